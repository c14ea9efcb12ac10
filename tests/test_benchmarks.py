"""The benchmark tooling, not timings: the summary table of `make bench`, the GPU check's orchestration
(every step's command names files and modules that exist; a failing or late step is recorded, the rest still run;
one JSON), and the GPU check script end to end at its CPU smoke sizes (slow)."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_summary_marks_each_target():
    from benchmarks.run import summarise, table

    wrapper = {"cases": {"accumulate": {"median_ratio": 1.004, "ratios": [0.99, 1.004, 1.02], "target": 1.01},
                         "noise_scale": {"median_ratio": 1.06, "ratios": [1.05, 1.06, 1.07], "target": 1.02}}}
    trainer = {"ratio": 0.975, "ratio_min": 0.95, "ratio_max": 0.99, "ratios": [0.95, 0.975, 0.99, 0.97, 0.98],
               "target": 0.98}
    rows = summarise(wrapper, trainer)
    assert [(r["name"], r["met"]) for r in rows] == [("accumulate", True), ("noise_scale", False), ("trainer", False)]
    text = table(rows)
    assert ("| Lightning MDM trainer / plain loop, update by update (throughput) | 0.975 | 0.950..0.990 | 5 | >= 0.98 "
            "| no |") in text



def test_noise_variance_estimators_invert_noise_of_exact_size():
    """Fed micro-batch gradients G + e_i with the e_i orthogonal to G and to each other and |e_i|^2 = tr(Sigma) / b,
    every squared norm equals its expectation (|G|^2 + tr(Sigma) / n), so each estimator of the Monte Carlo returns
    |G|^2 and tr(Sigma) exactly: any difference in its table is variance, not bias."""
    import torch

    from benchmarks.noise_variance import ESTIMATORS, per_window

    b, k, g2, trace = 4, 8, 3.0, 120.0
    micro = torch.zeros(1, k, k + 1, dtype=torch.float64)
    micro[0, :, 0] = g2 ** 0.5
    micro[0, torch.arange(k), torch.arange(1, k + 1)] = (trace / b) ** 0.5
    for name in ESTIMATORS:
        got_g2, got_trace = per_window(micro, b, name)
        assert torch.allclose(got_g2, torch.tensor([g2], dtype=torch.float64), rtol=1e-12), name
        assert torch.allclose(got_trace, torch.tensor([trace], dtype=torch.float64), rtol=1e-12), name


def test_trainer_benchmark_times_the_same_micro_batches_on_both_sides(micro_data, tmp_path, monkeypatch):
    """Both clocks start after the first update and stop at the update that reaches the budget, so each pair times
    the same tokens (equal work; a ratio of unequal work would be a bias, not an overhead)."""
    from benchmarks import trainer_throughput

    monkeypatch.setattr(trainer_throughput, "RESULTS", tmp_path)
    r = trainer_throughput.main(["--data", str(micro_data[0]), "--model", "micro", "--tokens", "2000",
                                 "--repeats", "2", "--physical", "2", "--logical", "6"])
    plain = [x["tokens"] for x in r["rows"] if x["name"] == "plain"]
    trainer = [x["tokens"] for x in r["rows"] if x["name"] == "trainer"]
    assert plain == trainer and min(plain) > 0 and len(plain) == 2
    assert (tmp_path / "trainer_throughput.json").exists()


@pytest.mark.parametrize("cpu", [True, False])
def test_gpu_check_steps_name_what_exists(cpu, tmp_path):
    from benchmarks.gpu_check import steps

    for name, cmd, limit, produced in steps(sys.executable, "data/tiny", cpu, tmp_path):
        assert 0 < limit <= 300, name
        module = cmd[cmd.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, (name, module)
        for arg in cmd:
            if arg.startswith("tests/"):
                assert (ROOT / arg).exists(), arg
    gpu = {name: cmd for name, cmd, _, _ in steps("py", "d", False, tmp_path)}
    assert {"--model", "320m", "--precision", "bf16-mixed", "--compile"} <= set(gpu["mfu"])
    assert 'strategy="fsdp"' in gpu["fsdp_smoke"] and "devices=1" in gpu["fsdp_smoke"]
    assert sum(limit for _, _, limit, _ in steps("py", "d", False, tmp_path)) <= 600  # 8 minutes with the set-up


def test_gpu_check_records_failures_and_its_budget(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    calls = []

    def fake(name, cmd, limit, env):
        calls.append((name, limit))
        return {"command": " ".join(cmd), "rc": 1 if name == "bench" else 0, "seconds": 0.0, "log_tail": ""}

    monkeypatch.setattr(gpu_check, "run_step", fake)
    out = tmp_path / "check.json"
    report = gpu_check.main(["--cpu", "--out", str(out), "--data", "d"])
    assert [c[0] for c in calls] == ["cuda_tests", "bench", "mfu", "fsdp_smoke"]  # a failure does not stop the rest
    assert report["passed"] is False and report["steps"]["bench"]["rc"] == 1
    assert json.loads(out.read_text())["steps"].keys() == report["steps"].keys()
    report = gpu_check.main(["--cpu", "--out", str(out), "--data", "d", "--budget", "5"])
    assert {s["rc"] for s in report["steps"].values()} == {"not started"}


@pytest.mark.slow
def test_gpu_check_script_runs_its_cpu_steps(micro_data, tmp_path):
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_CPU": "1",
           "GPU_CHECK_DATA": str(micro_data[0])}
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, {k: (v["rc"], v.get("log_tail", "")[-500:]) for k, v in report["steps"].items()}
    assert report["cpu_mode"] and report["passed"]
    assert report["steps"]["mfu"]["result"]["ratio"] > 0 and report["steps"]["bench"]["result"]["rows"]
