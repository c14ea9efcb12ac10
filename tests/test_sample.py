"""`sdebatch sample` (sdebatch.mdm.tasks) on an untrained micro model over the micro data folder: each task end to
end through the command line, against the sampler called by hand on a hand-laid-out prompt; determinism under
--seed; every input error named before anything is written; the checkpoint record; progress lines; WAV reading."""
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdebatch.cli import main
from sdebatch.mdm import tasks
from sdebatch.mdm.sample import SAMPLING_DEFAULTS
from sdebatch.mdm.vocab import AUDIO, IMAGE, SPECIAL, TEXT, Vocab

pytestmark = pytest.mark.usefixtures("one_thread", "float32")  # fixtures in conftest.py


def _save_model(folder: Path, data: Path, *, model: str = "micro", seed: int = 0, record: bool = True) -> Path:
    """An untrained model's weights as `sdebatch train` writes them: model.pt (+ train_config.json)."""
    from sdebatch.mdm.checkpoint import RECORD_FILE, training_record
    from sdebatch.mdm.data.dataset import read_index
    from sdebatch.mdm.train import MDMModule, load_config

    folder.mkdir(parents=True, exist_ok=True)
    config = load_config(None, data=str(data), model=model)
    vocab = Vocab(**read_index(data)["vocab"])
    torch.manual_seed(seed)
    module = MDMModule(config, vocab.size)
    torch.save(module.model.state_dict(), folder / "model.pt")
    if record:
        (folder / RECORD_FILE).write_text(json.dumps(training_record(config, vocab)))
    return folder / "model.pt"


@pytest.fixture(scope="module")
def ckpt(micro_data, tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("model"), micro_data[0])


def _cli(args, capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _options(task: str, overrides: dict) -> dict:
    """The sampler options of a task: the defaults table of the modality it generates, ``overrides`` on top."""
    modality = {"text": "text", "t2i": "image", "t2s": "audio", "i2t": "text", "s2t": "text"}[task]
    return {**SAMPLING_DEFAULTS[modality], **overrides}


def _prompt_row(v: Vocab, task: str, ids_or_codes, layout: dict) -> dict:
    """A prompt laid out by hand: text is [TEXT] [BOT] ids [MASK] x new; a pair is [task] [B.] first [E.]
    [B.] second [E.], the second segment (with its markers) the target."""
    if task == "text":
        tokens = [v.id("[TEXT]"), v.id("[BOT]")] + [v.text_offset + i for i in ids_or_codes]
        tokens += [v.mask_id] * layout["new"]
        modality = [SPECIAL, SPECIAL] + [TEXT] * (len(tokens) - 2)
        target = [False] * (len(tokens) - layout["new"]) + [True] * layout["new"]
    else:
        text_ids, codes = layout["text"], layout["codes"]
        begin, end, offset, mod = (("[BOI]", "[EOI]", v.image_offset, IMAGE) if task in ("t2i", "i2t") else
                                   ("[BOA]", "[EOA]", v.audio_offset, AUDIO))
        text = ([v.id("[BOT]")] + [v.text_offset + i for i in text_ids] + [v.id("[EOT]")],
                [SPECIAL] + [TEXT] * len(text_ids) + [SPECIAL])
        other = ([v.id(begin)] + [offset + c for c in codes] + [v.id(end)], [SPECIAL] + [mod] * len(codes) + [SPECIAL])
        first, second = (text, other) if task in ("t2i", "t2s") else (other, text)
        tokens = [v.id(f"[{task.upper()}]")] + first[0] + second[0]
        modality = [SPECIAL] + first[1] + second[1]
        target = [False] * (1 + len(first[0])) + [True] * len(second[0])
    return {"tokens": tokens, "modality": modality, "target": target}


def _reference(trained, task, ids_or_codes, n, seed, options, **layout):
    """The sampler written out as a plain loop over blocks, steps and rows, on a prompt laid out here: at each step
    every row commits round(targets of the block x alpha(next time)) positions in all, the most confident first
    (earlier position on a tie), or in random order; the model is called on the whole batch (with guidance w:
    uncond + w (cond - uncond) from one doubled batch, the condition's content masked), [MASK] and [PAD] never
    predicted. The draws follow the sampler's protocol: per step one multinomial over the candidates in row order,
    then, for the random order, one uniform per candidate, from one generator seeded with ``seed``."""
    v, model = trained.vocab, trained.model
    row = _prompt_row(v, task, ids_or_codes, layout)
    length = len(row["tokens"])
    targets = [p for p in range(length) if row["target"][p]]
    condition = [p for p in range(length) if not row["target"][p] and row["modality"][p] != SPECIAL]
    o = options
    size = o["block_size"]
    blocks = [targets[i:i + size] for i in range(0, len(targets), size)] if size else [targets]
    per_block = max(1, o["steps"] // len(blocks))
    alpha = {"linear": lambda t: 1 - t, "cosine": lambda t: 1 - math.cos(math.pi / 2 * (1 - t))}[o["schedule"]]
    x = [[v.mask_id if p in targets else row["tokens"][p] for p in range(length)] for _ in range(n)]
    pad = torch.ones(n, length, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks:
            for s in range(per_block):
                goal = len(block) if s == per_block - 1 else round(len(block) * alpha(1 - (s + 1) / per_block))
                cands = [[p for p in block if x[r][p] == v.mask_id] for r in range(n)]
                commits = [max(0, goal - (len(block) - len(c))) for c in cands]
                if not any(commits):
                    continue
                select = torch.zeros(n, length, dtype=torch.bool)
                for r, c in enumerate(cands):
                    select[r, c] = True
                tokens = torch.tensor(x)
                if o["guidance"] != 1.0 and condition:
                    dropped = tokens.clone()
                    dropped[:, condition] = v.mask_id
                    cond, uncond = model(torch.cat([tokens, dropped]), pad=torch.cat([pad, pad]),
                                         select=torch.cat([select, select])).chunk(2)
                    logits = uncond + o["guidance"] * (cond - uncond)
                else:
                    logits = model(tokens, pad=pad, select=select)
                logits[:, [v.mask_id, v.pad_id]] = float("-inf")
                if o["temperature"] == 0:
                    pred = logits.argmax(-1)
                else:
                    scaled = logits / o["temperature"]
                    if o["top_p"] is not None:  # keep the most likely tokens until their mass reaches top_p
                        for i, probs in enumerate(scaled.softmax(-1).tolist()):
                            mass, dropped = 0.0, []
                            for t in sorted(range(len(probs)), key=lambda t: -probs[t]):
                                if mass >= o["top_p"]:
                                    dropped.append(t)
                                mass += probs[t]
                            scaled[i, dropped] = float("-inf")
                    pred = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
                if o["strategy"] == "low_confidence":
                    conf = logits.softmax(-1)[torch.arange(len(pred)), pred]
                else:
                    conf = torch.rand(len(pred), generator=generator)
                first = 0
                for r, c in enumerate(cands):
                    row_conf, row_pred = conf[first:first + len(c)].tolist(), pred[first:first + len(c)].tolist()
                    first += len(c)
                    for j in sorted(range(len(c)), key=lambda j: -row_conf[j])[:commits[r]]:
                        x[r][c[j]] = row_pred[j]
    return [[x[r][p] for p in targets] for r in range(n)]


def test_text_continuation_and_infill(ckpt, capsys, tmp_path):
    trained = tasks.load_trained(ckpt, device="cpu")
    prompt = "The function returns"
    code, out, _err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "text", "--prompt", prompt, "--length", "12",
                         "--n", "2", "--seed", "3", "--sampler", "temperature=1.0", "--out", str(tmp_path / "a"),
                         "--quiet"], capsys)
    assert code == 0, (out, _err)
    rec = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert rec["task"] == "text" and rec["n"] == 2 and rec["targets_per_sample"] == 12
    opts = _options("text", {"temperature": 1.0})
    ids = trained.text_tokenizer.encode(prompt)
    assert rec["tokens"] == _reference(trained, "text", ids, 2, 3, opts, new=12)
    for text, toks in zip(rec["texts"], rec["tokens"]):
        assert text.startswith(prompt) and text == prompt + tasks.render_text(trained, toks)
        assert text in out
    assert "[sample] text: 2 sample(s) x 12 positions" in out
    # infill: [MASK:2] is two positions, [MASK] one; the text around them is kept, nothing appended by default
    code, out, _err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "text", "--prompt",
                         "def [MASK:2](x): return [MASK]", "--out", str(tmp_path / "b"), "--quiet"], capsys)
    rec = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert code == 0 and rec["targets_per_sample"] == 3 and len(rec["tokens"][0]) == 3
    text = rec["texts"][0]
    assert text.startswith("def ") and "(x): return " in text


@pytest.mark.parametrize("n", [3])
def test_t2i_writes_pngs_and_grid(ckpt, capsys, tmp_path, n):
    from PIL import Image

    trained = tasks.load_trained(ckpt, device="cpu")
    caption = "a red circle"
    code, out, _err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "t2i", "--prompt", caption, "--n", str(n),
                         "--sampler", "steps=4", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, (out, _err)
    rec = json.loads((tmp_path / "samples.json").read_text())
    itok = trained.image_tokenizer
    opts = _options("t2i", {"steps": 4})
    ref = _reference(trained, "t2i", None, n, 0, opts, text=trained.text_tokenizer.encode(caption),
                     codes=[0] * itok.tokens_per_image)
    assert rec["tokens"] == ref and rec["files"] == [f"t2i_{i:02d}.png" for i in range(n)] + ["t2i_grid.png"]
    v = trained.vocab
    for i in range(n):  # each PNG is the tokenizer's decoding of the sample's codes (another modality's ids clamped)
        codes = torch.tensor(ref[i][1:-1]) - v.image_offset  # [BOI] codes [EOI]
        img = itok.decode(codes.clamp(0, v.image_codes - 1)[None])[0]
        expect = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"t2i_{i:02d}.png")), expect)
    s = itok.config.image_size
    assert Image.open(tmp_path / "t2i_grid.png").size[0] >= n * 4 * s


def test_t2s_writes_wavs_of_the_planned_length(ckpt, capsys, tmp_path):
    from scipy.io import wavfile

    trained = tasks.load_trained(ckpt, device="cpu")
    sentence = "a blue square"
    code, out, _err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "t2s", "--prompt", sentence, "--n", "2",
                         "--sampler", "steps=4", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, (out, _err)
    rec = json.loads((tmp_path / "samples.json").read_text())
    ids = trained.text_tokenizer.encode(sentence)
    offsets = np.load(trained.folder / "audio_train_offsets.npy")
    caps = np.load(trained.folder / "audio_train_captions.npy")
    n_codes = round(offsets[-1] / (caps >= 0).sum() * len(ids))  # codes per caption token of the training pairs
    assert rec["targets_per_sample"] == n_codes + 2
    opts = _options("t2s", {"steps": 4})
    assert rec["tokens"] == _reference(trained, "t2s", None, 2, 0, opts, text=ids, codes=[0] * n_codes)
    atok = trained.audio_tokenizer
    for i in range(2):
        rate, pcm = wavfile.read(tmp_path / f"t2s_{i:02d}.wav")
        assert rate == atok.config.sample_rate and pcm.dtype == np.int16
        assert len(pcm) == (n_codes - 1) * atok.config.hop  # the decoder's length for n_codes codes
    # --length sets the number of codes
    code, _, _ = _cli(["sample", "--checkpoint", str(ckpt), "--task", "t2s", "--prompt", sentence, "--length", "9",
                       "--sampler", "steps=2", "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0 and json.loads((tmp_path / "b" / "samples.json").read_text())["targets_per_sample"] == 11


def test_i2t_and_s2t_caption_files(ckpt, capsys, tmp_path):
    from PIL import Image

    from sdebatch.mdm.tokenizers.audio import write_wav

    trained = tasks.load_trained(ckpt, device="cpu")
    itok, atok = trained.image_tokenizer, trained.audio_tokenizer
    s = itok.config.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2 * s, 2 * s, 3), dtype=np.uint8)  # twice the size: resized
    Image.fromarray(pixels).save(tmp_path / "in.png")
    code, out, _err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "i2t", "--input", str(tmp_path / "in.png"),
                         "--n", "2", "--sampler", "steps=3", "--out", str(tmp_path / "i"), "--quiet"], capsys)
    assert code == 0, (out, _err)
    rec = json.loads((tmp_path / "i" / "samples.json").read_text())
    resized = Image.fromarray(pixels).resize((s, s), Image.BICUBIC)
    codes = itok.encode(torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)[None])[0].tolist()
    n_text = int(np.median((np.load(trained.folder / "image_train_captions.npy") >= 0).sum(1)))
    opts = _options("i2t", {"steps": 3})
    ref = _reference(trained, "i2t", None, 2, 0, opts, text=[0] * n_text, codes=codes)
    assert rec["tokens"] == ref and rec["notes"] == [f"resized {2 * s}x{2 * s} -> {s}x{s}"]
    for text, toks in zip(rec["texts"], ref):
        assert text == tasks.render_text(trained, toks[1:-1], stop_at_eot=True) and text in out

    sr = atok.config.sample_rate
    t = np.arange(int(0.5 * sr)) / sr
    write_wav(tmp_path / "in.wav", 0.3 * np.sin(2 * np.pi * 220 * t), sr)
    code, out, _err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "s2t", "--input", str(tmp_path / "in.wav"),
                         "--length", "5", "--sampler", "steps=3", "--out", str(tmp_path / "s"), "--quiet"], capsys)
    assert code == 0, (out, _err)
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    from sdebatch.mdm.tokenizers.audio import read_wav

    acodes = atok.encode(torch.from_numpy(read_wav(tmp_path / "in.wav", sr).astype(np.float32))).tolist()
    assert rec["tokens"] == _reference(trained, "s2t", None, 1, 0, _options("s2t", {"steps": 3}),
                                       text=[0] * 5, codes=acodes)
    assert rec["targets_per_sample"] == 7


def test_same_seed_same_files_other_seed_other_samples(ckpt, capsys, tmp_path):
    args = ["sample", "--checkpoint", str(ckpt), "--task", "t2i", "--prompt", "two squares", "--n", "2",
            "--sampler", "steps=4", "--quiet"]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert _cli(args + ["--seed", str(seed), "--out", str(tmp_path / name)], capsys)[0] == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    for f in files:
        a, b = (tmp_path / "a" / f).read_bytes(), (tmp_path / "b" / f).read_bytes()
        if f == "samples.json":  # equal but for the timing
            a, b = ({k: v for k, v in json.loads(x).items() if k not in ("seconds", "tokens_per_s")} for x in (a, b))
        assert a == b, f
    tok = [json.loads((tmp_path / n / "samples.json").read_text())["tokens"] for n in "ac"]
    assert tok[0] != tok[1]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, micro_data):
    """A data folder whose vocabulary differs from micro's (image codebook 16 instead of 64): only its index matters."""
    from sdebatch.mdm.data.dataset import read_index

    folder = tmp_path_factory.mktemp("other")
    index = read_index(micro_data[0])
    index["vocab"] = {**index["vocab"], "image_codes": index["vocab"]["image_codes"] // 2}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def _errors(ckpt: Path, data: Path, other: Path, tmp: Path) -> list[tuple[list[str], str]]:
    c = ["--checkpoint", str(ckpt)]
    bare = tmp / "bare"
    if not bare.exists():  # weights alone, no record: the shapes tell
        _save_model(bare, data, record=False)
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "cfg.toml").write_text('model = "tiny"\n')
    (tmp / "micro.toml").write_text('model = "micro"\n')
    return [
        (["--task", "t2x", "--prompt", "a"] + c, "argument --task: invalid choice: 't2x'"),
        (["--task", "t2i"] + c, "task t2i takes --prompt TEXT"),
        (["--task", "i2t", "--prompt", "a cat"] + c, "task i2t takes --input FILE (an image), not --prompt"),
        (["--task", "i2t", "--input", str(tmp / "missing.png")] + c, "--input " + str(tmp / "missing.png")
         + " does not exist"),
        (["--task", "i2t", "--input", str(tmp / "notes.txt")] + c, "is not an image PIL can read"),
        (["--task", "s2t", "--input", str(tmp / "notes.txt")] + c, "is not a WAV file"),
        (["--task", "t2i", "--prompt", "a " * 60] + c, "--prompt is"),
        (["--task", "t2i", "--prompt", "   "] + c, "t2i needs a caption"),
        (["--task", "text", "--prompt", "x", "--length", "500"] + c, "pass --length <= "),
        (["--task", "text", "--prompt", "x", "--length", "0"] + c, "nothing to generate"),
        (["--task", "t2i", "--prompt", "a", "--length", "4"] + c, "--length does not apply to t2i"),
        (["--task", "t2i", "--prompt", "a", "--n", "0"] + c, "--n must be a positive int"),
        (["--task", "t2i", "--prompt", "a", "--sampler", "guidanse=2"] + c, "unknown options ['guidanse']"),
        (["--task", "t2i", "--prompt", "a", "--sampler", "temperature=-1"] + c, "temperature must be >= 0"),
        (["--task", "t2i", "--prompt", "a", "--sampler", "steps"] + c, "--sampler takes KEY=VALUE"),
        (["--task", "t2i", "--prompt", "a", "--checkpoint", str(tmp / "none.pt")], "none.pt does not exist"),
        (["--task", "t2i", "--prompt", "a", "--data", str(other)] + c, "trained on a vocabulary of"),
        (["--task", "t2i", "--prompt", "a", "--checkpoint", str(bare / "model.pt"), "--data", str(data)],
         "the checkpoint carries no config, so the defaults (model='tiny') were tried: pass --config"),
        (["--task", "t2i", "--prompt", "a", "--data", str(other), "--checkpoint", str(bare / "model.pt"),
          "--config", str(tmp / "micro.toml")], "weights do not fit the model"),
        (["--task", "t2i", "--prompt", "a", "--data", str(tmp / "nowhere")] + c,
         f"sdebatch data prepare --out {tmp / 'nowhere'}"),
        (["--task", "t2i", "--prompt", "a", "--config", str(tmp / "cfg.toml")] + c,
         "has model='tiny' but the checkpoint was trained with model='micro'"),
    ]


def test_every_input_error_is_named_before_anything_is_written(ckpt, micro_data, other_data, capsys, tmp_path):
    for args, needle in _errors(ckpt, micro_data[0], other_data, tmp_path):
        out = tmp_path / "out"
        code, _, err = _cli(["sample"] + args + ["--out", str(out), "--quiet"], capsys)
        assert code == 2 and needle in err, (args, err)
        assert not out.exists(), args


def test_characters_the_tokenizer_cannot_take(ckpt, capsys, tmp_path, monkeypatch):
    """A tokenizer that loses characters (here: one that drops non-ASCII on the way back) is caught by name."""
    from sdebatch.mdm.data.text import TextTokenizer

    decode = TextTokenizer.decode
    monkeypatch.setattr(TextTokenizer, "decode", lambda self, ids: decode(self, ids).encode("ascii", "ignore").decode())
    code, _, err = _cli(["sample", "--checkpoint", str(ckpt), "--task", "t2i", "--prompt", "a red \u2603 circle",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot represent '\u2603'" in err and "0x2603" in err
    assert not (tmp_path / "o").exists()


def test_progress_bar_on_terminal_lines_otherwise(ckpt, capsys, tmp_path):
    from sdebatch.progress import Progress

    trained = tasks.load_trained(ckpt, device="cpu")
    req = tasks.build_request(trained, "text", prompt="x", length=8)
    r = tasks.run(trained, req, options=tasks.sampler_options("text", {"steps": 8}), progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal: no bar, and nothing within 10 s
    assert "\r" not in err and r["steps"] == 8 and r["model_calls"] == 8
    s = io.StringIO()
    p = Progress(10, "job", unit="step", every_s=0.0, stream=s)
    for i in range(10):
        p.update(1, loss=1.0 / (i + 1))
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 10 and lines[4].startswith("[job] 5/10 step (50%)") and "ETA" in lines[4]
    assert "loss=0.2" in lines[4] and "\r" not in s.getvalue()


def test_record_in_train_outputs_and_lightning_checkpoints(micro_data, tmp_path):
    """sdebatch train: train_config.json beside model.pt and the record in every checkpoint; a resume with
    another model is refused by name before Lightning runs."""
    from sdebatch.mdm.checkpoint import RECORD_FILE, RECORD_KEY
    from sdebatch.mdm.train import load_config, train

    out = tmp_path / "run"
    config = load_config(None, data=str(micro_data[0]), model="micro", logical_batch_size=2, physical_batch_size=2,
                         tokens=600, val_sequences=0, estimate_noise_scale=False, noise_probe=0, out=str(out),
                         checkpoint_every=1)
    train(config, progress=False)
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["config"] == config and Vocab(**rec["vocab"]) == Vocab(**micro_data[1]["vocab"])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt[RECORD_KEY] == rec
    trained = tasks.load_trained(out / "checkpoints" / "last.ckpt", device="cpu")  # no --config needed
    assert trained.config == config and trained.weights == "checkpoint"
    with pytest.raises(ValueError, match="has model='tiny' but the checkpoint was trained with model='micro'"):
        train({**config, "model": "tiny", "out": str(tmp_path / "r2")}, progress=False,
              ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    assert not (tmp_path / "r2").exists()


def test_read_wav_mixes_and_resamples(tmp_path):
    from scipy.io import wavfile

    from sdebatch.mdm.tokenizers.audio import read_wav

    rate, f = 8000, 440.0
    t = np.arange(rate) / rate
    left, right = 0.5 * np.sin(2 * np.pi * f * t), 0.1 * np.sin(2 * np.pi * f * t)
    wavfile.write(tmp_path / "st.wav", rate, (np.stack([left, right], 1) * 32767).astype(np.int16))
    x = read_wav(tmp_path / "st.wav", 16000)
    assert len(x) == 16000
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - f) <= 1.0  # the tone survives resampling
    mid = x[4000:12000]  # amplitude of the channel mean, 0.3, away from the filter's edges
    assert math.isclose(np.abs(mid).max(), 0.3, rel_tol=0.02)


def test_train_and_eval_name_the_data_folder_and_the_fix(ckpt, micro_data, capsys, tmp_path):
    """Missing / unprepared data folders and a checkpoint of another config: exit 2, the path and the command."""
    missing, half = tmp_path / "nowhere", tmp_path / "half"
    (half / "tokenizers").mkdir(parents=True)  # what an interrupted `data prepare` leaves: no index.json yet
    (tmp_path / "tiny.toml").write_text('model = "tiny"\n')
    cases = [
        (["train", "--set", f"data='{missing}'", "tokens=100"],
         f"data folder {missing} does not exist: make it with `sdebatch data prepare --out {missing}`"),
        (["train", "--set", f"data='{half}'", "tokens=100"],
         f"data folder {half} is not prepared (no index.json): finish it with `sdebatch data prepare --out {half}`"),
        (["eval", "--checkpoint", str(ckpt), "--data", str(missing), "--out", str(tmp_path / "e")],
         f"data folder {missing} does not exist"),
        (["eval", "--checkpoint", str(ckpt), "--config", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "e")],
         "has model='tiny' but the checkpoint was trained with model='micro'"),
        (["eval", "--checkpoint", str(tmp_path / "no.pt"), "--out", str(tmp_path / "e")], "no.pt does not exist"),
        (["train", "--set", f"data='{micro_data[0]}'", "model='tiny'", "tokens=100", f"out='{tmp_path / 't'}'",
          "--ckpt", str(ckpt)], "has model='tiny' but the checkpoint was trained with model='micro'"),
    ]
    for args, needle in cases:
        code, _, err = _cli(args, capsys)
        assert code == 2 and needle in err, (args, err)
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()


def test_progress_lines_callback_in_a_pipe(micro_data, tmp_path):
    """sdebatch.lightning.ProgressLines: lines with the clock against the budget, never a carriage return."""
    import lightning.pytorch as pl

    import sdebatch.lightning as sl
    from sdebatch.mdm.train import load_config, train

    stream = io.StringIO()
    lines = sl.ProgressLines(every_s=1e-9, metric="elbo_bits", stream=stream)
    config = load_config(None, data=str(micro_data[0]), model="micro", logical_batch_size=4, physical_batch_size=2,
                         tokens=1500, val_sequences=0, estimate_noise_scale=False, noise_probe=0, out="")
    r = train(config, progress=False, callbacks=[lines])
    text = stream.getvalue()
    assert "\r" not in text
    got = [ln for ln in text.splitlines() if ln.startswith("[train] update ")]
    assert len(got) >= r["updates"] and "/1,500 tokens (" in got[-1] and "elbo_bits " in got[-1]
    assert all("/1,500 tokens (" in ln for ln in got) and all("ETA" in ln for ln in got[1:])
    with pytest.raises(ValueError, match="every_s must be a positive finite number"):
        sl.ProgressLines(every_s=0)
    assert isinstance(lines, pl.Callback)
