"""Text tokenizer, sequence layout and the mixture sampler against plain references."""
import collections
import json

import pytest
import torch

from sdebatch.data import ResumableDataLoader
from sdebatch.mdm.data.mixture import MixtureSampler
from sdebatch.mdm.data.text import TextTokenizer, builtin_corpus, load_text_folder
from sdebatch.mdm.vocab import AUDIO, IMAGE, SPECIAL, TEXT, Vocab, decode_pair, layout_pair, pack_text


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(builtin_corpus(max_docs=60), vocab_size=512)


@pytest.mark.parametrize("text", ["Hello, world!", "  leading spaces\tand\ttabs\n\nnew lines ",
                                  "unicode: héllo wörld — ∑ 🙂", "", "x" * 500])
def test_text_tokenizer_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_text_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    again = TextTokenizer.load(tmp_path / "tok")
    s = "The quick brown fox jumps over the lazy dog."
    assert again.encode(s) == tokenizer.encode(s) and again.vocab_size == tokenizer.vocab_size == 512
    assert len(tokenizer.encode(s)) < len(s.encode())  # merges were learned: fewer ids than bytes


def test_real_text_layout_and_bad_rows(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.md").write_text("# second\n\ntext")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": ""}) + "\nnot json\n")
    with pytest.raises(ValueError, match="c.jsonl:2"):
        load_text_folder(tmp_path)
    docs, skipped = load_text_folder(tmp_path, skip_bad=True)
    assert docs == ["first document", "# second\n\ntext", "third"] and skipped == 2


VOCAB = Vocab(text_size=100, image_codes=64, audio_codes=32)


@pytest.mark.parametrize("task", ["t2i", "i2t", "t2s", "s2t"])
def test_pair_layout_round_trip(task):
    text, codes = [5, 6, 7], list(range(10))
    d = layout_pair(VOCAB, task, text, codes, 24)
    toks = d["tokens"].tolist()
    task_token = {"t2i": "[T2I]", "i2t": "[I2T]", "t2s": "[T2S]", "s2t": "[S2T]"}[task]
    assert len(toks) == 24 and toks[0] == VOCAB.id(task_token)
    n_real = 1 + (len(text) + 2) + (len(codes) + 2)
    assert d["pad"].tolist() == [True] * n_real + [False] * (24 - n_real)
    assert toks[n_real:] == [VOCAB.pad_id] * (24 - n_real)
    assert decode_pair(VOCAB, d["tokens"]) == (task, text, codes)
    other = IMAGE if task in ("t2i", "i2t") else AUDIO
    target_mod = other if task in ("t2i", "t2s") else TEXT
    mods = d["modality"][d["target"]].tolist()
    assert set(mods) == {SPECIAL, target_mod} and mods.count(target_mod) == len(codes if target_mod == other else text)
    assert torch.equal(d["modality"][d["pad"]], VOCAB.modality_of(d["tokens"])[d["pad"]])
    with pytest.raises(ValueError, match="does not fit"):
        layout_pair(VOCAB, task, text, codes, 10)
    with pytest.raises(ValueError, match="ids must be in"):
        layout_pair(VOCAB, task, [100], codes, 24)


def test_text_packing_is_exact_and_lossless():
    docs = [[1] * 7, [2] * 20, [3] * 3]
    seqs = list(pack_text(VOCAB, docs, 10))
    flat = [t for s in seqs for t in s["tokens"].tolist()[1:]]
    expected = []
    for d in docs:
        expected += [VOCAB.id("[BOT]")] + [VOCAB.text_offset + i for i in d] + [VOCAB.id("[EOT]")]
    assert all(len(s["tokens"]) == 10 and s["pad"].all() for s in seqs)
    assert flat == expected[:len(flat)] and len(expected) - len(flat) < 9


SIZES = {"text": 300, "image": 120, "audio": 80}
WEIGHTS = {"text": 0.5, "image": 0.3, "audio": 0.2}


def test_mixing_ratios_within_binomial_tolerance():
    keys = list(MixtureSampler(SIZES, WEIGHTS, 20000, seed=1))
    c = collections.Counter(k for k, _ in keys)
    for name, p in WEIGHTS.items():
        sd = (20000 * p * (1 - p)) ** 0.5
        assert abs(c[name] - 20000 * p) < 4 * sd
    # each source walks through a permutation per pass: within a pass every item appears once
    image = [i for k, i in keys if k == "image"][:120]
    assert sorted(image) == list(range(120))


def test_deterministic_and_seed_dependent():
    a = list(MixtureSampler(SIZES, WEIGHTS, 500, seed=3))
    assert a == list(MixtureSampler(SIZES, WEIGHTS, 500, seed=3))
    assert a != list(MixtureSampler(SIZES, WEIGHTS, 500, seed=4))


def test_two_rank_sharding_is_disjoint_and_complete():
    full = MixtureSampler(SIZES, WEIGHTS, 1000, seed=2, num_replicas=1, rank=0)
    r0 = list(MixtureSampler(SIZES, WEIGHTS, 1000, seed=2, num_replicas=2, rank=0))
    r1 = list(MixtureSampler(SIZES, WEIGHTS, 1000, seed=2, num_replicas=2, rank=1))
    stream = list(full)
    assert r0 == stream[0::2] and r1 == stream[1::2]  # positions, not just sets: disjoint and complete


def test_resume_continues_the_identical_order():
    class Keys(torch.utils.data.Dataset):
        def __getitem__(self, key):
            return {"source": ["text", "image", "audio"].index(key[0]), "index": key[1]}

    def loader():
        return ResumableDataLoader(Keys(), 8, sampler=MixtureSampler(SIZES, WEIGHTS, 400, seed=5))

    full = [b["index"].tolist() for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it)["index"].tolist() for _ in range(13)]
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    tail = [b["index"].tolist() for b in again]
    assert head + tail == full
    assert again.sampler.epoch == 0
    again.sampler.set_epoch(1)
    assert [b["index"].tolist() for b in again] != full  # the next epoch continues the stream, not a replay
