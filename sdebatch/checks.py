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


def count(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A count of samples / tokens / items (a number or a 0-dim tensor, read back) as a float, > 0 (or >= 0)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
    return v
