"""Figures of a batch-size sweep: final loss vs batch per update per rule, and loss vs tokens per batch size.

Reads a sweep folder (run folders with config.json, metrics.json, curve.csv, as written by ``sdebatch sweep run``);
trains nothing. ``python -m paper_figures.batch_ablation runs/demo --out paper_figures/out``, or all of it at once:
``sdebatch report runs/demo``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from sdebatch.presets import LABELS  # noqa: E402
from sdebatch.stats import mean_se, paired, ratio_se, relative  # noqa: E402
from sdebatch.sweep import collect  # noqa: E402
from sdebatch.utils import atomic_write  # noqa: E402

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
COLORS = {"accumulate": "#000000", "sqrt_exact": "#0072B2", "sqrt_linear": "#56B4E9", "linear": "#009E73",
          "naive": "#D55E00"}
plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "figure.dpi": 150})


def label(rule: str, *, plain: bool = False) -> str:
    """The one label of a rule (a preset name) in every figure and page: :data:`sdebatch.presets.LABELS` as
    matplotlib mathtext, or with ``plain`` as text (the Greek letters spelled out as characters); a name that is not
    a preset is its own label."""
    text = LABELS.get(rule, rule)
    return text.replace(r"$\beta^\kappa$", "\u03b2^\u03ba").replace(r"$\beta$", "\u03b2") if plain else text


def summarise(rows: list[dict], tolerance: float = 0.01, folder: str | os.PathLike | None = None) -> dict:
    """Mean final loss per (rule, physical batch); the logical run's loss; each cell's relative deviation from it,
    with the standard error of that deviation over seeds (``deviation_se``: the delta method for the ratio of two
    independent means, None for a cell of one run); deviations and contrasts paired by seed (``paired``,
    ``contrast``, see :func:`_paired`); the knee of each rule: the smallest batch above the logical one whose paired
    deviation is worse (a higher loss) by more than both 2 standard errors and ``tolerance`` (relative, default 1%),
    or, for a cell without paired seeds, by more than ``tolerance`` alone; a better loss is no knee. With ``folder``
    (the sweep folder), the
    paired numbers also carry the held-out estimator's own standard error from each run's val_rows.json
    (``paired_estimator_se``, ``contrast_estimator_se``)."""
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault(cell_of(r), []).append(final_loss(r))
    means = {k: statistics.fmean(v) for k, v in cells.items()}
    logical = {int(r["logical_batch_size"]) for r in rows}
    lb = min(logical)
    # The logical run: exact accumulation at any physical batch (kappa = 1), else any rule at physical = logical.
    # (at physical = logical every rule is the same run: take one rule's cell, so only seeds count as repeats)
    ref_cells = [k for k in cells if k[0] == "accumulate"] or sorted(k for k in cells if k[1] == lb)[:1]
    # one value per seed (a seed's logical runs averaged: e.g. 4 at once and 2 x 2 accumulated are one seed, not two)
    by_seed: dict = {}
    for i, r in enumerate(rows):
        if cell_of(r) in ref_cells:
            by_seed.setdefault(int(r["seed"]) if "seed" in r else f"run{i}", []).append(final_loss(r))
    base = {s: statistics.fmean(v) for s, v in by_seed.items()}
    ref_runs = list(base.values())
    reference = statistics.fmean(ref_runs) if ref_runs else float("nan")
    # run-to-run spread of the logical run over seeds: deviations smaller than this are noise
    spread = statistics.stdev(ref_runs) / reference if len(ref_runs) > 1 else None
    deviation = {k: relative(v, reference) for k, v in means.items()}
    # standard error of cell mean / reference - 1, the cell's seeds and the logical run's independent: the reference
    # is a mean with an error too, which a deviation far from 0 magnifies by cell mean / reference
    ref_se = mean_se(ref_runs)[1] if ref_runs else None
    deviation_se = {}
    for k, v in cells.items():
        # the logical run's own cell deviates by construction (0 for a single cell): no error to give
        deviation_se[k] = None if k in ref_cells else ratio_se(means[k], mean_se(v)[1], reference, ref_se)
    by_seed_deviation, contrast = _paired(rows, ref_cells, base)
    knees = {}
    for rule in {k[0] for k in means}:
        above = []
        for (r, b), d in deviation.items():
            if r != rule or b <= lb:
                continue
            m, se, n = by_seed_deviation.get((r, b), (d, None, 1))
            if m > tolerance and (se is None or m > 2 * se):  # worse only: a lower loss is not a breakdown
                above.append(b)
        knees[rule] = min(above) if above else None
    # B_simple of the logical runs: the end-of-run probe when the workload made one (two batch sizes 16x apart),
    # else the in-run estimator's second-half average, else its final value
    ref_rows = [r for r in rows if cell_of(r) in ref_cells] or rows
    noise = []
    for key in ("noise_probe.b_simple", "noise_scale_late", "noise_scale"):
        noise = [float(r[key]) for r in ref_rows if r.get(key) not in (None, "", "None")]
        if noise:
            break
    out = {"means": means, "reference": reference, "logical_batch_size": lb, "deviation": deviation,
           "deviation_se": deviation_se, "paired": by_seed_deviation, "contrast": contrast,
           "reference_runs": len(ref_runs), "reference_spread": spread,
           "reference_se": ref_se / reference if ref_se is not None else None,
           "seeds": {k: len(v) for k, v in cells.items()},
           "knee": knees, "noise_scale": statistics.median(noise) if noise else None, "noise_scales": noise,
           "tolerance": tolerance,
           "estimator_se": _median_se(rows)}
    if folder is not None:
        out["paired_estimator_se"], out["contrast_estimator_se"] = _estimator_errors(rows, ref_cells, base,
                                                                                     Path(folder))
    return out


def cell_of(row: dict) -> tuple[str, int]:
    return row["rule"], int(row["physical_batch_size"])


def final_loss(row: dict) -> float:
    """The run's final loss; a diverged run counts as infinitely bad."""
    return float("inf") if row.get("diverged") in (True, "True") else float(row["final_loss"])


def _diverged_as_inf(summary: tuple[float, float | None, int]) -> tuple[float, float | None, int]:
    """A mean over seeds of which one diverged is infinitely bad (inf, whatever the other seeds gave)."""
    m, se, n = summary
    return (m if math.isfinite(m) else math.inf), se, n


def _median_se(rows: list[dict]) -> float | None:
    """Median over runs of one run's estimator standard error (``final_loss_se``), relative to its loss."""
    v = [float(r["final_loss_se"]) / float(r["final_loss"]) for r in rows
         if r.get("final_loss_se") not in (None, "", "None") and math.isfinite(float(r["final_loss"]))]
    return statistics.median(v) if v else None


CONTRAST_BASE = "sqrt_exact"  # every other rule is contrasted with the square-root rule, run for run


def _by_seed(rows: list[dict], ref_cells: list[tuple]) -> dict[tuple, dict[int, dict]]:
    runs: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if "seed" in r and cell_of(r) not in ref_cells:
            runs.setdefault(cell_of(r), {})[int(r["seed"])] = r
    return runs


def _paired(rows: list[dict], ref_cells: list[tuple], base: dict) -> tuple[dict, dict]:
    """Deviations paired by seed: each run against the logical run(s) of its own seed, mean +- se over seeds
    (``paired[(rule, batch)] = (mean, se, seeds)``), and each rule's difference from the square-root rule at the same
    batch over the seeds that have both (``contrast[(rule, batch)]``, e.g. naive - sqrt_exact), both relative to the
    seed's logical loss. Runs of one seed share their samples and draws (common random numbers), so paired
    differences can be less noisy than differences of means. ``base``: each seed's logical loss (the mean of its
    logical runs)."""
    runs = _by_seed(rows, ref_cells)
    deviation = {}
    for k, by in runs.items():
        seeds = [s for s in by if s in base]
        if seeds:
            deviation[k] = _diverged_as_inf(paired([final_loss(by[s]) for s in seeds], [base[s] for s in seeds]))
    contrast = {}
    for (rule, b), by in runs.items():
        other = runs.get((CONTRAST_BASE, b), {})
        if rule != CONTRAST_BASE:
            d = [(final_loss(r) - final_loss(other[s])) / base[s] for s, r in by.items() if s in other and s in base]
            if d:
                contrast[(rule, b)] = _diverged_as_inf(mean_se(d))
    return deviation, contrast


def _val_rows(folder: Path, row: dict) -> dict | None:
    path = folder / str(row.get("run_id")) / "val_rows.json"
    return json.loads(path.read_text()) if path.exists() else None


def _estimator_errors(rows: list[dict], ref_cells: list[tuple], base: dict, folder: Path) -> tuple[dict, dict]:
    """The held-out estimator's own standard error of each paired mean (relative to the seed's logical loss): per
    seed from the per-sequence replicates of the two runs under their common draws, combined over seeds as the
    error of a mean. None where a run has no val_rows.json."""
    import torch

    from sdebatch.mdm.objective import elbo_standard_error

    def nats(r):
        v = _val_rows(folder, r)
        return None if v is None else (torch.tensor(v["nats"], dtype=torch.float64), float(sum(v["items"])))

    logical: dict[int, list] = {}
    for r in rows:
        if cell_of(r) in ref_cells and "seed" in r:
            logical.setdefault(int(r["seed"]), []).append(nats(r))
    ref = {s: (None if any(x is None for x in v) else (sum(x[0] for x in v) / len(v), v[0][1]))
           for s, v in logical.items()}

    def combine(pairs):
        ses = []
        for s, a, b in pairs:
            if a is None or b is None:
                return None
            ses.append(elbo_standard_error(a[0] - b[0], a[1]) / base[s])
        return math.sqrt(sum(x * x for x in ses)) / len(ses) if ses else None

    runs = _by_seed(rows, ref_cells)
    cache = {(k, s): nats(r) for k, by in runs.items() for s, r in by.items()}
    paired = {k: combine([(s, cache[(k, s)], ref.get(s)) for s in by if s in base]) for k, by in runs.items()}
    contrast = {}
    for (rule, b), by in runs.items():
        if rule != CONTRAST_BASE and (CONTRAST_BASE, b) in runs:
            other = runs[(CONTRAST_BASE, b)]
            contrast[(rule, b)] = combine([(s, cache[((rule, b), s)], cache[((CONTRAST_BASE, b), s)])
                                           for s in by if s in other and s in base])
    return paired, contrast


def read_sweep(argv: list[str] | None, doc: str | None) -> tuple[argparse.Namespace, Path, list[dict]]:
    """The command line every figure script shares: a sweep folder and --out; its collected rows (results.csv
    rewritten)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("folder", help="a sweep folder, e.g. runs/demo")
    parser.add_argument("--out", default="paper_figures/out")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    rows = collect(folder, folder / "results.csv")
    if not rows:
        raise SystemExit(f"no finished runs in {folder}")
    return args, folder, rows


def save_figure(fig, out: Path, name: str) -> list[Path]:
    """``<out>/<name>.png`` and ``.pdf`` (written atomically); closes the figure."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        paths.append(out / f"{name}.{ext}")
        atomic_write(paths[-1], lambda f: fig.savefig(f, format=ext, bbox_inches="tight"))
    plt.close(fig)
    return paths


def loss_vs_batch(summary: dict, out: Path, name: str, ylabel: str) -> list[Path]:
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    lb = summary["logical_batch_size"]
    rules = sorted({r for r, _ in summary["means"]} - {"accumulate"}, key=list(COLORS).index)
    ref = summary["reference"]
    # error bars: standard errors over seeds (of the logical run's mean, and of each cell's deviation from it)
    ref_se = summary.get("reference_se")
    ax.errorbar([lb], [ref], yerr=ref * ref_se if ref_se else None, fmt="s", color="black", ms=4, capsize=2, zorder=3)
    for rule in rules:
        # every rule passes through the logical run at kappa = 1 (update batch = logical batch)
        pts = {b: v for (r, b), v in summary["means"].items() if r == rule}
        pts.setdefault(lb, ref)
        pts = [(b, v) for b, v in sorted(pts.items()) if math.isfinite(v)]
        if pts:
            se = [(summary["deviation_se"].get((rule, b)) or 0.0) * ref for b, _ in pts]
            ax.errorbar(*zip(*pts), yerr=se if any(se) else None, fmt="o-", color=COLORS.get(rule, "grey"),
                        label=label(rule), ms=3, lw=1.2, capsize=2)
    ax.axhline(summary["reference"], color="grey", lw=0.8, ls=":", label=f"logical run (B={lb})")
    ax.axvline(lb, color="grey", lw=0.5)
    if summary["noise_scale"]:
        ax.axvline(summary["noise_scale"], color="#CC79A7", lw=1, ls="--", label="noise-scale estimate")
    knee = summary["knee"].get("sqrt_exact")
    if knee:
        ax.axvline(knee, color=COLORS["sqrt_exact"], lw=0.8, ls="-.",
                   label=f"knee of the {label('sqrt_exact')} ({summary['tolerance']:.0%})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch per update (samples)")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: no data hidden
    return save_figure(fig, out, f"{name}_loss_vs_batch")


def _paired_panel(ax, summary: dict, title: str | None = None) -> None:
    lb, tol = summary["logical_batch_size"], summary["tolerance"]
    paired = {k: v for k, v in summary["paired"].items() if v[2] > 1}
    ax.axhspan(-100 * tol, 100 * tol, color="grey", alpha=0.15, lw=0, label=f"+-{tol:.0%}")
    ax.axhline(0, color="black", lw=0.8, ls=":")
    rules = sorted({r for r, _ in paired}, key=lambda r: list(COLORS).index(r) if r in COLORS else 99)
    ends = [-100 * tol, 100 * tol]
    for rule in rules:
        pts = sorted((b, m, se) for (r, b), (m, se, n) in paired.items() if r == rule and math.isfinite(m))
        if pts:
            b, m, se = zip(*pts)
            ax.errorbar(b, [100 * x for x in m], yerr=[100 * (x or 0) for x in se], fmt="o-", ms=3, lw=1.2,
                        capsize=2, color=COLORS.get(rule, "grey"), label=label(rule))
            ends += [100 * (x + sign * (e or 0)) for x, e in zip(m, se) for sign in (-1, 1)]
    knee = summary["knee"].get("sqrt_exact")
    if knee:
        ax.axvline(knee, color=COLORS["sqrt_exact"], lw=0.8, ls="-.", label=f"knee ({label('sqrt_exact')})")
    if summary["noise_scale"]:
        ax.axvline(summary["noise_scale"], color="#CC79A7", lw=1, ls="--", label="B_simple (probe)")
    ax.axvline(lb, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    # linear within the tolerance, logarithmic beyond: a rescaled arm within a few % stays readable next to a naive
    # arm at +500%
    ax.set_yscale("symlog", linthresh=100 * tol, linscale=1.0)
    # every error bar inside the axes, with a margin measured on the symmetric log scale
    scale = ax.yaxis.get_transform()
    lo, hi = scale.transform([min(ends), max(ends)])
    pad = 0.06 * (hi - lo)
    ax.set_ylim(*scale.inverted().transform([lo - pad, hi + pad]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}" if v else "0"))
    ax.set_xlabel("batch per update (samples)")
    seeds = sorted({n for _, _, n in paired.values()})
    count = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds"
    ax.set_title(f"{title}\n({count} per point)" if title else f"{count} per point", fontsize=8)


def paired_vs_batch(summary: dict | list[tuple[str, dict]], out: Path, name: str) -> list[Path]:
    """Each rule's deviation from the logical run of its own seed vs the batch per update (mean +- se over seeds; a
    symmetric log axis, linear within the knee's tolerance), the band of that tolerance: the figure that answers the
    question. ``summary`` may be a list of (title,
    summary) pairs, drawn side by side (e.g. a clean regression next to the MDM)."""
    panels = summary if isinstance(summary, list) else [(None, summary)]
    panels = [(t, s) for t, s in panels if any(v[2] > 1 for v in s["paired"].values())]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.1), squeeze=False)
    legend: dict[str, object] = {}  # one legend for the figure: the panels share their labels
    for ax, (title, s) in zip(axes[0], panels):
        _paired_panel(ax, s, title)
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    axes[0][0].set_ylabel("vs the logical run of the same seed (%, symmetric log)")
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), frameon=False, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(legend), 3 if len(panels) == 1 else 5), fontsize=6)
    return save_figure(fig, out, f"{name}_paired_vs_batch")


def _binned(curve: list[dict], x: str, bins: int, hi: float) -> dict[int, float]:
    """Mean training loss in ``bins`` equal-width bins of ``x`` over [0, hi]: per-micro-batch losses of a masked
    diffusion model are noisy (the 1/t weight), the binned mean shows the trend; every point is kept."""
    sums: dict[int, list[float]] = {}
    for p in curve:
        sums.setdefault(min(int(p[x] / hi * bins), bins - 1), []).append(p["loss"])
    return {i: statistics.fmean(v) for i, v in sums.items()}


def seed_mean(curves: list[list[dict]], x: str, bins: int, hi: float) -> tuple[list[float], list[float]]:
    """The binned curves of several seeds, averaged bin by bin (bins shared: one ``hi`` for the whole figure)."""
    per_run = [_binned(c, x, bins, hi) for c in curves]
    keys = sorted(set().union(*per_run))
    return ([(i + 0.5) * hi / bins for i in keys],
            [statistics.fmean(r[i] for r in per_run if i in r) for i in keys])


def loss_vs_tokens(folder: Path, out: Path, name: str, x: str, bins: int = 20) -> list[Path]:
    groups: dict[tuple[str, int], list[list[dict]]] = {}  # (rule, physical batch) -> the seeds' curves
    for cfg_path in sorted(folder.glob("*/config.json")):
        curve_path = cfg_path.parent / "curve.csv"
        if not curve_path.exists():
            continue
        cfg = json.loads(cfg_path.read_text())
        with open(curve_path) as f:
            curve = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        if curve and x in curve[0]:
            b = int(cfg["physical_batch_size"]) if cfg["rule"] != "accumulate" else int(cfg["logical_batch_size"])
            groups.setdefault((cfg["rule"], b), []).append(curve)
    rules = [r for r in ("sqrt_exact", "naive") if any(k[0] == r for k in groups)]
    if not rules:
        return []
    hi = max(p[x] for curves in groups.values() for c in curves for p in c)
    fig, axes = plt.subplots(1, len(rules), figsize=(3.4 * len(rules) / 1.4, 2.4), sharey=True, squeeze=False)
    batches = sorted({b for r, b in groups if r != "accumulate"})
    shades = plt.cm.viridis([i / max(len(batches) - 1, 1) for i in range(len(batches))])
    for ax, rule in zip(axes[0], rules):
        for (r, b), curves in sorted(groups.items(), key=lambda kv: kv[0][1]):
            seeds = f" ({len(curves)} runs)" if len(curves) > 1 else ""
            if r == "accumulate":
                ax.plot(*seed_mean(curves, x, bins, hi), ":", color="black", lw=1.4, label=f"logical B={b}{seeds}",
                        zorder=3)
            elif r == rule:
                ax.plot(*seed_mean(curves, x, bins, hi), "-", color=shades[batches.index(b)], lw=1,
                        label=f"B={b}{seeds}")
        ax.set_title(label(rule))
        ax.set_xlabel(f"{x} seen")
    axes[0][0].set_ylabel(f"training loss (mean per {100 // bins}% of the run)")
    axes[0][-1].legend(frameon=False, fontsize=6)
    return save_figure(fig, out, f"{name}_loss_vs_{x}")


def table(summary: dict) -> str:
    lines = [f"{'batch':>6} {'rule':>12} {'seeds':>6} {'final loss':>11} {'vs logical':>11} {'+- se':>7}"]
    for (rule, b), v in sorted(summary["means"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        se = summary["deviation_se"].get((rule, b))
        lines.append(f"{b:>6} {rule:>12} {summary['seeds'][(rule, b)]:>6} {v:>11.4f} "
                     f"{100 * summary['deviation'][(rule, b)]:>+10.1f}% " + (f"{100 * se:>6.1f}%" if se else ""))
    if any(n > 1 for _, _, n in summary["paired"].values()):
        est = summary.get("paired_estimator_se", {})
        cest = summary.get("contrast_estimator_se", {})
        lines.append("paired by seed (each run against its own seed's logical run; mean +- se over seeds; "
                     "[estimator's own se]; and each rule - sqrt_exact, run for run):")
        for (rule, b), (m, se, n) in sorted(summary["paired"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            c, e, ce = summary["contrast"].get((rule, b)), est.get((rule, b)), cest.get((rule, b))
            lines.append(f"{b:>6} {rule:>12} {n:>6} {100 * m:>+10.2f}% " + (f"+- {100 * se:.2f}" if se else "")
                         + (f" [{100 * e:.2f}]" if e is not None else "")
                         + (f"   {rule} - sqrt_exact {100 * c[0]:+.2f}% +- {100 * c[1]:.2f}" if c and c[1] else "")
                         + (f" [{100 * ce:.2f}]" if c and c[1] and ce is not None else ""))
    if summary["reference_spread"] is not None:
        lines.append(f"logical run: {summary['reference_runs']} seeds, seed-to-seed std "
                     f"{100 * summary['reference_spread']:.1f}% of its loss")
    if summary.get("estimator_se") is not None:
        lines.append(f"one run's held-out estimator se: {100 * summary['estimator_se']:.2f}% (median over runs)")
    lines.append(f"knee (paired deviation worse by more than 2 se and {summary['tolerance']:.0%}): " + ", ".join(
        f"{rule} {b if b else 'none'}" for rule, b in sorted(summary["knee"].items()) if rule != "accumulate"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="a sweep folder, e.g. runs/demo")
    parser.add_argument("--out", default="paper_figures/out")
    parser.add_argument("--ylabel", default="held-out loss")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="knee: relative deviation to the worse (with 2 paired se)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    rows = collect(folder, folder / "results.csv")
    if not rows:
        raise SystemExit(f"no finished runs in {folder}")
    summary = summarise(rows, args.tolerance, folder=folder)
    name = folder.name
    x = "tokens" if "tokens" in (folder / "results.csv").read_text().split("\n")[0] else "samples"
    paths = paired_vs_batch(summary, Path(args.out), name)
    paths += loss_vs_batch(summary, Path(args.out), name, args.ylabel)
    paths += loss_vs_tokens(folder, Path(args.out), name, x)
    print(table(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return summary


if __name__ == "__main__":
    main()
