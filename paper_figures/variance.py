"""Where the run-to-run variance of a sweep's final loss comes from: runs that differ from a base run in one source of
randomness only (``init_seed``, ``data_seed``, ``draw_seed``, or the float rounding of an accumulation split), the
spread of each group, with its confidence interval, against the estimator's own error.

Reads a sweep folder such as ``runs/mdm_variance`` (``experiments/sweeps/mdm_variance.toml``); trains nothing.
``python -m paper_figures.variance runs/mdm_variance --out paper_figures/out``
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats  # noqa: E402

from sdebatch.figures.batch_ablation import read_sweep, save_figure  # noqa: E402

SOURCES = {"init_seed": "initial weights", "data_seed": "data order", "draw_seed": "masking draws",
           "rounding": "float rounding only"}


def source_of(row: dict, base: dict) -> str | None:
    """Which single source a run changes against ``base`` ("base" for the base run itself; None for anything else)."""
    changed = [k for k in SOURCES if k != "rounding" and row.get(k) not in (None, "", base.get(k))]
    rounding = row.get("physical_batch_size") != base.get("physical_batch_size")
    if not changed and not rounding:
        return "base"
    if len(changed) == 1 and not rounding:
        return changed[0]
    if not changed and rounding and row.get("rule") == "accumulate":
        return "rounding"
    return None


def spread(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Sample standard deviation and its chi-square confidence interval (normal values assumed)."""
    n = len(values)
    s = statistics.stdev(values)
    lo = s * math.sqrt((n - 1) / stats.chi2.ppf(0.5 + level / 2, n - 1))
    hi = s * math.sqrt((n - 1) / stats.chi2.ppf(0.5 - level / 2, n - 1))
    return s, lo, hi


def decompose(rows: list[dict], key: str = "final_loss", folder: Path | None = None) -> dict:
    """Per source: the runs (base run included), their relative std with its 95% interval, and the median estimator
    standard error of one run's number (``final_loss_se``), all relative to the base run's loss. With ``folder`` (the
    sweep folder holding each run's val_rows.json), also the estimator's own error of a difference between a run and
    the base run (``paired_estimator_se``, median): runs share the held-out draws, so most of one run's estimator
    error is common to all and does not inflate their spread."""
    base = next((r for r in rows if all(r.get(k) in (None, "") for k in SOURCES if k != "rounding")
                 and r.get("rule") == "accumulate" and "physical_batch_size" in r
                 and int(r["physical_batch_size"]) == int(r["logical_batch_size"])), None)
    if base is None:
        raise ValueError("no base run (rule accumulate, physical = logical batch, no *_seed key) in the sweep")
    ref = float(base[key])
    out = {"base": ref, "sources": {}}
    for src in SOURCES:
        group = [float(r[key]) for r in rows if source_of(r, base) == src]
        values = [ref] + group
        if len(values) < 2:
            continue
        s, lo, hi = spread(values)
        ses = [float(r["final_loss_se"]) for r in rows if source_of(r, base) in (src, "base")
               and r.get("final_loss_se") not in (None, "", "None")]
        out["sources"][src] = {"runs": len(values), "values": values, "std": s / ref, "ci": (lo / ref, hi / ref),
                               "estimator_se": statistics.median(ses) / ref if ses else None,
                               "paired_estimator_se": None}
        if folder is not None and key == "final_loss":
            paired = [_paired_se(folder, r, base) for r in rows if source_of(r, base) == src]
            if paired and all(p is not None for p in paired):
                out["sources"][src]["paired_estimator_se"] = statistics.median(paired) / ref
    return out


def _paired_se(folder: Path, row: dict, base: dict) -> float | None:
    """Estimator se (bits) of row's loss minus the base run's, from both runs' per-sequence replicates."""
    import json

    import torch

    from sdebatch.mdm.objective import elbo_standard_error

    paths = [folder / str(r.get("run_id")) / "val_rows.json" for r in (row, base)]
    if not all(p.exists() for p in paths):
        return None
    a, b = (json.loads(p.read_text()) for p in paths)
    diff = torch.tensor(a["nats"], dtype=torch.float64) - torch.tensor(b["nats"], dtype=torch.float64)
    return elbo_standard_error(diff, float(sum(a["items"])))


def table(d: dict) -> str:
    lines = [f"base run {d['base']:.4f}; relative spread of the final loss when one source changes (runs = base + "
             f"changed), 95% interval; the estimator's own standard error for comparison",
             f"{'source':>22} {'runs':>5} {'std':>8} {'95% interval':>17} {'estimator se':>13} {'of a difference':>16}"]
    for src, v in d["sources"].items():
        est = f"{100 * v['estimator_se']:.2f}%" if v["estimator_se"] else "-"
        pest = f"{100 * v['paired_estimator_se']:.2f}%" if v.get("paired_estimator_se") else "-"
        lines.append(f"{SOURCES[src]:>22} {v['runs']:>5} {100 * v['std']:>7.2f}% "
                     f"{100 * v['ci'][0]:>7.2f}-{100 * v['ci'][1]:.2f}% {est:>13} {pest:>16}")
    return "\n".join(lines)


def figure(d: dict, out: Path, name: str) -> list[Path]:
    fig, ax = plt.subplots(figsize=(3.4, 2.2))
    items = list(d["sources"].items())
    for i, (src, v) in enumerate(items):
        ax.errorbar([100 * v["std"]], [i], xerr=[[100 * (v["std"] - v["ci"][0])], [100 * (v["ci"][1] - v["std"])]],
                    fmt="o", color="#0072B2", capsize=2, ms=4)
        if v["estimator_se"]:
            ax.plot([100 * v["estimator_se"]], [i], "x", color="#D55E00", ms=5)
        if v.get("paired_estimator_se"):
            ax.plot([100 * v["paired_estimator_se"]], [i], "+", color="#009E73", ms=6)
    ax.set_yticks(range(len(items)), [SOURCES[s] for s, _ in items])
    ax.plot([], [], "x", color="#D55E00", label="estimator se of one run")
    ax.plot([], [], "+", color="#009E73", label="estimator se of a difference")
    ax.set_xlabel("run-to-run std of the final loss (% of the loss, 95% interval)")
    ax.set_xlim(left=0)
    ax.legend(frameon=False, fontsize=6, loc="lower right")
    return save_figure(fig, out, f"{name}_variance")


def main(argv: list[str] | None = None) -> dict:
    args, folder, rows = read_sweep(argv, __doc__)
    d = decompose(rows, folder=folder)
    print(table(d))
    for m in ("text", "image", "audio"):
        if all(f"val.{m}" in r for r in rows):
            print(f"  {m:>5}: " + ", ".join(f"{SOURCES[s]} {100 * v['std']:.2f}%" for s, v in
                                           decompose(rows, f"val.{m}")["sources"].items()))
    paths = figure(d, Path(args.out), folder.name)
    print("wrote " + ", ".join(str(p) for p in paths))
    return d


if __name__ == "__main__":
    main()
