"""`sdebatch sweep run --backend submitit` through submitit's local executor (real processes, as on a machine without
SLURM): the same run folders and metrics as the local backend, a half-finished sweep resumed without running a
finished run twice, a failed run reported by a non-zero exit, and the sweep file's [submitit] table passed to the
executor."""
import json
import os
from pathlib import Path

import pytest

from sdebatch import sweep
from sdebatch.cli import main

submitit = pytest.importorskip("submitit")

WORKLOAD = '''
import json
import os
from pathlib import Path


def toy(config, progress=True, run_dir=None):
    """A known function of the config; every call is logged (to count them) beside the sweep folders."""
    with open(Path(run_dir).parents[1] / "calls.jsonl", "a") as f:
        f.write(json.dumps({"pb": config["physical_batch_size"], "rule": config["rule"], "pid": os.getpid()}) + "\\n")
    if config["physical_batch_size"] == config.get("fail_at"):
        raise RuntimeError("boom at " + str(config["fail_at"]))
    (Path(run_dir) / "weights.txt").write_text(str(config["physical_batch_size"]))
    loss = config["physical_batch_size"] / 100 + (0.5 if config["rule"] == "naive" else 0.0)
    return {"final_loss": loss, "updates": 64 // config["physical_batch_size"],
            "curve": [{"samples": 32, "loss": 2 * loss}, {"samples": 64, "loss": loss}]}
'''


def _sweep_file(tmp_path: Path, *, base: str = "", table: str = 'cluster = "local"\ntimeout_min = 5') -> Path:
    (tmp_path / "toy.py").write_text(WORKLOAD)
    path = tmp_path / "toy.toml"
    path.write_text(f'''
name = "toy"
workload = "toy.py:toy"
[base]
logical_batch_size = 16
samples = 64
{base}
[grid]
physical_batch_size = [8, 16]
rule = ["naive", "sqrt_exact"]
[submitit]
{table}
''')
    return path


def _calls(out: Path) -> list[dict]:
    path = out / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _runs(folder: Path) -> dict[str, dict]:
    """Each run folder's files, the wall clock left out (the one number that may differ)."""
    out = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("wall_clock_s")
        out[run.name] = {"metrics": metrics, "config": json.loads((run / "config.json").read_text()),
                         "curve": (run / "curve.csv").read_text(), "weights": (run / "weights.txt").read_text()}
    return out


def test_submitit_writes_the_runs_the_local_backend_writes(tmp_path):
    path = _sweep_file(tmp_path)
    local = sweep.run_sweep(path, tmp_path / "local", progress=False)
    remote = sweep.run_sweep(path, tmp_path / "submitit", backend="submitit", progress=False)
    a, b = _runs(tmp_path / "local" / "toy"), _runs(tmp_path / "submitit" / "toy")
    assert len(a) == 4 and a == b
    assert sorted(m["run_id"] for m in remote) == sorted(m["run_id"] for m in local) == sorted(a)
    # the runs ran in other processes than this one, each once
    calls = _calls(tmp_path / "submitit")
    assert len(calls) == 4 and len({(c["pb"], c["rule"]) for c in calls}) == 4
    assert all(c["pid"] != os.getpid() for c in calls)
    assert (tmp_path / "submitit" / "toy" / "_submitit").is_dir()  # submitit's logs, beside the runs


def test_a_half_finished_sweep_resumes_without_running_a_finished_run_twice(tmp_path, capsys):
    path = _sweep_file(tmp_path)
    out = tmp_path / "runs"
    sweep.run_sweep(path, out, max_runs=2, progress=False)  # stopped after two runs
    first = _calls(out)
    assert len(first) == 2
    results = sweep.run_sweep(path, out, backend="submitit", progress=False)
    assert "submitted 2 jobs via local" in capsys.readouterr().out
    calls = _calls(out)
    assert len(calls) == 4 and calls[:2] == first
    assert len({(c["pb"], c["rule"]) for c in calls}) == 4  # the two finished runs were not run again
    assert len(results) == 4 and len({m["run_id"] for m in results}) == 4  # finished and new runs, as locally
    sweep.run_sweep(path, out, backend="submitit", progress=False)  # nothing left: nothing submitted
    assert len(_calls(out)) == 4 and "submitted" not in capsys.readouterr().out


def test_a_failed_run_is_reported_with_a_nonzero_exit(tmp_path, capsys):
    path = _sweep_file(tmp_path, base="fail_at = 16")
    out = tmp_path / "runs"
    code = main(["sweep", "run", str(path), "--out", str(out), "--backend", "submitit"])
    captured = capsys.readouterr()
    assert code == 1
    failed = sweep.failed_runs(path, out)
    assert len(failed) == 2 and all("pb16" in rid for rid in failed)  # both rules at 16
    assert "2 run(s) failed" in captured.err and all(rid in captured.err for rid in failed)
    for rid in failed:
        assert "RuntimeError: boom at 16" in (out / "toy" / f"{rid}.error.txt").read_text()
        assert f"{rid} failed" in captured.out
    assert len(_runs(out / "toy")) == 2  # the runs at 8 finished
    # the failed runs are retried by the next invocation (and fail again here)
    assert main(["sweep", "run", str(path), "--out", str(out), "--backend", "submitit"]) == 1
    assert sorted((c["pb"], c["rule"]) for c in _calls(out)) == sorted(
        [(8, "naive"), (8, "sqrt_exact")] + 2 * [(16, "naive"), (16, "sqrt_exact")])


def test_the_submitit_table_goes_to_the_executor(tmp_path, monkeypatch):
    made, updates = [], []
    original_init, original_update = submitit.AutoExecutor.__init__, submitit.AutoExecutor.update_parameters

    def init(self, folder, cluster=None, **kw):
        made.append({"folder": Path(folder), "cluster": cluster})
        original_init(self, folder, cluster=cluster, **kw)

    def update(self, **kw):
        updates.append(kw)
        original_update(self, **kw)

    monkeypatch.setattr(submitit.AutoExecutor, "__init__", init)
    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters", update)
    table = 'cluster = "local"\ntimeout_min = 7\ncpus_per_task = 1\nslurm_partition = "gpu"\nname = "toy"'
    path = _sweep_file(tmp_path, table=table)
    assert len(sweep.run_sweep(path, tmp_path / "runs", backend="submitit", progress=False)) == 4
    assert made == [{"folder": tmp_path / "runs" / "toy" / "_submitit", "cluster": "local"}]
    assert updates == [{"timeout_min": 7, "cpus_per_task": 1, "slurm_partition": "gpu", "name": "toy"}]


@pytest.mark.parametrize("table, needle", [
    ('timeout_mins = 5', "submitit does not accept the [submitit] table {'timeout_mins': 5}"),
    ('cluster = "local"\ntimeout_min = "soon"', "submitit does not accept the [submitit] table"),
    ('cluster = "moon"', "submitit does not accept the [submitit] table {'cluster': 'moon'}"),
])
def test_a_table_submitit_refuses_is_named_before_any_job(tmp_path, capsys, table, needle):
    path = _sweep_file(tmp_path, table=table)
    with pytest.raises(SystemExit) as e:
        main(["sweep", "run", str(path), "--out", str(tmp_path / "runs"), "--backend", "submitit"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and str(path) in err
    assert _calls(tmp_path / "runs") == []
