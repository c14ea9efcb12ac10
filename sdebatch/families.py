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


# the param-group keys the rules change (sdebatch.rules.rescale); what `sdebatch rules` tabulates
RESCALED_KEYS = ("lr", "momentum", "betas", "alpha", "eps", "weight_decay", "momentum_decay")


def optimizer_table() -> dict[str, tuple[str, str, dict]]:
    """For every optimizer with known rules, by lower-case name: (family, weight-decay form, torch's defaults of the
    keys the rules change), read from torch itself so the table cannot drift from what the wrapper rescales."""
    table = {}
    for cls, family in _FAMILY:
        inst = cls([torch.zeros(1, requires_grad=True)])
        defaults = {k: inst.defaults[k] for k in RESCALED_KEYS if k in inst.defaults}
        if "betas" in defaults:
            defaults["betas"] = tuple(float(b) for b in defaults["betas"])
        defaults = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                    for k, v in defaults.items()}
        table[cls.__name__.lower()] = (family, weight_decay_form_of(inst, inst.param_groups[0]), defaults)
    return table
