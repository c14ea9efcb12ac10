"""sdebatch in a plain accelerate loop: the wrapper goes through accelerator.prepare, a torch scheduler steps once per
update (sdebatch.per_update), token-weighted losses are divided by the window's token count. Checked against
accelerate's own loop at the big batch. Run: ``python examples/accelerate_loop.py`` (or with ``accelerate launch``).
"""
import argparse
import sys

import torch
from accelerate import Accelerator

import sdebatch


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, 5, generator=g), torch.randn(n, 6, generator=g)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (n, 1), generator=g)  # 1-6 loss-bearing tokens each
    return torch.utils.data.TensorDataset(x, y, mask)


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def loss_sum(net, x, y, mask):  # squared error summed over the valid tokens, and their count
    return (((net(x).squeeze(-1) - y) ** 2) * mask).sum(), mask.sum()


def schedule(update):
    return min(1.0, (update + 1) / 3) * 0.95 ** update


def run(batch, logical=None, epochs=2, n=200):
    accelerator = Accelerator(cpu=True)
    net = model()
    inner = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
    loader = torch.utils.data.DataLoader(data(n), batch_size=batch)
    if logical is None:  # accelerate's own big batch: one step per batch
        net, opt, loader, sched = accelerator.prepare(net, inner, loader, sched)
        for _ in range(epochs):
            for x, y, mask in loader:
                s, c = loss_sum(net, x, y, mask)
                accelerator.backward(s / c)
                opt.step()
                sched.step()
                opt.zero_grad()
        return net, None
    opt = sdebatch.LogicalBatchOptimizer(inner, logical_batch_size=logical, physical_batch_size=batch, model=net)
    sched = sdebatch.per_update(sched, opt)  # steps only when an update was taken
    net, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
    logical_opt = sdebatch.unwrap(opt)  # the wrapper inside accelerate's AcceleratedOptimizer
    if accelerator.is_main_process:
        print(logical_opt.describe())
    for _ in range(epochs):
        for x, y, mask in loader:
            with logical_opt.accumulate(net):  # no gradient all-reduce until the window's last micro-batch
                s, c = loss_sum(net, x, y, mask)
                accelerator.backward(s)
            logical_opt.count(num_items=c, num_samples=len(x), num_tokens=c)  # the window divides by its tokens
            opt.step()
            sched.step()
            opt.zero_grad()
        if logical_opt.flush():  # the epoch's short last window
            sched.step()
        opt.zero_grad()
    return net, logical_opt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logical", type=int, default=40)
    ap.add_argument("--physical", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    ours, opt = run(args.physical, args.logical)
    ref, _ = run(args.logical)
    print(f"{opt.updates} updates, {opt.samples_seen} samples, {opt.tokens_seen} tokens")
    diff = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    print(f"max |parameter - big-batch reference| = {diff:.2e}")
    return 0 if diff < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
