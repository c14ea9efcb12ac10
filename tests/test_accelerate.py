"""A plain accelerate loop with the wrapper passed through accelerator.prepare, against accelerate's own big batch."""
import pytest
import torch

accelerate = pytest.importorskip("accelerate")

import sdebatch  # noqa: E402
from reference import OPTIMIZERS, flat, make_data, make_model, sample_loss_mean, token_loss_sum  # noqa: E402


def schedule(t):  # warmup over 2 updates, then a decay: a cadence off by a factor shows at once
    return min(1.0, (t + 1) / 2) * 0.8 ** t


def loader(data, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=batch, shuffle=False)


def accelerate_big_batch(data, batch, epochs=2):
    """accelerate's own loop at the big batch: one step per batch of ``batch`` samples, the loss averaged over the
    batch's valid tokens, the prepared scheduler stepped after each step."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    cls, kw = OPTIMIZERS["adamw"]
    inner = cls(model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
    model, opt, dl, sched = accelerator.prepare(model, inner, loader(data, batch), sched)
    lrs = []
    for _ in range(epochs):
        for x, y, mask in dl:
            s, n = token_loss_sum(model, x, y, mask)
            accelerator.backward(s / n)
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
            opt.zero_grad()
    return model, lrs


def sdebatch_loop(data, physical, logical, *, gate=True, epochs=2):
    """The recipe: the wrapper goes through prepare, the scheduler is stepped per update (sdebatch.per_update)."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    cls, kw = OPTIMIZERS["adamw"]
    inner = cls(model.parameters(), **kw)
    opt = sdebatch.LogicalBatchOptimizer(inner, logical, physical, model=model)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
    if gate:
        sched = sdebatch.per_update(sched, opt)
    model, opt, dl, sched = accelerator.prepare(model, opt, loader(data, physical), sched)
    logical_opt = sdebatch.unwrap(opt)  # AcceleratedOptimizer keeps the wrapper as .optimizer
    lrs = []
    for _ in range(epochs):
        for x, y, mask in dl:
            with logical_opt.accumulate(model):  # no all-reduce on micro-batches that do not end a window
                s, n = token_loss_sum(model, x, y, mask)
                accelerator.backward(s)
            logical_opt.count(num_items=n, num_samples=len(x), num_tokens=n)  # the window divides by its tokens
            opt.step()
            if logical_opt.did_update:
                lrs.append(logical_opt.effective_hyperparameters()[0]["lr"])
            sched.step()
            opt.zero_grad()
        if logical_opt.flush():  # a short last window, with its own kappa
            lrs.append(logical_opt.effective_hyperparameters()[0]["lr"])
            sched.step()
        opt.zero_grad()
    return model, lrs, logical_opt


def test_accelerate_loop_equals_accelerates_big_batch():
    data = make_data(n=96)
    ref, ref_lrs = accelerate_big_batch(data, 16)
    model, lrs, opt = sdebatch_loop(data, 4, 16)
    assert torch.allclose(flat(model), flat(ref), atol=1e-10, rtol=0)
    assert lrs == pytest.approx(ref_lrs, rel=1e-12)  # the scheduler's cadence: one step per update
    assert opt.updates == 12 and opt.samples_seen == 192 and opt.tokens_seen == 2 * int(data[2].sum())


def test_a_scheduler_stepped_per_micro_batch_is_caught():
    with pytest.warns(UserWarning, match="per_update"):
        sdebatch_loop(make_data(n=32), 4, 16, gate=False, epochs=1)


def test_did_update_is_reachable_through_accelerates_wrapper():
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4)
    _, prepared = accelerator.prepare(model, opt)
    assert type(prepared).__name__ == "AcceleratedOptimizer" and not hasattr(prepared, "did_update")
    assert sdebatch.unwrap(prepared) is opt
    with pytest.raises(TypeError, match="no LogicalBatchOptimizer"):
        sdebatch.unwrap(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.fixture
def fresh_gradient_state():
    """accelerate keeps its gradient-accumulation settings in a process-wide singleton: reset it around the test."""
    accelerate.state.GradientState._reset_state()
    yield
    accelerate.state.GradientState._reset_state()


def test_accelerates_own_accumulation_around_the_wrapper_is_refused(fresh_gradient_state):
    """Accelerator(gradient_accumulation_steps=4) calls the wrapper's step() once per 4 micro-batches, so the wrapper
    would accumulate 4 of its windows into one update counted as one window (3.75e-2 off, a quarter of the samples
    on the clock). The first step refuses, naming the recipe, before anything moves."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), 16, 4, model=model)
    x, y, mask = make_data(n=16)
    model, prepared, dl = accelerator.prepare(model, opt, loader((x, y, mask), 4))
    before = flat(model).clone()
    with pytest.raises(RuntimeError, match=r"gradient_accumulation_steps=1\).*unwrap\(opt\)\.accumulate"):
        for xb, yb, mb in dl:
            with accelerator.accumulate(model):
                s, n = token_loss_sum(model, xb, yb, mb)
                accelerator.backward(s / n)
                prepared.step()
                prepared.zero_grad()
    assert opt.updates == 0 and opt.samples_seen == 0 and torch.equal(flat(model), before)
    opt.discard_window()


def test_clipping_with_accelerate_each_micro_batch_warns(fresh_gradient_state):
    """The usual `if accelerator.sync_gradients: accelerator.clip_grad_norm_(...)` clips every micro-batch when the
    wrapper accumulates (sync_gradients is always True then): warned, naming max_grad_norm."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), 16, 4, model=model)
    model, prepared, dl = accelerator.prepare(model, opt, loader(make_data(n=16), 4))
    with pytest.warns(UserWarning, match="max_grad_norm"):
        for x, y, mask in dl:
            with opt.accumulate(model):
                s, n = token_loss_sum(model, x, y, mask)
                accelerator.backward(s / n)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.05)
            prepared.step()
            prepared.zero_grad()


def test_a_gradient_state_left_by_another_accelerator_does_not_refuse_a_plain_loop(fresh_gradient_state):
    """accelerate keeps an Accelerator's accumulation in a process-wide singleton: one made earlier (a notebook) with
    gradient_accumulation_steps=4 must not refuse a plain loop that never goes through it; that loop equals AdamW at
    the big batch, written here."""
    accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    x, y, _ = make_data(n=32)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), 16, 4)
    for i in range(0, 32, 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
        opt.zero_grad()
    ref = make_model()
    inner = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for i in range(0, 32, 16):
        inner.zero_grad()
        sample_loss_mean(ref, x[i:i + 16], y[i:i + 16]).backward()
        inner.step()
    assert opt.updates == 2 and torch.allclose(flat(model), flat(ref), atol=1e-12, rtol=0)
