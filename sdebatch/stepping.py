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
    for index, (group, ref, new) in enumerate(zip(optimizer.param_groups, saved, effective)):
        tensor_keys = _tensor_keys(group)
        for key in ref:
            if key in tensor_keys:
                group[key] = _persistent(optimizer, index, key, ref, new[key])
            else:
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
        for step_t, took_every, true_step in step_fixes:  # torch's own count back; a launch, no read
            step_t.copy_(torch.where(took_every, true_step, step_t))
    return effective


def _fake_adam_steps(optimizer: torch.optim.Optimizer, group: dict, k: float, kappa_sum: float,
                     updates: int) -> list:
    """Make Adam's 1 - beta_eff**step equal 1 - prod_s beta**kappa_s = 1 - beta**(kappa_sum + k).

    With beta_eff = beta**k that needs step = (kappa_sum + k) / k after Adam's increment. It only differs from the
    plain count when kappa changed between updates (a ramp, a short last window). Params that missed an update (no
    grad, so a count below ``updates``), and python-number steps (very old torch), keep torch's count. Which params
    took every update is decided on the step's device (a select, never read back: on CUDA a read per parameter would
    wait for the device every update for the rest of the run). Returns (step tensor, mask, true count) to restore.
    """
    if math.isclose(kappa_sum, updates * k, rel_tol=1e-12):
        return []  # kappa never changed: torch's count is right
    fake, fixes = kappa_sum / k, []
    for p in group["params"]:
        st = optimizer.state.get(p)
        if p.grad is None or not st or not isinstance(st.get("step"), torch.Tensor):
            continue
        step_t = st["step"]
        took_every = step_t == updates
        step_t.copy_(torch.where(took_every, fake, step_t))
        fixes.append((step_t, took_every, updates + 1))
    return fixes


def _tensor_keys(group: dict) -> tuple[str, ...]:
    """The keys written as 0-dim tensors, updated in place (the same tensors every update), so that a change of kappa
    neither recompiles a ``torch.compile``'d step nor is lost by a captured CUDA graph.

    Fused and capturable steps take lr and betas as tensors; eps has no tensor path there and stays a float (the
    fused kernel reads it per call, so the step stays correct; a CUDA graph captured around the step keeps the eps of
    its capture: recapture per batch size, or keep the batch fixed while graphed). A reference lr given as a tensor
    (torch's recipe for compiled optimizers) on the single-tensor or foreach path also gets eps as a tensor; with
    floats, a compiled step specialised on floats (``torch._dynamo.config.specialize_float = True``) compiles once per
    distinct kappa (torch's default does not specialise floats).
    """
    if group.get("fused") or group.get("capturable"):
        return ("lr", "betas")
    if isinstance(group.get("lr"), torch.Tensor):
        return ("lr", "betas", "eps")
    return ()


def _persistent(optimizer: torch.optim.Optimizer, index: int, key: str, ref: dict, value: Any) -> Any:
    """``value`` in 0-dim tensors kept on the optimizer and filled in place (the same tensors every update): on the
    reference lr's device and dtype when it is a tensor, else on the group's device in its dtype (at least float32)."""
    lr = ref.get("lr")
    params = optimizer.param_groups[index]["params"]
    if isinstance(lr, torch.Tensor):
        device, dtype = lr.device, lr.dtype
    elif params and params[0].is_floating_point():
        device, dtype = params[0].device, torch.promote_types(params[0].dtype, torch.float32)
    else:
        device, dtype = torch.device("cpu"), torch.float32
    cache = optimizer.__dict__.setdefault("_sdebatch_tensors", {})
    values = value if isinstance(value, (tuple, list)) else (value,)
    held = cache.get((index, key))
    if held is None or len(held) != len(values) or held[0].device != device or held[0].dtype != dtype:
        held = cache[(index, key)] = tuple(torch.empty((), dtype=dtype, device=device) for _ in values)
    for t, v in zip(held, values):
        t.fill_(v)  # a kernel launch, no host sync
    return held if isinstance(value, (tuple, list)) else held[0]


def _as_floats(hp: dict) -> dict:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in hp.items()}


def _like(ref: Any, value: Any) -> Any:
    """``value`` in the type of ``ref`` (a tensor lr stays a tensor on its device)."""
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if isinstance(ref, tuple):
        return tuple(value)
    return value
