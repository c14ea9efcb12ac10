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

    def check_reachable(self, per_pass: int) -> None:
        """Every batch of a piecewise schedule is reachable by accumulation: a multiple of ``per_pass`` (physical x
        world size); a callable schedule is checked at each window instead."""
        for t, b in self.points or []:
            if b % per_pass:
                raise ValueError(f"batch_schedule: {b} samples per update from {t:g} {self.unit} is not a multiple "
                                 f"of physical x world size = {per_pass}")

    def accumulation(self, clock, physical_batch_size: int, world_size: int) -> int:
        """Micro-steps per rank for the window starting at ``clock`` (a :class:`sdebatch.Clock`)."""
        batch = self(clock.tokens_seen if self.unit == "tokens" else clock.samples_seen)
        per_pass = physical_batch_size * world_size
        if batch % per_pass:
            raise ValueError(f"batch_schedule asks {batch} samples per update at {clock.samples_seen} samples / "
                             f"{clock.tokens_seen} tokens: not a multiple of physical {physical_batch_size} x world "
                             f"size {world_size}")
        return batch // per_pass

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


# ---------------------------------------------------------------- presets

def megatron_ramp(start: int, increment: int, ramp_samples: int, global_batch_size: int) -> BatchSchedule:
    """Megatron-LM's ``--rampup-batch-size start increment ramp_samples`` (global batch ``global_batch_size``): the
    batch starts at ``start`` and grows by ``increment`` in equal steps of samples until ``global_batch_size`` is
    reached after ``ramp_samples`` samples. Megatron changes no hyperparameter with it; here the rules follow."""
    for name, v in (("start", start), ("increment", increment), ("ramp_samples", ramp_samples),
                    ("global_batch_size", global_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if global_batch_size < start or (global_batch_size - start) % increment:
        raise ValueError(f"global_batch_size - start must be a non-negative multiple of increment, got "
                         f"{global_batch_size} - {start} and {increment}")
    steps = (global_batch_size - start) // increment
    per_step = ramp_samples / steps if steps else 0.0
    return batch_schedule([(i * per_step, start + i * increment) for i in range(steps + 1)], "samples")


def seesaw(lr_schedule: Callable[[float], float], logical_batch_size: int, max_batch_size: int, total: float,
           unit: str = "samples", *, tolerance: float = 1e-6) -> BatchSchedule:
    """Seesaw (arXiv 2510.14717): where the lr schedule would halve the lr, double the batch instead. Keep
    ``lr_schedule`` as the reference schedule and give the wrapper this batch schedule: at the k-th point where the
    schedule has fallen to 2**-k of its peak the batch becomes ``logical_batch_size * 2**k`` (capped at
    ``max_batch_size``), and the wrapper's rule turns the halving into lr / sqrt 2 under Adam's square-root rule (a
    constant effective lr under SGD's linear rule), which is Seesaw's update.

    Args:
        lr_schedule: the lr multiplier of the clock (e.g. :func:`sdebatch.warmup_cosine`), peak 1 after warmup.
        logical_batch_size: the batch of the reference hyperparameters (the first batch).
        max_batch_size: the cap (samples); doublings beyond it are dropped (the lr then decays as scheduled).
        total: the clock's horizon; crossings are looked for in [peak, total].
        unit: "samples" or "tokens" (the clock of ``lr_schedule``).
        tolerance: relative precision of each crossing point (bisection).
    """
    choice("unit", unit, UNITS)
    if max_batch_size < logical_batch_size:
        raise ValueError(f"max_batch_size ({max_batch_size}) must be >= logical_batch_size ({logical_batch_size})")
    grid = [total * i / 4096 for i in range(4097)]
    values = [lr_schedule(t) for t in grid]
    peak_i = max(range(len(values)), key=lambda i: (values[i], -i))
    peak = values[peak_i]
    points, k = [(0.0, logical_batch_size)], 1
    while logical_batch_size * 2 ** k <= max_batch_size:
        level = peak * 2.0 ** -k
        i = next((j for j in range(peak_i, len(grid)) if values[j] <= level), None)
        if i is None:
            break
        lo, hi = grid[i - 1], grid[i]  # the crossing, to tolerance (the schedule falls after its peak)
        while hi - lo > tolerance * max(total, 1.0):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if lr_schedule(mid) > level else (lo, mid)
        points.append((hi, logical_batch_size * 2 ** k))
        k += 1
    return batch_schedule(points, unit)


class CriticalBatchWarmup(BatchSchedule):
    """Grow the batch while it stays below ``fraction`` x the critical batch, estimated online (Merrill et al. 2025:
    the critical batch starts near 0 and grows): at each window the batch becomes the largest multiple of the
    physical pass (physical x world size) not above ``fraction`` x the lower 2-standard-error bound of B_simple from
    the wrapper's noise-scale estimator (``estimate_noise_scale=True``: ``value - 2 value_se``), never smaller than
    before, at most ``max_batch_size``. Until the estimator has a value and an error the batch stays at ``start``.
    Built by :func:`critical_batch_warmup`; the wrapper attaches itself."""

    def __init__(self, start: int, max_batch_size: int, fraction: float, unit: str) -> None:
        super().__init__(self._next, unit)
        self.start, self.max_batch_size, self.fraction = start, max_batch_size, fraction
        self.current = start
        self._opt = None

    def attach(self, optimizer) -> None:
        if getattr(optimizer, "noise_scale_estimator", None) is None:
            raise ValueError("critical_batch_warmup needs the wrapper's noise-scale estimator: pass "
                             "estimate_noise_scale=True")
        self._opt = optimizer

    def check_reachable(self, per_pass: int) -> None:
        """The batch grows in multiples of the physical pass (physical x world size): ``start`` and the cap must be
        multiples too, else the run would stop at the window that reaches them."""
        for name, b in (("start", self.start), ("max_batch_size", self.max_batch_size)):
            if b % per_pass:
                below, above = b // per_pass * per_pass, (b // per_pass + 1) * per_pass
                nearest = f"{below} or {above}" if below else f"{above}"
                raise ValueError(f"critical_batch_warmup: {name}={b} is not a multiple of physical x world size = "
                                 f"{per_pass}; the nearest valid {name}: {nearest}")

    def _next(self, clock: float) -> int:
        opt = self._opt
        estimator = None if opt is None else opt.noise_scale_estimator
        value = None if estimator is None else estimator.value
        se = None if estimator is None else estimator.value_se
        if value is None or se is None:
            return self.current
        # act on what the estimate is sure of: its lower 2-se bound (a noisy early estimate does not jump the batch)
        step = opt.physical_batch_size * opt.world_size
        target = int(self.fraction * max(value - 2 * se, 0.0) // step) * step
        self.current = max(self.current, min(self.max_batch_size, target))
        return self.current

    def describe(self) -> str:
        return (f"{self.start} growing to {self.fraction:g} x B_simple (online), at most {self.max_batch_size}; "
                f"now {self.current}")

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = int(state["current"])


def critical_batch_warmup(start: int, max_batch_size: int, fraction: float = 0.5,
                          unit: str = "samples") -> CriticalBatchWarmup:
    """A batch warmup that follows the online critical-batch estimate; see :class:`CriticalBatchWarmup`.

    Args:
        start: the first batch (samples), a multiple of physical x world size.
        max_batch_size: the cap (samples).
        fraction: the batch is kept at or below this multiple of B_simple (default 0.5).
        unit: the clock the wrapper reads ("samples" default, or "tokens"); the estimate, not the clock, drives it.
    """
    choice("unit", unit, UNITS)
    for name, v in (("start", start), ("max_batch_size", max_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (samples), got {v!r}")
    if max_batch_size < start:
        raise ValueError(f"max_batch_size ({max_batch_size}) must be >= start ({start})")
    if not 0 < fraction <= 1e3:
        raise ValueError(f"fraction must be in (0, 1000], got {fraction!r}")
    return CriticalBatchWarmup(start, max_batch_size, float(fraction), unit)
