"""The noisy quadratic model, its sample grids and the grid check shared by the other modules of :mod:`sdebatch.sde`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..checks import choice as check_choice
from ..checks import int_at_least as check_int
from ..checks import positive_finite as check_positive

DTYPE = torch.float64

__all__ = ["NoisyQuadratic", "sample_grid", "noise_scale"]

def check_grid(samples: Any) -> torch.Tensor:
    """A 1-D, strictly increasing grid of non-negative sample counts, as float64."""
    try:
        n = torch.as_tensor(samples, dtype=DTYPE).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"samples must be a 1-D increasing sequence of non-negative sample counts, got {samples!r}") \
            from None
    if n.ndim != 1 or n.numel() == 0 or not torch.isfinite(n).all() or (n < 0).any() or (n.diff() <= 0).any():
        raise ValueError("samples must be a non-empty 1-D strictly increasing sequence of non-negative finite sample "
                         f"counts, got {samples!r}")
    return n


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class NoisyQuadratic:
    """The noisy quadratic model (float64).

    Loss L(theta) = 0.5 * sum_i h_i theta_i**2. The gradient of one sample is g = h * theta + xi with independent
    xi_i ~ N(0, s_i), so the mean gradient of a batch of B samples has noise variance s_i / B per coordinate.

    Args:
        curvature: h, shape (d,), each > 0 (the Hessian's eigenvalues; units of loss / theta**2).
        noise: s, per-sample gradient-noise variance per coordinate, each >= 0; a scalar or shape (d,).
        theta0: the start point, a scalar or shape (d,). Every run starts there (deterministically).
    """
    curvature: torch.Tensor
    noise: torch.Tensor
    theta0: torch.Tensor

    def __init__(self, curvature: Any, noise: Any, theta0: Any) -> None:
        h = _as_vector("curvature", curvature)
        if h.ndim != 1 or h.numel() == 0:
            raise ValueError(f"curvature must be a non-empty 1-D sequence (one h_i > 0 per coordinate), got shape "
                             f"{tuple(h.shape)}")
        if not (h > 0).all():
            raise ValueError(f"curvature must be > 0 everywhere, got {h.tolist()}")
        s = _broadcast("noise", noise, h)
        if not (s >= 0).all():
            raise ValueError(f"noise (per-sample variances) must be >= 0 everywhere, got {s.tolist()}")
        t = _broadcast("theta0", theta0, h)
        object.__setattr__(self, "curvature", h)
        object.__setattr__(self, "noise", s)
        object.__setattr__(self, "theta0", t)

    @property
    def dim(self) -> int:
        return self.curvature.numel()

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """0.5 * sum_i h_i theta_i**2 over the last axis."""
        return 0.5 * (self.curvature * theta.to(DTYPE) ** 2).sum(-1)


def _as_vector(name: str, value: Any) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=DTYPE).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number or a 1-D sequence of numbers, got {value!r}") from None
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return t


def _broadcast(name: str, value: Any, like: torch.Tensor) -> torch.Tensor:
    t = _as_vector(name, value)
    if t.ndim == 0:
        return t.expand_as(like).clone()
    if t.shape != like.shape:
        raise ValueError(f"{name} must be a scalar or have the shape of curvature {tuple(like.shape)}, "
                         f"got shape {tuple(t.shape)}")
    return t


def noise_scale(model: NoisyQuadratic, theta: Any = None) -> torch.Tensor:
    """The simple gradient noise scale B_simple = tr(Sigma) / |G|**2 = sum(s) / sum((h * theta)**2).

    McCandlish et al. 2018: batches well below it are noise dominated (where the SDE rules hold).

    Args:
        model: the :class:`NoisyQuadratic`.
        theta: point(s), shape (..., d); default ``model.theta0``.

    Returns:
        B_simple in samples, shape (...); inf where the gradient is zero.
    """
    th = model.theta0 if theta is None else torch.as_tensor(theta, dtype=DTYPE)
    if th.ndim == 0 or th.shape[-1] != model.dim:
        raise ValueError(f"theta must have last dimension d = {model.dim}, got shape {tuple(th.shape)}")
    g2 = ((model.curvature * th) ** 2).sum(-1)
    return model.noise.sum() / g2


def sample_grid(horizon: float, points: int = 64, *, multiple_of: int = 1, spacing: str = "linear") -> torch.Tensor:
    """A grid of sample counts in [0, horizon], each a multiple of ``multiple_of`` (the largest batch to compare,
    so that every run has just finished an update at each grid point), duplicates removed.

    Args:
        horizon: last sample count (rounded down to a multiple of ``multiple_of``).
        points: number of points before de-duplication (default 64).
        multiple_of: grid step unit in samples (default 1).
        spacing: "linear" (default, includes 0) or "log" (from ``multiple_of`` to the horizon).
    """
    check_positive("horizon", horizon)
    check_int("points", points, 2)
    check_int("multiple_of", multiple_of)
    check_choice("spacing", spacing, ("linear", "log"))
    top = math.floor(horizon / multiple_of)
    if top < 1:
        raise ValueError(f"horizon must be at least multiple_of = {multiple_of}, got {horizon!r}")
    if spacing == "linear":
        units = torch.linspace(0, top, points, dtype=DTYPE)
    else:
        units = torch.logspace(0, math.log10(top), points, dtype=DTYPE)
    return torch.unique(torch.round(units)) * multiple_of


def batches_per_grid(samples: torch.Tensor, batch: float) -> torch.Tensor:
    """Updates completed at each grid point by a run with ``batch`` samples per update: floor(n / B)."""
    return torch.floor(samples / batch + 1e-9)


def seq2(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of floats in [0, 1), got {value!r}") from None
    if not (0 <= a < 1 and 0 <= b < 1):
        raise ValueError(f"{name} must be a pair of floats in [0, 1), got {value!r}")
    return a, b
