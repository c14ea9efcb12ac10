"""Command line: ``sdebatch rules`` (effective hyperparameters per batch per update), ``sdebatch sweep run | collect``,
``sdebatch report``; the tri-modal workload adds ``data prepare``, ``train``, ``eval`` and ``sample``
(:mod:`sdebatch.mdm.cli`)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import families, rules
from .mdm import cli as mdm_cli

# optimizer name -> (family, weight-decay form, torch's defaults of the keys the rules change)
OPTIMIZERS = families.optimizer_table()


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# reference values a table can start from: (test, accepted values), by key
_REFERENCE = {
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "eps": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "alpha": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "momentum_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
}


def check_reference(ref: dict, logical_batch_size: int, batch_sizes: list[int],
                    ema: float | None = None) -> None:
    """Raise one ValueError naming the first invalid input (``--key`` as the command line spells it)."""
    for key, value in ref.items():
        values = value if key == "betas" else (value,)
        test, accepted = (lambda v: 0 <= v < 1, "in [0, 1)") if key == "betas" else _REFERENCE.get(key, (None, ""))
        if test is not None and not all(isinstance(v, (int, float)) and test(float(v)) for v in values):
            raise ValueError(f"--{key.replace('_', '-')} must be {accepted}" + (" (each)" if key == "betas" else "")
                             + f", got {value!r}")
    if ema is not None and not 0 <= ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {ema!r}")
    if logical_batch_size < 1:
        raise ValueError(f"--logical must be a positive int (samples), got {logical_batch_size!r}")
    bad = [b for b in batch_sizes if b < 1]
    if bad:
        raise ValueError(f"--batch must be positive ints (samples per update), got {bad}")


def rules_table(optimizer: str, hparams: dict, logical_batch_size: int, batch_sizes: list[int], *,
                ema: float | None = None, beta_form: str = "exact", momentum_mode: str = "fixed",
                horizon: float | None = None, reference_horizon: float | None = None, gamma: float = 0.0) -> str:
    """A text table of the effective hyperparameters of updates of each batch size (samples per update).

    Args:
        optimizer: one of ``OPTIMIZERS`` (sgd, adam, adamw, rmsprop, nadam, radam).
        hparams: reference values at the logical batch (missing keys take torch's defaults).
        logical_batch_size: B_L, samples.
        batch_sizes: samples per update to tabulate (kappa = B / B_L).
        ema: optional model-EMA decay at the logical batch, shown as rho**kappa.
        beta_form, momentum_mode, horizon, reference_horizon, gamma: as in :func:`sdebatch.rescale` / :func:`kappa`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    family, wd_form, defaults = OPTIMIZERS[optimizer]
    ref = {**defaults, **hparams}
    check_reference(ref, logical_batch_size, batch_sizes, ema)
    keys = list(ref)
    header = ["batch", "kappa"] + keys + (["ema"] if ema is not None else [])
    rows = []
    for b in batch_sizes:
        k = rules.kappa(b, logical_batch_size, horizon=horizon, reference_horizon=reference_horizon, gamma=gamma)
        try:
            new = rules.rescale(family, ref, k, beta_form=beta_form, momentum_mode=momentum_mode,
                                weight_decay_form=wd_form)
            cells = [_fmt(new[key]) for key in keys]
        except ValueError as e:  # e.g. the linear beta form outside its range
            cells = [f"invalid: {e}"[:40]] + [""] * (len(keys) - 1)
        rows.append([str(b), f"{k:.4g}"] + cells + ([_fmt(rules.ema_decay(ema, k))] if ema is not None else []))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [f"{optimizer} ({family} rule, weight decay {wd_form}), reference values at logical batch "
             f"{logical_batch_size}; one update per batch:"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdebatch", description="sdebatch: logical vs physical batch size")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rules", help="effective hyperparameters for a list of batch sizes per update")
    r.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    r.add_argument("--logical", type=int, required=True, help="logical batch size (samples)")
    r.add_argument("--batch", type=int, nargs="+", required=True,
                   help="batch sizes per update (samples, all devices and accumulation: kappa = batch / logical)")
    r.add_argument("--lr", type=float)
    r.add_argument("--momentum", type=float)
    r.add_argument("--betas", type=float, nargs=2)
    r.add_argument("--alpha", type=float)
    r.add_argument("--eps", type=float)
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--momentum-decay", type=float, help="NAdam's momentum_decay")
    r.add_argument("--ema", type=float, help="model EMA decay at the logical batch")
    r.add_argument("--beta-form", default="exact", choices=rules.BETA_FORMS)
    r.add_argument("--momentum-mode", default="fixed", choices=rules.MOMENTUM_MODES)
    sw = sub.add_parser("sweep", help="run or collect a declarative batch-size sweep")
    swsub = sw.add_subparsers(dest="sweep_command", required=True)
    run = swsub.add_parser("run", help="run every unfinished run of a sweep file")
    run.add_argument("file")
    run.add_argument("--out", default="runs", help="parent folder of the sweep's run folders (default runs)")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their batch arithmetic")
    run.add_argument("--backend", default="local", choices=["local", "submitit"])
    run.add_argument("--jobs", type=int, default=1,
                     help="local runs at once, each its own process (default 1); keep jobs x threads <= cores")
    col = swsub.add_parser("collect", help="one CSV row per finished run")
    col.add_argument("folder", help="a sweep's folder, e.g. runs/mlp_physical_batch")
    col.add_argument("--out", help="CSV path (default <folder>/results.csv)")
    mdm_cli.add_commands(sub)  # data prepare | train | eval | sample: the workload's own commands
    rp = sub.add_parser("report", help="one HTML page and figures for a sweep folder: is the loss invariant?")
    rp.add_argument("folder", metavar="RUNS_DIR", help="a sweep's folder, e.g. runs/demo")
    rp.add_argument("--out", help="where to write (default RUNS_DIR/report)")
    rp.add_argument("--tolerance", type=float, default=0.01,
                    help="knee: the relative deviation to the worse that, with 2 paired standard errors, counts "
                         "(default 0.01)")
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "run"):  # a command added by a workload
            return args.run(args)
        if args.command == "report":
            from .figures.report import report
            r = report(args.folder, args.out, tolerance=args.tolerance)
            print(f"{r['summary']['runs']} runs -> {r['html']} ({len(r['figures'])} figure files beside it)")
            return 0
    except ValueError as e:
        parser.error(str(e))
    if args.command == "sweep":
        from . import sweep
        try:
            if args.sweep_command == "run":
                sweep.run_sweep(args.file, args.out, dry_run=args.dry_run, backend=args.backend, jobs=args.jobs)
                failed = [] if args.dry_run else sweep.failed_runs(args.file, args.out)
                if failed:
                    print(f"{len(failed)} run(s) failed (tracebacks in <out>/<sweep>/<run id>.error.txt; a rerun "
                          "retries them):\n" + "\n".join(f"  {rid}" for rid in failed), file=sys.stderr)
                    return 1
            else:
                out = args.out or str(Path(args.folder) / "results.csv")
                rows = sweep.collect(args.folder, out)
                print(f"{len(rows)} runs -> {out}")
        except ValueError as e:
            parser.error(str(e))
        return 0
    if args.command == "rules":
        given = {"lr": args.lr, "momentum": args.momentum, "alpha": args.alpha, "eps": args.eps,
                 "weight_decay": args.weight_decay, "momentum_decay": args.momentum_decay,
                 "betas": tuple(args.betas) if args.betas else None}
        allowed = OPTIMIZERS[args.optimizer][2]
        bad = [k for k, v in given.items() if v is not None and k not in allowed]
        if bad:
            parser.error(f"{args.optimizer} has no {', '.join(bad)} (it takes {', '.join(allowed)})")
        hp = {k: v for k, v in given.items() if v is not None}
        try:
            print(rules_table(args.optimizer, hp, args.logical, args.batch, ema=args.ema,
                              beta_form=args.beta_form, momentum_mode=args.momentum_mode))
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
