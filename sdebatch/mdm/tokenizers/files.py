"""The on-disk layout both trained tokenizers share: ``weights.pt`` (a torch state) and ``config.json`` (format,
version, config), each written atomically, the config last so that a folder with a config is complete."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...utils import atomic_write


def save_folder(folder, state: dict, fmt: str, version: int, config: dict) -> Path:
    """Write ``state`` to ``weights.pt`` then ``config.json``; returns the folder (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "weights.pt", lambda f: torch.save(state, f))
    meta = {"format": fmt, "version": version, "config": config}
    atomic_write(folder / "config.json", json.dumps(meta, indent=1).encode())
    return folder


def load_folder(folder, kind: str, fmt: str, version: int) -> tuple[dict, Any, Path, Path]:
    """(config dict, weights state, config path, weights path) of a folder written by :func:`save_folder`;
    ValueError naming the file when it is absent or of another format/version (``kind`` names the tokenizer)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "weights.pt"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{folder} is not a saved {kind} tokenizer (needs config.json and weights.pt)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ValueError(f"{cfg_path}: format/version {meta.get('format')}/{meta.get('version')}, "
                         f"expected {fmt}/{version}")
    return meta["config"], torch.load(w_path, map_location="cpu", weights_only=True), cfg_path, w_path
