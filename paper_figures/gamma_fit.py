"""Fit the horizon exponent gamma of kappa = (B / B_ref) (D_ref / D)**gamma from an lr x horizon sweep.

Under the square-root rule the optimal lr at horizon D scales as sqrt(kappa), so
    log lr*(D) = const - (gamma / 2) log D.
For each horizon the optimal lr is the vertex of a parabola fitted to the seed-mean final loss vs log lr (a smooth
curve around the best grid point, weighted by the seeds' standard errors); gamma = -2 x the slope of log lr* on log D,
by a regression weighted by the vertices' own standard errors (see :func:`fit_gamma`).
Bethune et al. 2026 report gamma ~ 0.44 for their cosine schedule; Complete(d)P's iso-horizon rule is gamma = 1.

``python -m paper_figures.gamma_fit runs/mlp_horizon --out paper_figures/out`` (reads a sweep; trains nothing).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from sdebatch.figures.batch_ablation import save_figure
from sdebatch.figures.lr_transfer import fit_optimum
from sdebatch.stats import mean_se
from sdebatch.sweep import collect


def optimal_lr(lrs: list[float], losses: list[float]) -> float:
    """Vertex of a parabola in log lr around the best grid point (:func:`sdebatch.figures.lr_transfer.fit_optimum`;
    the grid point itself when it lies at the edge of the grid or the parabola opens downward)."""
    return fit_optimum(lrs, losses, [None] * len(lrs))["lr"]


def fit_gamma(rows: list[dict], horizon_key: str = "samples") -> dict:
    """gamma and its standard error from rows with ``horizon_key``, ``lr``, ``final_loss`` and optionally ``seed``.

    Per horizon, the seeds of each lr are averaged (se over seeds) and the optimum log2 lr* is the vertex of a
    weighted parabola with its delta-method se; horizons whose best lr sits at the edge of the grid are left out
    (their optimum is not bracketed: ``dropped``). log2 lr* is then regressed on log2 D, weighted by 1 / se^2 when
    every vertex has one (the errors scaled up by sqrt(chi^2 / dof) when the points scatter more than their errors
    say), else unweighted with the residual se. gamma = -2 x slope."""
    by_h: dict[float, dict[float, list[float]]] = {}
    for r in rows:
        loss = float(r["final_loss"])
        by_h.setdefault(float(r[horizon_key]), {}).setdefault(float(r["lr"]), []).append(
            loss if math.isfinite(loss) and r.get("diverged") not in (True, "True") else math.inf)
    fits, dropped = {}, []
    for h, by_lr in sorted(by_h.items()):
        if len(by_lr) < 3:
            continue
        lrs = sorted(by_lr)
        ms = [mean_se(by_lr[lr]) for lr in lrs]  # a diverged seed: an infinite mean, no error
        f = fit_optimum(lrs, [m for m, _, _ in ms], [se for _, se, _ in ms])
        (dropped.append(h) if f["at_edge"] else fits.__setitem__(h, f))
    horizons = sorted(fits)
    if len(horizons) < 2:
        raise ValueError(f"need at least two horizons with three lrs each and a bracketed optimum, got "
                         f"{sorted(fits)} (optimum at the grid's edge: {dropped})")
    X = np.log2(horizons)
    Y = np.array([fits[h]["log2_lr"] for h in horizons])
    ses = [fits[h]["se"] for h in horizons]
    weighted = all(se for se in ses)
    w = np.array([1 / se ** 2 for se in ses]) if weighted else np.ones(len(X))
    A = np.stack([X, np.ones(len(X))], 1)
    M = A.T @ (w[:, None] * A)
    slope, intercept = np.linalg.solve(M, A.T @ (w * Y))
    resid = Y - (slope * X + intercept)
    dof = len(X) - 2
    if weighted:
        scale = max(1.0, float(resid @ (w * resid)) / dof) if dof > 0 else 1.0
        se = math.sqrt(np.linalg.inv(M)[0, 0] * scale)
    else:
        se = math.sqrt(np.linalg.inv(M)[0, 0] * float(resid @ resid) / dof) if dof > 0 else float("nan")
    return {"gamma": -2 * float(slope), "gamma_se": 2 * se, "horizons": horizons,
            "lr_star": [fits[h]["lr"] for h in horizons], "lr_star_se_log2": ses, "dropped": dropped,
            "weighted": weighted}


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
    err = [(lr * (1 - 2 ** -se), lr * (2 ** se - 1)) if se else (0, 0)
           for lr, se in zip(fit["lr_star"], fit["lr_star_se_log2"])]
    ax.errorbar(fit["horizons"], fit["lr_star"], yerr=np.array(err).T, fmt="o", color="#0072B2", capsize=2,
                label="optimal lr per horizon (+- se)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    h = np.asarray(fit["horizons"])
    ax.loglog(h, fit["lr_star"][0] * (h / h[0]) ** (-fit["gamma"] / 2), "-", color="#D55E00",
              label=rf"fit: $\gamma$ = {fit['gamma']:.2f} $\pm$ {fit['gamma_se']:.2f}")
    ax.set_xlabel(f"horizon ({args.horizon_key})")
    ax.set_ylabel("optimal lr")
    ax.legend(frameon=False, fontsize=7)
    out = Path(args.out)
    name = Path(args.folder).name
    save_figure(fig, out, f"{name}_gamma")
    print(f"gamma = {fit['gamma']:.3f} +- {fit['gamma_se']:.3f} from {len(fit['horizons'])} horizons; "
          f"wrote {out / (name + '_gamma.png')}")
    return fit


if __name__ == "__main__":
    main()
