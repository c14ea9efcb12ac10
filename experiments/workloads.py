"""Workloads a sweep file can name (``workload = "experiments.workloads:<name>"``): each takes a run config and
returns ``{"final_loss": ..., "curve": [{"samples": ..., "loss": ...}, ...], ...}``.

A config's ``rule`` names a preset of :mod:`sdebatch.presets` (naive, accumulate, linear, sqrt_exact, sqrt_linear).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import sdebatch
from sdebatch import presets

def wrapper_kwargs(config: dict) -> dict:
    """LogicalBatchOptimizer keyword arguments for a config's ``rule`` (a preset of :mod:`sdebatch.presets`)."""
    return presets.wrapper_kwargs(config.get("rule", "sqrt_exact"), config.get("optimizer", "adam"))


def _batches(config: dict, x: torch.Tensor, y: torch.Tensor):
    """The physical batches of one pass; under "accumulate" with physical > logical, the logical chunks."""
    b, lb = config["physical_batch_size"], config["logical_batch_size"]
    if presets.update_batch(config.get("rule", "sqrt_exact"), lb, b) < b:
        chunker = sdebatch.LogicalChunker(lb)
        for i in range(0, len(x), b):
            yield from chunker((x[i:i + b], y[i:i + b]))
        yield from chunker.flush()
    else:
        for i in range(0, len(x), b):
            yield x[i:i + b], y[i:i + b]


def mlp(config: dict, progress: bool = True) -> dict:
    """A student MLP learns a teacher MLP with label noise (the regression of ``experiments/demo.py``).

    Config: physical_batch_size, logical_batch_size, rule, optimizer ("adam" | "sgd"), lr, samples, seed,
    eval_every (samples, default samples // 16); for a batch ramp, batch_schedule (a
    :func:`sdebatch.batch_schedule` spec in samples, or "critical_batch_warmup": see :func:`_schedule_of`; reached by
    accumulation of physical batches), ramp: "rules" (default: every hyperparameter rescaled per update by the
    optimizer's rule), "lr_only" (the OLMo-core way: lr x sqrt(kappa) for Adam, x kappa for SGD, the rest unchanged)
    or "none" (the Megatron way: nothing rescaled), and second_moment_rescale (default false).
    """
    from experiments import demo

    samples, seed = int(config["samples"]), int(config.get("seed", 0))
    teacher, x_test, y_test = demo.make_teacher()
    x, y = demo.make_stream(teacher, seed, samples)
    torch.manual_seed(seed)
    model = demo.mlp(demo.HIDDEN, torch.nn.SiLU)
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[config.get("optimizer", "adam")]
    inner = cls(model.parameters(), lr=float(config["lr"]))
    b = int(config["physical_batch_size"])
    lb = int(config["logical_batch_size"])
    if config.get("batch_schedule"):
        ramp = config.get("ramp", "rules")
        family = "adam" if config.get("optimizer", "adam") == "adam" else "sgd"
        schedule = _schedule_of(config, lb, samples)
        opt = sdebatch.LogicalBatchOptimizer(inner, lb, b, rule=family if ramp == "rules" else "none",
                                             batch_schedule=schedule, estimate_noise_scale=hasattr(schedule, "attach"),
                                             noise_scale_warn=None,
                                             second_moment_rescale=bool(config.get("second_moment_rescale", False)))
        if ramp == "lr_only":  # the reference lr is constant here: set the lr of each update from its kappa
            base = float(config["lr"])

            def lr_only(o, window):
                factor = window["kappa"] ** (0.5 if family == "adam" else 1.0)
                for group in o.param_groups:
                    group["lr"] = base * factor
            opt.register_pre_update_hook(lr_only)
    else:
        opt = sdebatch.LogicalBatchOptimizer(inner, lb, presets.update_batch(config.get("rule", "sqrt_exact"), lb, b),
                                             **wrapper_kwargs(config))
    every = int(config.get("eval_every", max(1, samples // 16)))
    curve, next_eval = [], every

    def evaluate() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x_test[:8192]), y_test[:8192]))

    for xb, yb in _batches(config, x, y):
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        if not math.isfinite(loss.item()):
            return {"final_loss": float("nan"), "curve": curve, "updates": opt.updates}
        loss.backward()
        opt.step(num_samples=len(xb))
        opt.zero_grad()
        if opt.samples_seen >= next_eval:
            curve.append({"samples": opt.samples_seen, "updates": opt.updates, "loss": evaluate()})
            next_eval += every
    opt.flush()
    final = evaluate()
    return {"final_loss": final, "curve": curve + [{"samples": opt.samples_seen, "updates": opt.updates,
                                                    "loss": final}],
            "updates": opt.updates, "samples_seen": opt.samples_seen}


def mdm(config: dict, progress: bool = True, run_dir=None) -> dict:
    """The tri-modal masked diffusion model (``sdebatch.mdm.train``); keys of ``sdebatch.mdm.train.DEFAULTS``.

    The final loss is the held-out ELBO (bits per token), ``final_loss_se`` its estimator's own standard error; the
    curve is the training ELBO averaged over each update's window, against tokens seen. Under a sweep (``run_dir``
    given) the weights go to the run's folder as model.pt, and each held-out sequence's estimates to val_rows.json
    (for the estimator's error of paired differences between runs, which share the draws).
    """
    import json

    from sdebatch.utils import atomic_write
    import lightning.pytorch as pl

    from sdebatch.lightning import find_optimizer
    from sdebatch.mdm import train as mdm_train

    curve: list[dict] = []

    class Curve(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            opt = find_optimizer(module)
            if opt.did_update and module.window_micro_elbo_bits:
                window = module.window_micro_elbo_bits  # each micro-batch's training ELBO, read at the update
                point = {"tokens": opt.tokens_seen, "samples": opt.samples_seen, "updates": opt.updates,
                         "loss": sum(window) / len(window), "kappa": opt.last_kappa}
                for m in ("text", "image", "audio"):  # the window's training ELBO per modality (for diagnosis)
                    point[m] = module.window_elbo_bits.get(m, float("nan"))
                noise = getattr(opt, "noise", None)
                if noise is not None and noise.count:  # the estimator's EMAs of |G|^2 and tr(Sigma)
                    point.update(noise_g2=noise.gradient_sq_norm, noise_trace=noise.trace_sigma)
                curve.append(point)

    known = {k: v for k, v in config.items() if k in mdm_train.DEFAULTS}
    if run_dir is not None:  # each run its own weights (the default out would be shared by every run of a sweep)
        known["out"] = str(run_dir)
    cfg = mdm_train.load_config(None, **known)
    result = mdm_train.train(cfg, progress=progress, callbacks=[Curve()])
    result.pop("module")
    val = result.pop("val", {})
    rows = val.pop("rows", None)
    if run_dir is not None and rows is not None:
        atomic_write(Path(run_dir) / "val_rows.json", json.dumps(rows).encode())
    # B_simple = tr(Sigma) / |G|^2 from the estimator's EMAs averaged over the second half of the run: the final
    # value rests on the last ~20 updates and varies severalfold between seeds on short runs
    late = [p for p in curve[len(curve) // 2:] if "noise_g2" in p]
    g2 = sum(p["noise_g2"] for p in late)
    result["noise_scale_late"] = sum(p["noise_trace"] for p in late) / g2 if late and g2 > 0 else None
    if run_dir is not None and "weights" in result:
        result["weights"] = "model.pt"  # relative to the run folder (run_dir is renamed into place)
    return {"final_loss": val.get("bits_per_token", float("nan")), "final_loss_se": val.get("bits_per_token_se"),
            "val": val, "curve": curve, **result}


NAMED_SCHEDULES = ("seesaw", "critical_batch_warmup")  # batch schedules a config names, beside clock:batch specs


def _schedule_of(config: dict, lb: int, total: int, lr_schedule=None):
    """The run's batch schedule (samples): a clock:batch spec, "seesaw" (the lr schedule's halvings turned into
    doublings of the batch) or "critical_batch_warmup" (the batch grows to cbw_fraction x the online B_simple,
    default 0.5), both capped at max_batch_size (default 8 x the logical batch)."""
    from sdebatch import batch_schedules

    spec, cap = config["batch_schedule"], int(config.get("max_batch_size", 8 * lb))
    if spec == "seesaw":
        return batch_schedules.seesaw(lr_schedule or (lambda t: 1.0), lb, cap, total)
    if spec == "critical_batch_warmup":
        return batch_schedules.critical_batch_warmup(lb, cap, float(config.get("cbw_fraction", 0.5)))
    return sdebatch.batch_schedule(spec)


def _check_ramp(config: dict) -> None:
    if config.get("batch_schedule"):
        if config["batch_schedule"] not in NAMED_SCHEDULES:
            sdebatch.batch_schedule(config["batch_schedule"])  # names a bad entry
        presets.check_ramp(config.get("ramp", "rules"))
    if config.get("second_moment_rescale", False) not in (True, False):
        raise ValueError(f"second_moment_rescale must be true or false, got {config.get('second_moment_rescale')!r}")


def _check_mlp(config: dict) -> None:
    presets.check(config.get("rule", "sqrt_exact"))
    _check_ramp(config)
    if config.get("optimizer", "adam") not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.get('optimizer')!r}")
    if not isinstance(config.get("lr"), (int, float)) or isinstance(config.get("lr"), bool) or not config["lr"] > 0:
        raise ValueError(f"lr must be a number > 0, got {config.get('lr')!r}")


def _check_mdm(config: dict) -> None:
    """The run config as sdebatch.mdm.train.load_config takes it: unknown keys, types and values, each named."""
    from sdebatch.mdm import train as mdm_train

    mdm_train.load_config(None, **config)


def _check_quadratic(config: dict) -> None:
    allowed = {"sgd": ("naive", "accumulate", "linear"), "adam": ("naive", "accumulate", "sqrt_exact", "sqrt_linear")}
    opt_name, rule = config.get("optimizer", "sgd"), config.get("rule")
    if opt_name not in allowed or rule not in allowed[opt_name]:
        raise ValueError(f"quadratic: rule must be one of {allowed.get(opt_name)} for optimizer {opt_name!r} "
                         f"(optimizer: sgd | adam), got {rule!r}")
    if config.get("lr_schedule", "constant") not in ("constant", "cosine"):
        raise ValueError(f"quadratic: lr_schedule must be 'constant' or 'cosine', got {config.get('lr_schedule')!r}")
    if config.get("batch_schedule") and rule != "accumulate":
        raise ValueError(f"quadratic: a batch_schedule is reached by accumulation: it needs rule = 'accumulate' "
                         f"(the ramp's rescaling is set by ramp), got {rule!r}")
    _check_ramp(config)


def quadratic(config: dict, progress: bool = True) -> dict:
    """The noisy quadratic (``sdebatch.sde``): torch SGD or Adam through LogicalBatchOptimizer, many replicas at once.

    Config: physical_batch_size, logical_batch_size, rule (naive | accumulate | linear with sgd | sqrt_exact,
    sqrt_linear with adam), optimizer ("sgd" | "adam"), lr, samples, seed, and optional replicas (default 256), dim
    (default 16; curvatures log-spaced from 1 to 1e-2), noise (per-sample gradient variance, default 1.0), theta0
    (default 1.0), lr_schedule ("constant", default, or "cosine" to 0 over the samples). The loss is exact (0.5 sum h
    theta^2), averaged over the replicas; all batch sizes of a sweep see the same sample stream (common random
    numbers), so their differences have little noise.

    A batch ramp (rule "accumulate"): batch_schedule, a :func:`sdebatch.batch_schedule` spec in samples, "seesaw"
    or "critical_batch_warmup" (see :func:`_schedule_of`), reached by accumulating physical batches; ramp: "rules"
    (every hyperparameter rescaled), "lr_only" (the OLMo-core way) or "none" (the Megatron way);
    second_moment_rescale (default false).
    """
    from sdebatch import sde

    _check_quadratic(config)
    opt_name, rule = config.get("optimizer", "sgd"), config["rule"]
    dim = int(config.get("dim", 16))
    model = sde.NoisyQuadratic(torch.logspace(0, -2, dim, dtype=torch.float64), float(config.get("noise", 1.0)),
                               float(config.get("theta0", 1.0)))
    lb, b = int(config["logical_batch_size"]), int(config["physical_batch_size"])
    samples = int(config["samples"])
    cosine = sdebatch.warmup_cosine(samples) if config.get("lr_schedule", "constant") == "cosine" else None
    if config.get("batch_schedule"):
        ramp = _schedule_of(config, lb, samples, cosine)
        arm = {"rules": "auto", "lr_only": "lr_only", "none": "none"}[config.get("ramp", "rules")]
        grid = sde.sample_grid(samples, 64, multiple_of=b)
        sim = sde.simulate(model, opt_name, float(config["lr"]), lb, b, grid, rule=arm,
                           seeds=int(config.get("replicas", 256)), seed=int(config.get("seed", 0)),
                           lr_schedule=cosine, batch_schedule=ramp,
                           second_moment_rescale=bool(config.get("second_moment_rescale", False)))
        return _quadratic_result(sim)
    if cosine is not None or config.get("second_moment_rescale"):
        grid = sde.sample_grid(samples, 64, multiple_of=lb if rule == "accumulate" else b)
        sim = sde.simulate(model, opt_name, float(config["lr"]), lb, lb if rule == "accumulate" else b, grid,
                           rule="none" if rule == "naive" else "auto", seeds=int(config.get("replicas", 256)),
                           seed=int(config.get("seed", 0)), beta_form="linear" if rule == "sqrt_linear" else "exact",
                           lr_schedule=cosine, second_moment_rescale=bool(config.get("second_moment_rescale", False)))
        return _quadratic_result(sim)
    grid = sde.sample_grid(samples, 16, multiple_of=max(b, lb) if rule != "accumulate" else lb)
    sim = sde.simulate(model, opt_name, float(config["lr"]), lb, lb if rule == "accumulate" else b, grid,
                       rule="none" if rule == "naive" else "auto", seeds=int(config.get("replicas", 256)),
                       seed=int(config.get("seed", 0)), beta_form="linear" if rule == "sqrt_linear" else "exact")
    curve = [{"samples": int(n), "loss": float(v)} for n, v in zip(sim.samples, sim.loss_mean)]
    final = curve[-1]["loss"]
    return {"final_loss": final if math.isfinite(final) else float("nan"), "final_loss_se": float(sim.loss_se[-1]),
            "curve": curve, "samples_seen": curve[-1]["samples"], "kappa": sim.kappa}


def _quadratic_result(sim) -> dict:
    """A run's result with the updates at each point of the curve (ramps and lr schedules)."""
    curve = [{"samples": int(n), "updates": int(u), "loss": float(v)}
             for n, u, v in zip(sim.samples, sim.updates, sim.loss_mean)]
    final = curve[-1]["loss"]
    return {"final_loss": final if math.isfinite(final) else float("nan"), "final_loss_se": float(sim.loss_se[-1]),
            "curve": curve, "samples_seen": curve[-1]["samples"], "updates": curve[-1]["updates"],
            "kappa": sim.kappa}


# the checks the sweep runner applies to every run before the first one starts (sdebatch.sweep.validate)
mlp.validate = _check_mlp
mdm.validate = _check_mdm
quadratic.validate = _check_quadratic
