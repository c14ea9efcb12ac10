"""Batch-size schedules: the batch per update as a function of the sample or token clock.

    ramp = sdebatch.batch_schedule("0:64, 20M:128, 100M:256", unit="tokens")
    opt = sdebatch.LogicalBatchOptimizer(inner, logical_batch_size=64, physical_batch_size=32, batch_schedule=ramp)

From 0 tokens each update takes 64 samples, from 20M tokens 128, from 100M 256. The wrapper reaches each batch by
accumulation (exact: the update's gradient is the mean over all its samples) and, because it rescales every update
from the samples it actually consumed, applies the SDE rules at every update from the reference values of the
logical batch: lr, betas, eps, weight decay, the EMA, and Adam's bias correction through the product of the betas
used. A lr schedule on the same clock is untouched by a change of batch. To change the batch through the physical
batch instead (a loader whose batch grows), give the wrapper accumulation_steps=1 and size each loader batch with
``schedule(clock)``: the rules follow the samples counted.

Numbers take the suffixes K, M, G, T (10^3 ... 10^12); the first key must be 0 and keys must increase.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from .checks import choice

UNITS = ("samples", "tokens")
_SUFFIX = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)\s*$", re.IGNORECASE)


def _number(text: str) -> float:
    m = _NUMBER.match(text)
    if m is None:
        raise ValueError(f"{text.strip()!r} is not a number (digits with an optional K, M, G or T)")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


class BatchSchedule:
    """The batch per update (samples) at a point of the clock; call it with the clock's value.

    Build it with :func:`batch_schedule`. ``points`` (piecewise-constant schedules only): the (clock, batch) pairs
    where the batch changes, first at 0. ``unit``: "samples" or "tokens".
    """

    def __init__(self, fn: Callable[[float], int], unit: str, points: list[tuple[float, int]] | None = None) -> None:
        self._fn, self.unit, self.points = fn, unit, points

    def __call__(self, clock: float) -> int:
        batch = self._fn(clock)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch_schedule gave {batch!r} at {clock:g} {self.unit}: batches are positive ints")
        return batch

    def describe(self) -> str:
        """``64 from 0, 128 from 20M, 256 from 100M tokens`` (or the callable's name)."""
        if self.points is None:
            return f"{getattr(self._fn, '__name__', 'a function')} of the {self.unit} seen"
        return ", ".join(f"{b} from {_short(t)}" for t, b in self.points) + f" {self.unit}"

    def __repr__(self) -> str:
        return f"BatchSchedule({self.describe()})"


def _short(x: float) -> str:
    for suffix, scale in (("T", 10 ** 12), ("G", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if x >= scale and x % scale == 0:
            return f"{int(x // scale)}{suffix}"
    return f"{x:g}"


def batch_schedule(spec: str | Sequence[tuple[float, int]] | Callable[[float], int],
                   unit: str = "samples") -> BatchSchedule:
    """A batch schedule from ``"0:64, 20M:128"`` (clock:batch pairs), a list of (clock, batch) pairs, or a callable
    clock -> batch; ``unit``: "samples" (default) or "tokens". Invalid entries (a first key other than 0, keys that do
    not increase, a batch that is not a positive int) fail here, naming the entry."""
    choice("unit", unit, UNITS)
    if callable(spec) and not isinstance(spec, str):
        return BatchSchedule(spec, unit)
    if isinstance(spec, str):
        entries = [e for e in spec.split(",")]
        if not spec.strip():
            raise ValueError("batch_schedule is empty: give clock:batch pairs, e.g. '0:64, 20M:128'")
        pairs = []
        for i, entry in enumerate(entries, 1):
            key, colon, value = entry.partition(":")
            if not colon:
                raise ValueError(f"batch_schedule entry {i} ({entry.strip()!r}) is not clock:batch")
            try:
                pairs.append((_number(key), _number(value)))
            except ValueError as e:
                raise ValueError(f"batch_schedule entry {i} ({entry.strip()!r}): {e}") from None
        labels = [e.strip() for e in entries]
    else:
        pairs = [tuple(p) for p in spec]
        labels = [f"{p[0]}:{p[1]}" for p in pairs]
        if not pairs:
            raise ValueError("batch_schedule is empty: give (clock, batch) pairs")
    points = []
    for i, ((t, b), label) in enumerate(zip(pairs, labels), 1):
        where = f"batch_schedule entry {i} ({label!r})"
        if isinstance(b, bool) or float(b) != int(b) or int(b) < 1:
            raise ValueError(f"{where}: the batch must be a positive int (samples), got {b!r}")
        if i == 1 and t != 0:
            raise ValueError(f"{where}: the first entry must start at 0 {unit}")
        if points and not t > points[-1][0]:
            raise ValueError(f"{where}: clock values must increase, {t:g} follows {points[-1][0]:g}")
        points.append((float(t), int(b)))

    def piecewise(clock: float) -> int:
        batch = points[0][1]
        for t, b in points:
            if clock >= t:
                batch = b
        return batch

    return BatchSchedule(piecewise, unit, points)
