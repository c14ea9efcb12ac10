"""sdebatch with FSDP2 (torch.distributed.fsdp.fully_shard) on two CPU processes over gloo: logical batch 32 from 4
per device x 2 ranks x 4 micro-steps; the gradients stay sharded and reduce-scatter at every micro-step (FSDP's
usual trade: memory stays divided by the ranks; the wrapper accumulates the shards), the window's token count is
summed over the ranks, the update clips once on the global norm, and each rank saves its own shards mid-window and
resumes from them. Checked against one process at the big batch. Run: ``python examples/fsdp2_two_processes.py``."""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sdebatch

N, LOGICAL, PER_DEVICE, WORLD = 96, 32, 4, 2


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 6, 5, generator=g), torch.randn(N, 6, generator=g)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (N, 1), generator=g)
    return x, y, mask


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def loss_sum(net, x, y, mask):
    return (((net(x).squeeze(-1) - y) ** 2) * mask).sum(), mask.sum()


def sharded():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = model()
    mesh = init_device_mesh("cpu", (WORLD,))  # explicit: with CUDA present gloo would otherwise move parameters there
    for layer in (net[0], net[2], net):
        fully_shard(layer, mesh=mesh)
    inner = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.1)
    return net, sdebatch.LogicalBatchOptimizer(inner, LOGICAL, PER_DEVICE, model=net, max_grad_norm=1.0)


def rank_main(rank, init_file, folder):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, y, mask = data()
    net, opt = sharded()
    if rank == 0:
        print(opt.describe())
    step = 0
    for epoch in range(2):
        for w in range(0, N, LOGICAL):
            for j in range(opt.accumulation_steps):  # this rank's micro-batch j of window w
                start = w + WORLD * PER_DEVICE * j + PER_DEVICE * rank
                sl = slice(start, start + PER_DEVICE)
                if step == 6:  # a sharded checkpoint inside a window: each rank saves and reloads its own state
                    path = os.path.join(folder, f"rank{rank}.pt")
                    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
                    net, opt = sharded()
                    state = torch.load(path, weights_only=False)
                    net.load_state_dict(state["model"])
                    opt.load_state_dict(state["opt"])
                s, c = loss_sum(net, x[sl], y[sl], mask[sl])
                opt.backward(s, num_items=c, num_tokens=c)
                opt.step()
                opt.zero_grad()
                step += 1
    params = torch.cat([p.full_tensor().detach().flatten() for p in net.parameters()])  # a collective
    if rank == 0:
        torch.save({"params": params, "updates": opt.updates, "samples": opt.samples_seen},
                   os.path.join(folder, "out.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's own teardown: the work is saved


def main() -> int:
    torch.set_default_dtype(torch.float64)
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(os.path.join(folder, "rendezvous"), folder), nprocs=WORLD, join=True,
                           start_method="spawn")
        got = torch.load(os.path.join(folder, "out.pt"))
    x, y, mask = data()
    ref = model()
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(2):
        for w in range(0, N, LOGICAL):
            opt.zero_grad()
            s, c = loss_sum(ref, x[w:w + LOGICAL], y[w:w + LOGICAL], mask[w:w + LOGICAL])
            (s / c).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
    diff = (got["params"] - torch.cat([p.detach().flatten() for p in ref.parameters()])).abs().max().item()
    print(f"{got['updates']} updates, {got['samples']} samples over {WORLD} ranks")
    print(f"max |parameter - big-batch reference| = {diff:.2e}")
    return 0 if diff < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
