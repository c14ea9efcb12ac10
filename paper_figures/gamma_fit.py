"""Fit the horizon exponent gamma of kappa = (B / B_ref) (D_ref / D)**gamma from an lr x horizon sweep.

Under the square-root rule the optimal lr at horizon D scales as sqrt(kappa), so
    log lr*(D) = const - (gamma / 2) log D.
For each horizon the optimal lr is the vertex of a parabola fitted to final loss vs log lr (around the best grid
point); gamma = -2 x the slope of log lr* on log D, with its standard error from the regression (and the parabola
vertices' own uncertainty is not propagated: the error bar is a lower bound when few horizons are swept).
Bethune et al. 2026 report gamma ~ 0.44 for their cosine schedule; Complete(d)P's iso-horizon rule is gamma = 1.

``python -m paper_figures.gamma_fit runs/mlp_horizon --out paper_figures/out`` (reads a collected sweep; trains nothing).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from sdebatch.sweep import collect


def optimal_lr(lrs: list[float], losses: list[float]) -> float:
    """Vertex of a parabola in log lr through the best grid point and its neighbours (the grid point itself when
    it lies at the edge of the grid or the parabola opens downward)."""
    order = np.argsort(lrs)
    x, y = np.log(np.asarray(lrs, float)[order]), np.asarray(losses, float)[order]
    i = int(np.nanargmin(y))
    if i == 0 or i == len(x) - 1:
        return float(math.exp(x[i]))
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    return float(math.exp(-b / (2 * a))) if a > 0 else float(math.exp(x[i]))


def fit_gamma(rows: list[dict], horizon_key: str = "samples") -> dict:
    """gamma and its standard error from rows with ``horizon_key``, ``lr`` and ``final_loss``."""
    by_h: dict[float, list[tuple[float, float]]] = {}
    for r in rows:
        loss = float(r["final_loss"])
        if math.isfinite(loss):
            by_h.setdefault(float(r[horizon_key]), []).append((float(r["lr"]), loss))
    horizons = sorted(h for h, pts in by_h.items() if len(pts) >= 3)
    if len(horizons) < 2:
        raise ValueError(f"need at least two horizons with three lrs each, got {sorted(by_h)}")
    lr_star = [optimal_lr(*zip(*by_h[h])) for h in horizons]
    X, Y = np.log(horizons), np.log(lr_star)
    slope, intercept = np.polyfit(X, Y, 1)
    if len(horizons) > 2:
        resid = Y - (slope * X + intercept)
        se = math.sqrt(resid @ resid / (len(X) - 2) / ((X - X.mean()) @ (X - X.mean())))
    else:
        se = float("nan")
    return {"gamma": -2 * slope, "gamma_se": 2 * se, "horizons": horizons, "lr_star": lr_star}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--horizon-key", default="samples", help="'samples' (MLP) or 'tokens' (MDM)")
    parser.add_argument("--out", default="paper_figures/out")
    args = parser.parse_args(argv)
    fit = fit_gamma(collect(args.folder), args.horizon_key)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.4, 2.4))
    ax.loglog(fit["horizons"], fit["lr_star"], "o", color="#0072B2", label="optimal lr per horizon")
    h = np.asarray(fit["horizons"])
    ax.loglog(h, fit["lr_star"][0] * (h / h[0]) ** (-fit["gamma"] / 2), "-", color="#D55E00",
              label=rf"fit: $\gamma$ = {fit['gamma']:.2f} $\pm$ {fit['gamma_se']:.2f}")
    ax.set_xlabel(f"horizon ({args.horizon_key})")
    ax.set_ylabel("optimal lr")
    ax.legend(frameon=False, fontsize=7)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.folder).name
    for ext in ("png", "pdf"):
        tmp = out / f".{name}_gamma.tmp.{ext}"
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, out / f"{name}_gamma.{ext}")
    print(f"gamma = {fit['gamma']:.3f} +- {fit['gamma_se']:.3f} from {len(fit['horizons'])} horizons; "
          f"wrote {out / (name + '_gamma.png')}")
    return fit


if __name__ == "__main__":
    main()
