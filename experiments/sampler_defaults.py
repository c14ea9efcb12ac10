"""Measure the sampler options behind ``sdebatch.mdm.sample.SAMPLING_DEFAULTS`` on a trained checkpoint.

    python -m experiments.sampler_defaults --checkpoint runs/train_tiny/model.pt [--images 100] [--speech 8]

Draws text-to-image for the held-out captions under a small grid of image options (guidance, nucleus, order,
temperature) and text-to-speech under a grid of audio options, scores each with ``sdebatch eval``'s scorers (pixel
attributes; mel-cepstral distortion to eSpeak) and prints one table per modality. Same seed for every setting, so
rows differ only by the options. Writes ``<out>/sampler_defaults.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdebatch.mdm.evaluate import evaluate_checkpoint
from sdebatch.mdm.train import load_config
from sdebatch.utils import atomic_write

IMAGE_GRID = [
    {"guidance": 1.0}, {"guidance": 3.0}, {"guidance": 5.0}, {"guidance": 8.0},
    {"guidance": 5.0, "top_p": None}, {"guidance": 5.0, "temperature": 0.8},
    {"guidance": 5.0, "strategy": "low_confidence"}, {"guidance": 5.0, "steps": 64},
]
AUDIO_GRID = [{"guidance": 1.0}, {"guidance": 2.0}, {"guidance": 4.0}, {"guidance": 2.0, "strategy": "random"}]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", help="the training config (default: sdebatch.mdm.train.DEFAULTS)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--speech", type=int, default=8)
    parser.add_argument("--out", default="runs/sampler_defaults")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    rows = []
    for modality, grid in (("image", IMAGE_GRID), ("audio", AUDIO_GRID)):
        for options in grid:
            start = time.time()
            report = evaluate_checkpoint(
                config, args.checkpoint, Path(args.out) / "scratch", progress=False,
                n_images=args.images if modality == "image" else 0, n_speech=args.speech if modality == "audio" else 0,
                text_rows=1, sampler={modality: options})
            if modality == "image":
                score = report["t2i"]["scores"]
                row = {"modality": modality, **options, **{k: round(v, 3) for k, v in score.items()}}
            else:
                row = {"modality": modality, **options, "mcd_db": round(report["t2s"]["mcd_db"], 2)}
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out) / "sampler_defaults.json", json.dumps(rows, indent=1).encode())
    return rows


if __name__ == "__main__":
    main()
