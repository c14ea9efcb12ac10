"""sdebatch in a plain PyTorch loop: logical batch 64 reached with micro-batches of 16 from a DataLoader whose last
batch is short, checked against one big-batch SGD step per 64 samples (the short last window rescaled by the linear
rule, written out by hand). Run: ``python examples/plain_loop.py``."""
import argparse
import sys

import torch

import sdebatch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1000, help="dataset size (default 1000: the last batch is short)")
    ap.add_argument("--logical", type=int, default=64)
    ap.add_argument("--physical", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)  # exactness shows at round-off
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.samples, 8, generator=g), torch.randn(args.samples, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.physical)

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                         logical_batch_size=args.logical, physical_batch_size=args.physical)
    print(opt.describe())
    for xb, yb in loader:                                  # the last batch may be short
        loss = torch.nn.functional.mse_loss(model(xb), yb)  # a mean over the micro-batch
        opt.backward(loss, num_samples=len(xb))             # weighs it by its samples; counts the clock
        opt.step()
        opt.zero_grad()
    opt.flush()                                            # the short last window, with its own kappa
    print(f"{opt.updates} updates, {opt.samples_seen} samples seen, last update kappa = {opt.last_kappa:.4g}")

    torch.manual_seed(1)  # the reference: SGD on each logical batch, the short last one with lr x kappa
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inner = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for i in range(0, args.samples, args.logical):
        xb, yb = x[i:i + args.logical], y[i:i + args.logical]
        inner.param_groups[0]["lr"] = 0.05 * len(xb) / args.logical
        inner.zero_grad()
        torch.nn.functional.mse_loss(ref(xb), yb).backward()
        inner.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    print(f"max |parameter - big-batch reference| = {diff:.2e}")
    return 0 if diff < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
