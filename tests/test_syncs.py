"""No host-device synchronisation in the hot path: every read of a tensor's value back to the host
(``Tensor.item``, ``__float__``, ``__int__``, ``__bool__``, ``tolist``; on CUDA each one waits for the device) made
by sdebatch code is counted while a window of micro-steps and its update run. A micro-step reads nothing; an update
reads at most once (one transfer of everything it needs), and nothing when every count is a host number and no
estimate is made. On CUDA the same loop runs under ``torch.cuda.set_sync_debug_mode("error")``."""
import sys
from contextlib import contextmanager

import pytest
import torch

import sdebatch
from reference import make_data, make_model, reference_adam, sample_loss_mean, token_loss_sum

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "__index__")


@contextmanager
def counted_reads():
    """Count host reads of tensor values whose caller is sdebatch code (not torch's, not the test's)."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/sdebatch/" in caller and "/tests/" not in caller:
                calls.append(f"{name} at {caller.rsplit('/', 1)[-1]}:{sys._getframe(1).f_lineno}")
            return fn(self, *args, **kwargs)
        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _window(opt, model, x, y, mask, *, protocol, micro, physical):
    for i in range(micro):
        sl = slice(i * physical, (i + 1) * physical)
        if protocol == "mean":
            sample_loss_mean(model, x[sl], y[sl]).backward()
            opt.step()
        else:
            s, n = token_loss_sum(model, x[sl], y[sl], mask[sl])
            opt.backward(s, num_items=n, num_tokens=n)  # n: a tensor count of the mask
            opt.step(num_samples=physical)
        opt.zero_grad()


@pytest.mark.parametrize("protocol", ["mean", "sum"])
@pytest.mark.parametrize("options", [{}, {"estimate_noise_scale": True}, {"max_grad_norm": 0.5},
                                     {"batch_schedule": "0:16, 48:32"}])
def test_a_micro_step_reads_nothing_and_an_update_at_most_once(protocol, options):
    x, y, mask = make_data(n=160)
    model = make_model()
    options = dict(options)
    if "batch_schedule" in options:
        options["batch_schedule"] = sdebatch.batch_schedule(options["batch_schedule"])
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), 16, 4, **options)
    _window(opt, model, x, y, mask, protocol=protocol, micro=4, physical=4)  # a first update: state initialised
    with counted_reads() as calls:
        _window(opt, model, x[16:], y[16:], mask[16:], protocol=protocol, micro=3, physical=4)
    assert calls == [] and opt.in_window  # three micro-steps inside a window: no read
    with counted_reads() as calls:
        _window(opt, model, x[28:], y[28:], mask[28:], protocol=protocol, micro=1, physical=4)
    assert opt.updates == 2
    needs_read = protocol == "sum" or options.get("estimate_noise_scale")
    assert len(calls) == (1 if needs_read else 0), calls
    assert opt.tokens_seen == (0 if protocol == "mean" else int(mask[:32].sum()))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("protocol", ["mean", "sum"])
@pytest.mark.parametrize("change", ["ramp", "flush"])
def test_after_a_change_of_kappa_an_update_still_reads_at_most_once_and_adam_corrects_by_the_product(
        change, protocol, fused):
    """Once kappa has changed (a ramp 8 -> 16, or a short window flushed), every later update corrects Adam's bias
    through prod_s beta**kappa_s: still at most one read per update (the counts' transfer; none with host counts),
    and the parameters those of Adam written by hand on each window's whole batch."""
    x, y, mask = make_data(n=96)
    model, ref_model = make_model(), make_model()
    kw = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1}
    options = {"batch_schedule": sdebatch.batch_schedule("0:8, 16:16")} if change == "ramp" else {}
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), fused=fused, **kw), 16, 4, **options)
    # micro-steps of 4 per window; "flush" ends the second window after two of them
    windows = [4, 2, 4, 4, 4, 4] if change == "flush" else [2, 2, 4, 4, 4, 4, 4]
    grads, kappas, start = [], [], 0
    with counted_reads() as calls:
        for micro in windows:
            stop = start + 4 * micro
            ref_model.load_state_dict(model.state_dict())  # the window's gradient at the wrapper's iterate
            if protocol == "mean":
                loss = sample_loss_mean(ref_model, x[start:stop], y[start:stop])
            else:
                s, n = token_loss_sum(ref_model, x[start:stop], y[start:stop], mask[start:stop])
                loss = s / n
            grads.append([g.detach() for g in torch.autograd.grad(loss, list(ref_model.parameters()))])
            kappas.append(4 * micro / 16)
            _window(opt, model, x[start:], y[start:], mask[start:], protocol=protocol, micro=micro, physical=4)
            if not opt.did_update:
                assert opt.flush()
                opt.zero_grad()
            start = stop
    assert opt.updates == len(windows) and opt.last_kappa == 1.0 and 0.5 in kappas
    assert len(calls) <= (opt.updates if protocol == "sum" else 0), calls
    want = reference_adam([p.detach().clone() for p in make_model().parameters()], grads, kappas, lr=kw["lr"],
                          betas=kw["betas"], eps=kw["eps"], wd=kw["weight_decay"], decoupled=True)
    for p, q in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)
    assert all(float(st["step"]) == len(windows) for st in opt.state.values())  # torch's own count kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode)")
def test_no_sync_on_cuda_inside_a_window():
    x, y, mask = (t.cuda() for t in make_data(n=64))
    model = make_model().cuda()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), 16, 4,
                                         estimate_noise_scale=True)
    _window(opt, model, x, y, mask, protocol="sum", micro=4, physical=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _window(opt, model, x[16:], y[16:], mask[16:], protocol="sum", micro=3, physical=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_lightning_callback_reads_at_most_once_per_update():
    """The callback's hooks and sl.count(num_items=<tensor>, num_tokens=<tensor>) read nothing per batch: over a fit
    the sdebatch reads are at most one per update (the update's transfer)."""
    import sdebatch.lightning as sl
    from lightning_helpers import Regression, loader, trainer

    module = Regression("adamw", "sum")
    cb = sl.LogicalBatch(16, verbose=False)
    with counted_reads() as calls:
        trainer(cb, epochs=1).fit(module, train_dataloaders=loader(64, 4))
    assert cb.optimizer.updates == 4 and cb.optimizer.tokens_seen > 0
    assert len(calls) <= cb.optimizer.updates, calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode)")
@pytest.mark.parametrize("flag", ["fused", "capturable"])
def test_no_sync_on_cuda_in_an_update_after_a_change_of_kappa(flag):
    """After a ramp 8 -> 16 every update corrects Adam's bias by the product of the betas: on the device alone."""
    x, y, mask = (t.cuda() for t in make_data(n=64))
    model = make_model().cuda()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, **{flag: True}), 16, 4,
                                         batch_schedule=sdebatch.batch_schedule("0:8, 16:16"))
    _window(opt, model, x, y, mask, protocol="mean", micro=2, physical=4)
    _window(opt, model, x[8:], y[8:], mask[8:], protocol="mean", micro=2, physical=4)
    _window(opt, model, x[16:], y[16:], mask[16:], protocol="mean", micro=4, physical=4)
    assert opt.updates == 3 and opt.last_kappa == 1.0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _window(opt, model, x[32:], y[32:], mask[32:], protocol="mean", micro=4, physical=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.updates == 4
    assert all(float(st["step"]) == 4 for st in opt.state.values())
