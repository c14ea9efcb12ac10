"""Monte Carlo of the real discrete optimizers on the noisy quadratic, through :class:`sdebatch.LogicalBatchOptimizer`.

Replicas ("seeds") are vectorised: theta has shape (seeds, d) and the loss is summed over replicas, so each
replica's gradient is its own (exact for SGD, and for Adam, which is elementwise). The per-sample noise comes from
one stream of samples per replica, drawn in fixed chunks, so runs with different batch sizes consume the *same*
samples (common random numbers): differences between batch sizes then have far less noise than each curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..batch_schedules import BatchSchedule
from ..checks import choice as check_choice
from ..checks import int_at_least as check_int
from ..checks import positive_finite as check_positive
from ..optimizer import LogicalBatchOptimizer
from ..rules import BETA_FORMS
from ..utils import single_threaded
from .model import DTYPE, NoisyQuadratic, check_grid, seq2

__all__ = ["Simulation", "simulate"]

RULES = ("auto", "none", "lr_only")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Simulation:
    """Monte Carlo result on a grid of sample counts.

    Attributes:
        samples: (N,) sample counts; at n each replica has taken floor(n / batch_size) updates.
        loss_mean: (N,) mean over replicas of the exact loss 0.5 * sum h theta**2.
        loss_se: (N,) its standard error (std over replicas / sqrt(seeds)).
        losses: (seeds, N) the per-replica losses (for paired comparisons between runs with the same stream).
        kappa: the wrapper's kappa = batch_size / logical_batch_size (under a batch schedule: of the last window).
        updates: (N,) updates taken at each grid point.
    """
    samples: torch.Tensor
    loss_mean: torch.Tensor
    loss_se: torch.Tensor
    losses: torch.Tensor
    kappa: float
    updates: torch.Tensor | None = None


class _NoiseStream:
    """Per-sample noise xi ~ N(0, s), shape (samples, seeds, d), drawn in chunks of ``chunk`` samples so the
    sequence does not depend on how it is consumed."""

    def __init__(self, sigma: torch.Tensor, seeds: int, seed: int, chunk: int) -> None:
        self.sigma, self.seeds, self.chunk = sigma, seeds, chunk
        self.gen = torch.Generator().manual_seed(seed)
        self.buf = torch.empty(0, seeds, sigma.numel(), dtype=DTYPE)

    def take(self, b: int) -> torch.Tensor:
        parts = [self.buf]
        have = self.buf.shape[0]
        while have < b:
            parts.append(torch.randn(self.chunk, self.seeds, self.sigma.numel(), generator=self.gen, dtype=DTYPE)
                         * self.sigma)
            have += self.chunk
        buf = torch.cat(parts) if len(parts) > 1 else self.buf
        out, self.buf = buf[:b], buf[b:]
        return out


def simulate(model: NoisyQuadratic, optimizer: str, lr: float, logical_batch_size: int, batch_size: int,
             samples: Any, rule: str = "auto", seeds: int = 1000, *, seed: int = 0, beta_form: str = "exact",
             betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, chunk: int = 64,
             lr_schedule: Callable[[float], float] | None = None, batch_schedule: BatchSchedule | None = None,
             second_moment_rescale: bool = False) -> Simulation:
    """Run torch.optim.SGD or Adam wrapped in ``LogicalBatchOptimizer`` on the noisy quadratic, many replicas at once.

    Each update draws B = ``batch_size`` per-sample noises xi_j ~ N(0, s) per replica and back-propagates the real
    per-sample loss mean_j [0.5 sum_i h_i theta_i**2 + xi_j . theta] (gradient h theta + mean_j xi_j). The wrapper
    is built as ``LogicalBatchOptimizer(inner, logical_batch_size, physical_batch_size=batch_size,
    accumulation_steps=1, rule=rule, beta_form=beta_form)``, so kappa = batch_size / logical_batch_size and
    ``lr`` (and betas, eps) are the reference values at the logical batch. With ``batch_schedule`` the wrapper
    takes it instead of ``accumulation_steps=1``: each update accumulates micro-batches of ``batch_size``.

    Args:
        model: the :class:`NoisyQuadratic`; every replica starts at ``model.theta0``.
        optimizer: "sgd" (torch.optim.SGD, no momentum) or "adam" (torch.optim.Adam, amsgrad off).
        lr: reference learning rate (at the logical batch).
        logical_batch_size: B_L, samples (positive int).
        batch_size: B, samples per update (positive int).
        samples: grid of sample counts (1-D, increasing, >= 0); the run lasts floor(max / B) updates.
        rule: "auto" (the optimizer's rule: linear for SGD, square root for Adam), "none" (the naive baseline:
            reference values used at any batch, the Megatron way under a ramp) or "lr_only" (the lr alone follows the
            rule, x kappa for SGD, x sqrt(kappa) for Adam; betas and eps stay: the OLMo-core way).
        seeds: number of independent replicas (default 1000).
        seed: seed of the noise stream (default 0); equal seeds give runs that see the same samples.
        beta_form: "exact" (beta**kappa, default) or "linear" (1 - kappa (1 - beta)); Adam only.
        betas: Adam's reference betas (default (0.9, 0.999)).
        eps: Adam's reference eps (default 1e-8).
        chunk: samples per drawn chunk of the noise stream (default 64); part of the stream's definition.
        lr_schedule: multiplier of the samples seen (e.g. :func:`sdebatch.warmup_cosine`) applied to ``lr`` before
            every update. Default None (constant).
        batch_schedule: a :func:`sdebatch.batch_schedule` in samples (or :func:`sdebatch.critical_batch_warmup`,
            which turns on the wrapper's noise-scale estimator), reached by accumulating micro-batches of
            ``batch_size``. Default None: every update takes ``batch_size`` samples.
        second_moment_rescale: the wrapper's option (Adam's v <- v B_old / B_new at a change of batch).

    Returns:
        :class:`Simulation`.
    """
    if not isinstance(model, NoisyQuadratic):
        raise ValueError(f"model must be a sdebatch.sde.NoisyQuadratic, got {type(model).__name__}")
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("rule", rule, RULES)
    check_choice("beta_form", beta_form, BETA_FORMS)
    eta = check_positive("lr", lr)
    bl, b = check_int("logical_batch_size", logical_batch_size), check_int("batch_size", batch_size)
    n = check_grid(samples)
    check_int("seeds", seeds)
    check_int("seed", seed, 0)
    check_int("chunk", chunk)
    betas = seq2(betas, "betas")
    eps = check_positive("eps", eps)
    if lr_schedule is not None and not callable(lr_schedule):
        raise ValueError(f"lr_schedule must be a callable of the samples seen, got {type(lr_schedule).__name__}")
    if batch_schedule is not None and not isinstance(batch_schedule, BatchSchedule):
        raise ValueError(f"batch_schedule must come from sdebatch.batch_schedule(...), got "
                         f"{type(batch_schedule).__name__}")
    if batch_schedule is not None and batch_schedule.unit != "samples":
        raise ValueError(f"batch_schedule must be in samples here (the quadratic has no tokens), got "
                         f"{batch_schedule.unit!r}")

    return _run(model, optimizer, eta, bl, b, n, rule, seeds, seed, beta_form, betas, eps, chunk, lr_schedule,
                batch_schedule, second_moment_rescale)


@single_threaded
def _run(model: NoisyQuadratic, optimizer: str, eta: float, bl: int, b: int, n: torch.Tensor, rule: str, seeds: int,
         seed: int, beta_form: str, betas: tuple[float, float], eps: float, chunk: int,
         lr_schedule: Callable[[float], float] | None, batch_schedule: BatchSchedule | None,
         second_moment_rescale: bool) -> Simulation:
    theta = model.theta0.expand(seeds, model.dim).clone().requires_grad_(True)
    inner = (torch.optim.SGD([theta], lr=eta) if optimizer == "sgd"
             else torch.optim.Adam([theta], lr=eta, betas=betas, eps=eps))
    opt = LogicalBatchOptimizer(
        inner, bl, physical_batch_size=b, accumulation_steps=None if batch_schedule is not None else 1,
        reparameterize=batch_schedule is None,
        rule="none" if rule == "lr_only" else rule, beta_form=beta_form, batch_schedule=batch_schedule,
        estimate_noise_scale=hasattr(batch_schedule, "attach"), noise_scale_warn=None,
        second_moment_rescale=second_moment_rescale)
    if lr_schedule is not None or rule == "lr_only":
        power = (1.0 if optimizer == "sgd" else 0.5) if rule == "lr_only" else 0.0

        def set_lr(o: LogicalBatchOptimizer, window: dict) -> None:  # the reference lr of this update
            m = lr_schedule(o.samples_seen) if lr_schedule is not None else 1.0
            for group in o.param_groups:
                group["lr"] = eta * m * window["kappa"] ** power
        opt.register_pre_update_hook(set_lr)
    stream = _NoiseStream(model.noise.sqrt(), seeds, seed, chunk)
    h = model.curvature
    grid = n.tolist()
    out = torch.empty(seeds, n.numel(), dtype=DTYPE)
    updates = torch.empty(n.numel(), dtype=torch.long)
    j = 0
    while True:
        # record every grid point the next update would pass: at n, floor(n / B) updates are done for a fixed B
        while j < len(grid) and grid[j] < opt.samples_seen + opt.window_batch_size - 1e-9 * max(1.0, grid[j]):
            out[:, j] = model.loss(theta.detach())
            updates[j] = opt.updates
            j += 1
        if j == len(grid):
            break
        for _ in range(opt.accumulation_steps):
            xi_mean = stream.take(b).sum(0) / b                          # (seeds, d): mean_j of (B, seeds, d)
            # mean_j [0.5 sum h theta**2 + xi_j . theta] = 0.5 sum h theta**2 + (mean_j xi_j) . theta (linearity; B x
            # cheaper than forming the B per-sample losses); summed over replicas so each gets its own gradient.
            loss = 0.5 * (h * theta * theta).sum(-1) + (xi_mean * theta).sum(-1)
            loss.sum().backward()
            opt.step()
            opt.zero_grad()
    mean = out.mean(0)
    se = out.std(0) / seeds ** 0.5 if seeds > 1 else torch.full_like(mean, float("nan"))
    return Simulation(n, mean, se, out, opt.last_kappa if batch_schedule is not None else opt.window_kappa, updates)
