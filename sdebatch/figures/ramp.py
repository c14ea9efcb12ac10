"""A batch ramp against the fixed logical batch: final loss paired by seed, updates, and the updates each ramp needs
to reach the fixed run's final loss (from the evaluation curve).

Runs of a sweep are grouped into arms by their config: ``batch_schedule`` empty (the fixed logical batch) or set,
with ``ramp`` = "rules" (every hyperparameter rescaled), "lr_only" or "none", and "+v" when Adam's second moment is
rescaled at each change (``second_moment_rescale``). A named schedule ("seesaw", "critical_batch_warmup") prefixes
its arms ("seesaw rules"); a clock:batch spec does not. Reads a sweep folder, trains nothing:
``python -m paper_figures.ramp runs/mlp_ramp --out paper_figures/out``.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from ..stats import mean_se, paired  # noqa: E402
from .batch_ablation import final_loss, read_sweep, save_figure  # noqa: E402

RAMPS = ("rules", "rules+v", "lr_only", "none")
KINDS = ("", "seesaw", "critical_batch_warmup")  # "": a clock:batch spec
KIND_LABELS = {"": "ramp", "seesaw": "Seesaw", "critical_batch_warmup": "critical-batch warmup"}
RAMP_LABELS = {"rules": "every hyperparameter rescaled (sdebatch)", "rules+v": "rescaled, and Adam's v",
               "lr_only": "lr only (OLMo-core)", "none": "nothing rescaled (Megatron)"}
COLORS = {"fixed": "#000000", "rules": "#0072B2", "rules+v": "#009E73", "lr_only": "#E69F00", "none": "#D55E00"}
STYLES = {"": "-", "seesaw": "--", "critical_batch_warmup": ":"}


def _split(arm: str) -> tuple[str, str]:
    """(schedule kind, ramp) of an arm name."""
    kind, _, ramp = arm.rpartition(" ")
    return kind, ramp


def arm_of(row: dict) -> str:
    spec = row.get("batch_schedule")
    if not spec:
        return "fixed"
    ramp = str(row.get("ramp", "rules")) + ("+v" if str(row.get("second_moment_rescale")) in ("True", "true", "1")
                                            else "")
    return f"{spec} {ramp}" if spec in KINDS else ramp


def _order(arm: str) -> tuple:
    if arm == "fixed":
        return (-1, 0)
    kind, ramp = _split(arm)
    return (KINDS.index(kind) if kind in KINDS else 99, RAMPS.index(ramp) if ramp in RAMPS else 99)


def label_of(arm: str) -> str:
    if arm == "fixed":
        return "fixed logical batch"
    kind, ramp = _split(arm)
    return f"{KIND_LABELS.get(kind, kind)}, {RAMP_LABELS.get(ramp, ramp)}"


def _curve(folder: Path, row: dict) -> list[dict]:
    path = folder / str(row["run_id"]) / "curve.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def summarise(rows: list[dict], folder: Path | None = None) -> dict:
    """Per arm: seeds, mean final loss, updates; per ramp arm: its final loss minus the fixed run's of the same seed,
    relative to the fixed run's (mean, se, seeds), and, from the curves (with ``folder``), the updates it took to
    reach the fixed run's final loss as a fraction of the fixed run's updates (mean, se, seeds reaching it)."""
    by_arm: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_arm.setdefault(arm_of(r), {})[int(r["seed"])] = r
    fixed = by_arm.get("fixed", {})
    # "updates to the fixed loss" reads the curve, which must be the final loss's own quantity (the MLP's curve is
    # the held-out loss and ends at it; the MDM's is the training ELBO, another number)
    comparable = folder is not None and bool(fixed) and all(
        (c := _curve(folder, r)) and math.isclose(c[-1]["loss"], final_loss(r), rel_tol=1e-9)
        for r in fixed.values())
    out: dict = {"arms": {}, "curve_is_final_loss": comparable}
    for arm, runs in sorted(by_arm.items(), key=lambda kv: _order(kv[0])):
        losses = [final_loss(r) for r in runs.values()]
        entry = {"seeds": len(runs), "final_loss": mean_se(losses)[:2],
                 "updates": statistics.fmean(float(r["updates"]) for r in runs.values())}
        if arm != "fixed" and fixed:
            seeds = [s for s in runs if s in fixed]
            entry["vs_fixed"] = paired([final_loss(runs[s]) for s in seeds],
                                       [final_loss(fixed[s]) for s in seeds]) if seeds else None
            kind, _ = _split(arm)
            rules_arm = f"{kind} rules".strip()
            rules = by_arm.get(rules_arm, {})
            if arm != rules_arm and rules:  # paired against the same schedule's rescaled ramp, relative to fixed
                c = [(final_loss(r) - final_loss(rules[s])) / final_loss(fixed[s]) for s, r in runs.items()
                     if s in rules and s in fixed]
                entry["vs_rules"] = mean_se(c) if c else None
            if comparable:
                fractions = []
                for s, r in runs.items():
                    if s not in fixed:
                        continue
                    target = final_loss(fixed[s])
                    hit = next((p["updates"] for p in _curve(folder, r) if "updates" in p and p["loss"] <= target),
                               None)
                    if hit is not None:
                        fractions.append(hit / float(fixed[s]["updates"]))
                entry["updates_to_fixed_loss"] = mean_se(fractions) if fractions else (None, None, 0)
        out["arms"][arm] = entry
    return out


def table(s: dict) -> str:
    width = max([8] + [len(a) for a in s["arms"]])
    lines = [f"{'arm':>{width}} {'seeds':>5} {'final loss':>11} {'updates':>8} {'vs fixed (paired)':>22} "
             f"{'vs the rescaled ramp':>22} {'updates to the fixed loss':>26}"]
    for arm, e in s["arms"].items():
        m, se = e["final_loss"]
        vs = e.get("vs_fixed")
        vs_text = f"{100 * vs[0]:+.2f}% +- {100 * vs[1]:.2f}" if vs and vs[1] is not None else ""
        u = e.get("updates_to_fixed_loss")
        u_text = (f"{100 * u[0]:.0f}% +- {100 * u[1]:.0f} ({u[2]}/{e['seeds']} seeds)" if u and u[0] is not None
                  and u[1] is not None else (f"not reached ({u[2]}/{e['seeds']})" if u else ""))
        vr = e.get("vs_rules")
        vr_text = f"{100 * vr[0]:+.2f}% +- {100 * vr[1]:.2f}" if vr and vr[1] is not None else ""
        lines.append(f"{arm:>{width}} {e['seeds']:>5} {m:>11.5f} {e['updates']:>8.0f} {vs_text:>22} {vr_text:>22} "
                     f"{u_text:>26}")
    if not s.get("curve_is_final_loss", True):
        lines.append("(updates to the fixed loss: not computed, the curve is not the final loss's quantity)")
    return "\n".join(lines)


def _bins(curve: list[dict], x: str, bins: int = 20) -> list[tuple[float, float]]:
    """(mean x, mean loss) in ``bins`` equal spans of the curve's points (a long noisy curve, e.g. a per-update
    training ELBO, becomes readable; a short one is kept as it is)."""
    if len(curve) <= 2 * bins:
        return [(p[x], p["loss"]) for p in curve]
    size = len(curve) / bins
    chunks = [curve[int(i * size):int((i + 1) * size)] for i in range(bins)]
    return [(statistics.fmean(p[x] for p in c), statistics.fmean(p["loss"] for p in c)) for c in chunks if c]


def figure(rows: list[dict], folder: Path, out: Path, name: str) -> list[Path]:
    """The runs' curves vs the clock and vs updates per arm (mean over seeds; long curves averaged in 20 spans)."""
    fig, axes = plt.subplots(1, 2, figsize=(6.8, 2.7), sharey=True)
    by_arm: dict[str, list[list[dict]]] = {}
    for r in rows:
        c = _curve(folder, r)
        if c:
            by_arm.setdefault(arm_of(r), []).append(c)
    clock = "tokens" if any("tokens" in c[0] for cs in by_arm.values() for c in cs) else "samples"
    for arm in sorted(by_arm, key=_order):
        curves = by_arm[arm]
        kind, ramp = _split(arm) if arm != "fixed" else ("", "fixed")
        for ax, x in zip(axes, (clock, "updates")):
            binned = [_bins(c, x) for c in curves]
            n = min(len(b) for b in binned)
            xs = [statistics.fmean(b[i][0] for b in binned) for i in range(n)]
            ys = [statistics.fmean(b[i][1] for b in binned) for i in range(n)]
            ax.plot(xs, ys, color=COLORS.get(ramp, "#999999"), lw=1.6 if arm == "fixed" else 1.1,
                    ls=STYLES.get(kind, "-"), label=f"{label_of(arm)} ({len(curves)} seeds)")
    for ax, x in zip(axes, (clock, "updates")):
        ax.set_xlabel(f"{x} seen")
        ax.set_yscale("log")
    axes[1].set_xscale("log")
    axes[0].xaxis.set_major_formatter(EngFormatter(sep=""))  # 10k, 1M: long counts do not overlap
    axes[0].set_ylabel("the runs' loss curve (mean over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.06))
    return save_figure(fig, out, f"{name}_ramp")


def main(argv: list[str] | None = None) -> dict:
    args, folder, rows = read_sweep(argv, __doc__)
    s = summarise(rows, folder)
    print(table(s))
    paths = figure(rows, folder, Path(args.out), folder.name)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(json.dumps({a: e.get("vs_fixed") for a, e in s["arms"].items()}))
    return s


if __name__ == "__main__":
    main()
