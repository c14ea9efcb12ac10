"""Fused, foreach and compiled inner optimizers: wrapped, under a batch ramp (kappa 1, 2, 4), they equal a
hand-written Adam on each update's whole batch to float32 tolerance; lr and betas reach fused steps as 0-dim tensors
updated in place (the same tensors every update); a compiled step does not recompile when kappa changes."""
import math

import pytest
import torch

import sdebatch
from reference import make_data, sample_loss_mean

SCHEDULE = "0:8, 32:16, 96:32"
LR, B1, B2, EPS = 0.01, 0.9, 0.99, 1e-6


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def _data(dtype=torch.float32):
    x, y, _ = make_data(n=224)
    return x.to(dtype), y.to(dtype)


def _reference():
    """Float64 Adam written here, each update on its whole batch with the rules applied by hand."""
    x, y = _data(torch.float64)
    model = _model(torch.float64)
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    schedule, seen, k_sum = sdebatch.batch_schedule(SCHEDULE), 0, 0.0
    while seen < len(x):
        b = schedule(seen)
        k = b / 8
        k_sum += k
        model.zero_grad()
        sample_loss_mean(model, x[seen:seen + b], y[seen:seen + b]).backward()
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                mi.mul_(B1 ** k).add_((1 - B1 ** k) * p.grad)
                vi.mul_(B2 ** k).add_((1 - B2 ** k) * p.grad ** 2)
                p.sub_(LR * math.sqrt(k) * (mi / (1 - B1 ** k_sum)) / ((vi / (1 - B2 ** k_sum)).sqrt()
                                                                      + EPS / math.sqrt(k)))
        seen += b
    return model


def _wrapped(inner_kwargs, lr=LR, compile_step=False):
    x, y = _data()
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=(B1, B2), eps=EPS, weight_decay=0.0, **inner_kwargs)
    if compile_step:
        inner.step = torch.compile(inner.step, backend="eager")
    opt = sdebatch.LogicalBatchOptimizer(inner, 8, 4, batch_schedule=sdebatch.batch_schedule(SCHEDULE))
    held = []
    for i in range(0, len(x), 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
        if opt.did_update:
            held.append(dict(getattr(inner, "_sdebatch_tensors", {})))
            assert opt.param_groups[0]["lr"] is lr  # the reference value is back after every update
        opt.zero_grad()
    return model, opt, held


@pytest.mark.parametrize("inner_kwargs,lr", [
    ({"fused": True}, LR), ({"foreach": True}, LR), ({"foreach": False}, LR),
    ({"foreach": False}, torch.tensor(LR)),  # torch's recipe for compiled optimizers: a tensor lr
])
def test_fused_foreach_and_tensor_lr_equal_the_big_batch_reference(inner_kwargs, lr):
    model, opt, held = _wrapped(inner_kwargs, lr)
    assert opt.updates == 12
    for p, q in zip(model.parameters(), _reference().parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-4, atol=2e-5)  # float32 against float64
    tensor_path = inner_kwargs.get("fused") or isinstance(lr, torch.Tensor)
    assert bool(held[-1]) == bool(tensor_path)
    if tensor_path:  # the same 0-dim tensors at every update, holding the last update's values
        assert all(h[(0, "lr")][0] is held[-1][(0, "lr")][0] for h in held)
        assert float(held[-1][(0, "lr")][0]) == pytest.approx(LR * 2, rel=1e-6)  # kappa 4: lr x sqrt 4
        assert [float(b) for b in held[-1][(0, "betas")]] == pytest.approx([B1 ** 4, B2 ** 4], rel=1e-6)
        assert ((0, "eps") in held[-1]) == isinstance(lr, torch.Tensor)  # fused kernels take eps as a float


def _graphs(lr, schedule_changes):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, y = _data()
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=(B1, B2), eps=EPS, weight_decay=0.0, foreach=False)
    inner.step = torch.compile(inner.step, backend="eager")
    ramp = sdebatch.batch_schedule(SCHEDULE if schedule_changes else "0:8")
    opt = sdebatch.LogicalBatchOptimizer(inner, 8, 4, batch_schedule=ramp)
    for i in range(0, len(x), 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
        opt.zero_grad()
    return counters["stats"]["unique_graphs"], model


def test_a_compiled_step_does_not_recompile_when_kappa_changes():
    """Counted with dynamo's own counters, floats specialised (specialize_float=True, where a changing float lr,
    betas or eps recompiles): with a tensor lr the ramp's three kappas compile no more graphs than a fixed kappa, and
    the compiled run equals the uncompiled one; the float lr recompiles (so the count can fail)."""
    pytest.importorskip("torch._dynamo")
    with torch._dynamo.config.patch(specialize_float=True, cache_size_limit=64):
        ramp_graphs, compiled = _graphs(torch.tensor(LR), schedule_changes=True)
        fixed_graphs, _ = _graphs(torch.tensor(LR), schedule_changes=False)
        float_graphs, _ = _graphs(LR, schedule_changes=True)
    assert ramp_graphs == fixed_graphs and float_graphs > ramp_graphs
    eager, _, _ = _wrapped({"foreach": False}, torch.tensor(LR))
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
