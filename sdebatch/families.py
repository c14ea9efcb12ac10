"""Which scaling rule and weight-decay form a torch optimizer follows."""
from __future__ import annotations

import torch

# Exact rules are known for these; anything else needs an explicit rule (a heuristic for Lion, Adafactor, ...).
_FAMILY = (
    (torch.optim.SGD, "sgd"),
    (torch.optim.Adam, "adam"),  # AdamW subclasses Adam in recent torch
    (torch.optim.AdamW, "adam"),
    (torch.optim.RMSprop, "adam"),
    (torch.optim.NAdam, "adam"),
    (torch.optim.RAdam, "adam"),
)
KNOWN_OPTIMIZERS = tuple(cls.__name__ for cls, _ in _FAMILY)


def family_of(optimizer: torch.optim.Optimizer) -> str | None:
    """"sgd" or "adam" for the optimizers with known rules, else None."""
    for cls, family in _FAMILY:
        if isinstance(optimizer, cls):
            return family
    return None


def weight_decay_form_of(optimizer: torch.optim.Optimizer, group: dict) -> str:
    """"lr_coupled" for decoupled decay (AdamW; Adam/NAdam/RAdam with decoupled_weight_decay), else "l2"."""
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False):
        return "lr_coupled"
    return "l2"


def uses_step_bias_correction(optimizer: torch.optim.Optimizer) -> bool:
    """Adam/AdamW correct their moments by 1 - beta**step, which a changing kappa makes wrong (see optimizer.py)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
