"""Two processes (DDP over gloo, CPU) with per-device batch 4 and accumulation 2 equal one big-batch process."""
import pytest
import torch
import torch.multiprocessing as mp

import sdebatch
from reference import (OPTIMIZERS, big_batch_run, flat, make_data, make_model, sample_loss_mean,
                       token_loss_sum)
import ddp_worker


@pytest.mark.parametrize("opt_name,protocol,n", [
    ("adamw", "sum", 96),
    ("adamw", "sum", 88),     # ragged last window: 8 samples, one no_sync micro-step per rank, then flush
    ("sgd_momentum", "mean", 96),
])
def test_two_process_ddp_equals_big_batch(tmp_path, opt_name, protocol, n):
    out = tmp_path / "rank0.pt"
    mp.start_processes(ddp_worker.run, args=(2, str(tmp_path / "rendezvous"), opt_name, protocol, n, str(out)),
                       nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)
    data = make_data(n=n)
    ref = big_batch_run(opt_name, data, 16, token_weighted=(protocol == "sum"))
    assert torch.allclose(got["params"], flat(ref), atol=1e-10, rtol=0)
    assert got["clock"]["samples_seen"] == 2 * n
    if protocol == "sum":
        assert got["clock"]["tokens_seen"] == 2 * int(data[2].sum())
    # the noise scale from (one rank's micro-batch, all-reduced window) equals one process with the same micro-batches
    x, y, mask = data
    model = make_model()
    cls, kw = OPTIMIZERS[opt_name]
    opt = sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **kw), 16, 4, noise_scale=True,
                                         rule="auto" if n % 16 == 0 else "none")
    for _ in range(2):
        for i in range(0, n, 4):
            if protocol == "mean":
                sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
            else:
                s, c = token_loss_sum(model, x[i:i + 4], y[i:i + 4], mask[i:i + 4])
                opt.backward(s, num_items=c)
            opt.step()
            opt.zero_grad()
        opt.flush()
        opt.zero_grad()
    ref_noise = opt.noise.state_dict()
    assert got["noise"]["count"] == ref_noise["count"] > 0
    assert got["noise"]["g2"] == pytest.approx(ref_noise["g2"], rel=1e-9)
    assert got["noise"]["trace"] == pytest.approx(ref_noise["trace"], rel=1e-9)
