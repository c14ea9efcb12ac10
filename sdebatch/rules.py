"""SDE scaling rules as pure functions (no torch needed).

Two runs with different batch sizes follow the same SDE, and so reach the same loss after the same number of
samples, when their hyperparameters are rescaled by the factor

    kappa = (B_step / B_L) * (D_ref / D) ** gamma

(B_step: samples averaged in one update; B_L: the logical batch the hyperparameters belong to; D, D_ref: the
run's and the reference's training horizon; gamma = 0 switches the horizon term off). Rules per family:

- "sgd" (linear rule, Goyal et al. 2017): lr -> kappa * lr. Momentum mode "fixed" keeps mu; mode "timescale"
  keeps mu's half-life in samples: mu -> mu**kappa and lr -> kappa * lr * (1 - mu**kappa) / (1 - mu), which keeps
  the effective lr / (1 - mu) on the linear rule.
- "adam" (square-root rule, Malladi et al. 2022): lr -> sqrt(kappa) * lr; betas (and RMSprop's alpha) ->
  beta**kappa ("exact") or 1 - kappa * (1 - beta) ("linear"); eps -> eps / sqrt(kappa); NAdam's
  momentum_decay -> kappa * momentum_decay (it is a per-step rate).
- weight decay: "l2" (coupled, added to the gradient) is part of the loss and does not change; "lr_coupled"
  (torch AdamW: p *= 1 - lr * wd per update) keeps the decay per sample: (1 - lr' wd') = (1 - lr wd)**kappa
  ("exact") or wd -> sqrt(kappa) * wd ("linear", first order for the adam family; kappa * wd / (lr'/lr) in
  general); "independent" (p *= 1 - wd per update): 1 - (1 - wd)**kappa ("exact") or kappa * wd ("linear").
- "none": nothing changes (accumulation only, or the naive baseline).
- model EMA: rho -> rho**kappa (Busbridge et al. 2023), see :func:`ema_decay`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

# the vocabulary lives with the argument checks (which must not import this module); named here as part of the rules
from .checks import BETA_FORMS, FAMILIES, MOMENTUM_MODES, WEIGHT_DECAY_FORMS, choice, horizon_term, positive_finite

__all__ = ["kappa", "rescale", "ema_decay", "lr_factor", "FAMILIES", "BETA_FORMS", "MOMENTUM_MODES",
           "WEIGHT_DECAY_FORMS"]


def kappa(batch_per_update: float, logical_batch_size: float, *, horizon: float | None = None,
          reference_horizon: float | None = None, gamma: float = 0.0) -> float:
    """The rescaling factor kappa = (B_step / B_L) * (D_ref / D) ** gamma.

    Args:
        batch_per_update: B_step, samples averaged in one optimizer update (micro-batch x accumulation steps x
            data-parallel world size), in the same unit as ``logical_batch_size``.
        logical_batch_size: B_L, the batch the reference hyperparameters were tuned for.
        horizon: D, the run's training horizon (samples or tokens). Default None: no horizon term.
        reference_horizon: D_ref, the horizon the hyperparameters were tuned at (same unit as ``horizon``).
            Required when ``gamma != 0``.
        gamma: horizon exponent; default 0.0 (off). Bethune et al. 2026 fit ~0.44 for a cosine schedule;
            the Complete(d)P iso-horizon rule is 1.

    Returns:
        kappa > 0. kappa = 1 means "no rescaling" (pure accumulation).
    """
    b = positive_finite("batch_per_update", batch_per_update)
    bl = positive_finite("logical_batch_size", logical_batch_size)
    g, d, dref = horizon_term(horizon, reference_horizon, gamma)
    k = b / bl
    if g != 0.0:
        k *= (dref / d) ** g
    return k


def ema_decay(rho: float, kappa: float) -> float:
    """EMA decay for an update that covers kappa logical batches: rho**kappa (Busbridge et al. 2023).

    Keeps the EMA's half-life fixed in samples. ``rho`` must be in [0, 1).
    """
    r = float(rho)
    if not (0.0 <= r < 1.0):
        raise ValueError(f"rho must be in [0, 1), got {rho!r}")
    return r ** positive_finite("kappa", kappa)


def _beta(name: str, beta: float, k: float, form: str) -> float:
    b = float(beta)
    if not (0.0 <= b < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if b == 0.0:
        return 0.0
    if form == "exact":
        return b ** k
    out = 1.0 - k * (1.0 - b)
    if not (1e-12 < out < 1.0):  # 1e-12: kappa = 1/(1 - beta) must fail even when rounding leaves 2e-16
        raise ValueError(
            f"beta_form='linear' pushes {name}={b} out of (0, 1) at kappa={k:g} (1 - kappa*(1 - beta) = {out:g}); "
            f"it is valid only for kappa < 1/(1 - beta) = {1.0 / (1.0 - b):g}. Use beta_form='exact' (beta**kappa).")
    return out


def lr_factor(family: str, kappa: float) -> float:
    """The lr multiplier of a family's rule with no momentum: kappa (sgd), sqrt(kappa) (adam), 1 (none)."""
    choice("family", family, FAMILIES)
    k = positive_finite("kappa", kappa)
    return {"sgd": k, "adam": math.sqrt(k), "none": 1.0}[family]


def rescale(family: str, hparams: Mapping[str, Any], kappa: float, *, beta_form: str = "exact",
            momentum_mode: str = "fixed", weight_decay_form: str | None = None) -> dict:
    """Rescale reference hyperparameters for an update that covers ``kappa`` logical batches.

    Args:
        family: "sgd" (linear rule), "adam" (square-root rule; Adam, AdamW, RMSprop, NAdam, RAdam) or "none".
        hparams: torch param-group keys: ``lr`` (required), optional ``momentum``, ``betas``, ``alpha``
            (RMSprop), ``eps``, ``weight_decay``, ``momentum_decay`` (NAdam). Other keys are copied unchanged.
            Never modified.
        kappa: the factor from :func:`kappa`; positive and finite.
        beta_form: "exact" (default, beta**kappa) or "linear" (1 - kappa (1 - beta), Malladi et al.'s first-order
            form; an error once it leaves (0, 1)). Also selects the exact or first-order weight-decay form.
        momentum_mode: for a ``momentum`` key: "fixed" (default, Goyal et al.: mu unchanged) or "timescale"
            (mu -> mu**kappa, lr compensated so lr / (1 - mu) follows the rule).
        weight_decay_form: "l2" (coupled; unchanged), "lr_coupled" (torch AdamW) or "independent". Default:
            "lr_coupled" for "adam", "l2" for "sgd".

    Returns:
        A new dict with the rescaled values.
    """
    choice("family", family, FAMILIES)
    choice("beta_form", beta_form, BETA_FORMS)
    choice("momentum_mode", momentum_mode, MOMENTUM_MODES)
    if weight_decay_form is None:
        weight_decay_form = "lr_coupled" if family == "adam" else "l2"
    choice("weight_decay_form", weight_decay_form, WEIGHT_DECAY_FORMS)
    if not isinstance(hparams, Mapping):
        raise ValueError(f"hparams must be a mapping of param-group keys, got {type(hparams).__name__}")
    if "lr" not in hparams:
        raise ValueError(f"hparams is missing the key 'lr' (required); got keys {sorted(hparams)}")
    k = positive_finite("kappa", kappa)
    out = dict(hparams)
    if family == "none" or k == 1.0:
        return out

    lr = float(hparams["lr"])
    new_lr = lr * lr_factor(family, k)
    mu = hparams.get("momentum")
    if mu and momentum_mode == "timescale":
        mu = float(mu)
        if not (0.0 <= mu < 1.0):
            raise ValueError(f"momentum must be in [0, 1) for momentum_mode='timescale', got {mu!r}")
        new_mu = _beta("momentum", mu, k, beta_form)
        new_lr *= (1.0 - new_mu) / (1.0 - mu)
        out["momentum"] = new_mu
    out["lr"] = new_lr

    if family == "adam":
        if "betas" in hparams:
            out["betas"] = tuple(_beta(f"betas[{i}]", b, k, beta_form) for i, b in enumerate(hparams["betas"]))
        if "alpha" in hparams:
            out["alpha"] = _beta("alpha", hparams["alpha"], k, beta_form)
        if "eps" in hparams:
            out["eps"] = float(hparams["eps"]) / math.sqrt(k)
        if "momentum_decay" in hparams:
            out["momentum_decay"] = float(hparams["momentum_decay"]) * k

    wd = float(hparams.get("weight_decay", 0.0) or 0.0)
    if wd and weight_decay_form == "lr_coupled":
        per_update = lr * wd
        if not (0.0 <= per_update < 1.0):
            raise ValueError("lr * weight_decay must be in [0, 1) for weight_decay_form='lr_coupled', "
                             f"got {per_update:g}")
        if beta_form == "exact" and new_lr > 0.0:
            out["weight_decay"] = (1.0 - (1.0 - per_update) ** k) / new_lr
        else:  # first order: lr' wd' = kappa lr wd
            out["weight_decay"] = k * wd * lr / new_lr if new_lr > 0.0 else wd * lr_factor("adam", k)
    elif wd and weight_decay_form == "independent":
        if not (0.0 <= wd < 1.0):
            raise ValueError(f"weight_decay must be in [0, 1) for weight_decay_form='independent', got {wd:g}")
        out["weight_decay"] = 1.0 - (1.0 - wd) ** k if beta_form == "exact" else k * wd
    return out
