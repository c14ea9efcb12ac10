"""Worker for test_ddp.py: one rank of a 2-process gloo run (spawned, so it lives in its own module)."""
import os
import sys

import torch
import torch.distributed as dist

import sdebatch
from reference import OPTIMIZERS, make_data, make_model, sample_loss_mean, token_loss_sum


def run(rank, world, init_file, opt_name, protocol, n, out, per_device=4, bucket_view=False):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for with other processes on the machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y, mask = make_data(n=n)
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        cls, kw = OPTIMIZERS[opt_name]
        # a ragged run compares with a short last big batch, so it checks normalisation with no rescaling
        opt = sdebatch.LogicalBatchOptimizer(cls(ddp.parameters(), **kw), 16, per_device, model=ddp,
                                             rule="auto" if n % 16 == 0 else "none", estimate_noise_scale=True)
        assert opt.world_size == world and opt.accumulation_steps == 16 // (world * per_device), opt.describe()
        for _ in range(2):
            for w in range(0, n, 16):
                for j in range(opt.accumulation_steps):
                    start = w + world * per_device * j + per_device * rank
                    if start >= n:
                        break
                    sl = slice(start, start + per_device)
                    with opt.accumulate():
                        if protocol == "mean":
                            sample_loss_mean(ddp, x[sl], y[sl]).backward()
                        else:
                            s, c = token_loss_sum(ddp, x[sl], y[sl], mask[sl])
                            opt.backward(s, num_items=c, num_tokens=int(c))
                    opt.step()
                    opt.zero_grad()
            opt.flush()  # a short last window (n not a multiple of 16) ends on a no_sync micro-step
            opt.zero_grad()
        if rank == 0:
            torch.save({"params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                        "clock": opt.clock.state_dict(), "noise": opt.noise_scale_estimator.state_dict()}, out)
        dist.barrier()  # both ranks are done before either tears down
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an active exception",
    # seen about once in 30 runs): the work is done and saved, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
