"""Speech synthesis (eSpeak NG), the LJSpeech reader/writer, the audio tokenizer and MCD."""
import random

import numpy as np
import pytest
import torch

from sdebatch.mdm.data.speech import load_ljspeech, read_wav, synthesize, write_ljspeech
from sdebatch.mdm.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig, mel_cepstral_distortion

SR = 16000


def _sentences(n, seed=0):
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow", "purple", "orange"], ["circle", "square", "triangle", "star"]
    where = ["above", "below", "left of", "right of"]
    return [f"A {rng.choice(['small', 'large'])} {rng.choice(colours)} {rng.choice(shapes)} is {rng.choice(where)} "
            f"the {rng.choice(colours)} {rng.choice(shapes)}." for _ in range(n)]


@pytest.fixture(scope="module")
def speech():
    texts = _sentences(44)
    return texts, synthesize(texts, sample_rate=SR)


@pytest.fixture(scope="module")
def tokenizer(speech):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # training runs in float32, not the exactness tests' float64
    try:
        return AudioTokenizer.train(speech[1][:36], AudioTokenizerConfig(codebook_size=128, gl_iters=16),
                                    seed=0, progress=False)
    finally:
        torch.set_default_dtype(old)


def test_synthesis_is_deterministic_speech_like_and_text_dependent():
    texts = ["The red circle is above the blue square.", "Hello world.", "Seven green stars."]
    first = synthesize(texts, sample_rate=SR)
    again = synthesize(texts[::-1], sample_rate=SR)[::-1]  # a different history must not change the audio
    for t, a, b in zip(texts, first, again):
        assert a.dtype == np.float32 and np.array_equal(a, b), t
        assert 0.5 < len(a) / SR < 5.0, (t, len(a) / SR)
        assert np.sqrt(np.mean(a ** 2)) > 0.02 and np.abs(a).max() <= 1.0
    assert len({len(a) for a in first}) == 3
    native = synthesize(texts[0], sample_rate=22050)[0]
    assert abs(len(native) * SR / 22050 - len(first[0])) <= 2
    slow, fast = synthesize(texts[0], sample_rate=SR, rate=120)[0], synthesize(texts[0], sample_rate=SR, rate=300)[0]
    assert len(slow) > 1.5 * len(fast)
    for bad in ([""], ["   "], [None]):
        with pytest.raises(ValueError, match="text 0"):
            synthesize(bad)
    with pytest.raises(ValueError, match="rate"):
        synthesize("hi", rate=10)
    with pytest.raises(ValueError, match="voice"):
        synthesize("hi", voice="no-such-voice")


def test_tokenizer_reconstructs_held_out_speech(tokenizer, speech):
    held_out = speech[1][36:40]
    r = tokenizer.evaluate(held_out)
    print(r)
    # Measured (seed 0): logmel_l1 ~0.3 nats, random codes ~1.7, silence ~11.5. Margins: 3x below random codes,
    # 20x below silence; the quantiser alone must be at least as good as after Griffin-Lim (it is the upper bound).
    assert r["logmel_l1"] < r["random_l1"] / 3 and r["logmel_l1"] < r["silence_l1"] / 20
    assert r["codes_l1"] <= r["logmel_l1"] + 0.05
    assert r["utilisation"] > 0.4 and r["perplexity"] > 30
    assert r["tokens_per_second"] == tokenizer.tokens_per_second == 31.25 and tokenizer.codebook_size == 128


def test_tokenizer_codes_are_deterministic_and_survive_save_load(tokenizer, speech, tmp_path):
    x = speech[1][40]
    codes = tokenizer.encode(x)
    assert codes.dtype == torch.long and codes.shape == (1 + len(x) // 512,)
    assert 0 <= int(codes.min()) and int(codes.max()) < 128
    assert torch.equal(codes, tokenizer.encode(torch.as_tensor(x, dtype=torch.float64)))
    assert [c.tolist() for c in tokenizer.encode_batch(speech[1][40:42])] == [codes.tolist(),
                                                                           tokenizer.encode(speech[1][41]).tolist()]
    y = tokenizer.decode(codes)
    assert y.dtype == np.float32 and len(y) == (len(codes) - 1) * 512 and np.array_equal(y, tokenizer.decode(codes))
    tokenizer.save(tmp_path / "tok")
    again = AudioTokenizer.load(tmp_path / "tok")
    assert again.config == tokenizer.config and torch.equal(again.codebook, tokenizer.codebook)
    for w in speech[1][40:]:
        assert torch.equal(again.encode(w), tokenizer.encode(w))
    with pytest.raises(ValueError, match="codes must be in"):
        tokenizer.decode(torch.tensor([0, 128]))
    with pytest.raises(ValueError, match="not a saved audio tokenizer"):
        AudioTokenizer.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.encode(np.zeros(0, np.float32))


def test_mel_cepstral_distortion_with_dtw():
    a, b = synthesize(["The red circle is above the blue square."] * 2, sample_rate=SR, rate=140)
    same = synthesize("The red circle is above the blue square.", sample_rate=SR, rate=220)[0]
    other = synthesize("Seven green stars sit to the left.", sample_rate=SR, rate=220)[0]
    assert mel_cepstral_distortion(a, b, SR) == 0.0
    d_same, d_other = mel_cepstral_distortion(a, same, SR), mel_cepstral_distortion(a, other, SR)
    assert 0 < d_same and d_same * 1.5 < d_other, (d_same, d_other)


def test_ljspeech_round_trip(tmp_path, speech):
    texts, waves = speech[0][:3], speech[1][:3]
    ids = write_ljspeech(tmp_path / "lj", texts, waves, SR)
    assert (tmp_path / "lj" / "metadata.csv").read_text().splitlines()[0] == f"{ids[0]}|{texts[0]}|{texts[0]}"
    got = load_ljspeech(tmp_path / "lj", SR)
    assert got.ids == ids and got.texts == texts and got.skipped == 0
    for w, g in zip(waves, got.waves):
        assert g.dtype == np.float32 and len(g) == len(w) and np.abs(g - w).max() < 1e-4  # 16-bit PCM
    resampled = load_ljspeech(tmp_path / "lj", 8000)
    assert abs(len(resampled.waves[0]) - len(waves[0]) / 2) <= 1
    assert not list((tmp_path / "lj").rglob("*.tmp"))


def _bad_folder(root, case, wave):
    """An LJSpeech folder with one good row and one bad row of the given kind; returns the bad file's name."""
    write_ljspeech(root, ["Fine.", "Also fine."], [wave, wave], SR, ids=["good", "bad"])
    meta, bad = root / "metadata.csv", root / "wavs" / "bad.wav"
    if case == "missing wav":
        bad.unlink()
    elif case == "corrupt wav":
        bad.write_bytes(b"RIFF\x00\x01garbage, not a wave file")
    elif case == "empty text":
        meta.write_text("good|Fine.|Fine.\nbad| | \n")
        return "metadata.csv:2"
    elif case == "wrong rate":
        write_ljspeech(root, ["Also fine."], [wave], 22050, ids=["bad"])
        meta.write_text("good|Fine.|Fine.\nbad|Also fine.|Also fine.\n")
    elif case == "row naming a missing file":
        meta.write_text("good|Fine.|Fine.\nghost|Nobody home.\n")
        return "ghost.wav"
    elif case == "malformed row":
        meta.write_text("good|Fine.|Fine.\njust some text without separators\n")
        return "metadata.csv:2"
    return "bad.wav"


@pytest.mark.parametrize("case", ["missing wav", "corrupt wav", "empty text", "wrong rate",
                                  "row naming a missing file", "malformed row"])
def test_ljspeech_bad_input_is_a_clear_error_or_skipped(tmp_path, speech, case):
    root = tmp_path / "lj"
    name = _bad_folder(root, case, speech[1][0])
    strict = case == "wrong rate"
    with pytest.raises(ValueError, match=name):
        load_ljspeech(root, SR, strict_rate=strict)
    got = load_ljspeech(root, SR, strict_rate=strict, skip_bad=True)
    assert got.ids == ["good"] and got.skipped == 1
    if strict:  # without strict_rate the 22.05 kHz file is resampled and kept
        again = load_ljspeech(root, SR)
        assert again.ids == ["good", "bad"] and abs(len(again.waves[1]) - len(again.waves[0]) * SR / 22050) <= 1


def test_ljspeech_missing_metadata_and_empty_wav(tmp_path):
    with pytest.raises(ValueError, match="metadata.csv"):
        load_ljspeech(tmp_path, SR)
    import wave
    (tmp_path / "wavs").mkdir()
    with wave.open(str(tmp_path / "wavs" / "e.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
    with pytest.raises(ValueError, match="e.wav"):
        read_wav(tmp_path / "wavs" / "e.wav", SR)
