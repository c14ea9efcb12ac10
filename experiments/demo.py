"""Demo: one set of hyperparameters, tuned at a logical batch of 32, reused at any physical batch size.

Workload: regression of a fixed random teacher MLP (16 -> 32 tanh -> 1, output normalised to unit variance) with
Gaussian label noise (std 0.5), learned by a student MLP (16 -> 64 SiLU -> 1) in one pass over a fresh stream of
SAMPLES samples at a constant learning rate. Every run sees the same samples in the same order (per seed); only the
batching and the optimizer's hyperparameters differ. The metric is the held-out excess loss: MSE to the noise-free
teacher on a fixed test set of 65,536 inputs (= population loss - noise variance 0.25).

Each physical batch b takes ONE update per batch, so kappa = b / 32:
  - "rescaled": LogicalBatchOptimizer's SDE rule (SGD: lr * kappa; Adam: lr * sqrt(kappa), beta**kappa,
    eps / sqrt(kappa)),
  - "naive": rule="none", i.e. the b=32 hyperparameters unchanged.
The row "accumulate" is b=4 with 8 accumulation steps: an exact logical-batch run (kappa = 1).
Claim: the rescaled rows match the logical run (b=32) while the batch is below the critical batch; the naive rows
do not. The base learning rates are the best of a grid at b=32 for this budget (SGD 0.01..0.32 -> 0.04;
Adam 5e-4..1.6e-2 -> 2e-3), so any change of dynamics makes the logical run worse, not better.

Run: python -m experiments.demo   (about 75 s on one CPU core). Writes runs/demo_mlp/results.{json,csv}.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import torch

import sdebatch
from sdebatch import utils
from sdebatch.stats import mean_se, paired

DIM, HIDDEN, NOISE = 16, 64, 0.5
LOGICAL = 32
SAMPLES = 32768                      # sample budget, identical for every run
BATCHES = (4, 8, 16, 32, 64, 128, 256)
SEEDS = (0, 1, 2, 3, 4)
BASE = {"sgd": dict(cls=torch.optim.SGD, lr=0.04), "adam": dict(cls=torch.optim.Adam, lr=2e-3)}
TOL = 0.05                           # "matches the logical run": |relative deviation| <= 5%
OUT = Path("runs/demo_mlp")


def mlp(width: int, act: type[torch.nn.Module]) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(DIM, width), act(), torch.nn.Linear(width, 1))


def make_teacher():
    torch.manual_seed(1234)
    net = mlp(32, torch.nn.Tanh).requires_grad_(False)
    with torch.no_grad():
        net[2].weight.mul_(3.0)
        x_test = torch.randn(65536, DIM, generator=torch.Generator().manual_seed(999))
        net[2].weight.div_(net(x_test).std())  # unit-variance target (bias ignored: the std is shift-invariant)
        y_test = net(x_test)
    return net, x_test, y_test


def make_stream(teacher, seed: int, samples: int = SAMPLES):
    """The training stream of one seed: ``samples`` inputs and noisy teacher targets (the same for every batch)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(samples, DIM, generator=g)
    with torch.no_grad():
        y = teacher(x) + NOISE * torch.randn(samples, 1, generator=g)
    return x, y


def train(opt_name: str, b: int, rule: str, accumulation: int | None, seed: int, stream, test):
    torch.manual_seed(seed)
    model = mlp(HIDDEN, torch.nn.SiLU)
    cfg = BASE[opt_name]
    opt = sdebatch.LogicalBatchOptimizer(cfg["cls"](model.parameters(), lr=cfg["lr"]), logical_batch_size=LOGICAL,
                                         physical_batch_size=b, accumulation_steps=accumulation, rule=rule,
                                         reparameterize=accumulation == 1)
    x, y = stream
    for i in range(0, SAMPLES, b):
        loss = torch.nn.functional.mse_loss(model(x[i:i + b]), y[i:i + b])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not opt.in_window and opt.samples_seen == SAMPLES
    with torch.no_grad():
        excess = torch.nn.functional.mse_loss(model(test[0]), test[1]).item()
    return (excess if math.isfinite(excess) else float("inf")), opt


def settings():
    """(optimizer, setting, physical batch, accumulation steps, rule); b=32 and accumulate are shared by both."""
    for opt_name in BASE:
        yield opt_name, "accumulate", 4, None, "none"
        for b in BATCHES:
            if b == LOGICAL:
                yield opt_name, "logical", b, 1, "none"
            else:
                yield opt_name, "rescaled", b, 1, "auto"
                yield opt_name, "naive", b, 1, "none"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write(path, text.encode())


def main() -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    t_start = time.perf_counter()
    teacher, x_test, y_test = make_teacher()
    streams = {s: make_stream(teacher, s) for s in SEEDS}
    print(f"teacher-student MLP regression, d={DIM}, label noise std {NOISE}, logical batch {LOGICAL}, "
          f"{SAMPLES} samples per run, {len(SEEDS)} seeds, metric: held-out excess MSE")
    rows = []
    for opt_name, setting, b, acc, rule in settings():
        t0 = time.perf_counter()
        runs = [train(opt_name, b, rule, acc, s, streams[s], (x_test, y_test)) for s in SEEDS]
        losses, opt = [r[0] for r in runs], runs[-1][1]
        mean, se, _ = mean_se(losses)
        se = float("nan") if se is None else se
        arith = (f"b={b}{f' x {opt.accumulation_steps} accumulation' if opt.accumulation_steps > 1 else ''}: "
                 f"{opt.window_batch_size} per update, kappa={opt.window_kappa:g}, {opt.updates} updates")
        seconds = time.perf_counter() - t0
        print(f"  {opt_name:4s} {setting:10s} {arith:52s} loss {mean:.4f} +- {se:.4f}  {seconds:5.1f}s", flush=True)
        rows.append(dict(optimizer=opt_name, setting=setting, physical_batch=b,
                         accumulation_steps=opt.accumulation_steps,
                         batch_per_update=opt.window_batch_size, kappa=opt.window_kappa, updates=opt.updates,
                         rule=opt.rule, loss_mean=mean, loss_se=se, losses=losses, seconds=round(seconds, 2)))
    # relative deviation from the logical run, paired by seed (same init and data): mean +- s.e. over seeds
    logical = {r["optimizer"]: r["losses"] for r in rows if r["setting"] == "logical"}
    for r in rows:
        r["rel_dev"], se, _ = paired(r["losses"], logical[r["optimizer"]])
        r["rel_dev_se"] = math.nan if se is None else se

    # results table: rows = physical batch, columns = optimizer x {rescaled, naive}
    def cell(opt_name, b, col):
        match = [r for r in rows if r["optimizer"] == opt_name and r["physical_batch"] == b
                 and r["setting"] in (col, "logical")]
        if b == "accumulate":
            match = [r for r in rows if r["optimizer"] == opt_name and r["setting"] == "accumulate"]
        r = match[0]
        return f"{r['loss_mean']:.4f}+-{r['loss_se']:.4f} {100 * r['rel_dev']:+6.1f}+-{100 * r['rel_dev_se']:3.1f}%"

    cols = [(o, c) for o in BASE for c in ("rescaled", "naive")]
    print(f"\nheld-out excess MSE and its deviation from the logical run (b=32, same seed), mean +- s.e. over "
          f"{len(SEEDS)} seeds")
    print(f"{'b':>10s} {'kappa':>6s} | " + " | ".join(f"{o + ' ' + c:^28s}" for o, c in cols))
    for b in ("accumulate",) + BATCHES:
        kappa = 1.0 if b == "accumulate" else b / LOGICAL
        print(f"{b!s:>10s} {kappa:6.3g} | " + " | ".join(f"{cell(o, b, c):^28s}" for o, c in cols))

    summary = []
    for o in BASE:
        dev = {r["physical_batch"]: r["rel_dev"] for r in rows if r["optimizer"] == o and r["setting"] == "rescaled"}
        naive = {r["physical_batch"]: r["rel_dev"] for r in rows if r["optimizer"] == o and r["setting"] == "naive"}
        acc_dev = next(r["rel_dev"] for r in rows if r["optimizer"] == o and r["setting"] == "accumulate")
        ok_up_to = LOGICAL
        for b in sorted(bb for bb in dev if bb > LOGICAL):
            if abs(dev[b]) > TOL:
                break
            ok_up_to = b
        small_ok = all(abs(dev[b]) <= TOL for b in dev if b < LOGICAL)
        inside = [abs(dev[b]) for b in dev if b <= ok_up_to]
        beyond = ", ".join(f"b={b}: {100 * dev[b]:+.1f}%" for b in sorted(dev) if b > ok_up_to)
        worst_naive = max(naive, key=lambda b: abs(naive[b]))
        ends = "".join(f", b={b}: {100 * naive[b]:+.0f}%" for b in (min(naive), max(naive)) if b != worst_naive)
        summary.append(
            f"{o}: rescaled max |dev| {100 * max(inside):.1f}% for b<={ok_up_to}"
            f"{'' if small_ok else ' (but >' + str(int(100 * TOL)) + '% at some b<' + str(LOGICAL) + ')'}"
            f"{'; beyond: ' + beyond if beyond else ''}; naive max |dev| {100 * abs(naive[worst_naive]):.0f}% "
            f"(b={worst_naive}{ends}); accumulate {100 * acc_dev:+.2f}%")
    print("\n" + "\n".join(summary))

    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f}s; results in {OUT}/results.json and results.csv")
    config = dict(dim=DIM, hidden=HIDDEN, label_noise=NOISE, logical_batch=LOGICAL, samples=SAMPLES,
                  batches=list(BATCHES), seeds=list(SEEDS), lr={o: c["lr"] for o, c in BASE.items()}, tolerance=TOL,
                  metric="held-out MSE to the noise-free teacher (population loss minus noise variance)")
    finite = lambda v: [finite(x) for x in v] if isinstance(v, list) else (  # noqa: E731 (strict JSON: no inf/nan)
        None if isinstance(v, float) and not math.isfinite(v) else v)
    clean = [{k: finite(v) for k, v in r.items()} for r in rows]
    atomic_write(OUT / "results.json", json.dumps(dict(config=config, rows=clean, summary=summary,
                                                        seconds=round(total, 1)), indent=1) + "\n")
    fields = [k for k in rows[0] if k != "losses"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(OUT / "results.csv", buf.getvalue())


if __name__ == "__main__":
    main()
