"""Model EMA whose decay follows rho**kappa, so its half-life is fixed in samples (Busbridge et al. 2023)."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .rules import ema_decay


class ModelEMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    Args:
        model: the model to average (the unwrapped module; DDP's ``.module``).
        decay: rho, the per-update decay at the logical batch size (kappa = 1), in [0, 1). Default 0.999.
            An update covering kappa logical batches uses rho**kappa.

    Pass it as ``LogicalBatchOptimizer(..., ema=ema)`` and it is updated after every applied update. The averaged
    copy is ``ema.module``.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        ema_decay(decay, 1.0)  # validates
        self.decay = float(decay)
        self.model = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, kappa: float = 1.0) -> None:
        d = ema_decay(self.decay, kappa)
        ema_p = list(self.module.parameters())
        src_p = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), self.model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])


def ema_avg_fn(decay: float, optimizer: Any) -> Callable:
    """An ``avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` that uses rho**kappa of the optimizer's last update.

    ``AveragedModel(model, avg_fn=ema_avg_fn(0.999, opt))``, then ``averaged.update_parameters(model)`` whenever
    ``opt.did_update``.
    """
    ema_decay(decay, 1.0)

    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: Any) -> torch.Tensor:
        d = ema_decay(decay, optimizer.last_kappa or 1.0)
        return d * averaged + (1.0 - d) * current

    return avg_fn
