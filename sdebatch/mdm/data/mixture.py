"""A mixture sampler over named sources with mixing ratios: deterministic by seed, resumable, sharded across ranks.

The global stream is fixed by the seed: position k draws its source from the mixing ratios (one generator per block
of positions, so any position can be recomputed) and takes that source's next index; each source walks through its
own per-pass permutations. Rank r of W takes positions r, r + W, ... of the stream, so ranks are disjoint and
together complete, and the first W x b positions form the first global batch whatever the split. It yields keys
``(source, index)`` (with ``with_position``, ``(source, index, position)``: the global stream position, which keys
each sample's own random draws in training) for :class:`sdebatch.mdm.data.dataset.TriModalDataset` and has the
``epoch`` / ``start``
interface of :class:`sdebatch.data.ResumableSampler`, so :class:`sdebatch.data.ResumableDataLoader` resumes it.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ...data import ShardedMixin
from ..seeding import derive_seed

_BLOCK = 4096


class MixtureSampler(ShardedMixin, Sampler):
    """Args:
        sizes: source name -> number of items (positive).
        weights: source name -> mixing weight (non-negative, normalised); the same keys as ``sizes``.
        samples_per_epoch: global stream positions per epoch (all ranks together).
        seed: base seed (default 0).
        with_position: yield ``(source, index, position)`` with the global stream position (default False).
        num_replicas, rank: data-parallel layout; default from ``torch.distributed`` when iterated, else 1 and 0.
    """

    def __init__(self, sizes: dict[str, int], weights: dict[str, float], samples_per_epoch: int, *, seed: int = 0,
                 with_position: bool = False, num_replicas: int | None = None, rank: int | None = None) -> None:
        if set(sizes) != set(weights) or not sizes:
            raise ValueError(f"sizes and weights must name the same sources, got {sorted(sizes)} and {sorted(weights)}")
        if any(int(n) < 1 for n in sizes.values()):
            raise ValueError(f"every source needs at least one item, got sizes {sizes}")
        w = torch.tensor([float(weights[k]) for k in sorted(sizes)], dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.names = sorted(sizes)
        self.sizes = [int(sizes[k]) for k in self.names]
        self.probs = w / w.sum()
        self.samples_per_epoch, self.seed = int(samples_per_epoch), int(seed)
        self.with_position = bool(with_position)
        self._num_replicas, self._rank = num_replicas, rank
        self.epoch = 0
        self.start = 0  # this rank's positions already consumed in the current epoch
        self._perm: dict[int, list[int]] = {}
        self._perm_key: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self.samples_per_epoch // self.num_replicas

    def _sources(self, block: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, 0, block))
        return torch.multinomial(self.probs, _BLOCK, replacement=True, generator=g)

    def _index(self, source: int, j: int) -> int:
        """The j-th item (over all passes) of a source: pass j // n, one permutation per pass."""
        n = self.sizes[source]
        key = (source, j // n)
        if self._perm_key.get(source) != key:  # one cached permutation per source: the stream walks passes in order
            g = torch.Generator().manual_seed(derive_seed(self.seed, 1, source, j // n))
            self._perm[source] = torch.randperm(n, generator=g).tolist()
            self._perm_key[source] = key
        return self._perm[source][j % n]

    def stream(self, begin: int, end: int) -> list[tuple[str, int]]:
        """Global stream positions [begin, end) as (source, index) keys (epochs are consecutive stretches)."""
        counts = [0] * len(self.names)
        out = []
        pos = 0
        block = 0
        while pos < end:
            src = self._sources(block).tolist()
            for s in src:
                if pos >= end:
                    break
                if pos >= begin:
                    out.append((self.names[s], self._index(s, counts[s])))
                counts[s] += 1
                pos += 1
            block += 1
        return out

    def __iter__(self) -> Iterator[tuple[str, int]]:
        base = self.epoch * self.samples_per_epoch
        W, r = self.num_replicas, self.rank
        start, self.start = self.start, 0
        per_rank = len(self)
        keys = self.stream(base, base + per_rank * W)
        if self.with_position:
            keys = [(name, i, base + k) for k, (name, i) in enumerate(keys)]
        return iter(keys[r::W][start:])
