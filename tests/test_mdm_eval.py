"""`sdebatch eval` (sdebatch.mdm.evaluate): the unigram baseline by hand, the report of a uniform stub model on a small
hand-made data folder, checkpoint loading, and (when data/tiny exists) a tiny untrained MDM end to end."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdebatch.mdm.evaluate import evaluate, evaluate_checkpoint, unigram_baseline
from sdebatch.mdm.vocab import Vocab, pack_text

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"


pytestmark = pytest.mark.usefixtures("one_thread", "float32")  # fixtures in conftest.py


class UniformModel(torch.nn.Module):
    """Zero logits everywhere: uniform over the V - 2 ids SUBS allows."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, tokens, pad=None, select=None):
        n = int(select.sum()) if select is not None else tokens.numel()
        return torch.zeros(n, self.vocab_size)


# ---------------------------------------------------------------- a hand-made data folder

def make_folder(root: Path, *, n_text=64, n_img=4, n_audio=3, seq_len=64, seed=0) -> Path:
    """The layout `sdebatch data prepare` writes, filled with random ids and untrained tokenizers (seconds to make)."""
    from sdebatch.mdm.data.dataset import INDEX_VERSION
    from sdebatch.mdm.data.scenes import generate_scenes
    from sdebatch.mdm.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
    from sdebatch.mdm.tokenizers.image import ImageTokenizer, ImageTokenizerConfig

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    itok = ImageTokenizer(ImageTokenizerConfig(downsample=8, codebook_size=16, code_dim=4, channels=8, res_blocks=0))
    atok = AudioTokenizer(AudioTokenizerConfig(codebook_size=16), torch.randn(16, 80) - 4.0)
    vocab = Vocab(text_size=40, image_codes=16, audio_codes=16)
    itok.save(root / "tokenizers" / "image")
    atok.save(root / "tokenizers" / "audio")

    def save(name, arr):
        np.save(root / f"{name}.npy", arr)

    for split, n in (("train", n_text), ("val", n_text)):
        docs = [rng.zipf(1.5, size=rng.integers(5, 30)).clip(1, vocab.text_size) - 1 for _ in range(4 * n)]
        rows = [r["tokens"].numpy() for r in pack_text(vocab, docs, seq_len)][:n]
        save(f"text_{split}", np.stack(rows).astype(np.int32))
        scenes = generate_scenes(n_img, seed=seed + (split == "val"))
        save(f"image_{split}_codes", rng.integers(0, 16, (n_img, itok.tokens_per_image)).astype(np.int32))
        caps = np.full((n_img, 8), -1, np.int32)
        caps[:, :6] = rng.integers(0, vocab.text_size, (n_img, 6))
        save(f"image_{split}_captions", caps)
        (root / f"image_{split}_meta.jsonl").write_text(
            "".join(json.dumps({"text": s.caption, **s.attributes}) + "\n" for s in scenes))
        lengths = rng.integers(15, 30, n_audio)
        save(f"audio_{split}_codes", rng.integers(0, 16, int(lengths.sum())).astype(np.int32))
        save(f"audio_{split}_offsets", np.cumsum([0, *lengths]).astype(np.int64))
        acaps = np.full((n_audio, 8), -1, np.int32)
        acaps[:, :5] = rng.integers(0, vocab.text_size, (n_audio, 5))
        save(f"audio_{split}_captions", acaps)
        (root / f"audio_{split}_meta.jsonl").write_text(
            "".join(json.dumps({"text": s.caption}) + "\n" for s in generate_scenes(n_audio, seed=seed + 7)))
    index = {"version": INDEX_VERSION, "seq_len": seq_len, "vocab": vocab.state_dict(), "counts": {}}
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("mdm_eval_data"))


# ---------------------------------------------------------------- unigram baseline

def test_unigram_baseline_by_hand():
    v = Vocab(text_size=3, image_codes=2, audio_codes=2)
    a, b, c = v.text_offset, v.text_offset + 1, v.text_offset + 2
    bot, eot = v.id("[BOT]"), v.id("[EOT]")
    train = [bot, a, a, a, b, eot]                 # support {a, b, c, BOT, EOT}: 5 outcomes, 6 tokens
    held = [bot, a, c, eot]
    p = {a: 4 / 11, b: 2 / 11, c: 1 / 11, bot: 2 / 11, eot: 2 / 11}
    expect = -np.mean([math.log2(p[t]) for t in held])
    r = unigram_baseline(np.array(train), np.array(held), v)
    assert r["support"] == 5 and r["num_items"] == 4
    assert abs(r["bits_per_token"] - expect) < 1e-12
    assert abs(r["uniform_bits"] - math.log2(5)) < 1e-12
    # probabilities of the smoothed unigram sum to one over the support
    assert abs(sum(p.values()) - 1) < 1e-12


def test_unigram_baseline_beats_uniform_on_real_text():
    """On real English the unigram cross-entropy sits well below log2 of the text vocabulary."""
    if (TINY / "text_train.npy").exists():
        train = np.load(TINY / "text_train.npy")[:, 1:]
        held = np.load(TINY / "text_val.npy")[:, 1:]
        vocab = Vocab(**json.loads((TINY / "index.json").read_text())["vocab"])
    else:
        from sdebatch.mdm.data.text import TextTokenizer, builtin_corpus

        docs = builtin_corpus(max_docs=120)
        tok = TextTokenizer.train(docs[10:], 512)
        vocab = Vocab(tok.vocab_size, 1, 1)
        train, held = ([r["tokens"][1:].numpy() for r in pack_text(vocab, tok.encode_batch(d), 64)]
                       for d in (docs[10:], docs[:10]))
    r = unigram_baseline(np.asarray(train), np.asarray(held), vocab)
    assert r["bits_per_token"] < math.log2(vocab.text_size) - 1.0
    assert r["num_items"] == np.asarray(held).size


# ---------------------------------------------------------------- report with a uniform stub

def _plain_mcd(a, b, sample_rate: int) -> float:
    """Mel cepstral distortion written out: MFCCs 1..13 of the library's log-mel frames, then dynamic time warping in
    plain loops (steps diagonal, down, right; the path traced back preferring the diagonal), the accumulated frame
    distance (10 / ln 10) sqrt(2 sum (ca - cb)^2) over the path length."""
    from scipy.fft import dct

    from sdebatch.mdm.tokenizers.audio import log_mel, mel_filterbank

    n_fft = 2 ** round(math.log2(0.064 * sample_rate))
    fb = mel_filterbank(sample_rate, n_fft, 80)
    ca, cb = (dct(log_mel(x, fb, n_fft, n_fft // 4).double().numpy(), type=2, norm="ortho", axis=1)[:, 1:14]
              for x in (a, b))
    n, m = len(ca), len(cb)
    acc = [[math.inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            cost = 10 / math.log(10) * math.sqrt(2 * float(((ca[i] - cb[j]) ** 2).sum()))
            before = [acc[p][q] for p, q in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if p >= 0 and q >= 0]
            acc[i][j] = cost + (min(before) if before else 0.0)
    i, j, steps = n - 1, m - 1, 1
    while i > 0 or j > 0:
        i, j = min(((i - 1, j - 1), (i - 1, j), (i, j - 1)), key=lambda p: acc[p[0]][p[1]] if min(p) >= 0 else math.inf)
        steps += 1
    return acc[-1][-1] / steps


def test_report_of_uniform_model(folder, tmp_path, monkeypatch):
    import sdebatch.mdm.evaluate as evaluate_module
    from sdebatch.mdm.vocab import AUDIO, IMAGE

    vocab = Vocab(**json.loads((folder / "index.json").read_text())["vocab"])
    out = tmp_path / "eval"
    generated = []  # (batch, tokens) of each sampler call: the inputs the report's numbers are recomputed from
    sampler = evaluate_module.generate

    def recording(model, batch, **kw):
        tokens = sampler(model, batch, **kw)
        generated.append(({k: v.cpu() for k, v in batch.items()}, tokens.cpu()))
        return tokens

    monkeypatch.setattr(evaluate_module, "generate", recording)
    r = evaluate(UniformModel(vocab.size), folder, out, n_images=3, n_speech=2, steps=3, progress=False)
    assert len(generated) == 2  # one batch of images, one of speech

    def codes(call, modality, offset, size):
        """Per row: the generated ids at the modality's target positions, offset removed; and the true codes."""
        batch, tokens = generated[call]
        rows = []
        for i in range(tokens.shape[0]):
            pos = batch["target"][i] & (batch["modality"][i] == modality)
            rows.append(((tokens[i][pos] - offset).tolist(), (batch["tokens"][i][pos] - offset).tolist()))
        return rows
    # a uniform model's -ELBO is log2(V - 2) bits per token in expectation over t (64 rows x 4 draws here: the
    # 1/t weight makes the estimate noisy, about 2% relative standard deviation)
    assert abs(r["text"]["elbo_bits_per_token"] / math.log2(vocab.size - 2) - 1) < 0.06
    assert r["text"]["baseline_uniform_joint_bits"] == pytest.approx(math.log2(vocab.size - 2))
    assert r["text"]["baseline_unigram_bits_per_token"] > 0
    assert r["text"]["num_items"] == 64 * 63
    t2i = r["t2i"]
    assert t2i["n"] == 3 and t2i["codes_per_image"] == 16 and len(t2i["items"]) == 3
    assert t2i["sampler"]["steps"] == 3 and t2i["sampler"]["guidance"] == 3.0  # defaults except steps
    # ids outside the image codes, and codes equal to the true ones (an outside id clamped into the range), counted
    image = codes(0, IMAGE, vocab.image_offset, vocab.image_codes)
    outside = [sum(not 0 <= c < vocab.image_codes for c in gen) for gen, _ in image]
    assert [it["out_of_range"] for it in t2i["items"]] == outside and t2i["out_of_range"] == sum(outside)
    assert t2i["out_of_range_fraction"] == pytest.approx(sum(outside) / 48)
    match = sum(min(max(c, 0), vocab.image_codes - 1) == t for gen, true in image for c, t in zip(gen, true))
    assert t2i["code_match"] == pytest.approx(match / 48)
    assert set(t2i["scores"]) >= {"colour", "count", "position", "size", "shape", "all"}
    assert set(t2i["baseline_chance"]) == {"mismatched", "noise", "blank"}
    assert "all" in t2i["baseline_reconstruction"]
    from scipy.stats import binom

    for key, v in t2i["vs_chance"].items():  # hits and p-value against the binomial tail written out here
        assert v["n"] == 3 and v["hits"] == round(3 * t2i["scores"][key])
        assert v["p_value"] == pytest.approx(binom.sf(v["hits"] - 1, 3, v["chance"]))
        assert v["ci95"][0] <= v["accuracy"] <= v["ci95"][1]
    # chance of "all": a random caption of the evaluated set has the same attributes, by hand from the metadata
    meta = [json.loads(line) for line in (folder / "image_val_meta.jsonl").read_text().splitlines()[:3]]
    collide = 1.0
    for key in ("colour", "count", "position", "size", "shape"):
        values = [m[key] for m in meta]
        collide *= sum((values.count(v) / 3) ** 2 for v in set(values))
    assert t2i["vs_chance"]["all"]["chance"] == pytest.approx(max(collide, t2i["baseline_chance"]["mismatched"]["all"]))
    assert (out / "t2i_grid.png").stat().st_size > 0
    t2s = r["t2s"]
    assert t2s["n"] == 2 and len(t2s["items"]) == 2
    # MCD of the generated and of the true codes, decoded, to eSpeak's reading of the caption, by the plain reference
    from sdebatch.mdm.data.speech import synthesize
    from sdebatch.mdm.tokenizers.audio import AudioTokenizer

    atok = AudioTokenizer.load(folder / "tokenizers" / "audio")
    sr = atok.config.sample_rate
    texts = [json.loads(line)["text"] for line in (folder / "audio_val_meta.jsonl").read_text().splitlines()[:2]]
    speech = codes(1, AUDIO, vocab.audio_offset, vocab.audio_codes)
    assert [it["out_of_range"] for it in t2s["items"]] == [sum(not 0 <= c < 16 for c in gen) for gen, _ in speech]
    refs = synthesize(texts, sample_rate=sr)
    for item, (gen, true), ref in zip(t2s["items"], speech, refs):
        clamped = [min(max(c, 0), vocab.audio_codes - 1) for c in gen]
        assert item["mcd_db"] == pytest.approx(_plain_mcd(atok.decode(clamped, seed=0), ref, sr), rel=1e-9)
        assert item["baseline_reconstruction_mcd_db"] == pytest.approx(
            _plain_mcd(atok.decode(true, seed=0), ref, sr), rel=1e-9)
    for key in ("mcd_db", "baseline_random_mcd_db", "baseline_reconstruction_mcd_db"):
        assert t2s[key] == pytest.approx(sum(it[key] for it in t2s["items"]) / 2)
    from scipy.io import wavfile

    for i in range(2):
        for name in ("generated", "reference"):
            rate, pcm = wavfile.read(out / "speech" / f"{i:02d}_{name}.wav")
            assert rate == 16000 and pcm.dtype == np.int16 and len(pcm) > 0
    # report.json holds exactly what was returned, and nothing is left half-written
    assert json.loads((out / "report.json").read_text()) == r
    assert not list(out.glob(".*tmp"))


def test_uniform_model_out_of_range_rate(folder, tmp_path):
    """A uniform sampler puts an id outside the image codes with probability 1 - 16 / (V - 2)."""
    vocab = Vocab(**json.loads((folder / "index.json").read_text())["vocab"])
    r = evaluate(UniformModel(vocab.size), folder, tmp_path, n_images=4, n_speech=0, steps=2, progress=False)
    assert "t2s" not in r
    expect = 1 - vocab.image_codes / (vocab.size - 2)
    assert abs(r["t2i"]["out_of_range_fraction"] - expect) < 0.15  # 64 draws


def test_sampler_overrides_apply_and_bad_ones_fail_first(folder, tmp_path):
    vocab = Vocab(**json.loads((folder / "index.json").read_text())["vocab"])
    r = evaluate(UniformModel(vocab.size), folder, tmp_path / "a", n_images=2, n_speech=1, steps=2, progress=False,
                 sampler={"image": {"guidance": 1.5, "top_p": None}, "audio": {"strategy": "random"}})
    assert r["t2i"]["sampler"]["guidance"] == 1.5 and r["t2i"]["sampler"]["top_p"] is None
    assert r["t2s"]["sampler"]["strategy"] == "random" and r["t2i"]["sampler"]["steps"] == 2
    with pytest.raises(ValueError, match="unknown options \\['guidanse'\\]"):
        evaluate(UniformModel(vocab.size), folder, tmp_path / "b", n_images=2, progress=False,
                 sampler={"image": {"guidanse": 2.0}})
    assert not (tmp_path / "b").exists()  # failed before any work


@pytest.mark.parametrize("sampler, needle", [
    ({"image": {"temperature": -1}}, "sampler['image']: temperature must be >= 0, got -1"),
    ({"audio": {"top_p": 1.5}}, "sampler['audio']: top_p must be in (0, 1] or None, got 1.5"),
    ({"image": {"strategy": "best"}}, "sampler['image']: strategy must be one of"),
    ({"audio": {"steps": 0}}, "sampler['audio']: steps must be a positive int, got 0"),
    ({"image": {"block_size": 2.5}}, "sampler['image']: block_size must be a positive int or None, got 2.5"),
    ({"text": {"steps": 2}}, "sampler takes options for 'image', 'audio', got ['text']"),
])
def test_eval_checks_sampler_options_as_sample_does_before_any_work(folder, tmp_path, capsys, monkeypatch, sampler,
                                                                     needle):
    """The checks of `sdebatch sample`'s --sampler, here before the checkpoint is read or a file written: through
    evaluate, evaluate_checkpoint and the command line."""
    import sdebatch.mdm.checkpoint as checkpoint
    from sdebatch.cli import main

    vocab = Vocab(**json.loads((folder / "index.json").read_text())["vocab"])
    with pytest.raises(ValueError) as e:
        evaluate(UniformModel(vocab.size), folder, tmp_path / "a", n_images=1, n_speech=1, steps=2, progress=False,
                 sampler=sampler)
    assert needle in str(e.value)

    def no_work(*a, **k):
        raise AssertionError("the checkpoint was read before the sampler options were checked")

    monkeypatch.setattr(checkpoint, "read_checkpoint", no_work)
    with pytest.raises(ValueError) as e:
        evaluate_checkpoint(None, tmp_path / "model.pt", tmp_path / "b", progress=False, sampler=sampler)
    assert needle in str(e.value)
    ((modality, options),) = sampler.items()
    args = ["eval", "--checkpoint", str(tmp_path / "model.pt"), "--data", str(folder), "--out", str(tmp_path / "c"),
            "--sampler"] + [f"{modality}.{k}={json.dumps(v)}" for k, v in options.items()]
    try:
        code = main(args)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert (needle if modality != "text" else "--sampler takes image.KEY=VALUE or audio.KEY=VALUE") in err
    assert not [p for p in tmp_path.iterdir()]  # nothing written


# ---------------------------------------------------------------- checkpoints

def test_evaluate_checkpoint_state_dict_and_lightning(folder, tmp_path):
    from sdebatch.mdm.train import MDMModule, load_config

    config = load_config(data=str(folder), model="tiny")
    vocab = Vocab(**json.loads((folder / "index.json").read_text())["vocab"])
    torch.manual_seed(1)
    module = MDMModule(config, vocab.size)
    small = dict(n_images=1, n_speech=0, steps=2, text_rows=2, progress=False)

    plain = tmp_path / "weights.pt"
    torch.save(module.model.state_dict(), plain)
    r1 = evaluate_checkpoint(config, plain, tmp_path / "a", **small)
    assert r1["checkpoint"]["weights"] == "state_dict"
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == r1

    # a Lightning-style checkpoint with EMA weights in the callback state: the EMA weights are the ones evaluated
    ema = [torch.zeros_like(p) for p in module.model.parameters()]
    ckpt = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
            "callbacks": {"LogicalBatch": {"ema": {"params": ema, "decay": 0.9, "updates": 3}}}}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    r2 = evaluate_checkpoint(config, path, tmp_path / "b", **small)
    assert r2["checkpoint"]["weights"] == "checkpoint (EMA weights)"
    # all-zero weights give zero logits: exactly the uniform model's ELBO for the same draws
    r3 = evaluate(UniformModel(vocab.size), folder, tmp_path / "c", **small)
    assert r2["text"]["elbo_bits_per_token"] == pytest.approx(r3["text"]["elbo_bits_per_token"], rel=1e-5)

    with pytest.raises(ValueError, match="lacks"):
        torch.save({"embed.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
        evaluate_checkpoint(config, tmp_path / "bad.pt", tmp_path / "d", **small)


# ---------------------------------------------------------------- the real tiny data

needs_tiny = pytest.mark.skipif(not (TINY / "index.json").exists(), reason="data/tiny not prepared")


def _tiny_model(**overrides):
    from sdebatch.mdm.model import build_model, get_config

    vocab = Vocab(**json.loads((TINY / "index.json").read_text())["vocab"])
    torch.manual_seed(0)
    return build_model(get_config("tiny", vocab.size, **overrides)), vocab


@needs_tiny
def test_untrained_small_mdm_on_tiny_data(tmp_path):
    model, vocab = _tiny_model(d_model=32, n_layers=1, n_heads=1, base_width=32, base_depth=1)
    r = evaluate(model, TINY, tmp_path, n_images=4, n_speech=2, steps=4, text_rows=16, progress=False)
    # an untrained model is close to uniform: no better than the unigram, near log2(V - 2)
    assert r["text"]["elbo_bits_per_token"] > r["text"]["baseline_unigram_bits_per_token"]
    assert abs(r["text"]["elbo_bits_per_token"] - math.log2(vocab.size - 2)) < 1.0
    assert r["text"]["baseline_unigram_bits_per_token"] < r["text"]["baseline_uniform_text_bits"]
    assert r["t2i"]["codes_per_image"] == 64
    assert r["t2i"]["baseline_reconstruction"]["colour"] > 0.5  # the image tokenizer keeps colours
    assert r["t2s"]["baseline_reconstruction_mcd_db"] < r["t2s"]["baseline_random_mcd_db"]


@needs_tiny
@pytest.mark.slow
def test_untrained_tiny_mdm_defaults(tmp_path):
    """The full default evaluation of the tiny config (about a minute on 2 CPU cores)."""
    model, _ = _tiny_model()
    r = evaluate(model, TINY, tmp_path)
    assert r["t2i"]["n"] == 32 and r["t2s"]["n"] == 8 and r["text"]["sequences"] > 0
    assert (tmp_path / "report.json").exists()
