"""Two processes (DDP over gloo, CPU) with per-device batch 4 and accumulation 2 equal one big-batch process."""
import pytest
import torch
import torch.multiprocessing as mp

from reference import (OPTIMIZERS, big_batch_run, flat, make_data, make_model, sample_loss_mean,
                       token_loss_sum)
import ddp_worker


@pytest.mark.parametrize("opt_name,protocol,n,per_device,bucket_view", [
    ("adamw", "sum", 96, 4, False),
    ("adamw", "sum", 88, 4, False),     # ragged last window: 8 samples, one no_sync micro-step per rank, then flush
    ("sgd_momentum", "mean", 96, 4, False),
    ("adamw", "sum", 96, 8, False),     # no accumulation: the noise scale's small batch comes from the hooks
    # DDP points .grad at views of its buckets at each synced backward (new buckets after the first iteration):
    # not a window cleared
    ("adamw", "sum", 88, 4, True),
])
def test_two_process_ddp_equals_big_batch(tmp_path, opt_name, protocol, n, per_device, bucket_view):
    out = tmp_path / "rank0.pt"
    mp.start_processes(ddp_worker.run, args=(2, str(tmp_path / "rendezvous"), opt_name, protocol, n, str(out),
                                             per_device, bucket_view), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    data = make_data(n=n)
    ref = big_batch_run(opt_name, data, 16, token_weighted=(protocol == "sum"))
    assert torch.allclose(got["params"], flat(ref), atol=1e-10, rtol=0)
    assert got["clock"]["samples_seen"] == 2 * n
    if protocol == "sum":
        assert got["clock"]["tokens_seen"] == 2 * int(data[2].sum())
    # the noise scale: every micro-batch of every rank on its own (per_device samples, its squared gradient norm
    # averaged over the ranks and micro-steps), the all-reduced window the other point (16 samples, 8 in a ragged
    # last window): the two-batch-size formula per window, in an EMA of decay 0.95, along the big-batch trajectory
    # (computed here by hand)
    x, y, mask = data
    model = make_model()
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(model.parameters(), **kw)

    def grad(sl):  # the gradient of the loss normalised as the wrapper does (per sample, or per valid token)
        model.zero_grad()
        if protocol == "mean":
            loss = sample_loss_mean(model, x[sl], y[sl])
        else:
            s, c = token_loss_sum(model, x[sl], y[sl], mask[sl])
            loss = s / c
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g2_ema = trace_ema = 0.0
    count = 0
    for _ in range(2):
        for w in range(0, n, 16):
            big = min(16, n - w)
            p = per_device
            small = sum(grad(slice(i, i + p)).square().sum() for i in range(w, w + big, p)) / (big // p)
            whole = grad(slice(w, w + big)).square().sum()
            g2 = (big * whole - p * small) / (big - p)
            trace = (small - whole) / (1 / p - 1 / big)
            g2_ema, trace_ema = 0.95 * g2_ema + 0.05 * float(g2), 0.95 * trace_ema + 0.05 * float(trace)
            count += 1
            opt.step()  # the big-batch step, on the window's gradient just computed
    assert got["noise"]["count"] == count
    assert got["noise"]["g2"] == pytest.approx(g2_ema, rel=1e-9)
    assert got["noise"]["trace"] == pytest.approx(trace_ema, rel=1e-9)
