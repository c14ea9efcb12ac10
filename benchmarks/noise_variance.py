"""Which batch sizes inside a window should the in-run noise scale read? A Monte Carlo on Gaussian gradients.

Per-sample gradients G + sigma z (z ~ N(0, I_d)); a window of k micro-batches of b samples. Two estimators of |G|^2
and tr(Sigma), both unbiased:

    pair      the two-size formula on the window's first micro-batch (b) and the whole window (k b): 2 norms
    prefixes  least squares of |S_i|^2 on 1 / (i b) over the accumulated prefixes i = 1..k (nested): k norms

The prefixes are nested, so the extra points are strongly correlated and ordinary least squares weighs them badly;
the table shows the standard deviation of each estimate over windows (and its mean, to see the bias is nil).

    python -m benchmarks.noise_variance [--windows 3000]
"""
from __future__ import annotations

import argparse

import torch


def estimates(sq: torch.Tensor, n: torch.Tensor, pair: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(|G|^2, tr Sigma) per window from squared prefix norms ``sq`` (windows x k) at sample counts ``n`` (k)."""
    x = 1.0 / (n[[0, -1]] if pair else n)
    y = sq[:, [0, -1]] if pair else sq
    xm = x.mean()
    slope = ((x - xm) * (y - y.mean(1, keepdim=True))).sum(1) / (x - xm).square().sum()
    return y.mean(1) - slope * xm, slope


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=3000, help="Monte Carlo windows per setting (default 3000)")
    ap.add_argument("--dim", type=int, default=2000, help="gradient dimension d (default 2000)")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    G = 0.05 * torch.randn(args.dim, generator=gen, dtype=torch.float64)
    rows = []
    print(f"{'b':>3} {'k':>3} {'B_simple':>9} {'estimator':>9} {'|G|^2 mean':>11} {'sd':>8} "
          f"{'trace mean':>11} {'sd':>8}")
    for b, k in ((8, 4), (4, 8)):
        for sigma in (0.1, 0.35, 1.0):
            sq = torch.empty(args.windows, k, dtype=torch.float64)
            for w in range(args.windows):
                micro = G + sigma * torch.randn(k, b, args.dim, generator=gen, dtype=torch.float64).mean(1)
                prefix = micro.cumsum(0) / torch.arange(1, k + 1, dtype=torch.float64)[:, None]
                sq[w] = prefix.square().sum(1)
            n = b * torch.arange(1, k + 1, dtype=torch.float64)
            b_simple = args.dim * sigma ** 2 / float(G.square().sum())
            for name in ("pair", "prefixes"):
                g2, trace = estimates(sq, n, name == "pair")
                row = {"b": b, "k": k, "b_simple": b_simple, "estimator": name, "g2_mean": float(g2.mean()),
                       "g2_sd": float(g2.std()), "trace_mean": float(trace.mean()), "trace_sd": float(trace.std())}
                rows.append(row)
                print(f"{b:>3} {k:>3} {b_simple:>9.1f} {name:>9} {row['g2_mean']:>11.3f} {row['g2_sd']:>8.3f} "
                      f"{row['trace_mean']:>11.1f} {row['trace_sd']:>8.1f}")
    print(f"true |G|^2 = {float(G.square().sum()):.3f}; tr Sigma = d sigma^2")
    return rows


if __name__ == "__main__":
    main()
