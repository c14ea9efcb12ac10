"""`sdebatch eval`: score a trained tri-modal MDM on held-out data, each number next to a baseline.

Stages (one progress line each):
  text    negative ELBO in bits per token on the held-out packed text (``text_val``), against the cross-entropy of a
          unigram model estimated on ``text_train`` (add-one smoothed) on the very same target tokens. The ELBO is an
          upper bound on the model's NLL; the unigram number is an exact NLL of a weak model, so "ELBO below unigram"
          is a conservative check that the model learned more than token frequencies.
  t2i     for held-out image captions: generate the image codes, decode them with the data's image tokenizer and score
          the pixels against the caption's ground-truth attributes (colour, count, position, size, shape; see
          :func:`sdebatch.mdm.data.scenes.score_batch`). Baselines: :func:`~sdebatch.mdm.data.scenes.chance_scores`
          (mismatched captions, noise, blank) and, as the ceiling the tokenizer allows, the same scores of the
          tokenizer's reconstruction of the true codes. Writes ``t2i_grid.png`` (generated | reconstruction).
  t2s     for held-out speech captions: generate as many audio codes as the reference layout has, decode them to a
          waveform (Griffin-Lim) and measure the mel-cepstral distortion (DTW-aligned, dB) to the eSpeak NG rendering
          of the same text. Baselines: uniformly random codes of the same length (the floor), and the decoded true
          codes (the tokenizer's ceiling). Writes 16-bit WAVs under ``speech/``.

Everything lands in ``report.json`` (written atomically) and is returned as a dict. Generation uses the per-modality
:data:`sdebatch.mdm.sample.SAMPLING_DEFAULTS` except for ``steps`` when given. The sampler may put any id of the joint
vocabulary at a code position (it does not restrict ids to the target modality); such ids are counted
(``out_of_range``) and clamped into the codebook before decoding.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.dataset import TriModalDataset
from .objective import elbo
from .sample import generate
from .sample import sampler_options as _sampler_options
from .vocab import AUDIO, IMAGE, SPECIAL, Vocab
from ..utils import atomic_write

REPORT_VERSION = 1
_SCENE_KEYS = ("colour", "shape", "size", "position", "count")


# ---------------------------------------------------------------- helpers

def _device_of(model) -> torch.device:
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _stack(rows: list[dict], device, *, trim: bool = False) -> dict:
    """Stack laid-out rows; with ``trim``, drop the trailing columns that are padding in every row (padded keys get
    no attention and positions are relative under RoPE, so the real positions see exactly the same inputs)."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "pad", "modality", "target")}
    if trim and len(rows):
        real = batch["pad"].any(0).nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        batch = {k: v[:, :length] for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _clean(x: Any) -> Any:
    """JSON-safe: numpy / torch scalars to Python, NaN and inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- text

def unigram_baseline(train_tokens, eval_tokens, vocab: Vocab) -> dict:
    """Cross-entropy in bits per token of ``eval_tokens`` under a unigram model of ``train_tokens`` (joint-vocabulary
    ids, e.g. the target positions of packed text rows), add-one smoothed over the support: every text id plus the
    structure tokens [BOT] / [EOT] (and any other id that occurs in either set).

    Returns ``bits_per_token``, ``num_items`` (evaluated tokens), ``support`` (number of outcomes) and
    ``uniform_bits`` (log2 of the support: what a uniform distribution over it scores).
    """
    train = np.asarray(train_tokens, dtype=np.int64).ravel()
    ev = np.asarray(eval_tokens, dtype=np.int64).ravel()
    support = set(range(vocab.text_offset, vocab.image_offset)) | {vocab.id("[BOT]"), vocab.id("[EOT]")}
    support |= set(np.unique(train).tolist()) | set(np.unique(ev).tolist())
    n_outcomes = len(support)
    size = max(max(support), int(train.max(initial=0)), int(ev.max(initial=0))) + 1
    counts = np.bincount(train, minlength=size).astype(np.float64)
    logp = np.log2(counts + 1.0) - math.log2(len(train) + n_outcomes)
    bits = float(-logp[ev].mean()) if len(ev) else float("nan")
    return {"bits_per_token": bits, "num_items": int(len(ev)), "support": n_outcomes,
            "uniform_bits": math.log2(n_outcomes)}


def text_elbo(model, data: TriModalDataset, *, schedules="linear", n_t: int = 4, batch_size: int = 16,
              max_rows: int | None = None) -> dict:
    """Held-out negative ELBO in bits per target token over the packed text rows of ``data`` (item-weighted over
    batches; batch ``b`` draws its times with seed ``b`` so evaluations repeat)."""
    device = _device_of(model)
    n = len(data.text) if max_rows is None else min(max_rows, len(data.text))
    nats, items = 0.0, 0
    for b, start in enumerate(range(0, n, batch_size)):
        batch = _stack([data["text", i] for i in range(start, min(n, start + batch_size))], device)
        r = elbo(model, batch, n_t=n_t, schedules=schedules, seed=b)
        nats += r["nats_sum"]
        items += r["num_items"]
    return {"bits_per_token": nats / max(items, 1) / math.log(2), "num_items": items, "sequences": n, "n_t": n_t}


def _vs_chance(scores: list[dict], chance: dict, attrs: list[dict]) -> dict:
    """Per key: hits k of n, the Wilson 95% interval of the accuracy, the chance rate and the one-sided binomial
    p-value of doing at least this well by chance. Chance per attribute is the mismatched-caption rate. For "all",
    an estimate of a ~1/500 event from a few hundred images is mostly 0, so chance is the probability that a random
    other caption of the evaluated set has the same attributes (the product over attributes of sum_v p(v)^2, the
    generator drawing them independently): what drawing a perfect image for a random caption would score."""
    from scipy.stats import binomtest

    keys = [k for k in ("colour", "count", "position", "size", "shape") if k in chance]
    rates = {k: float(chance[k]) for k in keys}
    collide = 1.0
    for k in keys:
        _, counts = np.unique([str(a[k]) for a in attrs], return_counts=True)
        collide *= float(((counts / counts.sum()) ** 2).sum())
    rates["all"] = max(float(chance.get("all", 0.0)), collide)
    out = {}
    for key, p0 in rates.items():
        k, n = int(round(sum(s[key] for s in scores))), len(scores)
        test = binomtest(k, n, min(max(p0, 1e-12), 1.0), alternative="greater")
        ci = binomtest(k, n, min(max(p0, 1e-12), 1.0)).proportion_ci(confidence_level=0.95, method="wilson")
        out[key] = {"hits": k, "n": n, "accuracy": k / n, "ci95": [float(ci.low), float(ci.high)], "chance": p0,
                    "p_value": float(test.pvalue)}
    return out


# ---------------------------------------------------------------- generation helpers

GENERATED = ("image", "audio")  # the modalities evaluate samples, each with its own sampler options


def sampler_options(sampler: dict | None = None, steps: int | None = None) -> dict[str, dict]:
    """The sampler options of each generated modality: SAMPLING_DEFAULTS, ``steps`` when given, then ``sampler``'s
    options for that modality (e.g. ``{"image": {"guidance": 3.0}}``), checked as ``sdebatch sample`` checks them:
    an unknown modality, an unknown key or a bad value is a ValueError naming it."""
    sampler = sampler or {}
    if not isinstance(sampler, dict) or set(sampler) - set(GENERATED):
        raise ValueError(f"sampler takes options for {', '.join(map(repr, GENERATED))}, got "
                         f"{sorted(sampler) if isinstance(sampler, dict) else sampler!r}")
    base = {} if steps is None else {"steps": steps}
    return {m: _sampler_options(m, {**base, **sampler.get(m, {})}, what=f"sampler[{m!r}]") for m in GENERATED}


def _generate_codes(model, rows: list[dict], modality_id: int, offset: int, n_codes: int, sampler: dict,
                    generator: torch.Generator) -> dict:
    """Generate the targets of laid-out prompts; per row the generated codes (offset removed, clamped into
    [0, n_codes)), the true codes, the count of ids outside the code range, and the structure-token accuracy."""
    batch = _stack(rows, _device_of(model), trim=True)
    out = generate(model, batch, generator=generator, **sampler).cpu()
    batch = {k: v.cpu() for k, v in batch.items()}
    gen_codes, true_codes, bad = [], [], []
    for r in range(out.shape[0]):
        pos = batch["target"][r] & (batch["modality"][r] == modality_id)
        raw = out[r][pos] - offset
        bad.append(int(((raw < 0) | (raw >= n_codes)).sum()))
        gen_codes.append(raw.clamp(0, n_codes - 1))
        true_codes.append(batch["tokens"][r][pos] - offset)
    struct = batch["target"] & batch["pad"] & (batch["modality"] == SPECIAL)
    struct_acc = float((out[struct] == batch["tokens"][struct]).double().mean()) if bool(struct.any()) else float("nan")
    n_total = sum(len(c) for c in gen_codes)
    return {"generated": gen_codes, "true": true_codes, "out_of_range": bad,
            "out_of_range_fraction": sum(bad) / max(n_total, 1), "structure_accuracy": struct_acc,
            "code_match": float(sum(int((g == t).sum()) for g, t in zip(gen_codes, true_codes)) / max(n_total, 1))}


def _image_grid(path: Path, generated: torch.Tensor, recon: torch.Tensor, captions: list[str], *, scale: int = 4,
                cols: int = 4) -> None:
    """PNG grid: per item [generated | reconstruction of the true codes] with the caption below."""
    from PIL import Image, ImageDraw

    from .tokenizers.image import png_bytes, to_pil

    n = len(generated)
    if n == 0:
        return
    s = generated.shape[-1] * scale
    gap, text_h, header = 4, 28, 14
    cell_w, cell_h = 2 * s + gap, s + text_h
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * (cell_w + 2 * gap), header + rows * (cell_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 1), "each pair: generated | tokenizer reconstruction of the true codes", fill=(0, 0, 0))
    for i in range(n):
        x0 = (i % cols) * (cell_w + 2 * gap) + gap
        y0 = header + (i // cols) * (cell_h + gap)
        canvas.paste(to_pil(generated[i], scale), (x0, y0))
        canvas.paste(to_pil(recon[i], scale), (x0 + s + gap, y0))
        cap = captions[i] if i < len(captions) else ""
        words, lines, line = cap.split(), [], ""
        for w in words:  # wrap to the cell width (~6 px per character with PIL's default font)
            if line and len(line) + 1 + len(w) > cell_w // 6:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, ln in enumerate(lines[:2]):
            draw.text((x0, y0 + s + 2 + 12 * k), ln, fill=(0, 0, 0))
    atomic_write(path, png_bytes(canvas))


# ---------------------------------------------------------------- evaluate

def evaluate(model, data_folder, out_dir, *, n_images: int = 32, n_speech: int = 8, steps: int | None = None,
             seed: int = 0, progress: bool = True, schedules="linear", text_rows: int | None = None,
             sampler: dict | None = None, extra: dict | None = None) -> dict:
    """Evaluate a trained MDM on the held-out split of a prepared data folder; writes ``<out_dir>/report.json``,
    ``t2i_grid.png`` and ``speech/*.wav`` and returns the report.

    Args:
        model: the denoiser, called as ``model(tokens, pad=..., select=...)`` (e.g. ``MDMModule.model``).
        data_folder: a folder made by ``sdebatch data prepare`` (with its tokenizers).
        out_dir: where to write the report and the samples (created).
        n_images: held-out image captions to generate images for (0: skip text-to-image).
        n_speech: held-out speech captions to generate speech for (0: skip text-to-speech).
        steps: sampler steps for both modalities (default: SAMPLING_DEFAULTS per modality).
        seed: seeds generation, the random-code baseline and the ELBO draws.
        progress: print one line per stage.
        schedules: masking schedule(s) of the ELBO, as trained (default "linear").
        text_rows: evaluate the ELBO on at most this many held-out text rows (default: all).
        sampler: per-modality sampler options over SAMPLING_DEFAULTS, e.g. ``{"image": {"guidance": 3.0}}``
            (default None: the defaults).
        extra: more entries for the report (e.g. the checkpoint evaluated); default None.
    """
    samplers = sampler_options(sampler, steps)  # bad options fail here, before any work
    from .data.scenes import chance_scores, score_batch
    from .tokenizers.audio import AudioTokenizer, mel_cepstral_distortion, write_wav
    from .tokenizers.image import ImageTokenizer

    log = print if progress else (lambda *a, **k: None)
    folder, out = Path(data_folder), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = TriModalDataset(folder, "val")
    vocab = data.vocab
    was_training = model.training if isinstance(model, torch.nn.Module) else False
    if isinstance(model, torch.nn.Module):
        model.eval()
    t_start = time.time()
    n_params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    report: dict[str, Any] = {"version": REPORT_VERSION, "data": str(folder), "vocab": vocab.state_dict(),
                              "vocab_size": vocab.size, "seq_len": data.seq_len, "parameters": n_params,
                              "seed": seed, "timings_s": {}}
    try:
        # --- text ---
        t = time.time()
        txt = text_elbo(model, data, schedules=schedules, n_t=4, max_rows=text_rows)
        train_text = np.load(folder / "text_train.npy", mmap_mode="r")
        held = np.asarray(data.text[:txt["sequences"]])
        uni = unigram_baseline(np.asarray(train_text)[:, 1:], held[:, 1:], vocab)
        report["text"] = {"elbo_bits_per_token": txt["bits_per_token"], "num_items": txt["num_items"],
                          "sequences": txt["sequences"], "n_t": txt["n_t"], "schedules": schedules,
                          "baseline_unigram_bits_per_token": uni["bits_per_token"],
                          "baseline_uniform_text_bits": uni["uniform_bits"],
                          "baseline_uniform_joint_bits": math.log2(vocab.size - 2),
                          "unigram_support": uni["support"],
                          "gain_over_unigram_bits": uni["bits_per_token"] - txt["bits_per_token"]}
        report["timings_s"]["text"] = time.time() - t
        log(f"[eval] text: ELBO {txt['bits_per_token']:.3f} bits/token on {txt['num_items']:,} held-out tokens; "
            f"unigram {uni['bits_per_token']:.3f}, uniform over text {uni['uniform_bits']:.3f} "
            f"({time.time() - t:.1f}s)", flush=True)

        # --- text-to-image ---
        n_img = min(int(n_images), data.sizes["image"])
        if n_img > 0:
            t = time.time()
            itok = ImageTokenizer.load(folder / "tokenizers" / "image")
            meta = _read_jsonl(folder / "image_val_meta.jsonl")
            sampler_opts = samplers["image"]
            gen = torch.Generator(device=_device_of(model)).manual_seed(seed)
            g = _generate_codes(model, [data.pair("image", i, "t2i") for i in range(n_img)], IMAGE,
                                vocab.image_offset, vocab.image_codes, sampler_opts, gen)
            images = itok.decode(torch.stack(g["generated"]).long()).cpu()
            recon = itok.decode(torch.stack(g["true"]).long()).cpu()
            captions = [meta[i]["text"] if i < len(meta) else "" for i in range(n_img)]
            attrs = [{k: meta[i][k] for k in _SCENE_KEYS} for i in range(n_img)
                     if i < len(meta) and all(k in meta[i] for k in _SCENE_KEYS)]
            t2i: dict[str, Any] = {"n": n_img, "sampler": sampler_opts, "out_of_range": sum(g["out_of_range"]),
                                   "out_of_range_fraction": g["out_of_range_fraction"],
                                   "structure_token_accuracy": g["structure_accuracy"],
                                   "code_match": g["code_match"], "codes_per_image": len(g["true"][0])}
            if len(attrs) == n_img:
                scores = [score_batch(images[i:i + 1], attrs[i:i + 1]) for i in range(n_img)]
                t2i["scores"] = score_batch(images, attrs)
                t2i["baseline_reconstruction"] = score_batch(recon, attrs)
                t2i["baseline_chance"] = chance_scores(200, size=itok.config.image_size, seed=seed)
                per_item_all = [s["all"] for s in scores]
                t2i["vs_chance"] = _vs_chance(scores, t2i["baseline_chance"]["mismatched"], attrs)
            else:  # a real image folder without scene attributes: nothing to score against
                t2i["scores"] = None
                t2i["note"] = "no scene attributes in image_val_meta.jsonl: not scored"
                per_item_all = [None] * n_img
            t2i["items"] = [{"caption": captions[i], "out_of_range": g["out_of_range"][i], "all": per_item_all[i]}
                            for i in range(n_img)]
            _image_grid(out / "t2i_grid.png", images, recon, captions)
            t2i["grid"] = "t2i_grid.png"
            report["t2i"] = t2i
            report["timings_s"]["t2i"] = time.time() - t
            if t2i["scores"] is not None:
                s, rc, ch = t2i["scores"], t2i["baseline_reconstruction"], t2i["baseline_chance"]
                log(f"[eval] t2i: {n_img} images, all-correct {s['all']:.2f} (colour {s['colour']:.2f}, position "
                    f"{s['position']:.2f}); tokenizer ceiling {rc['all']:.2f}, chance (mismatched) "
                    f"{ch['mismatched']['all']:.2f} (attribute product {t2i['vs_chance']['all']['chance']:.4f}, "
                    f"one-sided binomial p = {t2i['vs_chance']['all']['p_value']:.1g}); ids outside the image range "
                    f"{t2i['out_of_range_fraction']:.1%} ({time.time() - t:.1f}s)", flush=True)
            else:
                log(f"[eval] t2i: {n_img} images generated, not scored ({time.time() - t:.1f}s)", flush=True)

        # --- text-to-speech ---
        n_sp = min(int(n_speech), data.sizes["audio"])
        if n_sp > 0:
            from .data.speech import synthesize

            t = time.time()
            atok = AudioTokenizer.load(folder / "tokenizers" / "audio")
            sr = atok.config.sample_rate
            meta = _read_jsonl(folder / "audio_val_meta.jsonl")
            if len(meta) < n_sp:
                raise ValueError(f"{folder / 'audio_val_meta.jsonl'} has {len(meta)} rows, need {n_sp}")
            texts = [meta[i]["text"] for i in range(n_sp)]
            sampler_opts = samplers["audio"]
            gen = torch.Generator(device=_device_of(model)).manual_seed(seed + 1)
            g = _generate_codes(model, [data.pair("audio", i, "t2s") for i in range(n_sp)], AUDIO,
                                vocab.audio_offset, vocab.audio_codes, sampler_opts, gen)
            refs = synthesize(texts, sample_rate=sr)
            rng = torch.Generator().manual_seed(seed + 2)
            (out / "speech").mkdir(exist_ok=True)
            items = []

            def mcd(a, b):
                return mel_cepstral_distortion(a, b, sr) if len(a) and len(b) else float("nan")

            for i in range(n_sp):
                wav_gen = atok.decode(g["generated"][i], seed=seed)
                wav_rec = atok.decode(g["true"][i], seed=seed)
                rand = torch.randint(atok.codebook_size, (len(g["true"][i]),), generator=rng)
                wav_rand = atok.decode(rand, seed=seed)
                items.append({"text": texts[i], "codes": len(g["true"][i]), "out_of_range": g["out_of_range"][i],
                              "mcd_db": mcd(wav_gen, refs[i]), "baseline_random_mcd_db": mcd(wav_rand, refs[i]),
                              "baseline_reconstruction_mcd_db": mcd(wav_rec, refs[i]),
                              "seconds": len(wav_gen) / sr, "reference_seconds": len(refs[i]) / sr})
                for name, w in (("generated", wav_gen), ("reference", refs[i]), ("reconstruction", wav_rec)):
                    write_wav(out / "speech" / f"{i:02d}_{name}.wav", w, sr)

            def mean(key):
                vals = [it[key] for it in items if math.isfinite(it[key])]
                return float(np.mean(vals)) if vals else float("nan")

            t2s = {"n": n_sp, "sampler": sampler_opts, "sample_rate": sr, "mcd_db": mean("mcd_db"),
                   "baseline_random_mcd_db": mean("baseline_random_mcd_db"),
                   "baseline_reconstruction_mcd_db": mean("baseline_reconstruction_mcd_db"),
                   "out_of_range": sum(g["out_of_range"]), "out_of_range_fraction": g["out_of_range_fraction"],
                   "structure_token_accuracy": g["structure_accuracy"], "code_match": g["code_match"],
                   "wavs": "speech/", "items": items}
            report["t2s"] = t2s
            report["timings_s"]["t2s"] = time.time() - t
            log(f"[eval] t2s: {n_sp} clips, MCD {t2s['mcd_db']:.2f} dB to eSpeak (random codes "
                f"{t2s['baseline_random_mcd_db']:.2f}, tokenizer ceiling {t2s['baseline_reconstruction_mcd_db']:.2f}); "
                f"ids outside the audio range {t2s['out_of_range_fraction']:.1%} ({time.time() - t:.1f}s)", flush=True)
    finally:
        if was_training:
            model.train()

    report["timings_s"]["total"] = time.time() - t_start
    report.update(extra or {})
    report = _clean(report)
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    log(f"[eval] report -> {out / 'report.json'} ({report['timings_s']['total']:.1f}s)", flush=True)
    return report


# ---------------------------------------------------------------- checkpoints

def evaluate_checkpoint(config: dict | None, checkpoint, out_dir, *, config_path=None, data: str | None = None,
                        **kwargs) -> dict:
    """Load a checkpoint written by ``sdebatch train`` (a Lightning checkpoint, or a plain state dict of the denoiser
    or of MDMModule) into the denoiser its config builds and run :func:`evaluate` on ``config["data"]`` with the
    config's masking schedule; extra keyword arguments go to :func:`evaluate` (its sampler options are checked
    first, before the checkpoint is read).

    ``config`` None: ``config_path`` (a TOML file), else the config the checkpoint carries
    (:mod:`sdebatch.mdm.checkpoint`), with ``data`` overriding its data folder. A config's data folder must have
    the vocabulary the checkpoint was trained on, and its model the checkpoint's shapes.
    """
    from .checkpoint import load_model, open_checkpoint

    sampler_options(kwargs.get("sampler"), kwargs.get("steps"))
    obj, record, config, vocab = open_checkpoint(checkpoint, config=config, config_path=config_path, data=data)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, source = load_model(obj, config, vocab, device)
    kwargs.setdefault("schedules", config.get("schedule", "linear"))
    kwargs.setdefault("seed", config.get("seed", 0))
    extra = {"checkpoint": {"path": str(checkpoint), "weights": source, "model": config.get("model")}}
    return evaluate(model, config["data"], out_dir, extra={**extra, **kwargs.pop("extra", {})}, **kwargs)
