"""The MDM's answer at kappa 4 and 16, resolved with seeds: the paired table, the knee with its bracket, B_simple.

Reads a sweep folder of ``experiments/sweeps/mdm_seeds.toml`` (or its collected CSV) and prints, per batch per update:
each rule's paired deviation from the logical run of the same seed and the no-rescaling - square-root contrast (mean
+- standard error over seeds, the seed count, the paired spread, and the seeds a standard error of 0.5% would take,
(sd / 0.5%)^2), the held-out estimator's own error of each difference, the knee of the square-root rule (the first
batch whose paired deviation exceeds 2 se and 1%) bracketed by the largest batch shown to stay within 1% (its upper
2-se bound below it), and the end-of-run B_simple probe of the logical runs. Trains nothing.

    python -m paper_figures.mdm_seeds runs/mdm_seeds [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from sdebatch.figures import batch_ablation
from sdebatch.stats import paired
from sdebatch.sweep import collect
from sdebatch.utils import atomic_write

TARGET_SE = 0.005


def _by_seed(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["rule"], int(r["physical_batch_size"])), {})[int(r["seed"])] = float(r["final_loss"])
    return out


def analyse(rows: list[dict], folder: Path | None = None, tolerance: float = 0.01) -> dict:
    """The table's numbers from a sweep's rows (as :func:`sdebatch.sweep.collect` returns them)."""
    summary = batch_ablation.summarise(rows, tolerance=tolerance, folder=folder)
    cells = _by_seed(rows)
    lb = summary["logical_batch_size"]
    logical = cells.get(("accumulate", lb), {})
    batches = sorted({b for (_, b) in cells if b != lb})
    table = []
    for b in batches:
        row = {"batch": b, "kappa": b / lb}
        for name, a, ref in (("sqrt_exact - logical", cells.get(("sqrt_exact", b), {}), logical),
                             ("naive - logical", cells.get(("naive", b), {}), logical),
                             ("naive - sqrt_exact", cells.get(("naive", b), {}), cells.get(("sqrt_exact", b), {}))):
            seeds = sorted(set(a) & set(ref))
            if len(seeds) < 2:
                continue
            m, se, n = paired([a[s] for s in seeds], [ref[s] for s in seeds])
            sd = se * math.sqrt(n)
            est = (summary.get("contrast_estimator_se") or {}).get(("naive", b)) if name == "naive - sqrt_exact" \
                else (summary.get("paired_estimator_se") or {}).get((name.split(" - ")[0], b))
            row[name] = {"mean": m, "se": se, "n": n, "sd": sd, "seeds_for_target": math.ceil((sd / TARGET_SE) ** 2),
                         "estimator_se": est}
        table.append(row)
    sqrt_rows = [(r["batch"], r.get("sqrt_exact - logical")) for r in table]
    within = [b for b, c in sqrt_rows if c and c["mean"] + 2 * c["se"] < tolerance]
    knee = summary["knee"].get("sqrt_exact")
    below = max((b for b in within if knee is None or b < knee), default=lb)
    probes = summary["noise_scales"]
    return {"table": table, "knee": knee, "knee_bracket": [below, knee], "tolerance": tolerance,
            "logical_batch_size": lb, "reference": summary["reference"],
            "reference_spread": summary["reference_spread"], "reference_runs": summary["reference_runs"],
            "b_simple_median": statistics.median(probes) if probes else None,
            "b_simple_quartiles": statistics.quantiles(probes, n=4) if len(probes) >= 4 else None,
            "b_simple_runs": len(probes), "estimator_se": summary["estimator_se"]}


def markdown(result: dict) -> str:
    """The table as Markdown (percentages of the logical run's held-out ELBO)."""
    lines = ["| batch per update (kappa) | contrast | mean +- se | seeds | paired sd | seeds for se 0.5% | "
             "estimator se |", "|---|---|---|---|---|---|---|"]
    for row in result["table"]:
        for name in ("sqrt_exact - logical", "naive - logical", "naive - sqrt_exact"):
            c = row.get(name)
            if not c:
                continue
            est = f"{100 * c['estimator_se']:.2f}%" if c["estimator_se"] is not None else "-"
            lines.append(f"| {row['batch']} ({row['kappa']:g}) | {name} | {100 * c['mean']:+.2f}% +- "
                         f"{100 * c['se']:.2f} | {c['n']} | {100 * c['sd']:.2f}% | {c['seeds_for_target']} | {est} |")
    lo, hi = result["knee_bracket"]
    lb = result["logical_batch_size"]
    knee = (f"the knee of the square-root rule lies in ({lo}, {hi}] samples per update (kappa {lo / lb:g} to "
            f"{hi / lb:g})" if hi else "no knee within the batches measured")
    q = result["b_simple_quartiles"]
    bs = (f"B_simple (end-of-run probe, median of {result['b_simple_runs']} logical runs) "
          f"{result['b_simple_median']:.0f} samples" + (f" (quartiles {q[0]:.0f}-{q[2]:.0f})" if q else "")
          if result["b_simple_median"] is not None else "no B_simple probe")
    return "\n".join(lines) + f"\n\n{knee}; {bs}; logical run {result['reference']:.4f} bits/token over " \
        f"{result['reference_runs']} seeds (seed-to-seed sd {100 * result['reference_spread']:.1f}%)."


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a sweep folder (runs/mdm_seeds) or its collected CSV")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    source = Path(args.source)
    if source.is_dir():
        rows, folder = collect(source), source
    else:
        import csv

        rows, folder = list(csv.DictReader(source.open())), None
    result = analyse(rows, folder)
    print(markdown(result))
    if args.json:
        atomic_write(Path(args.json), (json.dumps(result, indent=1, default=str) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
