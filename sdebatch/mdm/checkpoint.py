"""Checkpoints of the tri-modal MDM: the training record they carry, the denoiser's weights, the checks that a
checkpoint fits the config and the data folder it is used with (each failure names the file and the fix), and
:func:`load_trained`: a checkpoint loaded with its data folder's tokenizers, ready to sample.

A checkpoint knows how it was trained: ``sdebatch train`` puts its record (the resolved config and the data's
vocabulary sizes) into every Lightning checkpoint (key ``"sdebatch_mdm"``) and writes it beside ``model.pt`` as
``train_config.json``; a sweep run's folder also has the sweep's ``config.json`` beside its ``model.pt``. So
``sdebatch eval`` / ``sdebatch sample`` need no ``--config``, and a config or data folder that does not match the
checkpoint is an error before any work, not a shape error deep in torch or, worse, samples from the wrong vocabulary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import torch

from ..ema import ema_params_in_checkpoint
from .vocab import Vocab

RECORD_KEY = "sdebatch_mdm"              # in a Lightning checkpoint
RECORD_FILE = "train_config.json"        # beside a weights file
MODEL_KEYS = ("model", "model_overrides")  # the config keys that fix the weights' shapes


def training_record(config: dict, vocab: Vocab | dict) -> dict:
    """What a checkpoint carries about its training: the config and the vocabulary sizes of its data."""
    return {"config": dict(config), "vocab": vocab.state_dict() if isinstance(vocab, Vocab) else dict(vocab)}


def read_checkpoint(path: str | Path) -> Any:
    """The object saved at ``path`` (a Lightning checkpoint or a state dict); ValueError naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist (sdebatch train writes <out>/model.pt, and with "
                         "checkpoint_every <out>/checkpoints/*.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning checkpoints pickle more than tensors (loop and callback state): our own files
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is not a torch checkpoint ({type(e).__name__}: {e})") from None


def record_of(obj: Any, path: str | Path) -> dict | None:
    """The training record of a checkpoint: inside a Lightning checkpoint, else ``train_config.json`` (or a sweep
    run's ``config.json``, keys of the MDM config only) beside the file or one folder up (``<out>/checkpoints/``);
    None when there is none (files written before records existed)."""
    from .config import DEFAULTS

    if isinstance(obj, dict) and isinstance(obj.get(RECORD_KEY), dict):
        return obj[RECORD_KEY]
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        if (folder / RECORD_FILE).is_file():
            return json.loads((folder / RECORD_FILE).read_text())
        if (folder / "config.json").is_file():
            sweep_config = json.loads((folder / "config.json").read_text())
            if isinstance(sweep_config, dict) and "model" in sweep_config:
                return {"config": {k: v for k, v in sweep_config.items() if k in DEFAULTS}, "vocab": None}
    return None


def resolve_config(record: dict | None, config_path: str | Path | None = None, **overrides: Any) -> dict:
    """The config to use a checkpoint with: ``config_path`` when given (its model keys must match the checkpoint's),
    else the checkpoint's own, else the defaults; then ``overrides`` (e.g. ``data``). Checked by
    :func:`sdebatch.mdm.train.load_config`."""
    from .config import load_config

    if config_path is not None:
        config = load_config(config_path, **overrides)
        check_config(record, config, f"--config {config_path}")
        return config
    base = dict(record["config"]) if record is not None else {}
    return load_config(None, **{**base, **overrides})


def check_config(record: dict | None, config: dict, what: str = "the config") -> None:
    """ValueError when ``config`` builds another model than the checkpoint's record (its model keys differ)."""
    if record is None:
        return
    trained = record["config"]
    diff = [k for k in MODEL_KEYS if k in trained and trained[k] != config.get(k)]
    if diff:
        raise ValueError(f"{what} has {', '.join(f'{k}={config.get(k)!r}' for k in diff)} but the checkpoint was "
                         f"trained with {', '.join(f'{k}={trained[k]!r}' for k in diff)}: drop the config (the "
                         "checkpoint carries its own) or pass the one it was trained with")


def data_vocab(config: dict, record: dict | None) -> Vocab:
    """The vocabulary of ``config["data"]``, checked against the one the checkpoint was trained on."""
    from .data.dataset import read_index

    folder = config["data"]
    vocab = Vocab(**read_index(folder)["vocab"])
    trained = (record or {}).get("vocab")
    if trained and Vocab(**trained) != vocab:
        raise ValueError(f"the checkpoint was trained on a vocabulary of {Vocab(**trained)} but the data folder "
                         f"{folder} has {vocab}: pass the data folder it was trained on (--data, or data in --config)")
    return vocab


def open_checkpoint(path: str | Path, *, config: dict | None = None, config_path: str | Path | None = None,
                    data: str | None = None) -> tuple[Any, dict | None, dict, Vocab]:
    """Read a checkpoint once and settle what it is used with: ``config`` (a dict, checked against the checkpoint's
    record), else ``config_path`` (checked likewise), else the record's own config (else the defaults), ``data``
    overriding the data folder; the folder's vocabulary is checked against the record's. Returns (the checkpoint
    object, its record, the config, the vocabulary)."""
    obj = read_checkpoint(path)
    record = record_of(obj, path)
    if config is None:
        config = resolve_config(record, config_path, **({"data": data} if data is not None else {}))
    else:
        check_config(record, config)
    return obj, record, config, data_vocab(config, record)


def model_state(obj: Any, model: torch.nn.Module) -> tuple[dict, str]:
    """The denoiser's state dict from a Lightning checkpoint (its EMA weights when the checkpoint has them) or a
    plain state dict (of the denoiser, of MDMModule, or of a compiled model), and where it came from."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd, source = obj["state_dict"], "checkpoint"
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, source = obj, "state_dict"
    else:
        raise ValueError("the checkpoint is neither a Lightning checkpoint (with 'state_dict') nor a state dict")
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        for prefix in ("model._orig_mod.", "model.", "_orig_mod.", ""):
            if k.startswith(prefix) and k[len(prefix):] in own:
                out[k[len(prefix):]] = v
                break
    missing = sorted(set(own) - set(out))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]} "
                         "(was it trained with another model config or data folder?)")
    # EMA weights saved by the Lightning callback, in MDMModule.parameters() order = model order. An EMA that does
    # not fit is an error: evaluating the raw weights instead would report other numbers silently.
    ema = ema_params_in_checkpoint(obj) if source == "checkpoint" else None
    if ema is not None:
        _check_ema(ema, model)
        out.update(dict(zip((n for n, _ in model.named_parameters()), ema)))
        source = "checkpoint (EMA weights)"
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in out.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k, theirs, ours = wrong[0]
        raise ValueError(f"the checkpoint's weights do not fit the model: {len(wrong)} differ in shape, e.g. {k} is "
                         f"{theirs} in the checkpoint and {ours} in the model (another model config, or a data folder "
                         "with another vocabulary: pass the config and data folder it was trained with)")
    return out, source


def _check_ema(params: list, model: torch.nn.Module) -> None:
    """ValueError when the EMA weights of a checkpoint are not one tensor per parameter of ``model``, in its order
    and of its shapes."""
    named = list(model.named_parameters())
    fix = ("the checkpoint's EMA belongs to another model than its weights: evaluate a checkpoint written by "
           "`sdebatch train` for this model, or its raw weights alone (torch.save(ckpt['state_dict'], "
           "'weights.pt') and pass weights.pt)")
    if len(params) != len(named):
        raise ValueError(f"the checkpoint's EMA weights do not fit the model: {len(params)} EMA tensors for the "
                         f"model's {len(named)} parameters; {fix}")
    for p, (name, own) in zip(params, named):
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else None
        if shape != tuple(own.shape):
            raise ValueError(f"the checkpoint's EMA weights do not fit the model: {name} is "
                             f"{shape if shape is not None else type(p).__name__} in the EMA and {tuple(own.shape)} "
                             f"in the model; {fix}")


def load_model(obj: Any, config: dict, vocab: Vocab, device: str | torch.device = "cpu", *,
               guessed: bool = False):
    """The denoiser ``config`` builds for ``vocab`` (as ``sdebatch train`` does, without Lightning) with the
    checkpoint's weights, in eval mode on ``device``; returns (model, where the weights came from). ``guessed``: the
    config is the defaults (the checkpoint has no record), which a failure says."""
    from .model import build_model, train_model_config

    model = build_model(train_model_config(config, vocab.size))
    try:
        state, source = model_state(obj, model)
    except ValueError as e:
        if not guessed:
            raise
        raise ValueError(f"{e}; the checkpoint carries no config, so the defaults (model={config['model']!r}) were "
                         "tried: pass --config, the one it was trained with") from None
    model.load_state_dict(state)
    return model.to(device).eval(), source


@dataclass
class TrainedModel:
    """A trained denoiser with the data folder whose tokenizers and statistics sampling needs.

    Build it with :func:`load_trained`. Tokenizers are loaded when first used.
    """

    model: torch.nn.Module
    vocab: Vocab
    config: dict
    seq_len: int
    weights: str = ""  # where the weights came from ("state_dict", "checkpoint (EMA weights)", ...)

    @property
    def folder(self) -> Path:
        return Path(self.config["data"])

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @cached_property
    def text_tokenizer(self):
        from .data.text import TextTokenizer

        return TextTokenizer.load(self.folder / "tokenizers" / "text")

    @cached_property
    def image_tokenizer(self):
        from .tokenizers.image import ImageTokenizer

        return ImageTokenizer.load(self.folder / "tokenizers" / "image")

    @cached_property
    def audio_tokenizer(self):
        from .tokenizers.audio import AudioTokenizer

        return AudioTokenizer.load(self.folder / "tokenizers" / "audio")

    def captions(self, source: str) -> np.ndarray:
        """Training caption lengths (tokens) of a pair source; their array's width is the longest caption kept."""
        arr = np.load(self.folder / f"{source}_train_captions.npy", mmap_mode="r")
        return np.asarray(arr)

    def codes_per_caption_token(self) -> float:
        """Audio codes per caption token over the training pairs (how long speech for a sentence should be)."""
        offsets = np.load(self.folder / "audio_train_offsets.npy")
        tokens = int((self.captions("audio") >= 0).sum())
        return float(offsets[-1]) / max(tokens, 1)


def load_trained(checkpoint: str | Path, config_path: str | Path | None = None, *, data: str | None = None,
                 device: str | torch.device | None = None) -> TrainedModel:
    """Load a checkpoint of ``sdebatch train`` with the config it carries (or ``config_path``) and check it against
    its data folder (``data`` overrides the config's): every mismatch is a ValueError naming the file and the fix.

    Args:
        checkpoint: ``<out>/model.pt``, a Lightning ``.ckpt`` (EMA weights when it has them) or a state dict.
        config_path: a training config TOML (default: the checkpoint's own record, else the defaults).
        data: the prepared data folder (default: the config's ``data``).
        device: default CUDA when available, else CPU.
    """
    from .data.dataset import read_index

    obj, record, config, vocab = open_checkpoint(checkpoint, config_path=config_path, data=data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, source = load_model(obj, config, vocab, device, guessed=record is None and config_path is None)
    missing = [f"tokenizers/{k}/config.json" for k in ("text", "image", "audio")
               if not (Path(config["data"]) / "tokenizers" / k / "config.json").is_file()]
    if missing:
        raise ValueError(f"data folder {config['data']} lacks {', '.join(missing)}: finish it with "
                         f"`sdebatch data prepare --out {config['data']}`")
    return TrainedModel(model, vocab, config, int(read_index(config["data"])["seq_len"]), source)
