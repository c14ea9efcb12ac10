"""All overhead benchmarks in one command (``make bench``): the wrapper against a hand-written loop, the noise-scale
estimator against the wrapper without it, and the Lightning trainer against a plain loop. Each is a ratio measured
in one process with the two sides interleaved (see each module); this writes ``benchmarks/results/bench.json``
(the device, the date, each ratio with its spread and target) and prints the README's table.

    python -m benchmarks.run [--quick] [--data data/tiny]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from sdebatch.utils import atomic_write

from . import trainer_throughput, wrapper_overhead

RESULTS = Path(os.environ.get("SDEBATCH_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def summarise(wrapper: dict, trainer: dict | None) -> list[dict]:
    """One row per measurement: name, ratio, spread, target, whether it meets it (lower is better but for the
    trainer)."""
    rows = []
    labels = {"accumulate": "wrapper / hand-written loop, 4 micro-steps per update",
              "rescale": "wrapper / hand-written loop, rescaling every micro-step (kappa 0.25)",
              "noise_scale": "noise-scale estimator on / off, every window",
              "noise_every4": "noise-scale estimator on / off, one window in 4"}
    for name, c in wrapper["cases"].items():
        rows.append({"name": name, "what": labels.get(name, name), "ratio": c["median_ratio"],
                     "min": min(c["ratios"]), "max": max(c["ratios"]), "repeats": len(c["ratios"]),
                     "target": f"<= {c['target']}", "met": c["median_ratio"] <= c["target"]})
    if trainer is not None:
        rows.append({"name": "trainer", "what": "Lightning MDM trainer / plain loop, update by update (throughput)",
                     "ratio": trainer["ratio"], "min": trainer["ratio_min"], "max": trainer["ratio_max"],
                     "repeats": len(trainer["ratios"]), "target": f">= {trainer['target']}",
                     "met": trainer["ratio"] >= trainer["target"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| measurement | ratio (median) | min..max | repeats | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['ratio']:.3f} | {r['min']:.3f}..{r['max']:.3f} | {r['repeats']} | "
                     f"{r['target']} | {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    ap.add_argument("--data", default="data/tiny", help="prepared data folder for the trainer benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trainer", action="store_true", help="skip the trainer benchmark (no data folder)")
    args = ap.parse_args(argv)
    if not args.no_trainer and not (Path(args.data) / "index.json").exists():
        raise SystemExit(f"no prepared data in {args.data}: run `sdebatch data prepare --preset tiny --out "
                         f"{args.data}` (or pass --no-trainer)")
    wrapper = wrapper_overhead.main(["--threads", str(args.threads)] + (["--quick"] if args.quick else []))
    trainer = None
    if not args.no_trainer:
        trainer = trainer_throughput.main(["--data", args.data, "--threads", str(args.threads)]
                                          + (["--model", "micro", "--tokens", "3000", "--repeats", "2",
                                              "--physical", "2", "--logical", "4"] if args.quick else []))
    rows = summarise(wrapper, trainer)
    result = {"date": datetime.date.today().isoformat(), "device": device_name(), "torch": torch.__version__,
              "quick": args.quick, "rows": rows}
    out = RESULTS / ("bench.quick.json" if args.quick else "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"\n{result['date']}, {result['device']}, torch {result['torch']}\n{table(rows)}\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
