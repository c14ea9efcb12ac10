"""The training config of the tri-modal MDM: one typed dataclass, a docstring per field.

A run is described by one flat table (a TOML file for ``sdebatch train --config``, a sweep point for the ``mdm``
workload); :func:`load_config` checks it against :class:`TrainConfig` (every key known, every value of its field's
type: ``True`` is not an int) and returns it as a plain dict, the form the trainer, sweeps and checkpoints store.
"""
from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import presets


@dataclass(frozen=True)
class TrainConfig:
    """Every key of a training run (units in brackets)."""

    data: str = "data/tiny"
    """A folder made by ``sdebatch data prepare``."""
    model: str = "tiny"
    """A named config of :data:`sdebatch.mdm.model.CONFIGS`."""
    model_overrides: dict = field(default_factory=dict)
    """Fields of MDMConfig to change, e.g. ``{d_model = 64, n_layers = 2}``."""
    logical_batch_size: int = 32
    """[sequences] per update that the hyperparameters belong to."""
    physical_batch_size: int = 8
    """[sequences] per device per forward/backward."""
    rule: str = "accumulate"
    """A preset of :mod:`sdebatch.presets`: naive | accumulate | linear | sqrt_exact | sqrt_linear."""
    tokens: int = 2_000_000
    """[tokens] training budget (real, non-padding)."""
    batch_schedule: str = ""
    """[sequences per update over the tokens seen] a batch ramp, e.g. "0:16, 200K:32, 1M:64", or "seesaw" (where the
    cosine lr schedule halves, the batch doubles, up to max_batch_size), reached by accumulation of physical batches
    (needs rule = "accumulate"); empty: the fixed logical batch."""
    max_batch_size: int = 256
    """[sequences] the cap of a "seesaw" batch_schedule."""
    ramp: str = "rules"
    """How a batch_schedule rescales: "rules" (every hyperparameter, the SDE rule), "lr_only" (lr x sqrt(kappa), the
    OLMo-core way) or "none" (the Megatron way)."""
    second_moment_rescale: bool = False
    """At each change of the batch, AdamW's second moment x B_old / B_new (its noise-dominated limit); see
    :class:`sdebatch.LogicalBatchOptimizer`. Needs ramp = "rules" or a fixed run."""
    lr: float = 3e-3
    """AdamW lr at the logical batch (base shape; CompleteP scales it per group)."""
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas at the logical batch."""
    eps: float = 1e-8
    """AdamW eps at the logical batch."""
    weight_decay: float = 0.01
    """AdamW weight decay (decoupled) at the logical batch."""
    max_grad_norm: float = 0.0
    """Clip each update's gradient to this 2-norm (0: no clipping)."""
    warmup: float = 0.05
    """[fraction of the token budget] linear warmup of the lr."""
    final_lr: float = 0.1
    """[fraction of the peak] cosine floor of the lr."""
    ema: float = 0.0
    """Model EMA decay at the logical batch (0: off)."""
    mix: dict = field(default_factory=lambda: {"text": 0.4, "image": 0.3, "audio": 0.3})
    """[sequences] mixing weights of the sources."""
    generate_prob: float = 0.8
    """Pairs: the share laid out as text -> image / speech (else the reverse)."""
    schedule: str | dict = "linear"
    """Masking schedule, or a table per modality."""
    cond_drop: float = 0.1
    """Condition dropout for classifier-free guidance."""
    seed: int = 0
    """The run's seed: initialisation, data order and masking draws."""
    init_seed: int | None = None
    """Seed of the initial weights alone (None: ``seed``): with the next two, a study can vary one source apart."""
    data_seed: int | None = None
    """Seed of the training stream's order and of its pairs' task direction (None: ``seed``)."""
    draw_seed: int | None = None
    """Seed of the time, mask and condition-drop draws (None: ``seed``)."""
    devices: int = 1
    """Lightning devices."""
    precision: str = "32-true"
    """Lightning precision ("bf16-mixed" on a GPU)."""
    strategy: str = "auto"
    """Lightning strategy: "auto", "ddp" or "fsdp"."""
    compile: bool = False
    """torch.compile the denoiser's training forward (a GPU path: compile time dominates tiny CPU runs)."""
    val_sequences: int = 256
    """Held-out sequences for the validation ELBO at the end (0: none); the same set and draws whatever the batch
    sizes, so runs of a sweep compare."""
    val_batch_size: int = 16
    """[sequences] per validation forward (fixed: the masking draws follow it)."""
    val_time_points: int = 4
    """Stratified diffusion times per held-out sequence and replicate."""
    val_replicates: int = 2
    """Independent replicates of those times: their spread gives the estimator's own standard error."""
    eval_every_tokens: int = 0
    """[tokens] validation during training every this many (0: only at the end)."""
    out: str = "runs/train"
    """Folder for model.pt, train_config.json and checkpoints ('' writes nothing)."""
    checkpoint_every: int = 0
    """Lightning training steps between checkpoints in <out>/checkpoints (0: none)."""
    estimate_noise_scale: bool = False
    """In-run B_simple estimate from micro-batches vs their window (needs accumulation); the library's default."""
    noise_probe: int | bool = 512
    """[sequences] for an end-of-run B_simple probe on the training stream, in groups of 16 micro-batches of 4
    (B = 64 vs b = 4); 0 or false: no probe; single-device runs only."""
    threads: int = 0
    """Torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if f.name != "noise_probe" and not _is(value, kind):  # noise_probe: its own message below
                default = f.default if f.default_factory is MISSING else f.default_factory()
                raise ValueError(f"{f.name} must be {_describe(kind)} (like the default {default!r}), got {value!r}")
        presets.check(self.rule)
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"strategy must be 'auto', 'ddp' or 'fsdp', got {self.strategy!r}")
        presets.check_ramp(self.ramp)
        if self.second_moment_rescale and ((self.batch_schedule and self.ramp != "rules")
                                           or presets.wrapper_kwargs(self.rule)["rule"] not in ("auto", "adam")):
            raise ValueError(f"second_moment_rescale needs the square-root rule: ramp = 'rules' under a "
                             f"batch_schedule and a rule other than naive / linear, got ramp {self.ramp!r}, rule "
                             f"{self.rule!r}")
        if self.batch_schedule:
            from ..batch_schedules import batch_schedule

            if self.batch_schedule != "seesaw":
                batch_schedule(self.batch_schedule, unit="tokens")  # names a bad entry
            if self.rule != "accumulate":
                raise ValueError(f"batch_schedule is reached by accumulation: it needs rule = 'accumulate', got "
                                 f"{self.rule!r} (the ramp's rescaling is set by ramp)")
        for key in ("logical_batch_size", "physical_batch_size", "tokens", "val_batch_size", "val_time_points",
                    "val_replicates"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive int, got {getattr(self, key)!r}")
        for key in ("val_sequences", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be a non-negative int, got {getattr(self, key)!r}")
        if not 0 <= self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: off), got {self.max_grad_norm!r}")
        if self.noise_probe is not False and (not isinstance(self.noise_probe, int) or
                                              (self.noise_probe != 0 and self.noise_probe < 64)):
            raise ValueError(f"noise_probe must be 0 (off) or an int >= 64 (sequences), got {self.noise_probe!r}")
        for key in ("seed", "init_seed", "data_seed", "draw_seed"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be a non-negative int{' or None' if key != 'seed' else ''}, "
                                 f"got {getattr(self, key)!r}")
        if self.checkpoint_every and not self.out:
            raise ValueError("checkpoint_every needs an out folder (out = '' writes nothing)")


RENAMED = {"noise_scale": "estimate_noise_scale"}
"""Keys of earlier configs and their names now."""

DEFAULTS: dict[str, Any] = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
                            for f in fields(TrainConfig)}
"""Every key with its default (the fields of :class:`TrainConfig`)."""


def _is(value: Any, kind: Any) -> bool:
    """isinstance for the annotations of TrainConfig: a bool is not an int, an int is a float, ``X | None``."""
    if isinstance(kind, types.UnionType):
        return any(_is(value, k) for k in kind.__args__)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind: Any) -> str:
    if isinstance(kind, types.UnionType):
        return " or ".join(_describe(k) for k in kind.__args__)
    return {bool: "a bool", int: "an int", float: "a number", str: "a string", dict: "a table", list: "a list",
            type(None): "None"}.get(kind, getattr(kind, "__name__", str(kind)))


def load_config(path: str | Path | None = None, **overrides: Any) -> dict:
    """:data:`DEFAULTS`, updated by a TOML file and then by ``overrides``, checked by :class:`TrainConfig` (unknown
    keys and ill-typed values are errors naming the key); returned as a dict."""
    config = dict(DEFAULTS)
    if path is not None:
        config.update(tomllib.loads(Path(path).read_text()))
    config.update(overrides)
    for old, new in RENAMED.items():  # configs stored with earlier checkpoints and runs
        if old in config:
            config.setdefault(new, config.pop(old))
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(DEFAULTS)}")
    return asdict(TrainConfig(**config))


def seed_of(config: dict, source: str) -> int:
    """The seed of one source of randomness ("init", "data" or "draw"): ``<source>_seed`` if set, else ``seed``."""
    value = config.get(f"{source}_seed")
    return int(config["seed"] if value is None else value)
