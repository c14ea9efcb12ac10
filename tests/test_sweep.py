"""The sweep runner: grid expansion, dry run, resumable after a kill, atomic run folders, divergence and failures."""
import math
import json

import pytest
import torch

from sdebatch import sweep

CALLS = []


def fake(config, progress=True):
    """A workload whose result is a known function of its config (so the collected table can be checked)."""
    CALLS.append(dict(config))
    if config.get("fail"):
        raise RuntimeError("boom")
    loss = float("nan") if config["physical_batch_size"] == 999 else config["physical_batch_size"] / 100
    return {"final_loss": loss, "curve": [{"samples": 1, "loss": loss}], "nested": {"a": 1}}


def write_sweep(tmp_path, extra=""):
    path = tmp_path / "s.toml"
    path.write_text(f'''
name = "mini"
workload = "test_sweep:fake"
[base]
logical_batch_size = 32
samples = 64
[grid]
physical_batch_size = [8, 32, 999]
rule = ["naive", "sqrt_exact"]
{extra}
''')
    return path


def test_expand_and_ids_are_stable(tmp_path):
    spec = sweep.load_sweep(write_sweep(tmp_path))
    configs = sweep.expand(spec)
    assert len(configs) == 6 and len({sweep.run_id(c) for c in configs}) == 6
    assert sweep.run_id(dict(reversed(list(configs[0].items())))) == sweep.run_id(configs[0])


def test_an_axis_of_arms_merges_each_table_into_the_run(tmp_path):
    """A grid list of tables is an axis of arms: seed-major order, the same configs (and ids) as listing them."""
    path = tmp_path / "arms.toml"
    path.write_text('''name = "arms"
workload = "x.py:f"
[base]
logical_batch_size = 4
[grid]
seed = [0, 1]
arm = [{physical_batch_size = 4, rule = "accumulate"}, {physical_batch_size = 16, rule = "naive"}]
''')
    configs = sweep.expand(sweep.load_sweep(path))
    assert configs == [{"logical_batch_size": 4, "seed": s, **arm} for s in (0, 1)
                       for arm in ({"physical_batch_size": 4, "rule": "accumulate"},
                                   {"physical_batch_size": 16, "rule": "naive"})]
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(path.read_text().replace('arm = [{', 'arm = [3, {'))
    with pytest.raises(ValueError, match="values or tables"):
        sweep.load_sweep(mixed)


def test_kill_and_resume_runs_each_config_once(tmp_path, capsys):
    CALLS.clear()
    path = write_sweep(tmp_path)
    sweep.run_sweep(path, tmp_path / "runs", dry_run=True)
    assert CALLS == [] and "6 to run" in capsys.readouterr().out
    sweep.run_sweep(path, tmp_path / "runs", max_runs=2, progress=False)  # "killed" after two runs
    assert len(CALLS) == 2
    # a run killed mid-way leaves only a hidden temporary folder, which is not a finished run; the next invocation
    # deletes it once its process is gone (pid 1 is alive: kept; a pid past the kernel's limit is not: removed)
    (tmp_path / "runs" / "mini" / ".half.tmp-1").mkdir()
    (tmp_path / "runs" / "mini" / ".dead.tmp-4194305").mkdir()
    sweep.run_sweep(path, tmp_path / "runs", progress=False)
    assert (tmp_path / "runs" / "mini" / ".half.tmp-1").exists()
    assert not (tmp_path / "runs" / "mini" / ".dead.tmp-4194305").exists()
    assert len(CALLS) == 6 and len({json.dumps(c, sort_keys=True) for c in CALLS}) == 6
    sweep.run_sweep(path, tmp_path / "runs", progress=False)
    assert len(CALLS) == 6  # everything finished: nothing reruns
    rows = sweep.collect(tmp_path / "runs" / "mini", tmp_path / "table.csv")
    assert len(rows) == 6
    by_pb = {(r["physical_batch_size"], r["rule"]): r for r in rows}
    assert by_pb[(8, "naive")]["final_loss"] == 0.08 and by_pb[(8, "naive")]["nested.a"] == 1
    assert by_pb[(999, "naive")]["diverged"] is True and by_pb[(32, "naive")]["diverged"] is False
    assert (tmp_path / "table.csv").read_text().count("\n") == 7
    run_dir = tmp_path / "runs" / "mini" / sweep.run_id(CALLS[0])
    assert (run_dir / "curve.csv").exists() and json.loads((run_dir / "config.json").read_text())["sweep"] == "mini"


def test_parallel_jobs_write_the_same_runs_as_one_after_another(tmp_path):
    """jobs=2 (two spawned worker processes) finishes every run into the same folders, with the same results, as the
    sequential runner; a failing run is recorded and does not stop the others; jobs must be a positive integer."""
    path = write_sweep(tmp_path, extra='[[runs]]\nphysical_batch_size = 16\nrule = "naive"\nfail = true\n')
    sweep.run_sweep(path, tmp_path / "seq", progress=False)
    sweep.run_sweep(path, tmp_path / "par", progress=False, jobs=2)
    seq, par = (sorted(sweep.collect(tmp_path / d / "mini"), key=lambda r: r["run_id"]) for d in ("seq", "par"))
    assert len(par) == 6 and [r["run_id"] for r in par] == [r["run_id"] for r in seq]
    for a, b in zip(seq, par):
        a.pop("wall_clock_s"), b.pop("wall_clock_s")
        assert a == b
    assert len(list((tmp_path / "par" / "mini").glob("*.error.txt"))) == 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="jobs must be a positive integer"):
            sweep.run_sweep(path, tmp_path / "par", jobs=bad)


def test_failed_run_is_recorded_and_retried(tmp_path):
    CALLS.clear()
    path = write_sweep(tmp_path, extra='[[runs]]\nphysical_batch_size = 16\nrule = "naive"\nfail = true\n')
    sweep.run_sweep(path, tmp_path / "runs", progress=False)
    errors = list((tmp_path / "runs" / "mini").glob("*.error.txt"))
    assert len(errors) == 1 and "boom" in errors[0].read_text()
    n = len(CALLS)
    sweep.run_sweep(path, tmp_path / "runs", progress=False)
    assert len(CALLS) == n + 1  # only the failed run is tried again


@pytest.mark.parametrize("text,needle", [
    ('workload = "x:y"\n', "name"),
    ('name = "a"\nworkload = "nocolon"\n', "module:function"),
    ('name = "a"\nworkload = "x:y"\n[grid]\nb = []\n', "non-empty lists"),
    ('name = "a"\nworkload = "x:y"\n[grid\n', "cannot read"),
])
def test_bad_sweep_files(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=None) as e:
        sweep.load_sweep(path)
    assert needle in str(e.value)


def test_quadratic_workload_rules_and_errors():
    from experiments.workloads import quadratic

    base = dict(optimizer="adam", lr=0.01, logical_batch_size=8, samples=512, replicas=16, dim=4)
    logical = quadratic({**base, "physical_batch_size": 8, "rule": "sqrt_exact"})
    exact = quadratic({**base, "physical_batch_size": 2, "rule": "accumulate"})  # accumulation = the logical run
    assert exact["curve"] == logical["curve"] and logical["kappa"] == 1.0
    naive = quadratic({**base, "physical_batch_size": 2, "rule": "naive"})
    rescaled = quadratic({**base, "physical_batch_size": 2, "rule": "sqrt_exact"})
    assert rescaled["kappa"] == 0.25 and naive["final_loss"] != rescaled["final_loss"]
    # the loss is the exact quadratic: at 0 samples every run is at theta0 = 1, loss 0.5 sum h
    h = torch.logspace(0, -2, 4, dtype=torch.float64)
    assert naive["curve"][0] == {"samples": 0, "loss": pytest.approx(float(0.5 * h.sum()))}
    with pytest.raises(ValueError, match="rule must be one of"):
        quadratic({**base, "physical_batch_size": 2, "rule": "linear"})  # the linear rule is for SGD


def test_quadratic_workload_ramps():
    """The named schedules run through sde.simulate and take fewer updates than the fixed run; a clock:batch ramp
    equals sde.simulate called by hand; bad ramp configs are named."""
    import sdebatch
    from sdebatch import sde
    from experiments.workloads import quadratic

    base = dict(optimizer="adam", lr=0.02, logical_batch_size=8, physical_batch_size=4, rule="accumulate",
                samples=1024, replicas=8, dim=4, lr_schedule="cosine", max_batch_size=32)
    fixed = quadratic(base)
    assert fixed["updates"] == 128 and fixed["curve"][-1]["samples"] == 1024
    for spec in ("seesaw", "critical_batch_warmup"):
        # the warmup acts on a confident estimate (its lower 2-se bound): 64 replicas of a 16-dim problem give one
        r = quadratic({**base, "batch_schedule": spec, "ramp": "lr_only",
                       **({"replicas": 64, "dim": 16} if spec == "critical_batch_warmup" else {})})
        assert r["updates"] < fixed["updates"] and math.isfinite(r["final_loss"])
    r = quadratic({**base, "batch_schedule": "0:8, 512:16", "second_moment_rescale": True})
    sim = sde.simulate(sde.NoisyQuadratic(torch.logspace(0, -2, 4, dtype=torch.float64), 1.0, 1.0), "adam", 0.02, 8,
                       4, sde.sample_grid(1024, 64, multiple_of=4), seeds=8, lr_schedule=sdebatch.warmup_cosine(1024),
                       batch_schedule=sdebatch.batch_schedule("0:8, 512:16"), second_moment_rescale=True)
    assert r["final_loss"] == float(sim.loss_mean[-1]) and r["updates"] == 64 + 32
    for bad, needle in ((dict(batch_schedule="seesaw", rule="sqrt_exact"), "needs rule = 'accumulate'"),
                        (dict(batch_schedule="0:8, 10:0"), "entry 2"), (dict(lr_schedule="step"), "lr_schedule"),
                        (dict(batch_schedule="seesaw", ramp="all"), "ramp must be"),
                        (dict(second_moment_rescale="yes"), "second_moment_rescale")):
        with pytest.raises(ValueError, match=needle):
            quadratic({**base, **bad})


def checked(config, progress=True):
    return fake(config, progress)


def _check(config):
    if config["rule"] not in ("naive", "sqrt_exact"):
        raise ValueError(f"rule must be naive or sqrt_exact, got {config['rule']!r}")


checked.validate = _check


@pytest.mark.parametrize("extra,needle", [
    ('[[runs]]\nphysical_batch_size = 16\nrule = "sqrt_exakt"\n', "rule must be naive or sqrt_exact, got 'sqrt_exakt'"),
    ('[[runs]]\nphysical_batch_size = -8\nrule = "naive"\n', "physical_batch_size must be a positive int, got -8"),
    ('[[runs]]\nphysical_batch_size = true\nrule = "naive"\n', "physical_batch_size must be a positive int"),
])
def test_every_point_is_validated_before_the_first_run(tmp_path, extra, needle):
    """One bad point among valid ones: the sweep (and its dry run) fails before running anything, naming the run
    and the key."""
    CALLS.clear()
    path = write_sweep(tmp_path, extra=extra)
    path.write_text(path.read_text().replace("test_sweep:fake", "test_sweep:checked"))
    for dry in (True, False):
        with pytest.raises(ValueError, match="1 of 7 runs are invalid") as e:
            sweep.run_sweep(path, tmp_path / "runs", dry_run=dry, progress=False)
        assert needle in str(e.value) and "run 1 (" in str(e.value)  # explicit runs come first
    assert CALLS == [] and not (tmp_path / "runs" / "mini").exists()


def test_cli_exits_nonzero_when_a_run_failed(tmp_path, capsys, monkeypatch):
    from sdebatch.cli import main

    monkeypatch.syspath_prepend(str(tmp_path.parent))
    path = write_sweep(tmp_path, extra='[[runs]]\nphysical_batch_size = 16\nrule = "naive"\nfail = true\n')
    assert main(["sweep", "run", str(path), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed" in err and sweep.failed_runs(path, tmp_path / "runs")[0] in err
    ok = write_sweep(tmp_path)
    assert main(["sweep", "run", str(ok), "--out", str(tmp_path / "runs")]) == 0  # the 6 good runs: done, exit 0


def test_one_preset_vocabulary_everywhere():
    """The MDM trainer, the workloads and the figures read the presets of sdebatch.presets; a preset opts in to
    reparameterize exactly when one update is taken per physical batch (the wrapper and the callback alike)."""
    import experiments.workloads as workloads
    from sdebatch import presets
    from sdebatch.figures import batch_ablation
    from sdebatch.mdm import train

    assert set(presets.LABELS) == set(presets.PRESETS) and batch_ablation.LABELS is presets.LABELS
    assert not hasattr(train, "RULES") and not hasattr(workloads, "RULES")
    for name, kw in presets.PRESETS.items():
        assert workloads.wrapper_kwargs({"rule": name}) == kw
        assert kw.get("reparameterize", False) == (name != "accumulate")
    assert workloads.wrapper_kwargs({"rule": "sqrt_exact", "optimizer": "sgd"})["rule"] == "sgd"
    assert presets.update_batch("accumulate", 4, 16) == 4 and presets.update_batch("naive", 4, 16) == 16
    assert presets.kappa("accumulate", 4, 16) == 1.0 and presets.kappa("sqrt_exact", 4, 16) == 4.0
    with pytest.raises(ValueError, match="rule must be one of naive, accumulate, linear, sqrt_exact, sqrt_linear"):
        presets.check("sqrt")


def test_workload_by_file_path_imports_its_package_without_touching_sys_path(tmp_path, monkeypatch):
    import sys

    pkg = tmp_path / "proj" / "mypkg"
    (pkg / "sweeps").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("K = 3\n")
    (pkg / "work.py").write_text("from mypkg import helper\nfrom . import helper as h2\n\n"
                                 "def run(config, progress=True):\n    return {'final_loss': helper.K * h2.K}\n")
    monkeypatch.chdir(tmp_path)  # neither the project nor its package is on sys.path or the working directory
    before = list(sys.path)
    try:
        fn = sweep.load_workload("../work.py:run", base=pkg / "sweeps")
        assert fn({})["final_loss"] == 9 and sys.path == before
        assert sys.modules["mypkg.work"].run is fn
        assert sweep.load_workload("proj/mypkg/work.py:run") is fn  # from the working directory, the same module
        with pytest.raises(ValueError, match="no file nothere.py"):
            sweep.load_workload("nothere.py:run", base=pkg)
        with pytest.raises(ValueError, match="has no attribute 'nope'"):
            sweep.load_workload("../work.py:nope", base=pkg / "sweeps")
    finally:
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]


def grow(config: dict, progress: bool = True) -> dict:
    """A workload whose curve gains a column mid-run (as the MDM's noise-scale columns do)."""
    return {"final_loss": 1.0, "curve": [{"samples": 1, "loss": 2.0}, {"samples": 2, "loss": 1.5, "noise_g2": 0.3}]}


def test_a_curve_whose_points_gain_keys_is_written_whole(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\nworkload = "test_sweep:grow"\n[base]\nseed = 0\n')
    sweep.run_sweep(path, tmp_path / "runs", progress=False)
    (run,) = (tmp_path / "runs" / "g").glob("*/curve.csv")
    assert run.read_text().splitlines() == ["samples,loss,noise_g2", "1,2.0,", "2,1.5,0.3"]
