"""The GPU check, run by ``benchmarks/gpu_check.sh``: each step in its own process with a time limit, one
JSON of results. Steps: the CUDA tests (the sync test under ``set_sync_debug_mode("error")``, fused / compiled
steps), the overhead benchmarks on CUDA (``benchmarks.run``), the MFU of the Lightning MDM trainer for the ``320m``
config with bf16 and torch.compile (``benchmarks.trainer_throughput``), and a 1-device FSDP smoke run of
``sdebatch train``. A step that fails or runs out of time is recorded and the next one still runs; the whole check
stops starting steps after ``--budget`` seconds.

``--cpu``: the same steps at smoke sizes on the CPU (no compile, no bf16, the "auto" strategy), which is how the test
suite checks the script where there is no GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdebatch.utils import atomic_write


def steps(py: str, data: str, cpu: bool, results: Path) -> list[tuple[str, list[str], int, Path | None]]:
    """(name, command, time limit in s, JSON it writes or None)."""
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    if cpu:
        return [
            ("cuda_tests", pytest + ["tests/test_syncs.py"], 120, None),
            ("bench", [py, "-m", "benchmarks.run", "--quick", "--no-trainer"], 300, results / "bench.quick.json"),
            ("mfu", [py, "-m", "benchmarks.trainer_throughput", "--data", data, "--model", "micro", "--tokens",
                     "3000", "--repeats", "1", "--physical", "2", "--logical", "4"], 300,
             results / "trainer_throughput.json"),
            ("fsdp_smoke", [py, "-m", "sdebatch.cli", "train", "--set", f'data="{data}"', 'model="micro"',
                            "tokens=3000", "logical_batch_size=4", "physical_batch_size=2", "val_sequences=0",
                            'out=""', 'strategy="auto"'], 300, None),
        ]
    return [
        ("cuda_tests", pytest + ["tests/test_syncs.py", "tests/test_fused.py", "tests/test_rescale.py",
                                 "tests/test_accumulation.py"], 150, None),
        ("bench", [py, "-m", "benchmarks.run", "--data", data, "--threads", "8"], 150, results / "bench.json"),
        ("mfu", [py, "-m", "benchmarks.trainer_throughput", "--data", data, "--model", "320m", "--precision",
                 "bf16-mixed", "--compile", "--physical", "16", "--logical", "64", "--tokens", "3000000",
                 "--repeats", "1", "--threads", "8"], 210, results / "trainer_throughput.json"),
        ("fsdp_smoke", [py, "-m", "sdebatch.cli", "train", "--set", f'data="{data}"', 'model="tiny"',
                        "tokens=200000", "logical_batch_size=32", "physical_batch_size=16", "val_sequences=0",
                        'out=""', 'strategy="fsdp"', "devices=1", 'precision="bf16-mixed"'], 90, None),
    ]


def run_step(name: str, cmd: list[str], limit: int, env: dict) -> dict:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (
            e.stdout or "")
    seconds = time.monotonic() - start
    print(f"[gpu_check] {name}: rc {rc}, {seconds:.0f}s", flush=True)
    return {"command": " ".join(cmd), "rc": rc, "seconds": round(seconds, 1), "log_tail": out[-3000:]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--data", default="data/tiny")
    ap.add_argument("--cpu", action="store_true", help="smoke sizes on the CPU (the test suite's check)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds after which no step starts (default 480)")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu for the smoke sizes")
    start = time.monotonic()
    results = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = {**os.environ, "SDEBATCH_BENCH_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_mode": args.cpu, "steps": {}}
    for name, cmd, limit, produced in steps(sys.executable, args.data, args.cpu, results):
        left = args.budget - (time.monotonic() - start)
        if left <= 10:
            report["steps"][name] = {"rc": "not started", "reason": f"the {args.budget:.0f} s budget is spent"}
            continue
        step = run_step(name, cmd, int(min(limit, left)), env)
        if produced is not None and produced.exists():
            step["result"] = json.loads(produced.read_text())
        report["steps"][name] = step
    report["seconds"] = round(time.monotonic() - start, 1)
    report["passed"] = all(s.get("rc") == 0 for s in report["steps"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"[gpu_check] {'all steps passed' if report['passed'] else 'some steps failed'} in {report['seconds']}s; "
          f"wrote {out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
