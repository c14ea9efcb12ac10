"""kappa = 1 (pure accumulation) must equal one big-batch step of the plain optimizer, to round-off."""
import io

import pytest
import torch

import sdebatch
from reference import (OPTIMIZERS, big_batch_run, flat, make_data, make_model, sample_loss_mean,
                       token_loss_sum)

TOL = 1e-10


def wrapped(opt_name, logical, physical, *, seed=1, **kw):
    model = make_model(seed=seed)
    cls, okw = OPTIMIZERS[opt_name]
    return model, sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **okw), logical, physical, **kw)


def train_mean_protocol(model, opt, data, physical, epochs=2):
    x, y, _ = data
    for _ in range(epochs):
        for i in range(0, len(x), physical):
            loss = sample_loss_mean(model, x[i:i + physical], y[i:i + physical])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model


def train_sum_protocol(model, opt, data, physical, epochs=2, flush=True):
    x, y, mask = data
    for _ in range(epochs):
        for i in range(0, len(x), physical):
            sl = slice(i, i + physical)
            s, n = token_loss_sum(model, x[sl], y[sl], mask[sl])
            opt.backward(s, num_items=n, num_samples=len(x[sl]))
            opt.step()
            opt.zero_grad()
        if flush:
            opt.flush()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("physical", [1, 4, 8])
def test_mean_protocol_equals_big_batch(opt_name, physical):
    data = make_data()
    ref = big_batch_run(opt_name, data, 16, token_weighted=False)
    model, opt = wrapped(opt_name, 16, physical)
    train_mean_protocol(model, opt, data, physical)
    assert opt.accumulation_steps == 16 // physical
    assert opt.clock.updates == 12 and opt.clock.samples_seen == 192
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)
    assert all(abs(e["lr"] - OPTIMIZERS[opt_name][1]["lr"]) < 1e-15 for e in opt.effective_hyperparameters())


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("physical", [2, 4, 16])
def test_token_weighted_protocol_equals_big_batch(opt_name, physical):
    """Varying valid-token counts: per-micro-batch means would be the mean-of-means bug; sums are exact."""
    data = make_data()
    ref = big_batch_run(opt_name, data, 16, token_weighted=True)
    model, opt = wrapped(opt_name, 16, physical)
    train_sum_protocol(model, opt, data, physical)
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)


def test_mean_of_means_would_differ():
    """The oracle can fail: averaging per-micro-batch token means is measurably not the big batch."""
    data = make_data()
    x, y, mask = data
    ref = big_batch_run("adam", data, 16, token_weighted=True)
    model, opt = wrapped("adam", 16, 4)
    for _ in range(2):
        for i in range(0, len(x), 4):
            s, n = token_loss_sum(model, x[i:i + 4], y[i:i + 4], mask[i:i + 4])
            (s / n).backward()
            opt.step()
            opt.zero_grad()
    assert (flat(model) - flat(ref)).abs().max() > 1e-4


def test_mean_reduction_with_unequal_micro_batches():
    """opt.backward(mean_loss, num_items=b, reduction='mean') weighs a ragged micro-batch by its size."""
    data = make_data(n=96)
    x, y, _ = data
    ref = big_batch_run("adamw", data, 32, token_weighted=False, epochs=1)
    model, opt = wrapped("adamw", 32, 10, accumulation_steps=3)
    chunker = sdebatch.LogicalChunker(32)
    for batch in chunker((x, y)):  # 32-sample windows, split into micro-batches 10, 10, 12 of unequal size
        for a, b in ((0, 10), (10, 20), (20, 32)):
            loss = sample_loss_mean(model, batch[0][a:b], batch[1][a:b])
            opt.backward(loss, num_items=b - a, num_samples=b - a, reduction="mean")
            opt.step()
        opt.zero_grad()
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)


def test_ragged_last_window_accumulation_only():
    """rule='none': a short last window is normalised by what it holds, like a short last big batch."""
    data = make_data(n=88)  # 5 windows of 16, then 8 samples (2 micro-batches of 4)
    ref = big_batch_run("adamw", data, 16, token_weighted=True)
    model, opt = wrapped("adamw", 16, 4, rule="none")
    train_sum_protocol(model, opt, data, 4)
    assert opt.clock.updates == 12 and opt.clock.samples_seen == 176
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)


def test_ragged_last_window_sgd_gets_its_own_kappa():
    """rule='sgd': the short window (8 of 16 samples, kappa 0.5) steps with lr * 0.5 (linear rule)."""
    x, y, mask = make_data(n=88)
    model, opt = wrapped("sgd", 16, 4)
    train_sum_protocol(model, opt, (x, y, mask), 4, epochs=1)
    assert opt.last_kappa == 0.5
    ref = make_model()
    for i in range(0, 88, 16):
        s, n = token_loss_sum(ref, x[i:i + 16], y[i:i + 16], mask[i:i + 16])
        ref.zero_grad()
        (s / n).backward()
        lr = 0.05 * (0.5 if i == 80 else 1.0)
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)


@pytest.mark.parametrize("protocol", ["mean", "sum"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_resume_mid_window(protocol, opt_name):
    """Stop after 2.5 windows, checkpoint through torch.save, resume in a fresh process state: same trajectory."""
    data = make_data(n=64)
    x, y, mask = data
    micro = [slice(i, i + 4) for i in range(0, 64, 4)] * 2

    def micro_step(model, opt, sl):
        if protocol == "mean":
            sample_loss_mean(model, x[sl], y[sl]).backward()
        else:
            s, n = token_loss_sum(model, x[sl], y[sl], mask[sl])
            opt.backward(s, num_items=n, num_tokens=int(n))
        opt.step()
        opt.zero_grad()

    model, opt = wrapped(opt_name, 16, 4)
    for sl in micro:
        micro_step(model, opt, sl)

    model2, opt2 = wrapped(opt_name, 16, 4)
    for sl in micro[:10]:  # 2 windows + 2 micro-steps
        micro_step(model2, opt2, sl)
    assert opt2.in_window
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model3, opt3 = wrapped(opt_name, 16, 4, seed=7)  # different init: everything must come from the checkpoint
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    for sl in micro[10:]:
        micro_step(model3, opt3, sl)
    assert torch.allclose(flat(model3), flat(model), atol=TOL, rtol=0)
    assert opt3.clock == opt.clock


@pytest.mark.parametrize("physical", [40, 48])
def test_chunking_equals_physical_equals_logical(physical):
    """Physical batches larger than the logical one, split into logical chunks (remainders carried over)."""
    data = make_data()
    x, y, _ = data
    ref = big_batch_run("adamw", data, 16, token_weighted=False)
    model, opt = wrapped("adamw", 16, 16)
    chunker = sdebatch.LogicalChunker(16)
    for _ in range(2):
        for i in range(0, len(x), physical):
            for cx, cy in chunker((x[i:i + physical], y[i:i + physical])):
                sample_loss_mean(model, cx, cy).backward()
                opt.step()
                opt.zero_grad()
    assert list(chunker.flush()) == []
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)


def test_closure_protocol():
    data = make_data()
    x, y, _ = data
    ref = big_batch_run("adam", data, 16, token_weighted=False)
    model, opt = wrapped("adam", 16, 8)
    for _ in range(2):
        for i in range(0, len(x), 8):
            def closure():
                loss = sample_loss_mean(model, x[i:i + 8], y[i:i + 8])
                loss.backward()
                return loss
            assert opt.step(closure) is not None
            opt.zero_grad()
    assert torch.allclose(flat(model), flat(ref), atol=TOL, rtol=0)


def test_zero_grad_is_noop_inside_window():
    model, opt = wrapped("sgd", 16, 4)
    x, y, _ = make_data()
    sample_loss_mean(model, x[:4], y[:4]).backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is not None for p in model.parameters())
    for _ in range(3):
        sample_loss_mean(model, x[:4], y[:4]).backward()
        opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
