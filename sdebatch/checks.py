"""Argument checks shared by the library: each returns the value (converted) or raises one ValueError that names
the argument and the accepted values, before any state changes."""
from __future__ import annotations

import math
from typing import Any

import torch


def positive_finite(name: str, value: Any) -> float:
    """``value`` as a float > 0 and finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def non_negative(name: str, value: Any) -> float:
    """``value`` as a float >= 0 and finite."""
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
    return v


def fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1]."""
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    return v


def choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    """``value`` if it is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def count(name: str, value: Any, *, allow_zero: bool = False) -> float | torch.Tensor:
    """A count of samples / tokens / items as a float, > 0 (or >= 0). A one-element real tensor is returned as a
    0-dim tensor on its device, unread (reading it would wait for the device): its value is checked where the update
    reads the window's counts, see :func:`check_read_counts`."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got a {value.dtype} tensor of "
                             f"shape {tuple(value.shape)}")
        return value.detach().reshape(())
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
    return v


def check_read_counts(**counts: float) -> None:
    """The window's counts once read at the update (tensor counts were not checked when given)."""
    for name, v in counts.items():
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"the window's {name} add up to {v!r}: counts given as tensors must be non-negative "
                             "and finite")


def batch_sizes(logical_batch_size: Any, **optional: Any) -> None:
    """``logical_batch_size`` a positive int; each of ``optional`` (physical_batch_size, accumulation_steps, budgets)
    a positive int or None."""
    for name, v in (("logical_batch_size", logical_batch_size), *optional.items()):
        if (v is not None or name == "logical_batch_size") and (isinstance(v, bool) or not isinstance(v, int)
                                                                or v < 1):
            raise ValueError(f"{name} must be a positive int{' or None' if name != 'logical_batch_size' else ''}, "
                             f"got {v!r}")


def candidates(name: str, values: Any) -> list[int]:
    """A non-empty collection of positive ints (batch sizes), sorted, duplicates removed."""
    try:
        out = sorted(set(values))
    except TypeError:
        out = []
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in out):
        raise ValueError(f"{name} must be positive ints (samples), got {values!r}")
    return out


def wrapper_options(*, rule: Any = "auto", beta_form: Any = "exact", momentum_mode: Any = "fixed",
                    weight_decay_form: Any = None, horizon: Any = None, reference_horizon: Any = None,
                    gamma: Any = 0.0, max_grad_norm: Any = None, ema_rescale: Any = None,
                    noise_scale_decay: Any = 0.95, noise_scale_warn: Any = 1.0, noise_scale_every: Any = 1,
                    second_moment_rescale: Any = False) -> None:
    """The options of :class:`sdebatch.LogicalBatchOptimizer` that do not depend on the inner optimizer (shared with
    :class:`sdebatch.lightning.LogicalBatch`, which checks them before the optimizer exists)."""
    from . import rules

    choice("rule", rule, ("auto",) + rules.FAMILIES)
    choice("beta_form", beta_form, rules.BETA_FORMS)
    choice("momentum_mode", momentum_mode, rules.MOMENTUM_MODES)
    if weight_decay_form is not None:
        choice("weight_decay_form", weight_decay_form, rules.WEIGHT_DECAY_FORMS)
    if max_grad_norm is not None:
        positive_finite("max_grad_norm", max_grad_norm)
    rules.kappa(1, 1, horizon=horizon, reference_horizon=reference_horizon, gamma=gamma)  # validates the horizon
    if ema_rescale is not None and not isinstance(ema_rescale, bool):
        raise ValueError(f"ema_rescale must be True, False or None (follow rule), got {ema_rescale!r}")
    if not 0.0 <= float(noise_scale_decay) < 1.0:
        raise ValueError(f"noise_scale_decay must be in [0, 1), got {noise_scale_decay!r}")
    if noise_scale_warn is not None:
        positive_finite("noise_scale_warn", noise_scale_warn)
    int_at_least("noise_scale_every", noise_scale_every)
    if not isinstance(second_moment_rescale, bool):
        raise ValueError(f"second_moment_rescale must be True or False, got {second_moment_rescale!r}")
