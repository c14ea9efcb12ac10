"""`sdebatch data prepare`: sources -> tokenizers -> token shards, end to end, with no download.

Stages (each skipped when its outputs exist, each written atomically, each printing what it made):
  text    built-in CPython docs (or ``text_dir``) -> byte-level BPE -> packed sequences
  image   rendered scenes with captions (or ``image_dir``, an image folder with metadata.jsonl) -> VQ-VAE -> codes
  audio   short sentences spoken by eSpeak NG (or ``audio_dir``, an LJSpeech folder) -> mel-frame VQ -> codes
  index   index.json: vocabulary, sequence length, counts of samples and tokens per modality and split
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ...utils import atomic_write
from ..tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from ..tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from ..vocab import Vocab, pack_text
from .dataset import INDEX_VERSION
from .scenes import generate_scenes, load_image_folder, to_tensor
from .speech import load_ljspeech, synthesize
from .text import TextTokenizer, builtin_corpus, load_text_folder

PRESETS = {
    # seconds: for tests of the whole pipeline
    "micro": dict(seq_len=128, text_vocab=300, images=60, image_val=10, image_steps=10, image_channels=16,
                  image_res_blocks=1, audio=30, audio_val=6, audio_codes=16, audio_iterations=3, max_caption=12,
                  val_fraction=0.05),
    # trains on a 2-core CPU in a couple of minutes; the model's tiny config reads it
    "tiny": dict(seq_len=128, text_vocab=1024, images=3000, image_val=200, image_steps=2000, image_channels=64,
                 image_res_blocks=1, audio=1200,
                 audio_val=100, audio_codes=256, audio_iterations=25, max_caption=24, val_fraction=0.05),
    # the smallest useful size for the "small" model config on one GPU
    "small": dict(seq_len=256, text_vocab=4096, images=20000, image_val=500, image_steps=3000, image_channels=128,
                  image_res_blocks=2, audio=8000,
                  audio_val=300, audio_codes=512, audio_iterations=40, max_caption=48, val_fraction=0.02),
}


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def _done(out: Path, stage: str) -> bool:
    return (out / f".{stage}.done").exists()


def _mark(out: Path, stage: str, info: dict) -> None:
    atomic_write(out / f".{stage}.done", json.dumps(info).encode())


def _pad_rows(rows: list[list[int]], width: int) -> np.ndarray:
    arr = np.full((len(rows), width), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return arr


def _sentences(docs: list[str], n: int, *, min_words: int = 3, max_words: int = 8) -> list[str]:
    """Short plain sentences from the text corpus, for speech (unique, deterministic order)."""
    seen, out = set(), []
    for doc in docs:
        for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")):
            s = s.strip()
            words = s.split()
            if min_words <= len(words) <= max_words and re.fullmatch(r"[A-Za-z ,.'-]+[.!?]?", s) and s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == n:
                    return out
    return out


def prepare(out: str | Path, *, preset: str = "tiny", text_dir: str | None = None, image_dir: str | None = None,
            audio_dir: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Make a data folder; returns the index. Rerunning skips finished stages."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    p = PRESETS[preset]
    out = Path(out)
    (out / "tokenizers").mkdir(parents=True, exist_ok=True)
    log = print if progress else (lambda *a, **k: None)
    t0 = time.time()

    # --- text ---
    docs = load_text_folder(text_dir)[0] if text_dir else builtin_corpus()
    if not _done(out, "text"):
        tok = TextTokenizer.train(docs, p["text_vocab"])
        tok.save(out / "tokenizers" / "text")
    tok = TextTokenizer.load(out / "tokenizers" / "text")
    n_val = max(1, int(len(docs) * p["val_fraction"]))
    if not _done(out, "text"):
        for split, part in (("train", docs[n_val:]), ("val", docs[:n_val])):
            ids = tok.encode_batch(part)
            vocab = Vocab(tok.vocab_size, 1, 1)  # text ids sit right after the specials, whatever the code sizes
            seqs = [s["tokens"].numpy() for s in pack_text(vocab, ids, p["seq_len"])]
            _save_npy(out / f"text_{split}.npy", np.stack(seqs).astype(np.int32))
        _mark(out, "text", {})
        log(f"[text] {len(docs)} documents, BPE vocab {tok.vocab_size}, {time.time() - t0:.0f}s")

    # --- image-text ---
    if not _done(out, "image"):
        t = time.time()
        if image_dir:
            data = load_image_folder(image_dir, 32, skip_bad=True)
            images, captions, attrs = data.images, data.captions, data.rows
            log(f"[image] read {len(captions)} pairs from {image_dir} ({data.n_skipped} skipped)")
        else:
            scenes = generate_scenes(p["images"] + p["image_val"], size=32, seed=seed)
            images, captions = to_tensor(scenes), [s.caption for s in scenes]
            attrs = [s.attributes for s in scenes]
        n_val_img = min(p["image_val"], len(captions) // 10 or 1)
        icfg = ImageTokenizerConfig(channels=p["image_channels"], res_blocks=p["image_res_blocks"])
        itok = ImageTokenizer.train(images[n_val_img:], icfg, steps=p["image_steps"], seed=seed, progress=progress)
        itok.save(out / "tokenizers" / "image")
        report = itok.evaluate(images[:n_val_img])
        codes = itok.encode(images).numpy().astype(np.int32)
        caps = [tok.encode(c)[:p["max_caption"]] for c in captions]
        for split, sl in (("train", slice(n_val_img, None)), ("val", slice(0, n_val_img))):
            _save_npy(out / f"image_{split}_codes.npy", codes[sl])
            _save_npy(out / f"image_{split}_captions.npy", _pad_rows(caps[sl], p["max_caption"]))
            rows = [{"text": c, **(a if isinstance(a, dict) else {})} for c, a in zip(captions[sl], attrs[sl])]
            atomic_write(out / f"image_{split}_meta.jsonl", ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
        _mark(out, "image", {"tokenizer": report})
        log(f"[image] {len(captions)} pairs, {codes.shape[1]} codes each, held-out PSNR {report['psnr']:.1f} dB "
            f"(mean-colour baseline {report['baseline_psnr']:.1f}), codebook use {report['utilisation']:.0%}, "
            f"{time.time() - t:.0f}s")

    # --- audio-text ---
    if not _done(out, "audio"):
        t = time.time()
        acfg = AudioTokenizerConfig(codebook_size=p["audio_codes"])
        if audio_dir:
            sp = load_ljspeech(audio_dir, acfg.sample_rate, skip_bad=True)
            texts, waves = list(sp.texts), list(sp.waves)
        else:
            # short sentences of the docs, then spoken scene captions (also what text-to-speech is evaluated on)
            need = p["audio"] + p["audio_val"]
            texts = _sentences(docs, need)
            seen = set(texts)
            for scene in generate_scenes(4 * need, seed=seed + 1):
                if len(texts) >= need:
                    break
                if scene.caption not in seen:
                    seen.add(scene.caption)
                    texts.append(scene.caption)
            texts = texts[::-1]  # validation (the first items) = captions, like the image pairs
            waves = synthesize(texts, sample_rate=acfg.sample_rate)
        n_val_a = min(p["audio_val"], len(texts) // 10 or 1)
        atok = AudioTokenizer.train(waves[n_val_a:], acfg, iterations=p["audio_iterations"], seed=seed,
                                    progress=progress)
        atok.save(out / "tokenizers" / "audio")
        report = atok.evaluate(waves[:min(n_val_a, 32)])
        codes = [c.numpy().astype(np.int32) for c in atok.encode_batch(waves)]
        caps = [tok.encode(s)[:p["max_caption"]] for s in texts]
        budget = p["seq_len"] - 5
        keep = [i for i in range(len(texts)) if len(codes[i]) + len(caps[i]) <= budget]
        dropped = len(texts) - len(keep)
        for split, ids in (("train", [i for i in keep if i >= n_val_a]), ("val", [i for i in keep if i < n_val_a])):
            flat = np.concatenate([codes[i] for i in ids]) if ids else np.zeros(0, np.int32)
            offsets = np.cumsum([0] + [len(codes[i]) for i in ids]).astype(np.int64)
            _save_npy(out / f"audio_{split}_codes.npy", flat)
            _save_npy(out / f"audio_{split}_offsets.npy", offsets)
            _save_npy(out / f"audio_{split}_captions.npy", _pad_rows([caps[i] for i in ids], p["max_caption"]))
            atomic_write(out / f"audio_{split}_meta.jsonl",
                         ("\n".join(json.dumps({"text": texts[i]}) for i in ids) + "\n").encode())
        _mark(out, "audio", {"tokenizer": {k: v for k, v in report.items() if not isinstance(v, (list, dict))}})
        log(f"[audio] {len(keep)} pairs ({dropped} too long for seq_len {p['seq_len']}), {atok.tokens_per_second:.1f} "
            f"codes/s, held-out log-mel L1 {report.get('logmel_l1', float('nan')):.2f}, {time.time() - t:.0f}s")

    return _write_index(out, p, tok)


def _write_index(out: Path, p: dict, tok: TextTokenizer) -> dict:
    itok_cfg = json.loads((out / "tokenizers" / "image" / "config.json").read_text())
    atok_cfg = json.loads((out / "tokenizers" / "audio" / "config.json").read_text())
    image_codes = int(itok_cfg["config"]["codebook_size"])  # the layout tokenizers/files.py writes
    audio_codes = int(atok_cfg["config"]["codebook_size"])
    vocab = Vocab(tok.vocab_size, image_codes, audio_codes)
    counts = {}
    for split in ("train", "val"):
        text = np.load(out / f"text_{split}.npy", mmap_mode="r")
        img = np.load(out / f"image_{split}_codes.npy", mmap_mode="r")
        icap = np.load(out / f"image_{split}_captions.npy", mmap_mode="r")
        aoff = np.load(out / f"audio_{split}_offsets.npy", mmap_mode="r")
        acap = np.load(out / f"audio_{split}_captions.npy", mmap_mode="r")
        counts[split] = {
            "text": {"samples": int(text.shape[0]), "tokens": int(text.size)},
            "image": {"samples": int(img.shape[0]), "tokens": int(img.size + (np.asarray(icap) >= 0).sum())},
            "audio": {"samples": int(len(aoff) - 1), "tokens": int(aoff[-1] + (np.asarray(acap) >= 0).sum())},
        }
    index = {"version": INDEX_VERSION, "seq_len": p["seq_len"], "vocab": vocab.state_dict(), "counts": counts}
    atomic_write(out / "index.json", json.dumps(index, indent=2).encode())
    for split, c in counts.items():
        line = ", ".join(f"{m}: {v['samples']} samples / {v['tokens']:,} tokens" for m, v in c.items())
        print(f"[index] {split}: {line}; vocab {vocab.size} ids")
    return index
