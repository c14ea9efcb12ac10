"""Checkpoints of the MDM (sdebatch.mdm.checkpoint): EMA weights that do not fit the model are an error, never a
silent fall-back to the raw weights; loading a model for `sdebatch sample` / `eval` builds the bare denoiser, the one
training builds, without Lightning."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdebatch.mdm.checkpoint import load_model, model_state
from sdebatch.mdm.config import load_config
from sdebatch.mdm.model import build_model, train_model_config
from sdebatch.mdm.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
VOCAB = Vocab(text_size=40, image_codes=16, audio_codes=16)

pytestmark = pytest.mark.usefixtures("one_thread", "float32")  # fixtures in conftest.py


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(train_model_config(load_config(None, model="micro"), VOCAB.size))


def _lightning_checkpoint(model, ema: list) -> dict:
    """What a Lightning checkpoint of MDMModule with sdebatch.lightning.LogicalBatch's EMA holds (the parts read)."""
    return {"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            "callbacks": {"LogicalBatch": {"ema": {"params": ema, "decay": 0.99, "updates": 5}}}}


def test_ema_weights_that_fit_are_the_ones_loaded():
    model = _model()
    ema = [torch.full_like(p, 0.5 + i) for i, (_, p) in enumerate(model.named_parameters())]
    state, source = model_state(_lightning_checkpoint(model, ema), model)
    assert source == "checkpoint (EMA weights)"
    for i, (name, p) in enumerate(model.named_parameters()):
        assert torch.equal(state[name], torch.full_like(p, 0.5 + i)), name
    # buffers are not averaged: the raw ones
    params = {n for n, _ in model.named_parameters()}
    for name, v in model.state_dict().items():
        if name not in params:
            assert torch.equal(state[name], v)
    # no EMA: the raw weights, said so
    raw = _lightning_checkpoint(model, [])
    del raw["callbacks"]
    state, source = model_state(raw, model)
    assert source == "checkpoint" and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_ema_of_a_wrong_shape_is_an_error_naming_the_parameter():
    model = _model()
    named = list(model.named_parameters())
    ema = [p.detach().clone() for _, p in named]
    name, p = named[3]
    ema[3] = torch.zeros(p.shape[0] + 1, *p.shape[1:])
    with pytest.raises(ValueError) as e:
        model_state(_lightning_checkpoint(model, ema), model)
    msg = str(e.value)
    assert "EMA weights do not fit the model" in msg
    assert f"{name} is {tuple(ema[3].shape)} in the EMA and {tuple(p.shape)} in the model" in msg
    assert "torch.save(ckpt['state_dict'], 'weights.pt')" in msg  # what to do


def test_ema_of_a_wrong_count_is_an_error_giving_both_counts():
    model = _model()
    ema = [p.detach().clone() for p in model.parameters()][:-2]
    n = len(list(model.parameters()))
    with pytest.raises(ValueError, match=f"{n - 2} EMA tensors for the model's {n} parameters"):
        model_state(_lightning_checkpoint(model, ema), model)


def test_load_model_builds_the_training_model_without_lightning(tmp_path):
    """The bare model equals MDMModule's (names, shapes and, from one seed, values); loading weights for sampling
    in a fresh process imports no Lightning."""
    from sdebatch.mdm.train import MDMModule

    config = load_config(None, model="micro", model_overrides={"n_layers": 1})
    torch.manual_seed(0)
    trained = MDMModule(config, VOCAB.size).model
    torch.manual_seed(0)
    bare = build_model(train_model_config(config, VOCAB.size))
    assert [(n, p.shape) for n, p in bare.state_dict().items()] == \
        [(n, p.shape) for n, p in trained.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(), trained.state_dict().values()))

    torch.save(trained.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = f"""
import json, sys, torch
from sdebatch.mdm.checkpoint import load_model, read_checkpoint
from sdebatch.mdm.vocab import Vocab
import sdebatch.mdm.tasks
model, source = load_model(read_checkpoint({str(tmp_path / 'model.pt')!r}),
                           json.loads(open({str(tmp_path / 'config.json')!r}).read()), Vocab(**{VOCAB.state_dict()!r}))
saved = torch.load({str(tmp_path / 'model.pt')!r})
assert source == 'state_dict' and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'lightning', 'pytorch_lightning', 'lightning_fabric'}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_load_model_loads_the_ema_weights():
    model = _model(1)
    ema = [torch.zeros_like(p) for p in model.parameters()]
    loaded, source = load_model(_lightning_checkpoint(model, ema), load_config(None, model="micro"), VOCAB)
    assert source == "checkpoint (EMA weights)" and not loaded.training
    assert all(float(p.detach().abs().sum()) == 0.0 for p in loaded.parameters())
