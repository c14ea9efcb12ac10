"""Split physical batches into logical-sized chunks: the exact alternative to kappa > 1.

When the physical batch is larger than the logical one, one update per physical batch is the paper's
reparameterization (kappa > 1, valid below the critical batch). The exact alternative takes one update per
logical-sized chunk, in sequence. A remainder carries over into the next physical batch, so the chunks are exactly
the batches a run with physical = logical would see from the same sample stream.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def _size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _size(batch[0])
    raise TypeError(f"batch must be a tensor or a tuple/list/dict of tensors, got {type(batch).__name__}")


def _apply(batch: Any, fn) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _apply(v, fn) for k, v in batch.items()}
    return type(batch)(_apply(v, fn) for v in batch)


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return type(a)(_cat(x, y) for x, y in zip(a, b))


class LogicalChunker:
    """Yield chunks of exactly ``chunk_size`` samples from a stream of batches (dim 0 is the sample dim).

    Args:
        chunk_size: samples per chunk, usually the logical batch size (positive int).

    ``for chunk in chunker(batch): ...`` yields the full chunks; a remainder waits for the next batch.
    ``chunker.flush()`` yields what is left at the end of data (a short chunk) once.
    """

    def __init__(self, chunk_size: int) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._rest: Any = None

    def __call__(self, batch: Any) -> Iterator[Any]:
        if self._rest is not None:
            batch = _cat(self._rest, batch)
            self._rest = None
        n = _size(batch)
        start = 0
        while n - start >= self.chunk_size:
            yield _apply(batch, lambda t, s=start: t[s:s + self.chunk_size])
            start += self.chunk_size
        if start < n:
            self._rest = _apply(batch, lambda t: t[start:])

    def flush(self) -> Iterator[Any]:
        if self._rest is not None:
            rest, self._rest = self._rest, None
            yield rest
