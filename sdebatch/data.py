"""A deterministic, rank-sharded, resumable sample order, so a run stopped mid-epoch resumes on the same data.

Exact resume needs the data order as much as the optimizer state: a run resumed from a checkpoint taken in the
middle of an epoch must see the remaining batches of that epoch, in the same order. :class:`ResumableSampler`
shards one seeded permutation per epoch across data-parallel ranks (like ``DistributedSampler``) and can start
part-way; :class:`ResumableDataLoader` counts the batches it handed out and implements ``state_dict`` /
``load_state_dict``, which Lightning (>= 2.1) saves with the loops and restores before iterating.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


class ShardedMixin:
    """The extension point for resumable, sharded samplers (``ResumableSampler`` here; the MDM's
    ``MixtureSampler`` is another): a subclass sets ``_num_replicas`` / ``_rank`` (None: read from
    ``torch.distributed`` when used, not when made, since a loader is often built before the process group exists)
    and keeps ``epoch`` and ``start`` (the position to resume from within the epoch), which :meth:`set_epoch` and
    :class:`ResumableDataLoader`'s state drive. Its ``__iter__`` yields this rank's share of the epoch from
    ``start`` on."""

    _num_replicas: int | None = None
    _rank: int | None = None

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        """A new epoch starts at its beginning; the same epoch keeps a resume point."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch


class ResumableSampler(ShardedMixin, Sampler[int]):
    """One permutation per epoch (seeded by ``seed + epoch``), sharded across ranks, resumable mid-epoch.

    Args:
        data_source_len: number of samples in the dataset.
        shuffle: shuffle each epoch (default True); False keeps dataset order.
        seed: base seed (default 0); the same on every rank.
        num_replicas: data-parallel world size. Default: from ``torch.distributed`` when the sampler is iterated
            (so a loader made before the process group exists still shards), else 1.
        rank: this rank. Default: likewise from ``torch.distributed``, else 0.
        drop_last: drop the tail that does not divide evenly across ranks (default False: pad by repeating the
            first indices, as ``DistributedSampler`` does, so every rank has the same count).

    Rank r takes positions r, r + W, r + 2W, ... of the epoch's order, so the first W x b samples of the order
    form the first global batch whatever the split across ranks.
    """

    def __init__(self, data_source_len: int, *, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, drop_last: bool = False) -> None:
        if isinstance(data_source_len, bool) or not isinstance(data_source_len, int) or data_source_len < 1:
            raise ValueError(f"data_source_len must be a positive int, got {data_source_len!r}")
        if num_replicas is not None and rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self._num_replicas, self._rank = num_replicas, rank
        self.n, self.shuffle, self.seed, self.drop_last = data_source_len, shuffle, seed, drop_last
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed in this epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.num_replicas
        return -(-self.n // self.num_replicas)

    def order(self, epoch: int) -> list[int]:
        """The global order of ``epoch`` (before sharding)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = len(self) * self.num_replicas
        if total > self.n:
            idx += idx[: total - self.n]
        return idx[:total]

    def __iter__(self) -> Iterator[int]:
        mine = self.order(self.epoch)[self.rank::self.num_replicas]
        start, self.start = self.start, 0  # a resume point applies to one iteration
        return iter(mine[start:])

class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that remembers how many batches it handed out.

    Takes the ``DataLoader`` arguments; ``sampler`` must be resumable like :class:`ResumableSampler` (``shuffle`` and
    ``batch_sampler`` are not accepted). With Lightning, pass ``use_distributed_sampler=False`` to the Trainer so the
    sampler (which shards itself) is kept, and add :class:`sdebatch.lightning.LogicalBatch`, which records the batches
    actually trained on (Lightning fetches one batch ahead).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, *, sampler: Sampler, **kwargs: Any) -> None:
        if not all(hasattr(sampler, a) for a in ("epoch", "start", "set_epoch")):
            raise TypeError(f"sampler must be resumable (a ResumableSampler, a MixtureSampler, or any sampler with "
                            f"epoch, start and set_epoch), got {type(sampler).__name__}")
        for bad in ("shuffle", "batch_sampler"):
            if kwargs.get(bad):
                raise ValueError(f"ResumableDataLoader does not take {bad}= (the ResumableSampler decides the order)")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_yielded = 0
        self._resume_batches = 0
        self._resume_geometry: tuple[int, int] | None = None  # (batch size, ranks) the resume point was saved with

    def resume_batches(self) -> int:
        """Batches (of this loader's size and rank count) the next iteration skips: the saved position, converted
        to this geometry when the checkpoint had another batch size or rank count (elastic resume)."""
        skip, geometry = self._resume_batches, self._resume_geometry
        if geometry is None or geometry == (self.batch_size, self.sampler.num_replicas):
            return skip
        consumed = skip * geometry[0] * geometry[1]
        per_pass = self.batch_size * self.sampler.num_replicas
        if consumed % per_pass:
            raise ValueError(f"resuming at sample {consumed} of the epoch with {self.sampler.num_replicas} rank(s) x "
                             f"batch {self.batch_size}: not a whole number of batches; pick a batch size and rank "
                             "count whose product divides it")
        return consumed // per_pass

    def __iter__(self) -> Iterator[Any]:
        skip = self.resume_batches()  # the same position in samples of the epoch's order, in this batch / rank split
        self._resume_batches, self._resume_geometry = 0, None
        self.sampler.start = skip * self.batch_size
        self.batches_yielded = skip
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict:
        """The epoch and the batches handed out in it, with the batch size and rank count that position is in (a
        loader with another batch size or rank count resumes at the same sample)."""
        return {"epoch": self.sampler.epoch, "batches": self.batches_yielded, "batch_size": self.batch_size,
                "num_replicas": self.sampler.num_replicas, "sdebatch_resumable": True}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state or "batches" not in state:
            raise ValueError("ResumableDataLoader state must have 'epoch' and 'batches'")
        self.sampler.epoch = int(state["epoch"])
        self._resume_batches = int(state["batches"])
        if "batch_size" in state and "num_replicas" in state:
            self._resume_geometry = (int(state["batch_size"]), int(state["num_replicas"]))
