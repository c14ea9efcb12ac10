"""The plain loop's traps: each is exact (against a reference written here) or loud (an error or a warning naming the
fix), never silent."""
import gc
import warnings

import numpy as np
import pytest
import torch

import sdebatch
from reference import flat, make_data, make_model, sample_loss_mean


def loader(n=100, batch=32):
    x, y, _ = make_data(n=n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def test_the_quick_start_pattern_counts_a_short_last_batch():
    """100 samples in batches of 32 (drop_last=False) for logical 64: windows of 64 and 36 samples. The documented
    pattern weighs each micro-batch by its samples and flush() applies the last window with kappa = 36 / 64: equal to
    SGD written here, one step per window, the last with lr x 36 / 64 (the linear rule)."""
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), logical_batch_size=64,
                                         physical_batch_size=32)
    for x, y in loader():
        loss = sample_loss_mean(model, x, y)
        opt.backward(loss, num_samples=len(x))
        opt.step()
        opt.zero_grad()
    opt.flush()
    assert opt.samples_seen == 100 and opt.updates == 2 and opt.last_kappa == pytest.approx(36 / 64)

    ref = make_model()
    x, y, _ = make_data(n=100)
    for sl, lr in ((slice(0, 64), 0.1), (slice(64, 100), 0.1 * 36 / 64)):
        ref.zero_grad()
        sample_loss_mean(ref, x[sl], y[sl]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    assert torch.allclose(flat(model), flat(ref), atol=1e-12, rtol=0)


def test_unequal_micro_batches_with_a_mean_loss_warn():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 64, 32)
    with pytest.warns(UserWarning, match=r"num_samples=len\(batch\)"):
        for x, y in loader():
            sample_loss_mean(model, x, y).backward()
            opt.step(num_samples=len(x))
            opt.zero_grad()
    opt.flush()


def test_a_window_never_flushed_warns_when_the_optimizer_goes():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 64, 32)
    x, y, _ = make_data(n=32)
    sample_loss_mean(model, x, y).backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"call opt.flush\(\)"):
        del opt
        gc.collect()


def test_a_window_saved_in_a_checkpoint_does_not_warn():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 64, 32)
    x, y, _ = make_data(n=32)
    sample_loss_mean(model, x, y).backward()
    opt.step()
    opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del opt
        gc.collect()


def test_step_with_nothing_backpropagated_is_an_error():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    x, y, _ = make_data(n=8)
    with pytest.raises(RuntimeError, match="nothing backpropagated"):
        opt.step()  # before any backward
    sample_loss_mean(model, x[:4], y[:4]).backward()
    opt.step()
    clock = opt.clock.state_dict()
    with pytest.raises(RuntimeError, match="nothing backpropagated"):
        opt.step()  # a second step() for the same micro-batch
    assert opt.clock.state_dict() == clock and opt.window.micro_steps == 1  # refused before anything changed


def test_gradients_cleared_inside_a_window_are_an_error():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    x, y, _ = make_data(n=8)
    sample_loss_mean(model, x[:4], y[:4]).backward()
    opt.step()
    model.zero_grad()  # what transformers.Trainer does after every optimizer.step()
    sample_loss_mean(model, x[4:], y[4:]).backward()
    with pytest.raises(RuntimeError, match="cleared or replaced"):
        opt.step()


def test_a_forgotten_zero_grad_after_an_update_is_an_error():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    x, y, _ = make_data(n=12)
    for sl in (slice(0, 4), slice(4, 8)):
        sample_loss_mean(model, x[sl], y[sl]).backward()
        opt.step()
    assert opt.did_update
    sample_loss_mean(model, x[8:], y[8:]).backward()  # added onto the applied window's gradient
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()


def test_zero_grad_without_set_to_none_is_fine():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    x, y, _ = make_data(n=16)
    for i in range(4):
        sample_loss_mean(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert opt.updates == 2


def test_a_scheduler_stepped_per_micro_step_warns_and_per_update_is_exact():
    """A torch scheduler stepped after every micro-step advances accumulation_steps times too fast: warned.
    sdebatch.per_update steps it once per update: the lrs used equal the big-batch run's (schedule per step)."""
    x, y, _ = make_data(n=64)
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = sdebatch.LogicalBatchOptimizer(inner, 16, 4)
    sched = torch.optim.lr_scheduler.ExponentialLR(inner, gamma=0.5)
    with pytest.warns(UserWarning, match="per_update"):
        for i in range(0, 64, 4):
            sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = sdebatch.LogicalBatchOptimizer(inner, 16, 4)
    sched = sdebatch.per_update(torch.optim.lr_scheduler.ExponentialLR(inner, gamma=0.5), opt)
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(0, 64, 4):
            sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
            opt.step()
            if opt.did_update:
                used.append(opt.effective_hyperparameters()[0]["lr"])
            sched.step()
            opt.zero_grad()
    assert used == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert sched.last_epoch == 4 and sched.state_dict()["last_epoch"] == 4


def test_physical_above_logical_needs_the_opt_in():
    model = make_model()
    with pytest.raises(ValueError, match="reparameterize=True"):
        sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 32)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 32, reparameterize=True)
    assert opt.window_kappa == 4
    small = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    with pytest.raises(ValueError, match="reparameterize=True"):
        small.configure_batch(16)
    assert small.physical_batch_size == 4  # refused before anything changed


def test_numpy_integers_are_batch_sizes():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), np.int64(16), np.int32(4))
    assert opt.accumulation_steps == 4 and opt.window_batch_size == 16
    opt.configure_batch(np.int64(8))
    assert opt.accumulation_steps == 2 and type(opt.physical_batch_size) is int


def _window_run(physical_after=8, stop=6, resume=True):
    """Logical 16 from 4 per micro-step; at micro-step ``stop`` (inside the second window) either a checkpoint is
    taken and a fresh optimizer resumes it with another physical batch (elastic resume), or the same optimizer flushes
    and switches in place. Then 32 more samples at the new physical batch."""
    x, y, _ = make_data(n=128)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), 16, 4)
    for i in range(stop):
        sample_loss_mean(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]).backward()
        opt.step()
        opt.zero_grad()
    if resume:
        state = opt.state_dict()
        opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), 16, 4)
        opt.load_state_dict(state)
        for p in model.parameters():
            p.grad = None  # a fresh process: the window's gradients live in the checkpoint only
        assert opt.configure_batch(physical_after)  # the restored window is applied first, as a short update
    else:
        opt.flush()
        opt.zero_grad()
        opt.configure_batch(physical_after)
    start = 4 * stop
    for i in range(start, start + 32, physical_after):
        sample_loss_mean(model, x[i:i + physical_after], y[i:i + physical_after]).backward()
        opt.step()
        opt.zero_grad()
    return flat(model), opt


def test_elastic_resume_mid_window_equals_the_run_that_flushed_in_place():
    """configure_batch flushes a window restored with other arithmetic and clears its gradients: the next micro-batch
    is not added onto the flushed window (it was, 1e-2 off, unless the user called zero_grad nobody told them of)."""
    resumed, opt = _window_run(resume=True)
    in_place, ref = _window_run(resume=False)
    assert torch.allclose(resumed, in_place, atol=1e-12, rtol=0)
    assert opt.clock.state_dict() == ref.clock.state_dict()


def test_a_bad_physical_batch_is_refused_before_a_restored_window_is_flushed():
    x, y, _ = make_data(n=16)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), 16, 4)
    for i in range(2):
        sample_loss_mean(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]).backward()
        opt.step()
    state = opt.state_dict()
    opt.load_state_dict(state)
    before = flat(model).clone()
    with pytest.raises(ValueError, match="reparameterize=True"):
        opt.configure_batch(32)  # above the logical batch: refused
    assert torch.equal(flat(model), before) and opt.updates == 0 and opt.window.saved_grads is not None
