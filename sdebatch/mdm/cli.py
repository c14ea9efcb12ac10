"""The tri-modal workload's commands, added to ``sdebatch``: ``data prepare``, ``train``, ``eval``, ``sample``.

Only the standard library is imported here (``sdebatch rules`` must not load Lightning); each command imports what it
runs. A command raises ValueError for bad input, which ``sdebatch`` prints as a usage error (exit 2).
"""
from __future__ import annotations

import argparse
import tomllib

from .vocab import TASKS


def key_value(item: str, flag: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a TOML value (none / null: None); errors name the flag and the key."""
    key, eq, value = item.partition("=")
    if not key or not eq or not value:
        raise ValueError(f"{flag} takes KEY=VALUE (a TOML value), got {item!r}")
    if value.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError(f"{flag} {key}: {value!r} is not a TOML value (numbers as 8 or 3e-4, strings quoted: "
                         f"{key}='\"text\"', booleans true/false)") from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the workload's subcommands to ``sdebatch``'s subparsers; each sets ``run`` (args -> exit code)."""
    data = sub.add_parser("data", help="prepare the tri-modal workload's data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="sources -> tokenizers -> token shards (idempotent, no download)")
    prep.add_argument("--preset", default="tiny")
    prep.add_argument("--out", default="data/tiny")
    prep.add_argument("--text-dir", help="folder of .txt/.md/.jsonl (default: built-in CPython docs)")
    prep.add_argument("--image-dir", help="image folder with metadata.jsonl (default: rendered scenes)")
    prep.add_argument("--audio-dir", help="LJSpeech-layout folder (default: eSpeak NG speech)")
    prep.add_argument("--seed", type=int, default=0)
    prep.set_defaults(run=prepare_command)
    tr = sub.add_parser("train", help="train the tri-modal masked diffusion model")
    tr.add_argument("--config", help="TOML config (keys: sdebatch.mdm.config.TrainConfig)")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys (TOML values)")
    tr.add_argument("--ckpt", help="resume from this checkpoint")
    tr.set_defaults(run=train_command)
    ev = sub.add_parser("eval", help="evaluate a trained model: text ELBO, text-to-image, text-to-speech")
    ev.add_argument("--config", help="the training config (default: the one the checkpoint carries)")
    ev.add_argument("--data", help="the prepared data folder (default: the config's)")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint or weights file written by sdebatch train")
    ev.add_argument("--out", default="runs/eval")
    ev.add_argument("--images", type=int, default=100, help="held-out captions to draw images for (default 100)")
    ev.add_argument("--speech", type=int, default=8, help="held-out sentences to speak (default 8)")
    ev.add_argument("--sampler", nargs="*", default=[], metavar="MODALITY.KEY=VALUE",
                    help="sampler options over the defaults, e.g. image.guidance=5.0 (TOML values)")
    ev.set_defaults(run=eval_command)
    sa = sub.add_parser("sample", help="generate with a trained model: text, t2i, i2t, t2s, s2t")
    sa.add_argument("--checkpoint", required=True, help="model.pt or a .ckpt written by sdebatch train")
    sa.add_argument("--task", required=True, choices=list(TASKS),
                    help="text: continue / infill --prompt; t2i, t2s: draw / speak --prompt; i2t, s2t: caption "
                         "--input (an image / a WAV)")
    sa.add_argument("--prompt", help="text (text, t2i, t2s); for text, [MASK] or [MASK:n] marks tokens to fill")
    sa.add_argument("--input", help="an image file (i2t) or a WAV file (s2t)")
    sa.add_argument("--n", type=int, default=1, help="samples, one batch (default 1)")
    sa.add_argument("--length", type=int, help="tokens to generate: text continuation (default 64; 0 with [MASK] "
                    "markers), audio codes (t2s), caption tokens (i2t, s2t); default from the training data")
    sa.add_argument("--seed", type=int, default=0, help="seeds every draw (default 0)")
    sa.add_argument("--out", default="runs/sample", help="folder for samples.json, PNGs, WAVs (default runs/sample)")
    sa.add_argument("--sampler", nargs="*", default=[], metavar="KEY=VALUE",
                    help="sampler options over SAMPLING_DEFAULTS of the generated modality, e.g. guidance=3.0 "
                         "temperature=0.8 top_p=none (TOML values)")
    sa.add_argument("--config", help="the training config (default: the one the checkpoint carries)")
    sa.add_argument("--data", help="the prepared data folder (default: the config's)")
    sa.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    sa.set_defaults(run=sample_command)


def prepare_command(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    prepare(args.out, preset=args.preset, text_dir=args.text_dir, image_dir=args.image_dir,
            audio_dir=args.audio_dir, seed=args.seed)
    return 0


def train_command(args: argparse.Namespace) -> int:
    from . import train

    overrides = dict(key_value(item, "--set") for item in args.set)
    result = train.train(train.load_config(args.config, **overrides), ckpt_path=args.ckpt)
    result.pop("module")
    print(result)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    sampler: dict = {}
    for item in args.sampler:
        key, value = key_value(item, "--sampler")
        modality, _, option = key.partition(".")
        if modality not in ("image", "audio") or not option:
            raise ValueError(f"--sampler takes image.KEY=VALUE or audio.KEY=VALUE, got {item!r}")
        sampler.setdefault(modality, {})[option] = value
    evaluate_checkpoint(None, args.checkpoint, args.out, config_path=args.config, data=args.data,
                        n_images=args.images, n_speech=args.speech, sampler=sampler)
    return 0


def sample_command(args: argparse.Namespace) -> int:
    from . import tasks

    options = tasks.sampler_options(args.task, dict(key_value(i, "--sampler") for i in args.sampler))
    trained = tasks.load_trained(args.checkpoint, args.config, data=args.data)
    request = tasks.build_request(trained, args.task, prompt=args.prompt, input=args.input, length=args.length)
    result = tasks.run(trained, request, n=args.n, seed=args.seed, options=options, progress=not args.quiet)
    print(tasks.summary(result, tasks.write(result, args.out)))
    return 0
