"""Argument checks shared by the library: each returns the value (converted) or raises one ValueError that names
the argument and the accepted values, before any state changes."""
from __future__ import annotations

import math
import numbers
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The vocabulary of the scaling rules (sdebatch.rules re-exports it): here, so that checking a rule's name needs no
# import of the rules.
FAMILIES = ("sgd", "adam", "none")
BETA_FORMS = ("exact", "linear")
MOMENTUM_MODES = ("fixed", "timescale")
WEIGHT_DECAY_FORMS = ("l2", "lr_coupled", "independent")


def _integer(value: Any) -> int | None:
    """``value`` as an int when it is an integer (int, numpy.int64, any numbers.Integral) and not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


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
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return v


def choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    """``value`` if it is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (int, numpy.int64, ...; not a bool) >= ``minimum``."""
    v = _integer(value)
    if v is None or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return v


def count(name: str, value: Any, *, allow_zero: bool = False) -> float | torch.Tensor:
    """A count of samples / tokens / items as a float, > 0 (or >= 0). A one-element real tensor is returned as a
    0-dim tensor on its device, unread (reading it would wait for the device): its value is checked where the update
    reads the window's counts, see :func:`check_read_counts`."""
    torch = sys.modules.get("torch")  # not imported here: without torch loaded no value can be a tensor
    if torch is not None and isinstance(value, torch.Tensor):
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


def batch_sizes(logical_batch_size: Any, **optional: Any) -> dict[str, int | None]:
    """``logical_batch_size`` a positive int; each of ``optional`` (physical_batch_size, accumulation_steps, budgets)
    a positive int or None. Integers of other types (numpy.int64, ...) are accepted; returns every value by name as
    an int (or None)."""
    out: dict[str, int | None] = {}
    for name, v in (("logical_batch_size", logical_batch_size), *optional.items()):
        if v is None and name != "logical_batch_size":
            out[name] = None
            continue
        out[name] = _integer(v)
        if out[name] is None or out[name] < 1:
            raise ValueError(f"{name} must be a positive int{' or None' if name != 'logical_batch_size' else ''}, "
                             f"got {v!r}")
    return out


def candidates(name: str, values: Any) -> list[int]:
    """A non-empty collection of positive ints (batch sizes; numpy integers too), as ints, sorted, duplicates
    removed."""
    try:
        given = list(values)
    except TypeError:
        given = []
    ints = [_integer(b) for b in given]
    if not ints or any(b is None or b < 1 for b in ints):
        raise ValueError(f"{name} must be positive ints (samples), got {values!r}")
    return sorted(set(ints))


def horizon_term(horizon: Any, reference_horizon: Any, gamma: Any) -> tuple[float, float | None, float | None]:
    """``gamma`` as a finite float, and with ``gamma != 0`` both horizons as positive finite floats (else None: the
    horizon term is off and the horizons are not used)."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        g = math.nan
    if not math.isfinite(g):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    if g == 0.0:
        return g, None, None
    if horizon is None or reference_horizon is None:
        raise ValueError("gamma != 0 needs both horizon and reference_horizon (positive numbers); "
                         f"got horizon={horizon!r}, reference_horizon={reference_horizon!r}")
    return g, positive_finite("horizon", horizon), positive_finite("reference_horizon", reference_horizon)


def wrapper_options(*, rule: Any = "auto", beta_form: Any = "exact", momentum_mode: Any = "fixed",
                    weight_decay_form: Any = None, horizon: Any = None, reference_horizon: Any = None,
                    gamma: Any = 0.0, max_grad_norm: Any = None, ema_rescale: Any = None,
                    noise_scale_decay: Any = 0.95, noise_scale_warn: Any = 1.0, noise_scale_every: Any = 1,
                    second_moment_rescale: Any = False) -> None:
    """The options of :class:`sdebatch.LogicalBatchOptimizer` that do not depend on the inner optimizer (shared with
    :class:`sdebatch.lightning.LogicalBatch`, which checks them before the optimizer exists)."""
    choice("rule", rule, ("auto",) + FAMILIES)
    choice("beta_form", beta_form, BETA_FORMS)
    choice("momentum_mode", momentum_mode, MOMENTUM_MODES)
    if weight_decay_form is not None:
        choice("weight_decay_form", weight_decay_form, WEIGHT_DECAY_FORMS)
    if max_grad_norm is not None:
        positive_finite("max_grad_norm", max_grad_norm)
    horizon_term(horizon, reference_horizon, gamma)
    if ema_rescale is not None and not isinstance(ema_rescale, bool):
        raise ValueError(f"ema_rescale must be True, False or None (follow rule), got {ema_rescale!r}")
    try:
        decay_ok = 0.0 <= float(noise_scale_decay) < 1.0
    except (TypeError, ValueError):
        decay_ok = False
    if not decay_ok:
        raise ValueError(f"noise_scale_decay must be in [0, 1), got {noise_scale_decay!r}")
    if noise_scale_warn is not None:
        positive_finite("noise_scale_warn", noise_scale_warn)
    int_at_least("noise_scale_every", noise_scale_every)
    if not isinstance(second_moment_rescale, bool):
        raise ValueError(f"second_moment_rescale must be True or False, got {second_moment_rescale!r}")


def reparameterization(physical: int, accumulation: int, world_size: int, logical: int, reparameterize: bool) -> None:
    """The one rule of the wrapper and the Lightning callback: a fixed batch per update above the logical batch
    changes the dynamics (kappa > 1), so it needs ``reparameterize=True``."""
    per_update = physical * accumulation * world_size
    if per_update > logical and not reparameterize:
        kappa = per_update / logical
        raise ValueError(
            f"{physical} per device x {accumulation} accumulation x {world_size} device(s) = {per_update} samples "
            f"per update exceeds logical_batch_size={logical}. Pass reparameterize=True to take updates of "
            f"{per_update} samples with kappa = {kappa:.4g} (the hyperparameters rescaled by the SDE rules, valid "
            "below the critical batch size), or use a physical batch that divides the logical batch "
            f"per device ({max(1, logical // world_size)}).")


def optimizer_options(options: dict, *, owned: dict[str, str], accepted: tuple[str, ...]) -> dict:
    """Keyword arguments for :class:`sdebatch.LogicalBatchOptimizer` given to an integration (the Lightning callback,
    the Hugging Face Trainer), checked before the optimizer exists: ``accepted`` are the wrapper's keyword
    arguments, ``owned`` those the integration sets itself (name -> what to use instead). Returns them unchanged."""
    for key in options:
        if key in owned:
            raise ValueError(f"{key}: set by the integration; use {owned[key]}")
        if key not in accepted:
            raise ValueError(f"unknown option {key!r}; the LogicalBatchOptimizer options are "
                             f"{', '.join(k for k in accepted if k not in owned)}")
    checks = {k: v for k, v in options.items() if k in _WRAPPER_OPTION_NAMES}
    wrapper_options(**checks)
    batch_sizes(1, accumulation_steps=options.get("accumulation_steps"))
    for key in ("reparameterize", "estimate_noise_scale"):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"{key} must be True or False, got {options[key]!r}")
    return dict(options)


_WRAPPER_OPTION_NAMES = ("rule", "beta_form", "momentum_mode", "weight_decay_form", "horizon", "reference_horizon",
                         "gamma", "max_grad_norm", "ema_rescale", "noise_scale_decay", "noise_scale_warn",
                         "noise_scale_every", "second_moment_rescale")
