"""Which gradients inside a window should the in-run noise scale read? A Monte Carlo on Gaussian gradients.

Per-sample gradients G + sigma z (z ~ N(0, I_d)); a window of k micro-batches of b samples. Every estimator uses the
unbiased two-size formulas (E|g_n|^2 = |G|^2 + tr(Sigma) / n) with the whole window (k b samples) as the big batch;
they differ in the small batch:

    first     the window's first micro-batch (|g_1|^2 read from .grad after one micro-step): 2 norms per window
    own       every micro-batch's own gradient (mean of |g_i|^2, read by hooks before accumulation): k + 1 norms
    own2      the first two micro-batches' own gradients: 3 norms
    prefixes  least squares of |S_i|^2 on 1 / (i b) over the accumulated prefixes i = 1..k (nested): k norms

The table gives, per estimator, the standard deviation of the per-window |G|^2 and tr(Sigma) estimates, and the
relative error (standard deviation over replicate runs) of B_simple = tr / |G|^2 from an EMA (decay 0.95) of the
per-window estimates after 200 windows, as the wrapper computes it.

    python -m benchmarks.noise_variance [--windows 2000]
"""
from __future__ import annotations

import argparse

import torch

ESTIMATORS = ("first", "own", "own2", "prefixes")
COST = {"first": "2 norms", "own": "k+1 norms (hooks)", "own2": "3 norms (hooks)", "prefixes": "k norms"}


def per_window(micro: torch.Tensor, b: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(|G|^2, tr Sigma) per window from micro-batch mean gradients ``micro`` (windows x k x d) of b samples."""
    k = micro.shape[1]
    B = k * b
    big = micro.mean(1).square().sum(-1)
    if name == "prefixes":
        prefix = micro.cumsum(1) / torch.arange(1, k + 1, dtype=micro.dtype)[None, :, None]
        y = prefix.square().sum(-1)
        x = 1.0 / (b * torch.arange(1, k + 1, dtype=micro.dtype))
        xm = x.mean()
        slope = ((x - xm) * (y - y.mean(1, keepdim=True))).sum(1) / (x - xm).square().sum()
        return y.mean(1) - slope * xm, slope
    m = {"first": 1, "own": k, "own2": 2}[name]
    small = micro[:, :m].square().sum(-1).mean(1)
    return (B * big - b * small) / (B - b), (small - big) / (1.0 / b - 1.0 / B)


def ema_b_simple(g2: torch.Tensor, trace: torch.Tensor, decay: float = 0.95) -> torch.Tensor:
    """B_simple after the EMA of each replicate's window estimates (replicates x windows), as the wrapper does."""
    weights = decay ** torch.arange(g2.shape[1] - 1, -1, -1, dtype=g2.dtype)
    return (trace * weights).sum(1) / (g2 * weights).sum(1)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=2000, help="windows per setting (default 2000)")
    ap.add_argument("--dim", type=int, default=1000, help="gradient dimension d (default 1000)")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    G = 0.05 * torch.randn(args.dim, generator=gen, dtype=torch.float64)
    g2_true = float(G.square().sum())
    rows = []
    print(f"{'b':>3} {'k':>3} {'B_simple':>9} {'estimator':>9} {'cost':>18} {'|G|^2 sd':>9} {'trace sd':>9} "
          f"{'B_simple rel. error (EMA, 200 windows)':>40}")
    for b, k in ((4, 4), (4, 16), (8, 4)):
        for sigma in (0.1, 0.35, 1.0):
            # micro-batch means of b samples: G + sigma z / sqrt(b)
            micro = G + sigma / b ** 0.5 * torch.randn(args.windows, k, args.dim, generator=gen, dtype=torch.float64)
            b_simple = args.dim * sigma ** 2 / g2_true
            for name in ESTIMATORS:
                g2, trace = per_window(micro, b, name)
                reps = ema_b_simple(g2.reshape(-1, 200), trace.reshape(-1, 200))
                row = {"b": b, "k": k, "b_simple": b_simple, "estimator": name, "cost": COST[name],
                       "g2_sd": float(g2.std() / g2_true), "trace_sd": float(trace.std() / (args.dim * sigma ** 2)),
                       "b_simple_rel_error": float(reps.std() / b_simple),
                       "b_simple_rel_bias": float(reps.mean() / b_simple - 1)}
                rows.append(row)
                print(f"{b:>3} {k:>3} {b_simple:>9.1f} {name:>9} {row['cost']:>18} {row['g2_sd']:>9.3f} "
                      f"{row['trace_sd']:>9.3f} {100 * row['b_simple_rel_error']:>33.1f}% "
                      f"(bias {100 * row['b_simple_rel_bias']:+.1f}%)")
    print("sd columns: relative to the true |G|^2 and tr(Sigma); the EMA error over "
          f"{args.windows // 200} replicates of 200 windows")
    return rows


if __name__ == "__main__":
    main()
