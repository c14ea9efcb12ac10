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


def test_a_skipped_backward_at_a_window_start_is_an_error():
    """After an update and zero_grad() the gradients are None; a step() without a backward there (a batch skipped,
    Lightning's training_step returning None) counted samples never trained on, silently."""
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    x, y, _ = make_data(n=8)
    for i in (0, 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
        opt.zero_grad()
    clock = opt.clock.state_dict()
    with pytest.raises(RuntimeError, match="nothing backpropagated.*returns None"):
        opt.step()
    assert opt.clock.state_dict() == clock and opt.window.micro_steps == 0


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


def _micro_steps(model, opt, x, y, physical, edit=None):
    """Micro-batches of ``physical`` samples through the wrapper; ``edit(model)`` between backward and step."""
    for i in range(0, len(x), physical):
        sample_loss_mean(model, x[i:i + physical], y[i:i + physical]).backward()
        if edit is not None:
            edit(model)
        opt.step()
        opt.zero_grad()


def test_clipping_each_micro_batch_warns_and_max_grad_norm_is_exact():
    """clip_grad_norm_ between backward and step clips each partial sum of the window (3e-3 off the big batch,
    silently): warned at the window's second micro-step (an error would refuse the linear edits that stay exact,
    next test). max_grad_norm= clips the window's gradient once, as SGD clipped once per batch of 16, written here."""
    x, y, _ = make_data(n=64)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4)
    with pytest.warns(UserWarning, match=r"changed in place.*max_grad_norm"):
        _micro_steps(model, opt, x, y, 4, edit=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05))

    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4, max_grad_norm=0.05)
    _micro_steps(model, opt, x, y, 4)
    ref = make_model()
    for i in range(0, 64, 16):
        ref.zero_grad()
        sample_loss_mean(ref, x[i:i + 16], y[i:i + 16]).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert norm > 0.05  # the clipping acts
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    assert torch.allclose(flat(model), flat(ref), atol=1e-12, rtol=0)


def test_zeroing_the_inner_optimizer_in_place_inside_a_window_warns():
    x, y, _ = make_data(n=16)
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = sdebatch.LogicalBatchOptimizer(inner, 16, 4)
    with pytest.warns(UserWarning, match="changed in place"):
        _micro_steps(model, opt, x, y, 4, edit=lambda m: inner.zero_grad(set_to_none=False))


def test_a_linear_edit_per_micro_batch_is_exact():
    """Masking the first layer's gradient rows after each backward (training part of a layer) is linear, so the
    window equals the big batch with the mask applied once, SGD written here; it warns once, nothing more."""
    x, y, _ = make_data(n=32)

    def mask(m):
        m[0].weight.grad[:4] = 0

    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _micro_steps(model, opt, x, y, 4, edit=mask)
    assert sum("changed in place" in str(w.message) for w in caught) == 1
    ref = make_model()
    for i in range(0, 32, 16):
        ref.zero_grad()
        sample_loss_mean(ref, x[i:i + 16], y[i:i + 16]).backward()
        mask(ref)
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    assert opt.updates == 2 and torch.allclose(flat(model), flat(ref), atol=1e-12, rtol=0)


def test_the_gradient_watch_keeps_nothing_alive_after_the_optimizer():
    """The probe's counter hook holds its watch weakly: once the optimizer goes, its last gradients can be freed and
    the hook is removed (a new optimizer per phase would otherwise keep one gradient set and one hook each)."""
    import weakref

    x, y, _ = make_data(n=8)
    model = make_model()
    for _ in range(3):
        opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
        for i in (0, 4):
            sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
            opt.step()
        grads = [weakref.ref(p.grad) for p in model.parameters()]  # the update's gradients, recorded by the watch
        model.zero_grad(set_to_none=True)
        del opt
        gc.collect()
        assert all(g() is None for g in grads)
    assert not next(model.parameters())._post_accumulate_grad_hooks


def test_scaler_step_on_the_wrapper_is_refused_and_grad_scaler_is_exact():
    """scaler.step(opt) unscales each partial sum of the window at every micro-step (9e-2 off, silently): refused
    at its first call, before anything moves. grad_scaler= with opt.backward / opt.step equals SGD on the window's
    mean gradient, written here (the scale is a power of two: unscaling is exact)."""
    x, y, _ = make_data(n=32)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4)
    before = flat(model).clone()
    scaler.scale(sample_loss_mean(model, x[:4], y[:4])).backward()
    with pytest.raises(RuntimeError, match=r"grad_scaler=scaler"):
        scaler.step(opt)
    assert opt.updates == 0 and opt.window.micro_steps == 0 and torch.equal(flat(model), before)

    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4, grad_scaler=scaler)
    for i in range(0, 32, 4):
        opt.backward(sample_loss_mean(model, x[i:i + 4], y[i:i + 4]))
        opt.step()
        opt.zero_grad()
    ref = make_model()
    for i in range(0, 32, 16):
        ref.zero_grad()
        sample_loss_mean(ref, x[i:i + 16], y[i:i + 16]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    assert opt.updates == 2 and torch.allclose(flat(model), flat(ref), atol=1e-12, rtol=0)


def test_a_param_group_is_added_between_updates_only():
    """Unfreezing a layer with add_param_group after the first update equals AdamW written plainly with the group
    added at the same update; added inside a window (part of the window's gradient missing) it is an error."""
    x, y, _ = make_data(n=48)

    def run(add_at_micro_step):
        model = make_model()
        model[2].requires_grad_(False)
        opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model[0].parameters(), lr=1e-2), 16, 4)
        for k, i in enumerate(range(0, 48, 4)):
            if k == add_at_micro_step:
                model[2].requires_grad_(True)
                opt.add_param_group({"params": list(model[2].parameters()), "lr": 5e-3})
            sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
            opt.step()
            opt.zero_grad()
        return model

    ref = make_model()
    ref[2].requires_grad_(False)
    inner = torch.optim.AdamW(ref[0].parameters(), lr=1e-2)
    for u, i in enumerate(range(0, 48, 16)):
        if u == 1:
            ref[2].requires_grad_(True)
            inner.add_param_group({"params": list(ref[2].parameters()), "lr": 5e-3})
        inner.zero_grad()
        sample_loss_mean(ref, x[i:i + 16], y[i:i + 16]).backward()
        inner.step()
    assert torch.allclose(flat(run(4)), flat(ref), atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="param group was added inside"):
        run(5)


def test_a_mid_window_resume_into_other_arithmetic_is_refused_until_configured():
    """A checkpoint taken inside a window of 4 x 4, resumed into an optimizer built for 8 x 2: continuing the
    checkpoint's arithmetic would count each batch of 8 as 4 for the rest of the run. The first step refuses, naming
    configure_batch, before anything changes; configure_batch gives the elastic resume (tested above); flush()
    applies the restored window and returns to the built arithmetic."""
    x, y, _ = make_data(n=32)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4)
    _micro_steps(model, opt, x[:24], y[:24], 4)
    state = opt.state_dict()
    for p in model.parameters():
        p.grad = None
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 8)
    opt.load_state_dict(state)
    before, clock = flat(model).clone(), opt.clock.state_dict()
    with pytest.raises(RuntimeError, match=r"configure_batch\(8\)"):
        _micro_steps(model, opt, x[24:32], y[24:32], 8)
    assert torch.equal(flat(model), before) and opt.clock.state_dict() == clock
    for p in model.parameters():
        p.grad = None
    assert opt.flush() and opt.last_kappa == pytest.approx(8 / 16)  # the restored half window, its own kappa
    assert (opt.physical_batch_size, opt.accumulation_steps) == (8, 2)

    with pytest.warns(UserWarning, match="logical_batch_size=16 and is resumed at 32"):
        sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 32, 4).load_state_dict(state)
