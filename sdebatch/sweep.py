"""Declarative, resumable sweeps: a small TOML file declares a base config and a grid; each run gets its own folder.

    name = "physical_batch"
    workload = "../workloads.py:mlp"    # file (from the sweep file's folder) or module : function(config, progress
                                        # [, run_dir]) -> result dict; see load_workload
    [base]
    logical_batch_size = 32
    [grid]
    physical_batch_size = [4, 8, 16, 32, 64]
    rule = ["accumulate", "sqrt_exact", "naive"]

A run is the base updated with one point of the grid (the product of all grid lists, after any ``[[runs]]`` tables
listed explicitly). A grid list of tables is an axis of arms: each table is merged into the run's config (its key only
names the axis), e.g. ``arm = [{physical_batch_size = 4, rule = "accumulate"}, {physical_batch_size = 16, rule =
"sqrt_exact"}]`` with ``seed = [0, 1, 2]`` runs each arm at each seed, seed by seed when ``seed`` comes first.
A run's id is derived from its config, so a rerun of the sweep skips finished runs and a killed sweep continues where
it stopped. A run writes into a temporary folder that is renamed into place when complete: a folder
that exists is a finished run. A run whose loss goes nan/inf is recorded with ``diverged = true`` and the sweep goes
on; a run that raises is recorded as failed (its traceback in ``error.txt``) and retried by the next invocation.
A workload that takes a ``run_dir`` argument gets the run's (temporary) folder for its own files, e.g. weights; they
land in the run folder with the rest.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import inspect
import io
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
from .utils import atomic_write

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
    mixed = [k for k, v in grid.items() if len({isinstance(x, dict) for x in v}) > 1]
    if mixed:
        raise ValueError(f"{path}: a grid list holds values or tables (arms), not both: {mixed}")
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
        for values in itertools.product(*(grid[k] for k in keys)):
            config = dict(spec["base"])
            for k, v in zip(keys, values):
                if isinstance(v, dict):
                    config.update(v)  # an arm: its keys, not the axis name
                else:
                    config[k] = v
            configs.append(config)
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
    check = getattr(load_workload(spec["workload"], Path(spec["path"]).parent if "path" in spec else None),
                    "validate", None)
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


def load_workload(ref: str, base: str | os.PathLike | None = None) -> Callable[..., dict]:
    """The function a sweep's ``workload`` names, ``"<module>:<function>"``. The module is a file path ending in
    ``.py`` (relative to ``base``, the sweep file's folder, else to the working directory) or an importable dotted
    name. A file inside a package folder (``__init__.py`` up to its top) is imported as a member of that package,
    so the package's own imports work; nothing is added to ``sys.path``."""
    module, _, fn = ref.partition(":")
    try:
        if module.endswith(".py"):
            candidates = [Path(base) / module] if base is not None else []
            path = next((p for p in candidates + [Path(module)] if p.is_file()), None)
            if path is None:
                raise ImportError(f"no file {module} (relative to {base or '.'} or the working directory)")
            mod = _import_file(path.resolve())
        else:
            mod = importlib.import_module(module)
        return getattr(mod, fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"workload {ref!r} cannot be loaded: {e} (name a file, e.g. "
                         "'../workloads.py:mdm', or an installed module)") from None


def _import_file(path: Path):
    """Import a .py file by path: as ``pkg.sub.module`` when its folders are packages (the top package loaded from
    its own folder), else as a module named after the file."""
    parts, folder = [path.stem], path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    name = ".".join(parts)
    if name in sys.modules:
        return sys.modules[name]
    if len(parts) > 1 and parts[0] not in sys.modules:  # the top package, from its folder: its members resolve below
        top = folder / parts[0]
        spec = importlib.util.spec_from_file_location(parts[0], top / "__init__.py",
                                                      submodule_search_locations=[str(top)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[parts[0]] = pkg
        spec.loader.exec_module(pkg)
    if len(parts) > 1:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str).encode())


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
    fn = load_workload(spec["workload"], Path(spec["path"]).parent if "path" in spec else None)
    kwargs = {"run_dir": tmp} if "run_dir" in inspect.signature(fn).parameters else {}
    start = time.time()
    try:
        result = fn(dict(config), progress=progress, **kwargs)
    except Exception:
        atomic_write(out / f"{rid}.error.txt", traceback.format_exc().encode())
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = dict(result)
    curve = result.pop("curve", [])
    if curve:
        # every key any point has, in order of first appearance (the noise-scale columns start mid-run)
        atomic_write(tmp / "curve.csv", _csv(curve, list(dict.fromkeys(k for point in curve for k in point))))
    metrics = {"run_id": rid, "wall_clock_s": time.time() - start, "diverged": _diverged(result), **result}
    _write_json(tmp / "metrics.json", metrics)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover (no metrics.json) is replaced
    os.rename(tmp, final)
    return metrics


def _csv(rows: list[dict], fields: list[str]) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


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
        if config.get("batch_schedule"):  # a ramp: the schedule's updates, not the fixed batch's
            from .batch_schedules import batch_schedule
            try:
                ramp, seen, n = batch_schedule(config["batch_schedule"], unit), 0, 0
            except ValueError:  # a schedule the workload names (e.g. "seesaw"): it describes it when it runs
                return (f"rule={rule}: batch schedule {config['batch_schedule']} ({config.get('ramp', 'rules')}), "
                        f"logical {lb}")
            while budget and unit == "samples" and seen < budget:
                seen, n = seen + ramp(seen), n + 1
            return (f"rule={rule}: batch schedule {ramp.describe()} ({config.get('ramp', 'rules')}), logical {lb}"
                    + (f", {n} updates" if n else ""))
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


def _submitit_executor(spec: dict, folder: Path):
    """The executor of the sweep file's ``[submitit]`` table: ``cluster`` picks submitit's executor ("slurm", "local",
    "debug"; default: SLURM where it is installed, else local processes), every other key goes to
    ``executor.update_parameters`` (e.g. ``timeout_min``, ``cpus_per_task``, ``slurm_partition``). A table submitit
    refuses is a ValueError naming the sweep file, before any job is submitted."""
    try:
        import submitit
    except ImportError:
        raise ValueError("backend='submitit' needs the submitit package (pip install submitit)") from None
    where = spec.get("path", spec["name"])
    table = spec.get("submitit", {})
    if not isinstance(table, dict):
        raise ValueError(f"{where}: submitit must be a table ([submitit] with keys of executor.update_parameters), "
                         f"got {table!r}")
    options = dict(table)
    cluster = options.pop("cluster", None)
    try:
        executor = submitit.AutoExecutor(folder=folder / "_submitit", cluster=cluster)
        executor.update_parameters(**options)
    except (ValueError, TypeError, NameError, AssertionError, RuntimeError) as e:
        raise ValueError(f"{where}: submitit does not accept the [submitit] table {table!r}: {e}") from None
    return executor


def _run_submitit(spec: dict, configs: list[dict], folder: Path, progress: bool) -> list[dict]:
    """Each unfinished run as one job of a submitit job array (see :func:`_submitit_executor`), then wait for them.
    Finished runs are not submitted again; a failed job is reported and recorded in ``<run id>.error.txt`` (the run's
    traceback, or submitit's error when the job died outside the run, e.g. a timeout), and the sweep goes on, as the
    local backend does. Returns the metrics of every finished run."""
    executor = _submitit_executor(spec, folder)
    done = [c for c in configs if (folder / run_id(c) / "metrics.json").exists()]
    todo = [c for c in configs if c not in done]
    results = [json.loads((folder / run_id(c) / "metrics.json").read_text()) for c in done]
    if not todo:
        return results
    submitted = time.time()
    with executor.batch():
        jobs = [executor.submit(run_one, spec, c, folder, progress=False) for c in todo]
    print(f"submitted {len(jobs)} jobs via {executor.cluster} (logs in {folder / '_submitit'})", flush=True)
    for i, (c, job) in enumerate(zip(todo, jobs)):
        rid = run_id(c)
        try:
            m = job.result()
        except Exception as e:  # the job failed: recorded, the sweep goes on
            error = folder / f"{rid}.error.txt"
            if not error.exists() or error.stat().st_mtime < submitted:  # died before run_one could record it
                atomic_write(error, f"{type(e).__name__}: {e}".encode())
            print(f"[{i + 1}/{len(todo)}] {rid} failed (job {job.job_id}; traceback in {error.name})", flush=True)
            continue
        print(f"[{i + 1}/{len(todo)}] {rid}  {describe_run(c)}: {_status(m)}", flush=True)
        results.append(m)
    return results


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
        atomic_write(out_csv, _csv(rows, fields))
    return rows
