"""One rank of a 2-process FSDP2 (torch.distributed.fsdp.fully_shard) run over gloo on CPU, for test_fsdp.py."""
import os
import sys

import torch
import torch.distributed as dist

import sdebatch
from reference import OPTIMIZERS, make_data, make_model, token_loss_sum


def build(world, per_device, **kw):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))  # explicit: gloo on a machine with CUDA would move parameters there
    model = make_model()
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    cls, okw = OPTIMIZERS["adamw"]
    opt = sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **okw), 16, per_device, model=model, **kw)
    return model, opt


def micro_batches(n, world, rank, per_device, accumulation, epochs=2):
    """(epoch, slice) per micro-step of this rank: window w holds samples [w, w + 16), split over ranks and
    micro-steps as a distributed sampler would; a short last window ends early."""
    for epoch in range(epochs):
        for w in range(0, n, 16):
            for j in range(accumulation):
                start = w + world * per_device * j + per_device * rank
                if start >= n:
                    break
                yield epoch, slice(start, start + per_device)


def run(rank, world, init_file, out, n, per_device, options, stop_at, no_sync):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y, mask = make_data(n=n)
        model, opt = build(world, per_device, **options)
        result = {}
        last_epoch = 0
        try:
            for i, (epoch, sl) in enumerate(micro_batches(n, world, rank, per_device, opt.accumulation_steps)):
                if epoch != last_epoch:
                    opt.flush()  # a short last window of the epoch
                    opt.zero_grad()
                    last_epoch = epoch
                if i == stop_at:  # a sharded checkpoint mid-window: each rank saves and reloads its own shards
                    path = f"{out}.rank{rank}"
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
                    model, opt = build(world, per_device, **options)
                    state = torch.load(path, weights_only=False)
                    model.load_state_dict(state["model"])
                    opt.load_state_dict(state["opt"])
                if no_sync:
                    model.set_requires_gradient_sync(opt.next_step_updates)
                s, c = token_loss_sum(model, x[sl], y[sl], mask[sl])
                opt.backward(s, num_items=c, num_tokens=int(c))
                opt.step()
                opt.zero_grad()
            opt.flush()
        except RuntimeError as e:
            result["error"] = str(e)
        result["params"] = torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])
        result["clock"] = opt.clock.state_dict()
        result["grad_norm"] = opt.last_grad_norm
        if opt.noise_scale_estimator is not None:
            result["noise"] = opt.noise_scale_estimator.state_dict()
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's own teardown: the work is saved
