"""Model EMA whose decay follows rho**kappa, so its half-life is fixed in samples (Busbridge et al. 2023)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .rules import ema_decay


class ModelEMA:
    """Exponential moving average of a model's parameters.

    Args:
        model: the model to average (the unwrapped module, not DDP's wrapper).
        rho: the EMA's decay per update at the logical batch size (kappa = 1), in [0, 1). Default 0.999.
            An update covering kappa logical batches decays by ``sdebatch.ema_decay(rho, kappa)`` = rho**kappa.

    Pass it as ``LogicalBatchOptimizer(..., ema=ema)`` and it is updated after every applied update (with
    rho**kappa, or rho under ``rule="none"``: see ``ema_rescale``). The averages are ``ema.params`` (in
    ``model.parameters()`` order), kept in float32 at least: in bf16 a step of 1 - rho ~ 1e-3 is below the
    spacing of the numbers (2**-8 near 1), and a bf16 average would stop moving. ``ema.copy_to(model)`` writes them
    into a model (in its dtype) and ``with ema.swapped(model):`` evaluates with them and puts the training weights
    back.
    """

    def __init__(self, model: torch.nn.Module, rho: float = 0.999) -> None:
        ema_decay(rho, 1.0)  # validates
        self.rho = float(rho)
        self.model = model
        self.params = [p.detach().to(_shadow_dtype(p.dtype), copy=True) for p in model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, kappa: float = 1.0) -> None:
        d = ema_decay(self.rho, kappa)
        current = [p.detach() if p.dtype == e.dtype else p.detach().to(e.dtype)
                   for p, e in zip(self.model.parameters(), self.params)]
        torch._foreach_lerp_(self.params, current, 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, e in zip(model.parameters(), self.params):
            p.copy_(e)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module):
        """Evaluate ``model`` with the EMA weights inside the block; its own weights come back afterwards."""
        saved = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"params": [p.clone() for p in self.params], "rho": self.rho, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"EMA state has {len(state['params'])} tensors, the model {len(self.params)}")
        with torch.no_grad():
            for p, s in zip(self.params, state["params"]):
                p.copy_(s)
        self.rho = float(state["rho"] if "rho" in state else state["decay"])  # ("decay": earlier checkpoints)
        self.updates = int(state["updates"])


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def ema_avg_fn(rho: float, optimizer: Any) -> Callable:
    """An ``avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` that uses rho**kappa of the optimizer's last update
    (rho when the optimizer's ``ema_rescale`` is off, as it is by default under ``rule="none"``).

    ``AveragedModel(model, avg_fn=ema_avg_fn(0.999, opt))``, then ``averaged.update_parameters(model)`` whenever
    ``opt.did_update``.
    """
    ema_decay(rho, 1.0)

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: Any) -> torch.Tensor:
        kappa = optimizer.last_kappa if getattr(optimizer, "ema_rescale", True) else None
        d = ema_decay(rho, kappa or 1.0)
        return d * averaged + (1.0 - d) * current

    return avg_fn


def ema_params_in_checkpoint(checkpoint: dict) -> list | None:
    """The EMA weights that :class:`sdebatch.lightning.LogicalBatch` saved in a Lightning checkpoint (a list in the
    module's ``parameters()`` order), or None when it holds none. Reads the dict only: no Lightning import."""
    for state in (checkpoint.get("callbacks") or {}).values():
        ema = state.get("ema") if isinstance(state, dict) else None
        if isinstance(ema, dict) and isinstance(ema.get("params"), list):
            return ema["params"]
    return None
