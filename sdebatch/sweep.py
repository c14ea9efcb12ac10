"""Declarative, resumable sweeps: a small TOML file declares a base config and a grid; each run gets its own folder.

    name = "physical_batch"
    workload = "experiments.workloads:mlp"      # module:function(config, progress[, run_dir]) -> result dict
    [base]
    logical_batch_size = 32
    [grid]
    physical_batch_size = [4, 8, 16, 32, 64]
    rule = ["accumulate", "sqrt_exact", "naive"]

A run is the base updated with one point of the grid (the product of all grid lists, after any ``[[runs]]`` tables
listed explicitly). Its id is derived from its config, so a rerun of the sweep skips finished runs and a killed sweep
continues where it stopped. A run writes into a temporary folder that is renamed into place when complete: a folder
that exists is a finished run. A run whose loss goes nan/inf is recorded with ``diverged = true`` and the sweep goes
on; a run that raises is recorded as failed (its traceback in ``error.txt``) and retried by the next invocation.
A workload that takes a ``run_dir`` argument gets the run's (temporary) folder for its own files, e.g. weights; they
land in the run folder with the rest.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import shutil
import sys
import time
import tomllib
import traceback
from pathlib import Path
from typing import Any, Callable

from . import presets

__all__ = ["load_sweep", "expand", "validate", "failed_runs", "run_id", "run_sweep", "collect"]


def load_sweep(path: str | os.PathLike) -> dict:
    """Read and validate a sweep file (TOML)."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read sweep file {path}: {e}") from None
    for key in ("name", "workload"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ValueError(f"{path}: '{key}' must be a non-empty string")
    if ":" not in spec["workload"]:
        raise ValueError(f"{path}: workload must be 'module:function', got {spec['workload']!r}")
    grid = spec.get("grid", {})
    bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
    if bad:
        raise ValueError(f"{path}: grid entries must be non-empty lists, not {bad}")
    spec.setdefault("base", {})
    spec.setdefault("runs", [])
    spec["path"] = str(path)
    return spec


def expand(spec: dict) -> list[dict]:
    """All run configs of a sweep: the explicit runs first (usually the references, e.g. the logical runs: a partial
    sweep has its baselines, and slow reference runs do not finish alone at the end), then the base x grid product
    (duplicates removed, order kept)."""
    grid = spec.get("grid", {})
    keys = list(grid)
    configs = [{**spec["base"], **extra} for extra in spec.get("runs", [])]
    if grid or not spec.get("runs"):  # an empty grid with listed runs: only those (not the base as a run too)
        configs += [{**spec["base"], **dict(zip(keys, values))}
                    for values in itertools.product(*(grid[k] for k in keys))]
    seen, out = set(), []
    for c in configs:
        rid = run_id(c)
        if rid not in seen:
            seen.add(rid)
            out.append(c)
    return out


_POSITIVE_INTS = ("physical_batch_size", "logical_batch_size", "samples", "tokens")


def validate(spec: dict, configs: list[dict] | None = None) -> None:
    """Check every run of a sweep before any runs: batch sizes and budgets are positive ints, and the workload's own
    check passes (a workload function may carry ``fn.validate(config)``, raising ValueError). Raises one ValueError
    listing each bad point (its index, run id and the message, which names the key)."""
    configs = expand(spec) if configs is None else configs
    check = getattr(_workload(spec["workload"]), "validate", None)
    errors = []
    for i, c in enumerate(configs):
        try:
            for key in _POSITIVE_INTS:
                v = c.get(key)
                if key in c and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ValueError(f"{key} must be a positive int, got {v!r}")
            if check is not None:
                check(dict(c))
        except (ValueError, TypeError) as e:
            errors.append(f"  run {i + 1} ({run_id(c)}): {e}")
    if errors:
        raise ValueError(f"{spec.get('path', spec['name'])}: {len(errors)} of {len(configs)} runs are invalid, nothing "
                         "was run:\n" + "\n".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more"
                                                                   if len(errors) > 20 else ""))


def failed_runs(path: str | os.PathLike, out: str | os.PathLike = "runs") -> list[str]:
    """Run ids of a sweep that failed (an error file and no finished folder)."""
    spec = load_sweep(path)
    folder = Path(out) / spec["name"]
    return [rid for rid in map(run_id, expand(spec))
            if (folder / f"{rid}.error.txt").exists() and not (folder / rid / "metrics.json").exists()]


def run_id(config: dict) -> str:
    """A readable, stable id: the grid-relevant values plus a short hash of the whole config."""
    blob = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
    names = {"physical_batch_size": "pb", "logical_batch_size": "lb", "rule": "", "samples": "n", "tokens": "tok",
             "gamma": "g", "lr": "lr", "seed": "s", "init_seed": "si", "data_seed": "sd", "draw_seed": "sr"}
    short = "_".join(f"{names[k]}{config[k]}" for k in names if k in config)
    return f"{short}_{digest}" if short else digest


def _workload(ref: str) -> Callable[..., dict]:
    module, _, fn = ref.partition(":")
    if os.getcwd() not in sys.path:  # workloads live in the project (experiments/), run from its root
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"workload {ref!r} cannot be loaded: {e}") from None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _diverged(result: dict) -> bool:
    loss = result.get("final_loss")
    return loss is None or not math.isfinite(float(loss))


def run_one(spec: dict, config: dict, out: Path, *, progress: bool = True) -> dict:
    """Run one config into ``out/<run_id>`` (atomically). Returns the metrics, or the stored ones if finished."""
    rid = run_id(config)
    final = out / rid
    if (final / "metrics.json").exists():
        return json.loads((final / "metrics.json").read_text())
    tmp = out / f".{rid}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_json(tmp / "config.json", {"sweep": spec["name"], "workload": spec["workload"], "run_id": rid, **config})
    fn = _workload(spec["workload"])
    kwargs = {"run_dir": tmp} if "run_dir" in inspect.signature(fn).parameters else {}
    start = time.time()
    try:
        result = fn(dict(config), progress=progress, **kwargs)
    except Exception:
        (out / f"{rid}.error.txt").write_text(traceback.format_exc())
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = dict(result)
    curve = result.pop("curve", [])
    if curve:
        with open(tmp / "curve.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(curve[0]))
            w.writeheader()
            w.writerows(curve)
    metrics = {"run_id": rid, "wall_clock_s": time.time() - start, "diverged": _diverged(result), **result}
    _write_json(tmp / "metrics.json", metrics)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover (no metrics.json) is replaced
    os.rename(tmp, final)
    return metrics


def describe_run(config: dict) -> str:
    """The batch arithmetic of a run, for dry runs and logs."""
    lb, pb = config.get("logical_batch_size"), config.get("physical_batch_size")
    rule = config.get("rule", "?")
    if lb and pb:
        kappa = presets.kappa(rule, lb, pb) if rule in presets.PRESETS else pb / lb
        budget = config.get("samples") or config.get("tokens")
        unit = "samples" if config.get("samples") else "tokens"
        per = pb if rule != "accumulate" else max(pb, lb)
        updates = f", {int(budget // per)} updates" if budget and unit == "samples" else ""
        return f"rule={rule}: {pb} per batch, logical {lb}, kappa={kappa:g}{updates}"
    return json.dumps(config, sort_keys=True)


def run_sweep(path: str | os.PathLike, out: str | os.PathLike = "runs", *, dry_run: bool = False,
              backend: str = "local", progress: bool = True, max_runs: int | None = None, jobs: int = 1) -> list[dict]:
    """Run (or list, with ``dry_run``) every unfinished run of a sweep file.

    Args:
        path: the sweep file.
        out: parent folder; runs go to ``out/<sweep name>/<run id>``. Default "runs".
        dry_run: print the runs and their batch arithmetic, run nothing.
        backend: "local" (one after another, default) or "submitit" (submits each run as a SLURM job via submitit;
            without a cluster submitit's local executor runs them as processes).
        progress: let workloads show progress (with ``jobs`` > 1, a line per finished run instead).
        max_runs: stop after this many new runs (for tests of kill-and-resume).
        jobs: local runs at once, each in its own process (default 1). Small models use several cores poorly, so
            two one-thread runs finish sooner than two two-thread runs in turn; set the sweep's ``threads`` so that
            jobs x threads is at most the number of cores.
    """
    if backend not in ("local", "submitit"):
        raise ValueError(f"backend must be 'local' or 'submitit', got {backend!r}")
    if int(jobs) != jobs or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    spec = load_sweep(path)
    folder = Path(out) / spec["name"]
    configs = expand(spec)
    validate(spec, configs)  # every point before the first run: a typo fails now, not hours in
    done = [c for c in configs if (folder / run_id(c) / "metrics.json").exists()]
    print(f"sweep {spec['name']}: {len(configs)} runs, {len(done)} finished, {len(configs) - len(done)} to run "
          f"-> {folder}")
    if dry_run:
        for c in configs:
            mark = "done" if c in done else "todo"
            print(f"  [{mark}] {run_id(c)}  {describe_run(c)}")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    _remove_orphans(folder)
    results, new = [], 0
    if backend == "submitit":
        return _run_submitit(spec, configs, folder, progress)
    if jobs > 1:
        todo = [c for c in configs if c not in done][:max_runs]
        return [json.loads((folder / run_id(c) / "metrics.json").read_text()) for c in done] + \
            _run_parallel(spec, todo, folder, jobs)
    for i, c in enumerate(configs):
        if c in done:
            results.append(json.loads((folder / run_id(c) / "metrics.json").read_text()))
            continue
        if max_runs is not None and new >= max_runs:
            break
        print(f"[{i + 1}/{len(configs)}] {run_id(c)}  {describe_run(c)}", flush=True)
        try:
            m = run_one(spec, c, folder, progress=progress)
        except Exception as e:  # recorded in <run_id>.error.txt; the sweep goes on
            print(f"  failed: {type(e).__name__}: {e}", flush=True)
            continue
        new += 1
        print(f"  {_status(m)}", flush=True)
        results.append(m)
    return results


def _status(metrics: dict) -> str:
    loss = "DIVERGED" if metrics["diverged"] else f"final loss {metrics.get('final_loss'):.5g}"
    return f"{loss}, {metrics['wall_clock_s']:.1f}s"


def _remove_orphans(folder: Path) -> None:
    """Delete the temporary folders of interrupted runs (``.<run id>.tmp-<pid>`` whose process is gone); a live
    process's folder (another sweep running on the same folder) is left alone."""
    for d in folder.glob(".*.tmp-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            continue


def _run_parallel(spec: dict, todo: list[dict], folder: Path, jobs: int) -> list[dict]:
    """The runs in ``jobs`` worker processes (spawned: no forked torch state); a failed run is reported, not fatal."""
    import concurrent.futures
    import multiprocessing

    results = []
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    try:
        futures = {pool.submit(run_one, spec, c, folder, progress=False): c for c in todo}
        for i, f in enumerate(concurrent.futures.as_completed(futures)):
            rid = run_id(futures[f])
            try:
                m = f.result()
            except Exception as e:  # recorded in <run_id>.error.txt by run_one; the sweep goes on
                print(f"[{i + 1}/{len(todo)}] {rid} failed: {type(e).__name__}: {e}", flush=True)
                continue
            print(f"[{i + 1}/{len(todo)}] {rid}  {describe_run(futures[f])}: {_status(m)}", flush=True)
            results.append(m)
    except BaseException:  # Ctrl-C: start nothing new (finished runs are kept; a rerun continues)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _run_submitit(spec: dict, configs: list[dict], folder: Path, progress: bool) -> list[dict]:
    try:
        import submitit
    except ImportError:
        raise ValueError("backend='submitit' needs the submitit package (pip install submitit)") from None
    executor = submitit.AutoExecutor(folder=folder / "_submitit")
    executor.update_parameters(**spec.get("submitit", {}))
    todo = [c for c in configs if not (folder / run_id(c) / "metrics.json").exists()]
    jobs = [executor.submit(run_one, spec, c, folder, progress=False) for c in todo]
    print(f"submitted {len(jobs)} jobs via {executor.cluster}")
    return [j.result() for j in jobs]


def collect(folder: str | os.PathLike, out_csv: str | os.PathLike | None = None) -> list[dict]:
    """One row per finished run of a sweep folder (config + metrics); written to ``out_csv`` (atomically) if given."""
    folder = Path(folder)
    rows = []
    for metrics_path in sorted(folder.glob("*/metrics.json")):
        config = json.loads((metrics_path.parent / "config.json").read_text())
        metrics = json.loads(metrics_path.read_text())
        flat = {**config, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}
        for k, v in metrics.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        rows.append(flat)
    if out_csv is not None and rows:
        fields = sorted({k for r in rows for k in r})
        out_csv = Path(out_csv)
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_csv.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out_csv)
    return rows
