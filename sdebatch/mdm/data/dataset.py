"""The tokenized tri-modal dataset on disk: memory-mapped shards plus an index, laid out into sequences on read.

A prepared folder holds ``index.json`` and, per split, ``text_<split>.npy`` (packed sequences, already laid out),
``image_<split>_codes.npy`` / ``image_<split>_captions.npy`` (codes per image; caption ids padded with -1) and
``audio_<split>_codes.npy`` + ``audio_<split>_offsets.npy`` (variable-length codes, flat) / ``audio_<split>_captions.npy``.
Pairs are laid out when read, so the task direction (text-to-image or image-to-text, ...) is chosen per read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..vocab import TASKS, Vocab, layout_pair

INDEX_VERSION = 1


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / "index.json"
    if not Path(folder).is_dir():
        raise ValueError(f"data folder {folder} does not exist: make it with `sdebatch data prepare --out {folder}` "
                         "(or point the config's data key at a prepared folder)")
    if not path.exists():  # the index is written last: without it the folder is unprepared or half-prepared
        raise ValueError(f"data folder {folder} is not prepared (no index.json): finish it with `sdebatch data "
                         f"prepare --out {folder}` (finished stages are kept)")
    index = json.loads(path.read_text())
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {index.get('version')}, this code reads {INDEX_VERSION}")
    return index


def _captions(arr: np.ndarray, i: int) -> list[int]:
    row = arr[i]
    return [int(t) for t in row[row >= 0]]


class TriModalDataset(Dataset):
    """Items keyed by ``(source, index)`` with source "text", "image" or "audio".

    Args:
        folder: a prepared data folder.
        split: "train" or "val".
        generate_prob: for a pair, the probability of the generation direction (text-to-image / text-to-speech)
            rather than the reverse (captioning / recognition). Default 0.8. Chosen deterministically per item.
        seed: makes the direction choice reproducible (default 0).
    """

    def __init__(self, folder: str | Path, split: str = "train", *, generate_prob: float = 0.8, seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= generate_prob <= 1.0:
            raise ValueError(f"generate_prob must be in [0, 1], got {generate_prob}")
        self.folder, self.split = Path(folder), split
        self.index = read_index(folder)
        self.vocab = Vocab(**self.index["vocab"])
        self.seq_len = int(self.index["seq_len"])
        self.generate_prob, self.seed = generate_prob, seed
        f = self.folder

        def load(name: str) -> np.ndarray:
            return np.load(f / f"{name}.npy", mmap_mode="r")
        self.text = load(f"text_{split}")
        self.image_codes, self.image_captions = load(f"image_{split}_codes"), load(f"image_{split}_captions")
        self.audio_codes, self.audio_offsets = load(f"audio_{split}_codes"), load(f"audio_{split}_offsets")
        self.audio_captions = load(f"audio_{split}_captions")

    @property
    def sizes(self) -> dict[str, int]:
        return {"text": len(self.text), "image": len(self.image_codes), "audio": len(self.audio_offsets) - 1}

    def _direction(self, source: str, i: int) -> str:
        u = ((i * 2654435761 + self.seed * 40503 + (source == "audio")) % 1_000_003) / 1_000_003
        gen = u < self.generate_prob
        return {"image": ("t2i" if gen else "i2t"), "audio": ("t2s" if gen else "s2t")}[source]

    def pair(self, source: str, i: int, task: str | None = None) -> dict:
        """Item ``i`` of a pair source laid out for ``task`` (default: the item's own direction)."""
        task = task or self._direction(source, i)
        if source == "image":
            return layout_pair(self.vocab, task, _captions(self.image_captions, i), self.image_codes[i].tolist(),
                               self.seq_len)
        a, b = int(self.audio_offsets[i]), int(self.audio_offsets[i + 1])
        return layout_pair(self.vocab, task, _captions(self.audio_captions, i), self.audio_codes[a:b].tolist(),
                           self.seq_len)

    def __getitem__(self, key: tuple[str, int] | tuple[str, int, int]) -> dict:
        """``(source, index)``, or ``(source, index, position)`` to carry the stream position as ``position``."""
        source, i = key[0], key[1]
        if source == "text":
            tokens = torch.from_numpy(np.asarray(self.text[i], dtype=np.int64))
            modality = self.vocab.modality_of(tokens)
            item = {"tokens": tokens, "pad": torch.ones_like(tokens, dtype=torch.bool), "modality": modality,
                    "target": torch.arange(len(tokens)) > 0, "task": TASKS.index("text")}
        elif source in ("image", "audio"):
            item = self.pair(source, i)
        else:
            raise KeyError(f"source must be 'text', 'image' or 'audio', got {source!r}")
        if len(key) == 3:
            item["position"] = int(key[2])
        return item

    def __len__(self) -> int:
        return sum(self.sizes.values())
