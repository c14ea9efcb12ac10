"""SDE theory tools on the noisy quadratic model: what the scaling rules predict, exactly, and where they stop.

The model (:class:`NoisyQuadratic`): loss 0.5 * sum_i h_i theta_i**2, per-sample gradient h * theta + xi with
xi_i ~ N(0, s_i). Time is measured in **samples** n (one update of batch B advances n by B). Per coordinate:

- discrete SGD (lr eta, batch B) moves the mean m and second moment q = E[theta**2] exactly as
  m <- (1 - eta h) m,  q <- (1 - eta h)**2 q + eta**2 s / B           (:func:`sgd_discrete_moments`);
- its SDE limit, with a = eta / B (invariant under the linear rule eta = kappa eta0, B = kappa B0), is
  dm/dn = -a h m,  dq/dn = -2 a h q + a**2 s                          (:func:`sgd_sde_moments`);
  the discrete recursion differs from it by O(eta**2 h**2 / B) per update, which is what breaks the rule as
  kappa * eta * h_max approaches 2;
- Adam in the noise-dominated regime is momentum SGD with per-coordinate lr eta / sqrt(v_i), v_i ~ s_i / B, so
  a_i = eta / (sqrt(B) sigma_i) and the momentum's time constant -B / ln(beta1) (in samples) are invariant under
  the square-root rule eta = sqrt(kappa) eta0, beta1 -> beta1**kappa (:func:`adam_sde_moments`;
  :func:`adam_discrete_moments` is a deterministic approximation of the discrete run);
- :func:`simulate` (:mod:`sdebatch.sde.montecarlo`) runs the real torch optimizers through
  :class:`sdebatch.LogicalBatchOptimizer`; :func:`critical_batch` finds the batch where the discrete run leaves
  the SDE curve; :func:`noise_scale` is McCandlish's B_simple for comparison.

All tensors are float64 on the CPU.

Modules: ``model`` (NoisyQuadratic, grids, B_simple), ``dynamics`` (moment ODEs and closed forms), ``moments``
(discrete and SDE moments of SGD and Adam, the critical batch), ``montecarlo`` (the real optimizers, many replicas).
Needs the ``[sde]`` extra (torchdiffeq).
"""
from .dynamics import Moments
from .model import NoisyQuadratic, noise_scale, sample_grid
from .moments import (CriticalBatch, adam_discrete_moments, adam_sde_moments, critical_batch, momentum_timescale,
                      sgd_discrete_moments, sgd_sde_moments)
from .montecarlo import Simulation, simulate

__all__ = ["NoisyQuadratic", "Moments", "CriticalBatch", "Simulation", "sample_grid", "noise_scale",
           "sgd_discrete_moments", "sgd_sde_moments", "adam_sde_moments", "adam_discrete_moments", "simulate",
           "critical_batch", "momentum_timescale"]
