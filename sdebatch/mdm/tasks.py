"""`sdebatch sample`: the five tasks of a trained tri-modal MDM, from the user's input to files.

    text  continue a prompt by ``length`` tokens (default 64), or fill its [MASK] markers ([MASK] is one token,
          [MASK:8] eight; then ``length`` defaults to 0): prints the text
    t2i   a caption -> image codes -> one PNG per sample and a captioned grid (``t2i_grid.png``)
    t2s   a sentence -> audio codes -> one WAV per sample; the number of codes is the sentence's tokens times the
          training data's audio codes per caption token, unless ``length`` is given
    i2t   an image file (resized to the tokenizer's size) -> codes -> a caption per sample, printed
    s2t   a WAV file (mixed to mono, resampled to the tokenizer's rate) -> codes -> a caption per sample, printed

Captions are generated at ``length`` tokens (default: the median caption of the training data of that pair); a
caption the model ends early (an [EOT] inside) is cut there. The ``n`` samples are rows of one batch that differ by
their random draws (text's default sampler is greedy, so its rows agree unless a temperature is given). Sampler
options: :data:`sdebatch.mdm.sample.SAMPLING_DEFAULTS` of the generated modality, the caller's on top. Inputs are
checked (:func:`build_request`) before anything is generated or written; every file is written atomically and
``samples.json`` records the request, the options, the outputs and the timing.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..progress import Progress
from ..utils import atomic_write
from .checkpoint import TrainedModel, load_trained  # noqa: F401 (sdebatch sample's entry point, public here)
from .sample import generate, step_plan
from .sample import sampler_options as _sampler_options
from .tokenizers.image import png_bytes, to_pil
from .vocab import AUDIO, IMAGE, SPECIAL, SPECIALS, TASKS, TEXT, layout_pair

GENERATES = {"text": "text", "t2i": "image", "t2s": "audio", "i2t": "text", "s2t": "text"}  # modality of the target
PROMPT_TASKS, INPUT_TASKS = ("text", "t2i", "t2s"), ("i2t", "s2t")
TEXT_LENGTH = 64  # default continuation of a text prompt, in tokens
_MARKER = re.compile(r"\[MASK(?::(\d+))?\]")


# ---------------------------------------------------------------- requests: the user's input, laid out

@dataclass
class Request:
    """One laid-out prompt row (``tokens``, ``pad``, ``modality``, ``target``: (L,) tensors), what it came from, and
    notes on what was done to the input (resizing, resampling)."""

    task: str
    row: dict
    prompt: str | None = None
    input: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> int:
        return int((self.row["target"] & self.row["pad"]).sum())


def encode_text(tm: TrainedModel, text: str, what: str = "--prompt") -> list[int]:
    """Text ids of ``text``; ValueError naming the characters the tokenizer does not reproduce."""
    tok = tm.text_tokenizer
    ids = tok.encode(text)
    back = tok.decode(ids)
    if back != text:
        lost = sorted(set(text) - set(back)) or sorted(set(text) ^ set(back))
        raise ValueError(f"{what}: the text tokenizer of {tm.folder} cannot represent {''.join(lost)!r} "
                         f"(code points {[hex(ord(c)) for c in lost][:8]}); remove or replace them")
    if any(not 0 <= i < tm.vocab.text_size for i in ids):
        raise ValueError(f"{what}: the tokenizer gave ids outside the model's text vocabulary ({tm.vocab.text_size})")
    return ids


def _text_row(tm: TrainedModel, prompt: str, length: int | None) -> tuple[dict, list[str]]:
    v = tm.vocab
    pieces = _MARKER.split(prompt)  # text, count, text, count, ..., text
    has_markers = len(pieces) > 1
    length = (0 if has_markers else TEXT_LENGTH) if length is None else length
    tokens, target = [v.id("[TEXT]"), v.id("[BOT]")], [False, False]
    for j, piece in enumerate(pieces):
        if j % 2 == 0:
            ids = encode_text(tm, piece) if piece else []
            tokens += [v.text_offset + i for i in ids]
            target += [False] * len(ids)
        else:
            k = int(piece) if piece else 1
            if k < 1:
                raise ValueError("--prompt: a [MASK:n] marker needs n >= 1")
            tokens += [v.mask_id] * k
            target += [True] * k
    tokens += [v.mask_id] * length
    target += [True] * length
    if not any(target):
        raise ValueError("nothing to generate: put [MASK] markers in --prompt or pass --length > 0")
    if len(tokens) > tm.seq_len:
        fixed = len(tokens) - length
        raise ValueError(f"the prompt ({fixed - 2} tokens with its markers) and --length {length} need "
                         f"{len(tokens)} positions; the model's sequences hold {tm.seq_len}: pass --length <= "
                         f"{max(tm.seq_len - fixed, 0)} or shorten the prompt")
    n = len(tokens)
    row = {"tokens": torch.tensor(tokens), "pad": torch.ones(n, dtype=torch.bool),
           "modality": torch.tensor([SPECIAL, SPECIAL] + [TEXT] * (n - 2)), "target": torch.tensor(target)}
    return row, []


def _trim(row: dict) -> dict:
    n = int(row["pad"].sum())
    return {k: row[k][:n] for k in ("tokens", "pad", "modality", "target")}


def _caption_length(tm: TrainedModel, source: str, length: int | None) -> int:
    if length is not None:
        return length
    lengths = (tm.captions(source) >= 0).sum(1)
    return max(1, int(np.median(lengths))) if len(lengths) else 8


def _fits(task: str, need: int, tm: TrainedModel, hint: str) -> None:
    if need > tm.seq_len:
        raise ValueError(f"a {task} sequence would need {need} positions; the model's sequences hold {tm.seq_len}: "
                         f"{hint}")


def _load_image(tm: TrainedModel, path: Path) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"--input {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--input {path} is not an image PIL can read ({e})") from None
    size = tm.image_tokenizer.config.image_size
    notes = []
    if im.size != (size, size):
        notes.append(f"resized {im.size[0]}x{im.size[1]} -> {size}x{size}")
        im = im.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return x, notes


def build_request(tm: TrainedModel, task: str, *, prompt: str | None = None, input: str | Path | None = None,
                  length: int | None = None) -> Request:
    """Lay out one prompt row for ``task``, checking the input first (nothing is generated or written here).

    Args:
        task: "text", "t2i", "t2s" (take ``prompt``) or "i2t", "s2t" (take ``input``, a file).
        prompt: the text (text: may hold [MASK] / [MASK:n] markers; t2i / t2s: the caption to draw or speak).
        input: an image file (i2t) or a WAV file (s2t).
        length: tokens to generate: text continuation (default 64, or 0 with markers), audio codes (t2s; default
            from the training data), caption tokens (i2t / s2t; default the training data's median). Not for t2i.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if task in PROMPT_TASKS and (prompt is None or input is not None):
        raise ValueError(f"task {task} takes --prompt TEXT" + (", not --input" if input is not None else ""))
    if task in INPUT_TASKS and (input is None or prompt is not None):
        raise ValueError(f"task {task} takes --input FILE ({'an image' if task == 'i2t' else 'a WAV'})"
                         + (", not --prompt" if prompt is not None else ""))
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0
                               or (length == 0 and task != "text")):
        raise ValueError(f"--length must be a positive int (tokens), got {length!r}")
    if task == "t2i" and length is not None:
        raise ValueError(f"--length does not apply to t2i: an image is {tm.image_tokenizer.tokens_per_image} codes")
    v = tm.vocab
    if task == "text":
        row, notes = _text_row(tm, prompt, length)
        return Request(task, row, prompt=prompt, notes=notes)
    if task in ("t2i", "t2s"):
        source = "image" if task == "t2i" else "audio"
        if not prompt.strip():
            raise ValueError(f"--prompt: {task} needs a caption, got an empty one")
        ids = encode_text(tm, prompt)
        longest = tm.captions(source).shape[1]
        if len(ids) > longest:
            raise ValueError(f"--prompt is {len(ids)} tokens; the model was trained on {source} captions of at most "
                             f"{longest}: shorten it")
        if task == "t2i":
            n_codes = tm.image_tokenizer.tokens_per_image
        else:
            n_codes = length if length is not None else max(1, round(tm.codes_per_caption_token() * len(ids)))
        _fits(task, 1 + len(ids) + 2 + n_codes + 2, tm, f"pass --length <= {tm.seq_len - len(ids) - 5}")
        row = layout_pair(v, task, ids, [0] * n_codes, tm.seq_len)
        return Request(task, _trim(row), prompt=prompt)
    path = Path(input)
    if task == "i2t":
        image, notes = _load_image(tm, path)
        codes = tm.image_tokenizer.encode(image)[0].tolist()
        source = "image"
    else:
        from .tokenizers.audio import read_wav

        sr = tm.audio_tokenizer.config.sample_rate
        wave = read_wav(path, sr)
        codes = tm.audio_tokenizer.encode(torch.from_numpy(wave.astype(np.float32))).tolist()
        notes = [f"{len(wave) / sr:.2f}s at {sr} Hz, {len(codes)} codes"]
        source = "audio"
    n_text = _caption_length(tm, source, length)
    room = tm.seq_len - 5 - n_text
    _fits(task, len(codes) + n_text + 5, tm,
          f"the input is {len(codes)} codes; at most {room} fit with a {n_text}-token caption"
          + (f" ({room / tm.audio_tokenizer.tokens_per_second:.1f}s of audio)" if task == "s2t" else ""))
    row = layout_pair(v, task, [0] * n_text, codes, tm.seq_len)
    return Request(task, _trim(row), input=str(path), notes=notes)


# ---------------------------------------------------------------- generation

def sampler_options(task: str, overrides: dict | None = None) -> dict:
    """SAMPLING_DEFAULTS of the modality ``task`` generates, updated by ``overrides``; unknown keys and bad values
    are a ValueError naming them (:func:`sdebatch.mdm.sample.sampler_options`)."""
    return _sampler_options(GENERATES[task], overrides, what="--sampler")


def render_text(tm: TrainedModel, ids, *, stop_at_eot: bool = False) -> str:
    """Joint-vocabulary ids as text: runs of text ids decoded, structure tokens by name ([EOT] ...), image / audio
    codes as <image> / <audio>; with ``stop_at_eot``, everything from the first [EOT] is dropped."""
    v, out, run = tm.vocab, [], []
    for t in (int(i) for i in ids):
        if v.text_offset <= t < v.image_offset:
            run.append(t - v.text_offset)
            continue
        if run:
            out.append(tm.text_tokenizer.decode(run))
            run = []
        if stop_at_eot and t == v.id("[EOT]"):
            return "".join(out)
        out.append(SPECIALS[t] if t < len(SPECIALS) else ("<image>" if t < v.audio_offset else "<audio>"))
    if run:
        out.append(tm.text_tokenizer.decode(run))
    return "".join(out)


def run(tm: TrainedModel, request: Request, *, n: int = 1, seed: int = 0, options: dict | None = None,
        progress: bool = True) -> dict:
    """Generate ``n`` samples of a request (one batch); returns the outputs and a summary (see :func:`write`).

    Args:
        n: samples (rows), >= 1.
        seed: seeds the generator of every draw: the same seed, request and options give the same samples.
        options: sampler options (default :func:`sampler_options` of the task).
        progress: a bar over the denoising steps on a terminal, periodic lines otherwise.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be a positive int (samples), got {n!r}")
    options = sampler_options(request.task) if options is None else options
    batch = {k: v[None].expand(n, -1).to(tm.device) for k, v in request.row.items()}
    n_blocks, per_block = step_plan(request.targets, options["steps"], options["block_size"])
    calls = 0
    bar = Progress(n_blocks * per_block, f"sample {request.task}", bar=None) if progress else None

    def on_step(step: int, tokens: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if bar is not None:
            bar.update(step + 1 - bar.n)

    generator = torch.Generator(device=tm.device).manual_seed(int(seed))
    start = time.perf_counter()
    try:
        out = generate(tm.model, batch, generator=generator, callback=on_step, **options).cpu()
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    target = request.row["target"] & request.row["pad"]
    mod = request.row["modality"]
    result: dict[str, Any] = {
        "task": request.task, "prompt": request.prompt, "input": request.input, "notes": request.notes, "n": n,
        "seed": int(seed), "sampler": options, "weights": tm.weights,
        "steps": n_blocks * per_block, "model_calls": calls * (2 if options["guidance"] != 1.0 else 1),
        "targets_per_sample": request.targets, "seconds": seconds,
        "tokens_per_s": n * request.targets / max(seconds, 1e-9)}
    gen_mod = {"text": TEXT, "image": IMAGE, "audio": AUDIO}[GENERATES[request.task]]
    content = target & (mod == gen_mod)
    offset, size = {TEXT: (tm.vocab.text_offset, tm.vocab.text_size), IMAGE: (tm.vocab.image_offset,
                    tm.vocab.image_codes), AUDIO: (tm.vocab.audio_offset, tm.vocab.audio_codes)}[gen_mod]
    raw = out[:, content] - offset
    # ids of another modality where this one was asked for (structure tokens in text, e.g. [EOT], are text's own)
    outside = (out[:, content] >= tm.vocab.image_offset) if gen_mod == TEXT else (raw < 0) | (raw >= size)
    result["outside_vocabulary"] = int(outside.sum())
    result["tokens"] = out[:, target].tolist()  # each sample's generated ids (joint vocabulary), target positions
    if request.task == "text":
        result["texts"] = [render_text(tm, row[2:]) for row in out]
    elif request.task in ("i2t", "s2t"):
        result["texts"] = [render_text(tm, row[content], stop_at_eot=True) for row in out]
    else:
        codes = raw.clamp(0, size - 1)
        if request.task == "t2i":
            result["images"] = tm.image_tokenizer.decode(codes.long()).cpu()
        else:
            result["sample_rate"] = tm.audio_tokenizer.config.sample_rate
            result["waves"] = [tm.audio_tokenizer.decode(c, seed=int(seed)) for c in codes]
    return result


# ---------------------------------------------------------------- files

def _grid(images: torch.Tensor, caption: str, *, scale: int = 4, cols: int = 8):
    from PIL import Image, ImageDraw

    n, s, gap, header = len(images), images.shape[-1] * scale, 4, 16
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * (s + gap) + gap, header + rows * (s + gap)), (255, 255, 255))
    ImageDraw.Draw(canvas).text((gap, 2), caption[:cols * (s + gap) // 6], fill=(0, 0, 0))
    for i in range(n):
        canvas.paste(to_pil(images[i], scale), (gap + (i % cols) * (s + gap), header + (i // cols) * (s + gap)))
    return canvas


def write(result: dict, out: str | Path) -> list[Path]:
    """Write a :func:`run` result under ``out`` (created): ``t2i_NN.png`` + ``t2i_grid.png`` (t2i), ``t2s_NN.wav``
    (t2s) and ``samples.json`` (every task: request, options, texts, file names, timing). Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task, paths = result["task"], []
    record = {k: v for k, v in result.items() if k not in ("images", "waves")}
    if task == "t2i":
        for i, image in enumerate(result["images"]):
            paths.append(out / f"t2i_{i:02d}.png")
            atomic_write(paths[-1], png_bytes(to_pil(image)))
        paths.append(out / "t2i_grid.png")
        atomic_write(paths[-1], png_bytes(_grid(result["images"], result["prompt"] or "")))
    elif task == "t2s":
        from .tokenizers.audio import write_wav

        for i, wave in enumerate(result["waves"]):
            paths.append(out / f"t2s_{i:02d}.wav")
            write_wav(paths[-1], wave, result["sample_rate"])
        record["seconds_of_audio"] = [len(w) / result["sample_rate"] for w in result["waves"]]
    record["files"] = [p.name for p in paths]
    paths.append(out / "samples.json")
    atomic_write(paths[-1], json.dumps(record, indent=1).encode())
    return paths


def summary(result: dict, paths: list[Path]) -> str:
    """The lines printed after sampling: the outputs (texts) and the batch arithmetic of the run."""
    lines = []
    for i, text in enumerate(result.get("texts", [])):
        lines.append(f"--- sample {i}" + (":" if result["task"] != "text" else f" ({result['targets_per_sample']} "
                                                                               "tokens generated):"))
        lines.append(text)
    guided = " (x2 rows: guidance)" if result["sampler"]["guidance"] != 1.0 else ""
    lines.append(f"[sample] {result['task']}: {result['n']} sample(s) x {result['targets_per_sample']} positions, "
                 f"{result['steps']} steps, {result['model_calls']} model calls{guided}, {result['seconds']:.2f}s, "
                 f"{result['tokens_per_s']:.0f} tokens/s; ids of another modality: {result['outside_vocabulary']}")
    for note in result["notes"]:
        lines.append(f"[sample] input: {note}")
    if result["n"] > 1 and result["sampler"]["temperature"] == 0 and result["sampler"]["strategy"] == "low_confidence":
        lines.append("[sample] note: greedy sampler (temperature 0, low-confidence order): the samples are identical; "
                     "pass --sampler temperature=1.0 for different ones")
    if paths:
        lines.append(f"[sample] wrote {', '.join(str(p) for p in paths)}")
    return "\n".join(lines)
