"""The physical batch chosen for the hardware, never the logical one.

:func:`choose_physical_batch` runs a few real micro-steps at each candidate micro-batch, measures throughput (and, on
CUDA, peak memory from the allocator; an out-of-memory error is caught and ends the search), and picks the fastest
candidate that fits with a margin. :meth:`sdebatch.LogicalBatchOptimizer.configure_batch` then derives the
accumulation (or kappa), so the dynamics stay those of the logical batch:

    choice = sdebatch.choose_physical_batch(lambda b: train_micro_step(b), [4, 8, 16, 32, 64])
    print(choice.describe())
    opt.configure_batch(choice.physical_batch_size)

Under torch.distributed every rank measures and rank 0's choice is broadcast, so all ranks agree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from . import checks


@dataclass
class PhysicalBatchChoice:
    """The measured table (one dict per candidate: batch, throughput per second, peak memory, status) and the
    choice; ``unit`` is what throughput counts ("samples" or "tokens")."""

    physical_batch_size: int
    rows: list[dict] = field(default_factory=list)
    unit: str = "samples"
    margin: float = 0.1

    def describe(self) -> str:
        lines = [f"{'batch':>6} {self.unit + '/s':>14} {'peak MiB':>9}  status"]
        for r in self.rows:
            mem = f"{r['peak_bytes'] / 2 ** 20:9.0f}" if r.get("peak_bytes") is not None else f"{'-':>9}"
            rate = f"{r['throughput']:14,.0f}" if r.get("throughput") is not None else f"{'-':>14}"
            lines.append(f"{r['batch']:>6} {rate} {mem}  {r['status']}")
        lines.append(f"chosen: {self.physical_batch_size} per device (the fastest that fits with a "
                     f"{self.margin:.0%} memory margin); the logical batch is unchanged")
        return "\n".join(lines)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def choose_physical_batch(step: Callable[[int], float | None], candidates: Sequence[int], *, steps: int = 3,
                          warmup: int = 1, margin: float = 0.1, device: torch.device | str | None = None,
                          timer: Callable[[], float] = time.perf_counter,
                          memory: Callable[[], tuple[int | None, int | None]] | None = None) -> PhysicalBatchChoice:
    """Measure ``step`` at each candidate micro-batch and pick the fastest that fits.

    Args:
        step: ``step(b)`` runs one forward and backward of the real model on a micro-batch of ``b`` samples (and
            clears the gradients it made) and returns the tokens it processed, or None to count samples.
        candidates: micro-batch sizes (samples), tried from small to large; the search stops at the first
            out-of-memory error.
        steps: timed micro-steps per candidate (default 3), after ``warmup`` untimed ones (default 1).
        margin: fraction of the device memory kept free (default 0.1); CUDA only.
        device: default CUDA when available, else CPU (throughput only).
        timer: the clock (tests inject it; default: perf_counter with CUDA synchronisation).
        memory: ``memory() -> (peak bytes since the last call, total bytes)`` (tests inject it; default: the CUDA
            allocator's peak / the device's total).
    """
    cands = checks.candidates("candidates", candidates)
    for name, v, lo in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if memory is None and cuda:
        def memory() -> tuple[int | None, int | None]:
            peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return peak, torch.cuda.get_device_properties(device).total_memory
    sync = torch.cuda.synchronize if cuda else (lambda *a: None)
    rows, unit = [], "samples"
    for b in cands:
        row = {"batch": b, "throughput": None, "peak_bytes": None, "status": "ok"}
        rows.append(row)
        try:
            if memory is not None:
                memory()  # reset the peak
            for _ in range(warmup):
                step(b)
            sync()
            start, done = timer(), 0.0
            for _ in range(steps):
                tokens = step(b)
                if tokens is not None:
                    unit = "tokens"
                done += float(tokens) if tokens is not None else b
            sync()
            elapsed = timer() - start
        except Exception as e:  # noqa: BLE001 (out-of-memory is the one expected error)
            if not _is_oom(e):
                raise
            row["status"] = "out of memory"
            if cuda:
                torch.cuda.empty_cache()
            break
        row["throughput"] = done / max(elapsed, 1e-12)
        if memory is not None:
            peak, total = memory()
            row["peak_bytes"] = peak
            if peak is not None and total is not None and peak > (1 - margin) * total:
                row["status"] = f"over the {margin:.0%} margin"
    fits = [r for r in rows if r["status"] == "ok"]
    if not fits:
        raise RuntimeError(f"no candidate micro-batch fits: {[(r['batch'], r['status']) for r in rows]}")
    chosen = max(fits, key=lambda r: r["throughput"])["batch"]
    if dist.is_available() and dist.is_initialized():  # every rank measured; rank 0 decides for all
        box = [chosen]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
    return PhysicalBatchChoice(chosen, rows, unit, margin)
