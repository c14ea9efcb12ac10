"""Moment dynamics of the noisy quadratic's SDEs: closed forms and the torchdiffeq integrator used by
:mod:`sdebatch.sde`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchdiffeq import odeint

from .model import NoisyQuadratic

BIAS_START = 1e-6   # the bias-corrected momentum ODE starts at n0 = BIAS_START * tau (see integrate)


@dataclass(frozen=True)
class Moments:
    """Per-coordinate moments on a grid of sample counts.

    Attributes:
        samples: (N,) sample counts.
        mean: (N, d) E[theta].
        second_moment: (N, d) E[theta**2].
        loss: (N,) expected loss 0.5 * sum_i h_i E[theta_i**2].
    """
    samples: torch.Tensor
    mean: torch.Tensor
    second_moment: torch.Tensor
    loss: torch.Tensor


def moments(model: NoisyQuadratic, n: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> Moments:
    return Moments(n, m, q, 0.5 * (model.curvature * q).sum(-1))


def linear_closed_form(model: NoisyQuadratic, a: torch.Tensor, n: torch.Tensor) -> Moments:
    """dm/dn = -a h m, dq/dn = -2 a h q + a**2 s with constant per-coordinate a, solved exactly."""
    rate = a * model.curvature
    decay = torch.exp(-rate * n[:, None])
    q_inf = a * model.noise / (2.0 * model.curvature)
    m = model.theta0 * decay
    q = q_inf + (model.theta0 ** 2 - q_inf) * decay ** 2
    return moments(model, n, m, q)


def momentum_closed_form(model: NoisyQuadratic, a: torch.Tensor, tau: float, n: torch.Tensor) -> Moments:
    """The momentum SDE (see :func:`integrate`) with constant a, solved exactly with matrix exponentials:
    y(n) = y_inf + exp(L n) (y0 - y_inf) for the means (theta, mu) and the second moments (P, R, Q)."""
    h, s, t0 = model.curvature, model.noise, model.theta0
    z = torch.zeros_like(h)
    fm = torch.stack([torch.stack([z, -a]), torch.stack([h / tau, -z - 1.0 / tau])]).permute(2, 0, 1)   # (d, 2, 2)
    fs = torch.stack([torch.stack([z, -2.0 * a, z]), torch.stack([h / tau, -z - 1.0 / tau, -a]),
                      torch.stack([z, 2.0 * h / tau, -z - 2.0 / tau])]).permute(2, 0, 1)                # (d, 3, 3)
    c = torch.stack([z, z, s / tau ** 2], -1)
    s_inf = -torch.linalg.solve(fs, c).numpy()                           # (d, 3); the mean's fixed point is 0
    # step from grid point to grid point with exp(L dn), one matrix exponential per distinct gap (a regular grid
    # has one or two; gaps equal to 1e-12 of the largest count as equal, which moves n by at most that much)
    dn = torch.diff(n, prepend=n.new_zeros(1))
    unit = float(n[-1]) * 1e-12 if n[-1] > 0 else 1.0
    keys, which = torch.unique(torch.round(dn / unit), return_inverse=True)
    gaps = keys * unit
    em = torch.linalg.matrix_exp((fm[None] * gaps[:, None, None, None]).contiguous()).numpy()
    es = torch.linalg.matrix_exp((fs[None] * gaps[:, None, None, None]).contiguous()).numpy()
    x_m = torch.stack([t0, h * t0], -1).numpy()
    x_s = torch.stack([t0 ** 2, h * t0 ** 2, (h * t0) ** 2], -1).numpy() - s_inf
    means, secs = [], []
    for j in which.tolist():
        x_m, x_s = np.einsum("dij,dj->di", em[j], x_m), np.einsum("dij,dj->di", es[j], x_s)
        means.append(x_m[:, 0])
        secs.append(x_s[:, 0])
    mean = torch.from_numpy(np.stack(means))
    sec = torch.from_numpy(np.stack(secs) + s_inf[:, 0])
    return moments(model, n, mean, sec)


def integrate(model: NoisyQuadratic, rate: Callable[[torch.Tensor], torch.Tensor], tau: float, n: torch.Tensor,
              rtol: float, atol: float, bias_correction: bool = False) -> Moments:
    """Integrate the moment ODEs of the SDE with torchdiffeq (dopri5) from n = 0, theta(0) = theta0, mu(0) = h theta0.

    tau = 0: d theta = -a(P) (h theta dn + sigma dW), so d E[theta]/dn = -a h E[theta], dP/dn = -2 a h P + a**2 s.
    tau > 0 (momentum mu, an EMA of the gradient with time constant tau samples, rate k = 1 / tau):
        d theta = -a mu dn,  d mu = k (h theta - mu) dn + k sigma dW,
    whose second moments P = E theta**2, R = E theta mu, Q = E mu**2 follow
        dP = -2 a R,  dR = -a Q + k (h P - R),  dQ = 2 k (h R - Q) + k**2 s.
    bias_correction: mu is Adam's bias-corrected moment, the EMA divided by c(n) = 1 - exp(-n / tau); that is the
    same equations with k(n) = 1 / (tau c(n)) ~ 1 / n near 0 (mu is then the running mean of the gradient, with
    variance s / n). They are integrated from n0 = 1e-6 tau with Q(n0) = (h theta0)**2 + s / n0; the solution
    converges as n0 -> 0 (the excess noise of the first updates moves theta by a finite amount).
    a(P) = a_i may depend on P (Adam's mean-field preconditioner). The state is normalised per coordinate so that
    one scalar atol means the same relative accuracy everywhere.
    """
    h, s, t0 = model.curvature, model.noise, model.theta0
    d = model.dim
    one = torch.ones_like(h)
    sth = torch.where(t0.abs() > 0, t0.abs(), one)
    sp = torch.maximum(t0 ** 2, rate(t0 ** 2) * s / (2.0 * h))
    sp = torch.where(sp > 0, sp, one)
    n0 = BIAS_START * tau if (tau > 0 and bias_correction) else 0.0
    if tau > 0:
        scale = torch.cat([sth, h * sth, sp, h * sp, torch.maximum(h * h * sp, s / (2.0 * tau))])
        q0 = (h * t0) ** 2 + (s / n0 if n0 > 0 else 0.0)
        y0 = torch.cat([t0, h * t0, t0 ** 2, h * t0 ** 2, q0]) / scale
    else:
        scale = torch.cat([sth, sp])
        y0 = torch.cat([t0, t0 ** 2]) / scale

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y * scale
        if tau > 0:
            th, mu, p, r, q = x.split(d)
            a = rate(p)
            k = 1.0 / (tau * -torch.expm1(-t / tau)) if bias_correction else 1.0 / tau
            dx = [-a * mu, k * (h * th - mu), -2.0 * a * r, -a * q + k * (h * p - r), 2.0 * k * (h * r - q) + k * k * s]
        else:
            th, p = x.split(d)
            a = rate(p)
            dx = [-a * h * th, -2.0 * a * h * p + a * a * s]
        return torch.cat(dx) / scale

    later = n[n > n0]
    t = torch.cat([later.new_full((1,), n0), later])
    y = odeint(f, y0, t, rtol=rtol, atol=atol, method="dopri5")[1:] if later.numel() else y0[:0]
    y = torch.cat([y0.expand(n.numel() - later.numel(), -1), y])       # points at or before n0 hold the start
    x = y * scale
    return moments(model, n, x[:, :d], x[:, (2 if tau > 0 else 1) * d:][:, :d])
