"""One inner optimizer step with the rule applied to the reference hyperparameters, then restored.

The rescaled values live in the param groups only for the inner ``step()``; schedulers and loggers keep seeing the
reference values (the petuum/adaptdl approach), and every update is rescaled from the reference, never compounded.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import rules
from .families import uses_step_bias_correction, weight_decay_form_of

# param-group keys a rule may change; everything else passes through untouched.
RULE_KEYS = ("lr", "momentum", "betas", "alpha", "eps", "weight_decay", "momentum_decay")


def rescaled_step(optimizer: torch.optim.Optimizer, family: str, kappa: float, *, kappa_sum: float, updates: int,
                  beta_form: str = "exact", momentum_mode: str = "fixed", weight_decay_form: str | None = None,
                  grad_scaler: Any = None) -> list[dict]:
    """Step ``optimizer`` once with its hyperparameters rescaled for ``kappa``; return the values used per group.

    Args:
        optimizer: the inner torch optimizer (its param groups hold the reference values).
        family, kappa, beta_form, momentum_mode: as in :func:`sdebatch.rescale`.
        kappa_sum: sum of kappa over the updates already applied (for Adam's bias correction).
        updates: number of updates already applied.
        weight_decay_form: None to read it from the optimizer (AdamW: "lr_coupled"; else "l2").
        grad_scaler: an AMP GradScaler whose ``unscale_`` already ran, or None.
    """
    saved, effective, step_fixes = [], [], []
    fix_bias = family == "adam" and uses_step_bias_correction(optimizer)
    for group in optimizer.param_groups:  # every group's values first: a rule error must leave nothing rescaled
        ref = {key: group[key] for key in RULE_KEYS if key in group}
        wd_form = weight_decay_form or weight_decay_form_of(optimizer, group)
        new = rules.rescale(family, _as_floats(ref), kappa, beta_form=beta_form, momentum_mode=momentum_mode,
                            weight_decay_form=wd_form)
        saved.append(ref)
        effective.append({key: new[key] for key in ref})
    for group, ref, new in zip(optimizer.param_groups, saved, effective):
        for key in ref:
            group[key] = _like(ref[key], new[key])
        if fix_bias and "betas" in group:
            step_fixes += _fake_adam_steps(optimizer, group, kappa, kappa_sum, updates)
    try:
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
    finally:
        for group, ref in zip(optimizer.param_groups, saved):
            group.update(ref)
        for step_t, true_step in step_fixes:
            step_t.fill_(true_step)
    return effective


def _fake_adam_steps(optimizer: torch.optim.Optimizer, group: dict, k: float, kappa_sum: float,
                     updates: int) -> list:
    """Make Adam's 1 - beta_eff**step equal 1 - prod_s beta**kappa_s = 1 - beta**(kappa_sum + k).

    With beta_eff = beta**k that needs step = (kappa_sum + k) / k after Adam's increment. It only differs from the
    plain count when kappa changed between updates (a short last window). Params that missed an update (no grad),
    and python-number steps (very old torch), keep torch's count. Returns (step tensor, true count) pairs to restore.
    """
    if math.isclose(kappa_sum, updates * k, rel_tol=1e-12):
        return []  # kappa never changed: torch's count is right (and no per-param read of a device step tensor)
    fixes = []
    for p in group["params"]:
        st = optimizer.state.get(p)
        if p.grad is None or not st or not isinstance(st.get("step"), torch.Tensor):
            continue
        n = float(st["step"])
        if n != updates or math.isclose(kappa_sum, n * k, rel_tol=1e-12):
            continue  # missed an update, or kappa never changed: torch's count is already right
        st["step"].fill_(kappa_sum / k)
        fixes.append((st["step"], n + 1))
    return fixes


def _as_floats(hp: dict) -> dict:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in hp.items()}


def _like(ref: Any, value: Any) -> Any:
    """``value`` in the type of ``ref`` (a tensor lr stays a tensor on its device)."""
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if isinstance(ref, tuple):
        return tuple(value)
    return value
