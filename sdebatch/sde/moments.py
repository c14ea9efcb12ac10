"""Moments of SGD and Adam on the noisy quadratic, discrete and in the SDE limit, and the critical batch where they
part (see :mod:`sdebatch.sde` for the model and the equations)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..checks import choice as check_choice
from ..checks import int_at_least as check_int
from ..checks import positive_finite as check_positive
from ..utils import single_threaded
from .dynamics import Moments, integrate, linear_closed_form, moments, momentum_closed_form
from .model import DTYPE, NoisyQuadratic, batches_per_grid, check_grid

METHODS = ("ode", "closed_form")
PRECONDITIONERS = ("noise", "second_moment")
OPTIMIZERS = ("sgd", "adam")


def _check_model(model: Any) -> NoisyQuadratic:
    if not isinstance(model, NoisyQuadratic):
        raise ValueError(f"model must be a sdebatch.sde.NoisyQuadratic, got {type(model).__name__}")
    return model


# --- SGD ---------------------------------------------------------------------------------------------------------
@single_threaded
def sgd_discrete_moments(model: NoisyQuadratic, lr: float, batch_size: float, samples: Any) -> Moments:
    """The exact moments of discrete SGD (no momentum) on the noisy quadratic.

    The recursion m <- (1 - eta h) m, q <- (1 - eta h)**2 q + eta**2 s / B is summed in closed form (a geometric
    series), so it is exact to round-off for any number of updates.

    Args:
        model: the :class:`NoisyQuadratic`.
        lr: eta, the learning rate of each update (already rescaled, if a rule applies).
        batch_size: B, samples per update (> 0; need not be an integer here).
        samples: grid of sample counts (1-D, increasing, >= 0). At n the run has taken floor(n / B) updates.

    Returns:
        :class:`Moments` on the grid.
    """
    _check_model(model)
    eta, b, n = check_positive("lr", lr), check_positive("batch_size", batch_size), check_grid(samples)
    k = batches_per_grid(n, b)[:, None]
    x = eta * model.curvature
    one_minus_r = x * (2.0 - x)                                      # 1 - (1 - x)**2
    log_r = 2.0 * torch.where(x < 1, torch.log1p(-x.clamp(max=1.0)), torch.log((x - 1.0).abs()))
    k_log_r = torch.where(k == 0, torch.zeros_like(k * log_r), k * log_r)
    rk = torch.exp(k_log_r)
    geo = torch.where(one_minus_r == 0, k.expand_as(k_log_r), -torch.expm1(k_log_r) / one_minus_r)
    sign = torch.where((x > 1) & (torch.remainder(k, 2) == 1), -1.0, 1.0)
    m = sign * torch.exp(k_log_r / 2) * model.theta0
    q = rk * model.theta0 ** 2 + (eta ** 2 * model.noise / b) * geo
    return moments(model, n, m, q)


@single_threaded
def sgd_sde_moments(model: NoisyQuadratic, lr_over_batch: float, samples: Any, *, method: str = "ode",
                    rtol: float = 1e-10, atol: float = 1e-13) -> Moments:
    """The SDE limit of SGD in samples time: dm/dn = -a h m, dq/dn = -2 a h q + a**2 s, a = eta / B.

    Args:
        model: the :class:`NoisyQuadratic`.
        lr_over_batch: a = eta / B (per sample). The linear rule keeps it fixed across batch sizes.
        samples: grid of sample counts (1-D, increasing, >= 0).
        method: "ode" (default: torchdiffeq dopri5) or "closed_form"
            (q = a s / (2h) + (q0 - a s / (2h)) exp(-2 a h n)); the two agree to ~1e-9 relative.
        rtol: ODE relative tolerance; default 1e-10.
        atol: ODE absolute tolerance (on the per-coordinate normalised state); default 1e-13.

    Returns:
        :class:`Moments` on the grid.
    """
    _check_model(model)
    a = check_positive("lr_over_batch", lr_over_batch)
    n = check_grid(samples)
    check_choice("method", method, METHODS)
    a_vec = torch.full_like(model.curvature, a)
    if method == "closed_form":
        return linear_closed_form(model, a_vec, n)
    return integrate(model, lambda q: a_vec, 0.0, n, check_positive("rtol", rtol), check_positive("atol", atol))


# --- Adam --------------------------------------------------------------------------------------------------------
def _adam_rate(model: NoisyQuadratic, lr: float, b: float, eps: float,
               preconditioner: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample rate a_i(P) = lr / (B (sqrt(v_i) + eps)) with v_i = s_i / B (+ h_i**2 P_i)."""
    h2, s = model.curvature ** 2, model.noise
    if preconditioner == "noise":
        a = lr / (b * ((s / b).sqrt() + eps))
        return lambda p: a
    return lambda p: lr / (b * ((s / b + h2 * p).sqrt() + eps))


def _check_adam(model: NoisyQuadratic, lr: float, batch_size: float, beta1: float, eps: float,
                preconditioner: str) -> tuple[float, float, float, float]:
    _check_model(model)
    eta, b = check_positive("lr", lr), check_positive("batch_size", batch_size)
    vals = []
    for name, v, lo, hi in (("beta1", beta1, 0.0, 1.0), ("eps", eps, 0.0, math.inf)):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not (lo <= x < hi):
            raise ValueError(f"{name} must be a float in [{lo:g}, {hi:g}), got {v!r}")
        vals.append(x)
    check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    if vals[1] == 0 and not (model.noise > 0).all():
        raise ValueError("eps=0 needs noise > 0 in every coordinate (Adam divides by sqrt(v_i) ~ sigma_i / sqrt(B))")
    return eta, b, vals[0], vals[1]


def momentum_timescale(beta1: float, batch_size: float) -> float:
    """tau = -B / ln(beta1): the e-folding time of Adam's first moment in samples (0 for beta1 = 0). The exact
    rule beta1**kappa with B = kappa B0 keeps it fixed."""
    return 0.0 if beta1 == 0 else -batch_size / math.log(beta1)


@single_threaded
def adam_sde_moments(model: NoisyQuadratic, lr: float, batch_size: float, samples: Any, *, beta1: float = 0.9,
                     eps: float = 1e-8, preconditioner: str = "noise", bias_correction: bool = True,
                     method: str = "ode", rtol: float = 1e-10, atol: float = 1e-13) -> Moments:
    """SDE prediction of Adam's expected loss vs samples in the noise-dominated regime.

    Model (Malladi et al. 2022 with the preconditioner at its fixed point): Adam is momentum SGD with
    per-coordinate step eta / (sqrt(v_i) + eps), where v_i = E[g_i**2] of the mini-batch gradient. When the noise
    dominates (B well below the noise scale) v_i = s_i / B, so in samples time the rate
    a_i = eta / (sqrt(B) sigma_i + B eps) is fixed by the square-root rule (eta = sqrt(kappa) eta0, B = kappa B0,
    eps = eps0 / sqrt(kappa)). The first moment is an EMA of the gradient with time constant
    tau = -B / ln(beta1) samples, which beta1**kappa also keeps; it speeds the decay by about a h tau, a first-order
    effect (~10% at a h tau = 0.1), so it is kept:
        d theta = -a mu dn,   d mu = (h theta - mu) / tau dn + sigma / tau dW   (beta1 = 0: mu = the gradient).
    With ``bias_correction`` (default) mu is Adam's bias-corrected moment: 1 / tau becomes 1 / (tau (1 - e**(-n/tau))),
    so early on mu is the running mean of few gradients and their noise enters theta with a larger weight (the
    first update's ~3x for beta1 = 0.9). Near the noise floor that adds tens of % to the early loss.

    Assumptions (state them when you quote the curve):
      - v is deterministic and at s / B from the first update: its fluctuations (about
        sqrt(2 (1 - beta2) / (1 + beta2)) relative) and its own bias correction are ignored;
      - the discretisation (O(eta**2) per update) is ignored, as in any SDE; it grows with B (measured on
        tests/test_sde.py's model, B_simple(theta0) = 77: max deviation from the real Adam 1% at B = 1-4, 3% at 8,
        7% at 16, 14% at 32).

    Args:
        model: the :class:`NoisyQuadratic`; with eps=0 every s_i must be > 0.
        lr: eta of each update (already rescaled, if a rule applies).
        batch_size: B, samples per update.
        samples: grid of sample counts (1-D, increasing, >= 0).
        beta1: Adam's beta1 of each update, in [0, 1) (default 0.9); 0 drops the momentum.
        eps: Adam's eps of each update (default 1e-8, torch's default).
        preconditioner: "noise" (default, v = s / B: the SDE of the noise-dominated regime) or "second_moment"
            (v = s / B + h**2 E[theta**2], a mean-field extension that also follows a signal-dominated start).
        bias_correction: model the first moment's bias correction (default True; see above). False starts mu at
            h theta0 and keeps the equations linear.
        method: "ode" (default, torchdiffeq) or "closed_form" (matrix exponentials; needs preconditioner="noise"
            and, with momentum, bias_correction=False).
        rtol: ODE relative tolerance; default 1e-10.
        atol: ODE absolute tolerance (on the normalised state); default 1e-13.

    Returns:
        :class:`Moments` on the grid.
    """
    eta, b, b1, e = _check_adam(model, lr, batch_size, beta1, eps, preconditioner)
    n = check_grid(samples)
    check_choice("method", method, METHODS)
    rate, tau = _adam_rate(model, eta, b, e, preconditioner), momentum_timescale(b1, b)
    if method == "closed_form":
        if preconditioner != "noise" or (bias_correction and tau > 0):
            raise ValueError("method='closed_form' needs preconditioner='noise' and, with momentum, "
                             "bias_correction=False (the others make the equations nonlinear or time-dependent); "
                             f"got preconditioner={preconditioner!r}, bias_correction={bias_correction!r}. "
                             "Use method='ode'")
        a = rate(model.theta0)
        return linear_closed_form(model, a, n) if tau == 0 else momentum_closed_form(model, a, tau, n)
    return integrate(model, rate, tau, n, check_positive("rtol", rtol), check_positive("atol", atol),
                      bool(bias_correction))


@single_threaded
def adam_discrete_moments(model: NoisyQuadratic, lr: float, batch_size: float, samples: Any, *, beta1: float = 0.9,
                          eps: float = 1e-8, bias_correction: bool = True) -> Moments:
    """A deterministic (mean-field) approximation of discrete Adam, update by update.

    Per coordinate and update t, m <- beta1 m + (1 - beta1) g and theta <- theta - lr_i m / (1 - beta1**t) (without
    bias correction: m starts at h theta0 and is not divided), with lr_i = eta / (sqrt(v_i) + eps) and
    v_i = s_i / B + h_i**2 E[theta_i**2] (v at its fixed point for the current second moment). The means and second
    moments of (theta, m) are propagated exactly for that lr_i. It keeps the two effects that break the
    square-root rule, the finite step and the mean gradient entering v as B approaches the noise scale, and drops
    only the fluctuations of v (and v's own bias correction). Used by :func:`critical_batch`; Monte Carlo
    (:func:`simulate`) is the ground truth.

    Args: as :func:`adam_sde_moments` (lr, batch_size, beta1 and eps of each update). Returns :class:`Moments`.
    """
    eta, b, b1, e = _check_adam(model, lr, batch_size, beta1, eps, "second_moment")
    n = check_grid(samples)
    k_at = batches_per_grid(n, b).long().tolist()
    h, s = model.curvature.numpy(), model.noise.numpy()          # numpy: this loop runs once per update
    th, p = model.theta0.numpy().copy(), model.theta0.numpy() ** 2
    mu, r, q = (0 * h, 0 * h, 0 * h) if bias_correction else (h * th, h * p, h * h * p)
    ths, ps = [], []
    for k in range(k_at[-1] + 1):
        while len(ps) < len(k_at) and k_at[len(ps)] == k:
            ths.append(th)
            ps.append(p)
        if len(ps) == len(k_at):
            break
        lr_i = eta / (np.sqrt(s / b + h * h * p) + e)
        if bias_correction:
            lr_i = lr_i / (1.0 - b1 ** (k + 1))
        m00, m01, m10, m11 = 1.0 - lr_i * (1.0 - b1) * h, -lr_i * b1, (1.0 - b1) * h, b1
        e0, e1 = -lr_i * (1.0 - b1), 1.0 - b1                     # noise xi (variance s / B) enters as e * xi
        th, mu = m00 * th + m01 * mu, m10 * th + m11 * mu
        p, r, q = (m00 * m00 * p + 2 * m00 * m01 * r + m01 * m01 * q + e0 * e0 * s / b,
                   m00 * m10 * p + (m00 * m11 + m01 * m10) * r + m01 * m11 * q + e0 * e1 * s / b,
                   m10 * m10 * p + 2 * m10 * m11 * r + m11 * m11 * q + e1 * e1 * s / b)
    return moments(model, n, torch.from_numpy(np.stack(ths)), torch.from_numpy(np.stack(ps)))


# --- critical batch ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CriticalBatch:
    """Result of :func:`critical_batch`.

    Attributes:
        batch: the critical batch in samples (kappa * logical_batch_size); inf if no scanned kappa crossed, and
            kappa_min * logical_batch_size (an upper bound) if the first one already did.
        kappa: the critical kappa.
        kappas, deviations: the scanned kappas and the largest relative loss deviation from the SDE at each.
        noise_scale_start, noise_scale_end: B_simple = sum(s) / E|h theta|**2 along the SDE curve at n = 0 and at
            the horizon (E|G|**2 = sum h**2 q), for comparison.
    """
    batch: float
    kappa: float
    kappas: torch.Tensor
    deviations: torch.Tensor
    noise_scale_start: float
    noise_scale_end: float


@single_threaded
def critical_batch(model: NoisyQuadratic, lr: float, logical_batch_size: float, samples: float,
                   tolerance: float = 0.05, optimizer: str = "sgd", *, beta1: float = 0.9, eps: float = 1e-8,
                   kappa_min: float | None = None, kappa_max: float | None = None,
                   points_per_octave: int = 4) -> CriticalBatch:
    """The theoretical critical batch: the smallest batch at which the discrete run, rescaled by the rule from
    (lr, logical_batch_size), leaves the SDE curve by more than ``tolerance`` relative loss after some update
    within the horizon.

    "sgd": the exact recursion (:func:`sgd_discrete_moments`, lr = kappa * lr) against the SGD SDE with
    a = lr / logical_batch_size. "adam": the mean-field recursion (:func:`adam_discrete_moments`,
    lr = sqrt(kappa) * lr, beta1**kappa, eps / sqrt(kappa), with bias correction) against the noise-dominated Adam
    SDE with bias correction (:func:`adam_sde_moments`, integrated once on 4097 points and interpolated in log loss,
    error ~1e-5). An approximation: it reflects the discretisation and the mean gradient entering v, not the
    fluctuations of v. The deviation is compared after every update; kappa is scanned on a log grid and the crossing
    refined by bisection in log kappa (assuming one crossing between neighbouring scan points). Checked against
    Monte Carlo in tests/test_sde.py (the real Adam leaves the SDE by 5% between B_crit / 2 and 2 B_crit).

    Args:
        model: the :class:`NoisyQuadratic`.
        lr: reference learning rate, tuned at the logical batch.
        logical_batch_size: B_L in samples.
        samples: the horizon, in samples.
        tolerance: relative loss deviation that counts as "left the SDE" (default 0.05).
        optimizer: "sgd" (default) or "adam".
        beta1: Adam's reference beta1 (default 0.9).
        eps: Adam's reference eps (default 1e-8).
        kappa_min: start of the scan range; default 1 / B_L (a batch of one sample).
        kappa_max: end of the scan range; default horizon / B_L (one update).
        points_per_octave: scan resolution before bisection (default 4).

    Returns:
        :class:`CriticalBatch`.
    """
    _check_model(model)
    eta, bl, horizon = (check_positive("lr", lr), check_positive("logical_batch_size", logical_batch_size),
                        check_positive("samples", samples))
    tol = check_positive("tolerance", tolerance)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_int("points_per_octave", points_per_octave)
    lo = 1.0 / bl if kappa_min is None else check_positive("kappa_min", kappa_min)
    hi = horizon / bl if kappa_max is None else check_positive("kappa_max", kappa_max)
    if hi < lo or hi * bl > horizon:
        raise ValueError(f"need kappa_min <= kappa_max <= samples / logical_batch_size = {horizon / bl:g}; got "
                         f"kappa_min={lo:g}, kappa_max={hi:g}")
    if optimizer == "adam":
        _check_adam(model, eta, bl, beta1, eps, "noise")

    if optimizer == "sgd":
        ends = sgd_sde_moments(model, eta / bl, [0.0, horizon], method="closed_form").second_moment
    else:
        fine = torch.linspace(0.0, horizon, 4097, dtype=DTYPE)
        ref_fine = adam_sde_moments(model, eta, bl, fine, beta1=beta1, eps=eps)
        ends = ref_fine.second_moment[[0, -1]]
        log_fine = ref_fine.loss.log().numpy()

    def sde_loss(n: torch.Tensor) -> torch.Tensor:
        if optimizer == "sgd":
            return sgd_sde_moments(model, eta / bl, n, method="closed_form").loss
        return torch.from_numpy(np.exp(np.interp(n.numpy(), fine.numpy(), log_fine)))

    def deviation(k: float) -> float:
        b = k * bl
        n = torch.arange(1, math.floor(horizon / b + 1e-9) + 1, dtype=DTYPE) * b
        if optimizer == "sgd":
            disc = sgd_discrete_moments(model, k * eta, b, n).loss
        else:
            disc = adam_discrete_moments(model, math.sqrt(k) * eta, b, n, beta1=beta1 ** k,
                                         eps=eps / math.sqrt(k)).loss
        ref = sde_loss(n)
        dev = ((disc - ref).abs() / ref).max()
        return float(dev) if torch.isfinite(dev) else math.inf

    steps = max(1, math.ceil(points_per_octave * math.log2(hi / lo)))
    kappas = [lo * (hi / lo) ** (i / steps) for i in range(steps + 1)] if hi > lo else [lo]
    devs: list[float] = []
    found = math.inf
    for i, k in enumerate(kappas):
        devs.append(deviation(k))
        if devs[-1] > tol:
            if i == 0:
                found = k
            else:
                a, b = math.log(kappas[i - 1]), math.log(k)
                for _ in range(16):  # the bracket shrinks to 2**-16 of a scan step
                    mid = 0.5 * (a + b)
                    a, b = (a, mid) if deviation(math.exp(mid)) > tol else (mid, b)
                found = math.exp(b)
            break
    b_simple = model.noise.sum() / ((model.curvature ** 2) * ends).sum(-1)
    return CriticalBatch(found * bl, found, torch.tensor(kappas[:len(devs)], dtype=DTYPE),
                         torch.tensor(devs, dtype=DTYPE), float(b_simple[0]), float(b_simple[1]))
