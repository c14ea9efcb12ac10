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
        decay: rho, the per-update decay at the logical batch size (kappa = 1), in [0, 1). Default 0.999.
            An update covering kappa logical batches uses rho**kappa.

    Pass it as ``LogicalBatchOptimizer(..., ema=ema)`` and it is updated after every applied update (with
    rho**kappa, or rho under ``rule="none"``: see ``ema_rescale``). The averages
    are ``ema.params`` (in ``model.parameters()`` order); ``ema.copy_to(model)`` writes them into a model and
    ``with ema.swapped(model):`` evaluates with them and puts the training weights back.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        ema_decay(decay, 1.0)  # validates
        self.decay = float(decay)
        self.model = model
        self.params = [p.detach().clone() for p in model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, kappa: float = 1.0) -> None:
        d = ema_decay(self.decay, kappa)
        torch._foreach_lerp_(self.params, [p.detach() for p in self.model.parameters()], 1.0 - d)
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
        return {"params": [p.clone() for p in self.params], "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"EMA state has {len(state['params'])} tensors, the model {len(self.params)}")
        with torch.no_grad():
            for p, s in zip(self.params, state["params"]):
                p.copy_(s)
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])


def ema_avg_fn(decay: float, optimizer: Any) -> Callable:
    """An ``avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` that uses rho**kappa of the optimizer's last update
    (rho when the optimizer's ``ema_rescale`` is off, as it is by default under ``rule="none"``).

    ``AveragedModel(model, avg_fn=ema_avg_fn(0.999, opt))``, then ``averaged.update_parameters(model)`` whenever
    ``opt.did_update``.
    """
    ema_decay(decay, 1.0)

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: Any) -> torch.Tensor:
        kappa = optimizer.last_kappa if getattr(optimizer, "ema_rescale", True) else None
        d = ema_decay(decay, kappa or 1.0)
        return d * averaged + (1.0 - d) * current

    return avg_fn
