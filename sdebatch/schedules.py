"""Learning-rate schedules whose time is samples or tokens seen, not optimizer steps.

Runs at different batch sizes take different numbers of updates for the same data; keyed to the clock, their
schedules agree as functions of samples. A multiplier function maps t (in the schedule's unit) to a factor of the
base lr; :class:`ClockSchedule` applies it to the reference lr before every update of a LogicalBatchOptimizer
(never per micro-step), so nobody calls ``scheduler.step()``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .checks import fraction, non_negative, positive_finite

Multiplier = Callable[[float], float]
UNITS = ("samples", "tokens")


def constant(warmup: float = 0.0) -> Multiplier:
    """1 after a linear warmup of ``warmup`` units (default 0: none)."""
    warmup = non_negative("warmup", warmup)
    return lambda t: min(1.0, t / warmup) if warmup > 0 else 1.0


def linear(total: float, *, warmup: float = 0.0, final: float = 0.0) -> Multiplier:
    """Linear warmup over ``warmup`` units, then linear decay to ``final`` (fraction of the base lr) at ``total``."""
    total, warmup, final = positive_finite("total", total), non_negative("warmup", warmup), fraction("final", final)
    if warmup > total:
        raise ValueError(f"warmup ({warmup:g}) must not exceed total ({total:g})")

    def f(t: float) -> float:
        if t < warmup:
            return t / warmup
        frac = min(1.0, (t - warmup) / max(total - warmup, 1e-300))
        return 1.0 - (1.0 - final) * frac
    return f


def warmup_cosine(total: float, *, warmup: float = 0.0, final: float = 0.0) -> Multiplier:
    """Linear warmup over ``warmup`` units, then cosine decay to ``final`` x base lr at ``total`` (then flat)."""
    total, warmup, final = positive_finite("total", total), non_negative("warmup", warmup), fraction("final", final)
    if warmup > total:
        raise ValueError(f"warmup ({warmup:g}) must not exceed total ({total:g})")

    def f(t: float) -> float:
        if t < warmup:
            return t / warmup
        frac = min(1.0, (t - warmup) / max(total - warmup, 1e-300))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def warmup_stable_decay(total: float, *, warmup: float = 0.0, decay: float = 0.2, final: float = 0.0) -> Multiplier:
    """Warmup-stable-decay (WSD): linear warmup, constant, then linear decay over the last ``decay`` fraction of
    ``total`` (default 0.2) to ``final`` x base lr."""
    total, warmup = positive_finite("total", total), non_negative("warmup", warmup)
    decay, final = fraction("decay", decay), fraction("final", final)
    start = total * (1.0 - decay)
    if warmup > start:
        raise ValueError(f"warmup ({warmup:g}) must end before the decay starts ({start:g})")

    def f(t: float) -> float:
        if t < warmup:
            return t / warmup
        if t < start or decay == 0.0:
            return 1.0
        return 1.0 - (1.0 - final) * min(1.0, (t - start) / (total - start))
    return f


class ClockSchedule:
    """Drive the reference lr of a LogicalBatchOptimizer from its sample or token clock.

    Args:
        optimizer: a :class:`sdebatch.LogicalBatchOptimizer`.
        multiplier: t -> factor of the base lr (e.g. :func:`warmup_cosine`), t in ``unit``.
        unit: "samples" (default) or "tokens" (micro-steps must then report ``num_tokens``).

    The base lr of each group is its lr when the schedule is made. Before each update, lr = base x
    multiplier(t) with t the clock *after* that update's window, so the first warmup update is not wasted and runs
    with any split of the same data get the same lr at the same sample count.
    """

    def __init__(self, optimizer, multiplier: Multiplier, unit: str = "samples") -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if not hasattr(optimizer, "register_pre_update_hook"):
            raise TypeError("optimizer must be a sdebatch.LogicalBatchOptimizer")
        if not callable(multiplier):
            raise TypeError("multiplier must be a function of t")
        self.optimizer, self.multiplier, self.unit = optimizer, multiplier, unit
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._set(optimizer.clock.get(unit))
        self._handle = optimizer.register_pre_update_hook(self._before_update)

    def _set(self, t: float) -> None:
        m = float(self.multiplier(t))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * m

    def _before_update(self, optimizer, window: dict) -> None:
        if self.unit == "tokens" and optimizer.clock.tokens_seen == 0 and window["tokens"] == 0:
            raise RuntimeError("ClockSchedule(unit='tokens') but no micro-step reported num_tokens; pass num_tokens to "
                               "opt.backward(...) or opt.step(...), or use unit='samples'")
        self._set(optimizer.clock.get(self.unit) + window[self.unit])

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def remove(self) -> None:
        self._handle.remove()

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "unit": self.unit}

    def load_state_dict(self, state: dict) -> None:
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError("state_dict has base lrs for a different number of param groups")
        self.base_lrs, self.unit = list(state["base_lrs"]), state["unit"]
        self._set(self.optimizer.clock.get(self.unit))


class PerUpdateScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A torch lr scheduler that steps only when the wrapper took an update: call ``step()`` after every
    ``opt.step()`` (once per micro-batch, as a plain loop or ``accelerate`` does) and the schedule advances once per
    update, whatever the accumulation. An ``LRScheduler`` itself, so ``accelerator.prepare`` treats it as it treats
    the scheduler it wraps. Made by :func:`per_update`; ``state_dict`` / ``load_state_dict`` / ``get_last_lr`` and
    every other attribute are the wrapped scheduler's.
    """

    def __init__(self, scheduler: Any, optimizer: Any) -> None:  # (LRScheduler.__init__ would step the scheduler)
        from .optimizer import unwrap

        self.__dict__["scheduler"] = scheduler
        self.__dict__["_logical"] = unwrap(optimizer)

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._logical.did_update:
            self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.load_state_dict(state_dict)

    def get_last_lr(self) -> list:
        return self.scheduler.get_last_lr()

    def __getattr__(self, name: str) -> Any:  # optimizer, last_epoch, base_lrs, total_steps, _step_count, ...
        return getattr(self.__dict__["scheduler"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["scheduler"], name, value)


def per_update(scheduler: Any, optimizer: Any) -> PerUpdateScheduler:
    """``scheduler`` (any torch lr scheduler on the inner optimizer or on the wrapper) stepped once per update of
    ``optimizer`` (a :class:`sdebatch.LogicalBatchOptimizer`, or a wrapper around one such as accelerate's
    ``AcceleratedOptimizer``): ``sched = sdebatch.per_update(LambdaLR(inner, f), opt)``, then ``sched.step()`` after
    every ``opt.step()``. A scheduler stepped per micro-batch would advance ``accumulation_steps`` times too fast."""
    if not hasattr(scheduler, "step"):
        raise TypeError(f"scheduler must be a torch lr scheduler, got {type(scheduler).__name__}")
    return PerUpdateScheduler(scheduler, optimizer)
