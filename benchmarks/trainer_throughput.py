"""Throughput of the Lightning MDM trainer (with sdebatch's callback) against a plain PyTorch loop of the same model,
data, objective and number of micro-batches, in one process; also peak memory (RSS on CPU, CUDA max allocated).

The plain loop is what a user writes by hand: AdamW with the same per-group lrs, ``loss_sum / num_items`` per
micro-batch, accumulate, step. Both read the same prepared data folder through the same DataLoader. They alternate
(plain, trainer, plain, trainer, ...; the order flips every repeat). Both train on the same micro-batches in the same
order, so their i-th updates do the same work: each side records when each update ends, and a pair's ratio is the
median over updates of time(plain update i) / time(trainer update i), the trainer's relative throughput, robust to
the odd update another process slowed (whole-run throughputs, whose ratio moved by +-5% between pairs on a shared
2-core machine, are reported too). The result is the median over ``--repeats`` pairs (default 9) with its min..max
(target >= 0.98). Nine pairs of 150k tokens rather than five of 300k (the same time): an outside load that slows a
whole run (seen: 2 of 5 trainer runs at 40-50 s against 28 s) moves a median of nine less than one of five; with a
pair-to-pair spread of 2-3% the median's standard error is about 1%. Each side's clock starts after its first update
(compilation, the allocator's and the optimizer state's first touch, Lightning's set-up: one-off costs, not
throughput). Needs a data folder (`sdebatch data prepare`).

``python -m benchmarks.trainer_throughput --data data/tiny [--tokens 150000] [--repeats 9]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from sdebatch.lightning import find_optimizer
from sdebatch.utils import atomic_write

from sdebatch.mdm import train as mdm_train
from sdebatch.mdm.model import build_model, flops_per_token, get_config, param_groups
from sdebatch.mdm.config import seed_of
from sdebatch.mdm.objective import mdm_loss, sample_draws

from .wrapper_overhead import _sync

RESULTS = Path(os.environ.get("SDEBATCH_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
# Dense bf16 peak TFLOP/s by CUDA device name (vendor datasheets, no sparsity), for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def peak_tflops(given: float | None) -> float | None:
    """The accelerator's peak for MFU: ``given``, else the CUDA device's datasheet value, else None (CPU)."""
    if given:
        return given
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def plain_loop(config: dict, tokens: int) -> dict:
    """The same training without Lightning or sdebatch (on the GPU when there is one, with the config's bf16 and
    compile): returns tokens/s over ``tokens`` real tokens."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = mdm_train.MDMDataModule(config)
    model = build_model(get_config(config["model"], data.vocab.size, **config["model_overrides"])).to(device)
    opt = torch.optim.AdamW(param_groups(model, config["lr"], config["weight_decay"]), lr=config["lr"],
                            betas=tuple(config["betas"]), eps=config["eps"])
    forward = torch.compile(model) if config["compile"] else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16-mixed")
    accum = max(1, config["logical_batch_size"] // config["physical_batch_size"])
    seen, micro, seen0 = 0, 0, 0
    marks: list[float] = []  # when each update ended
    for batch in data.train_dataloader():
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast:
            # the trainer's draws (keyed by stream position): the same objective, the same work
            t, u, drop_u = sample_draws(batch["position"], batch["tokens"].shape[1], seed=seed_of(config, "draw"))
            out = mdm_loss(forward, batch, schedules=config["schedule"], cond_drop=config["cond_drop"], t=t, u=u,
                           drop_u=drop_u)
        (out["loss_sum"] / out["num_items"].clamp(min=1)).backward()  # mean-of-means: the usual hand-written loop
        micro += 1
        seen += int(batch["pad"].sum())
        if micro % accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            marks.append(time.perf_counter())
            if len(marks) == 1:  # the clock starts after the first update
                seen0 = seen
            if seen >= tokens:  # at an update, as the trainer stops: both sides time the same micro-batches
                break
    if len(marks) < 2:
        raise SystemExit(f"--tokens {tokens} ends before the second update: nothing timed")
    return timing(marks, seen - seen0)


class FitClock(pl.Callback):
    """Times the fit loop from its first update to its end, and the tokens in between, as the plain loop is timed:
    Lightning's one-off set-up and the first update's compilation and first-touch costs are not throughput."""

    def __init__(self) -> None:
        self.marks: list[float] = []  # when each update ended
        self.tokens0 = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        opt = find_optimizer(module)
        if opt.did_update:
            _sync()
            self.marks.append(time.perf_counter())
            if len(self.marks) == 1:
                self.tokens0 = opt.tokens_seen

    def on_train_end(self, trainer, module) -> None:
        if len(self.marks) < 2:
            raise SystemExit("the trainer ended before its second update: nothing timed")
        self.result = timing(self.marks, find_optimizer(module).tokens_seen - self.tokens0)


def timing(marks: list[float], tokens: int) -> dict:
    """Tokens and seconds from the first update's end to the last's, and each later update's seconds."""
    return {"tokens": tokens, "seconds": marks[-1] - marks[0],
            "update_seconds": [b - a for a, b in zip(marks, marks[1:])]}


def trainer_run(config: dict) -> dict:
    clock = FitClock()
    result = mdm_train.train({**config, "val_sequences": 0, "out": ""}, progress=False, callbacks=[clock])
    return {**clock.result, "seconds_with_setup": result["wall_clock_s"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/tiny")
    ap.add_argument("--tokens", type=int, default=150_000, help="tokens per run (default 150000)")
    ap.add_argument("--physical", type=int, default=8)
    ap.add_argument("--logical", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9, help="alternating pairs (default 9)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="tiny", help="a config of sdebatch.mdm.model.CONFIGS (default tiny)")
    ap.add_argument("--precision", default="32-true", help='Lightning precision ("bf16-mixed" on a GPU)')
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both sides)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="accelerator peak TFLOP/s for MFU (default: looked up from the CUDA device name)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = mdm_train.load_config(None, data=args.data, model=args.model, tokens=args.tokens,
                                   physical_batch_size=args.physical,
                                   logical_batch_size=args.logical, estimate_noise_scale=False, threads=args.threads,
                                   precision=args.precision, compile=args.compile, noise_probe=0)
    rows, ratios, throughput_ratios = [], [], []
    runs = (("plain", lambda: plain_loop(config, args.tokens)), ("trainer", lambda: trainer_run(config)))
    for r in range(args.repeats):  # alternate, flipping the order, so drifting background load hits both alike
        pair: dict[str, dict] = {}
        for name, fn in (runs if r % 2 == 0 else runs[::-1]):
            m = fn()
            m.update(name=name, repeat=r, tokens_per_s=m["tokens"] / m["seconds"])
            rows.append(m)
            pair[name] = m
            print(f"{name:>8} repeat {r}: {m['tokens']:,} tokens in {m['seconds']:.1f}s = "
                  f"{m['tokens_per_s']:,.0f} tok/s", flush=True)
        plain, trainer = pair["plain"], pair["trainer"]
        if plain["tokens"] != trainer["tokens"]:  # the update-by-update pairing needs the same micro-batches
            raise SystemExit(f"plain loop and trainer timed different work: {plain['tokens']:,} vs "
                             f"{trainer['tokens']:,} tokens")
        ratios.append(statistics.median(p / t for p, t in zip(plain["update_seconds"], trainer["update_seconds"])))
        throughput_ratios.append(trainer["tokens_per_s"] / plain["tokens_per_s"])
    best = {n: max(x["tokens_per_s"] for x in rows if x["name"] == n) for n in ("plain", "trainer")}
    ratio = statistics.median(ratios)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    # model FLOPs per token (PaLM's 6N + attention count; an upper bound, see flops_per_token) x tokens/s
    vocab_size = mdm_train.MDMDataModule(config).vocab.size
    shape = get_config(config["model"], vocab_size, **config["model_overrides"])
    tflops = flops_per_token(shape) * best["trainer"] / 1e12
    peak = peak_tflops(args.peak_tflops)
    mfu = tflops / peak if peak else None
    print(f"trainer / plain loop, update by update, median of {args.repeats} alternating pairs: {ratio:.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.98); whole-run throughput ratio "
          f"{statistics.median(throughput_ratios):.3f} ({min(throughput_ratios):.3f}..{max(throughput_ratios):.3f}); "
          f"peak RSS {peak_rss_mb:.0f} MB" + (f", CUDA peak {cuda_peak:.0f} MB" if cuda_peak else "")
          + f"; trainer {tflops * 1e3:.2f} GFLOP/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else
                                                       " (MFU: CUDA or --peak-tflops only)"))
    results = {"config": {k: config[k] for k in ("model", "physical_batch_size", "logical_batch_size", "tokens",
                                                 "precision", "compile")},
               "threads": args.threads, "rows": rows, "best_tokens_per_s": best, "ratio": ratio,
               "ratios": ratios, "ratio_min": min(ratios), "ratio_max": max(ratios), "target": 0.98,
               "throughput_ratios": throughput_ratios,
               "peak_rss_mb": peak_rss_mb, "cuda_peak_mb": cuda_peak, "loadavg_1min": os.getloadavg()[0],
               "model_tflops_per_s": tflops, "peak_tflops": peak, "mfu": mfu}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS / "trainer_throughput.json", json.dumps(results, indent=2).encode())
    return results


if __name__ == "__main__":
    main()
