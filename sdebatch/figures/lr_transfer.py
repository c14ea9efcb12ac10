"""Loss vs reference lr, per physical batch and rule: does the optimum stay put when the batch changes?

Under the square-root rule the runs at every physical batch are one SDE, so their loss-vs-lr curves collapse onto one
optimum; without it the lr that a run actually uses is the reference lr, and the optimum of the reference lr moves by
about sqrt(kappa) (half an octave per doubling of the batch). The optimum of each curve is the vertex of a parabola in
log2 lr fitted by weighted least squares to the seed means around the best grid point (a smooth curve, not the best
noisy point), with its standard error by the delta method. Also the lr sensitivity of a regime: each lr's paired
difference from the best lr (same seed), mean +- se over seeds.

Reads a sweep folder (``sdebatch sweep run`` output); trains nothing.
``python -m paper_figures.lr_transfer runs/mdm_lr_transfer --out paper_figures/out``
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..stats import mean_se, relative  # noqa: E402
from .batch_ablation import COLORS, cell_of, final_loss, label, read_sweep, save_figure  # noqa: E402


def fit_optimum(lrs: list[float], means: list[float], ses: list[float | None], width: int = 2) -> dict:
    """Vertex of the parabola a x^2 + b x + c in x = log2 lr, fitted to the best grid point and up to ``width``
    neighbours each side, weighted by 1 / se^2 (unweighted when an se is missing). Returns ``log2_lr``, ``lr``,
    ``se`` (of log2 lr*, delta method on the fit's covariance; None when the fit has no spare degree of freedom and
    no standard errors), ``curvature`` a, ``at_edge`` (the best point is at the end of the grid: the optimum is not
    bracketed and ``lr`` is that point), ``points`` used."""
    order = np.argsort(lrs)
    x = np.log2(np.asarray(lrs, float)[order])
    y = np.asarray(means, float)[order]
    s = [ses[i] for i in order]
    finite = np.isfinite(y)
    i = int(np.argmin(np.where(finite, y, np.inf)))
    if i == 0 or i == len(x) - 1 or not finite[max(i - 1, 0):i + 2].all():
        return {"log2_lr": float(x[i]), "lr": float(2 ** x[i]), "se": None, "curvature": None, "at_edge": True,
                "points": 1}
    lo, hi = max(i - width, 0), min(i + width + 1, len(x))
    keep = [j for j in range(lo, hi) if finite[j]]
    X = np.stack([x[keep] ** 2, x[keep], np.ones(len(keep))], 1)
    have_se = all(s[j] for j in keep)
    w = np.array([1 / s[j] ** 2 for j in keep]) if have_se else np.ones(len(keep))
    A = X.T @ (w[:, None] * X)
    coef = np.linalg.solve(A, X.T @ (w * y[keep]))
    a, b = coef[0], coef[1]
    if a <= 0:
        return {"log2_lr": float(x[i]), "lr": float(2 ** x[i]), "se": None, "curvature": float(a), "at_edge": False,
                "points": len(keep)}
    if have_se:
        cov = np.linalg.inv(A)
    elif len(keep) > 3:
        resid = y[keep] - X @ coef
        cov = np.linalg.inv(A) * float(resid @ resid) / (len(keep) - 3)
    else:
        cov = None
    v = -b / (2 * a)
    se = None
    if cov is not None:
        grad = np.array([b / (2 * a * a), -1 / (2 * a)])  # d v / d (a, b)
        se = float(math.sqrt(grad @ cov[:2, :2] @ grad))
    return {"log2_lr": float(v), "lr": float(2 ** v), "se": se, "curvature": float(a), "at_edge": False,
            "points": len(keep)}


def curves(rows: list[dict]) -> dict:
    """Per (rule, physical batch): {lr: {seed: loss}} (the logical runs, rule "accumulate", under their own key)."""
    out: dict[tuple, dict[float, dict[int, float]]] = {}
    for r in rows:
        out.setdefault(cell_of(r), {}).setdefault(float(r["lr"]), {})[int(r.get("seed", 0))] = final_loss(r)
    return out


def sensitivity(by_lr: dict[float, dict[int, float]]) -> dict:
    """Each lr's paired relative difference from the best lr (by seed mean), over the seeds both have: mean, se,
    seeds; and the seed spread of those differences (their std), the paired noise of the regime."""
    means = {lr: statistics.fmean(v.values()) for lr, v in by_lr.items()}
    best = min(means, key=lambda lr: means[lr] if math.isfinite(means[lr]) else math.inf)
    out = {"best": best, "rows": {}}
    for lr, by_seed in sorted(by_lr.items()):
        d = [relative(v, by_lr[best][s]) for s, v in by_seed.items() if s in by_lr[best]]
        if lr == best or not d:
            continue
        m, se, n = mean_se(d)
        out["rows"][lr] = {"mean": m, "se": se, "seeds": n, "spread": statistics.stdev(d) if se is not None else None}
    return out


def summarise(rows: list[dict]) -> dict:
    """Per (rule, batch): seed means and se per lr, the fitted optimum, and its shift in octaves from the optimum
    at the logical batch (the logical runs', else the smallest-kappa cell's), with the shift the naive arm would show
    if the square-root rule is right, 0.5 log2 kappa."""
    lb = min(int(r["logical_batch_size"]) for r in rows)
    out: dict = {"logical_batch_size": lb, "cells": {}}
    for cell, by_lr in curves(rows).items():
        lrs = sorted(by_lr)
        ms = [mean_se(by_lr[lr].values()) for lr in lrs]
        fit = fit_optimum(lrs, [m for m, _, _ in ms], [se for _, se, _ in ms])
        out["cells"][cell] = {"lrs": lrs, "means": [m for m, _, _ in ms], "ses": [se for _, se, _ in ms],
                              "seeds": [len(by_lr[lr]) for lr in lrs], "fit": fit, "sensitivity": sensitivity(by_lr)}
    ref = next((c for c in out["cells"] if c[0] == "accumulate"), None) or next(
        (c for c in sorted(out["cells"], key=lambda c: c[1]) if c[1] == lb), None)
    out["reference"] = ref
    for cell, v in out["cells"].items():
        if ref is None or cell == ref:
            continue
        a, b = v["fit"], out["cells"][ref]["fit"]
        se = math.hypot(a["se"], b["se"]) if a["se"] is not None and b["se"] is not None else None
        kappa = cell[1] / lb
        v["shift"] = {"octaves": a["log2_lr"] - b["log2_lr"], "se": se, "at_edge": a["at_edge"] or b["at_edge"],
                      "expected_naive": 0.5 * math.log2(kappa)}
    return out


def table(s: dict) -> str:
    lines = []
    for (rule, b), v in sorted(s["cells"].items(), key=lambda kv: (kv[0][0], kv[0][1])):
        pts = ", ".join(f"{lr:g}: {m:.4f}" + (f"+-{se:.4f}" if se else "") for lr, m, se in
                        zip(v["lrs"], v["means"], v["ses"]))
        f = v["fit"]
        opt = (f"optimum lr {f['lr']:.3g} (log2 {f['log2_lr']:.2f}" + (f" +- {f['se']:.2f})" if f["se"] else ")")
               + (" at the edge of the grid" if f["at_edge"] else ""))
        lines.append(f"{rule:>12} batch {b:>4}: {opt}; {pts}")
        sens = v["sensitivity"]
        lines.append(" " * 19 + "vs best lr {:g}, paired over seeds: ".format(sens["best"]) + ", ".join(
            f"{lr:g} {100 * r['mean']:+.1f}%" + (f" +- {100 * r['se']:.1f}" if r["se"] else "")
            + (f" (spread {100 * r['spread']:.1f}%)" if r["spread"] is not None else "")
            for lr, r in sens["rows"].items()))
        if "shift" in v:
            sh = v["shift"]
            lines.append(" " * 19 + f"optimum moved {sh['octaves']:+.2f}" + (f" +- {sh['se']:.2f}" if sh["se"] else "")
                         + f" octaves from the logical run's (no rescaling expects {sh['expected_naive']:+.2f})")
    return "\n".join(lines)


def figure(s: dict, out: Path, name: str) -> list[Path]:
    rules = sorted({r for r, _ in s["cells"]} - {"accumulate"}, key=lambda r: list(COLORS).index(r)
                   if r in COLORS else 99)
    fig, axes = plt.subplots(1, max(len(rules), 1), figsize=(3.0 * max(len(rules), 1), 2.6), sharey=True,
                             squeeze=False)
    batches = sorted({b for _, b in s["cells"]})
    shades = plt.cm.viridis([i / max(len(batches) - 1, 1) for i in range(len(batches))])
    ref = s["reference"]
    for ax, rule in zip(axes[0], rules or ["accumulate"]):
        cells = [c for c in s["cells"] if c[0] == rule] + ([ref] if ref and ref[0] != rule else [])
        for cell in sorted(set(cells), key=lambda c: c[1]):
            v = s["cells"][cell]
            style = dict(color="black", ls=":") if cell == ref else dict(color=shades[batches.index(cell[1])])
            ax.errorbar(v["lrs"], v["means"], yerr=[se or 0 for se in v["ses"]], marker="o", ms=3, capsize=2, lw=1,
                        label=("logical " if cell == ref else "") + f"B={cell[1]}", **style)
            if not v["fit"]["at_edge"]:
                ax.axvline(v["fit"]["lr"], lw=0.6, **{**style, "ls": "--"})
        ax.set_xscale("log", base=2)
        ax.set_title(label(rule))
        ax.set_xlabel("reference lr (at the logical batch)")
        ax.legend(frameon=False, fontsize=6)
    axes[0][0].set_ylabel("held-out loss (mean over seeds +- se)")
    return save_figure(fig, out, f"{name}_lr_transfer")


def main(argv: list[str] | None = None) -> dict:
    args, folder, rows = read_sweep(argv, __doc__)
    s = summarise(rows)
    print(table(s))
    paths = figure(s, Path(args.out), folder.name)
    print("wrote " + ", ".join(str(p) for p in paths))
    return s


if __name__ == "__main__":
    main()
