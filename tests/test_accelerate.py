"""A plain accelerate loop with the wrapper passed through accelerator.prepare, against accelerate's own big batch."""
import pytest
import torch

accelerate = pytest.importorskip("accelerate")

import sdebatch  # noqa: E402
from reference import OPTIMIZERS, flat, make_data, make_model, token_loss_sum  # noqa: E402


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
