"""The arms of a batch-size ablation, by name: one vocabulary for the MDM trainer, the workloads, the sweep runner's
run descriptions and the figure labels.

A preset is not a rule. ``rule`` is the wrapper's argument: the scaling rule of an optimizer family ("auto", "sgd",
"adam", "none"). A preset fixes that rule together with how an update's batch is reached:

    naive        one update per physical batch, hyperparameters unchanged (rule="none")
    accumulate   exact: accumulate up to the logical batch (a larger physical batch is split into logical chunks)
    linear       one update per physical batch, lr x kappa (the linear rule, also applied to Adam as a baseline)
    sqrt_exact   one update per physical batch, the square-root rule with beta**kappa
    sqrt_linear  the same with the first-order betas 1 - kappa (1 - beta)

Sweep files and train configs name a preset under the key ``rule`` (kept: it keys every stored run).
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {  # LogicalBatchOptimizer keyword arguments (one update per physical batch: opted in)
    "naive": dict(rule="none", accumulation_steps=1, reparameterize=True),
    "accumulate": dict(rule="auto", accumulation_steps=None),
    "linear": dict(rule="sgd", accumulation_steps=1, reparameterize=True),
    "sqrt_exact": dict(rule="adam", beta_form="exact", accumulation_steps=1, reparameterize=True),
    "sqrt_linear": dict(rule="adam", beta_form="linear", accumulation_steps=1, reparameterize=True),
}
# figure labels (matplotlib mathtext)
LABELS = {"accumulate": "accumulate (exact)", "sqrt_exact": r"square-root rule, $\beta^\kappa$",
          "sqrt_linear": r"square-root rule, linear $\beta$", "linear": "linear lr rule", "naive": "no rescaling"}


RAMPS = ("rules", "lr_only", "none")  # how a batch ramp rescales: every hyperparameter, the lr alone, nothing


def check_ramp(name: str) -> str:
    """``name`` if it is a way of ramping (:data:`RAMPS`), else a ValueError listing them."""
    if name not in RAMPS:
        raise ValueError(f"ramp must be 'rules', 'lr_only' or 'none', got {name!r}")
    return name


def check(name: str) -> str:
    """``name`` if it is a preset, else a ValueError listing them."""
    if name not in PRESETS:
        raise ValueError(f"rule must be one of {', '.join(PRESETS)}; got {name!r}")
    return name


def wrapper_kwargs(name: str, family: str = "adam") -> dict:
    """LogicalBatchOptimizer keyword arguments of a preset; for an SGD ``family`` the square-root presets use the
    linear rule (the square-root rule is Adam's; for SGD the SDE rule is linear)."""
    kw = dict(PRESETS[check(name)])
    if name in ("sqrt_exact", "sqrt_linear") and family == "sgd":
        kw["rule"] = "sgd"
    return kw


def update_batch(name: str, logical_batch_size: int, physical_batch_size: int) -> int:
    """The physical batch the wrapper is given: under "accumulate" a batch above the logical one is split into
    logical chunks, i.e. runs as a physical batch of the logical size."""
    if check(name) == "accumulate" and physical_batch_size > logical_batch_size:
        return logical_batch_size
    return physical_batch_size


def kappa(name: str, logical_batch_size: int, physical_batch_size: int) -> float:
    """Logical batches per update: 1 under "accumulate", else physical / logical."""
    return 1.0 if check(name) == "accumulate" else physical_batch_size / logical_batch_size
