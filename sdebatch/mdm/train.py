"""Train the tri-modal masked diffusion model in Lightning through sdebatch's public API.

Everything batch-related goes through :class:`sdebatch.lightning.LogicalBatch`: the logical batch, the accumulation
that follows from the per-device batch, the SDE rescaling when they differ, the token clock (the lr schedule and the
budget are in tokens), the model EMA with decay rho**kappa, checkpoints and exact resume. The module itself is a
plain LightningModule: it returns the ELBO as a sum and reports its fixed denominator with ``sdebatch.lightning.count``.

A run is described by one flat config dict (a TOML file for ``sdebatch train --config``; a sweep point for
``experiments/workloads.py:mdm``), checked by :class:`sdebatch.mdm.config.TrainConfig`, which documents every key.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

import sdebatch
import sdebatch.lightning as sl
from sdebatch import presets
from sdebatch.data import ResumableDataLoader
from sdebatch.utils import atomic_write

from .checkpoint import RECORD_FILE, RECORD_KEY, training_record
from .config import DEFAULTS, TrainConfig, load_config, seed_of  # noqa: F401 (public here as before)
from .data.dataset import TriModalDataset
from .data.mixture import MixtureSampler
from .model import build_model, describe, param_groups, train_model_config
from .objective import MODALITY_NAMES, elbo, elbo_standard_error, mdm_loss, sample_draws

MODALITIES = ("text", "image", "audio")  # the per-modality sums of mdm_loss


class MDMModule(pl.LightningModule):
    """The denoiser, its ELBO objective and AdamW with CompleteP per-group learning rates."""

    def __init__(self, config: dict, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.model_config = train_model_config(config, vocab_size)
        self.model = build_model(self.model_config)
        # compiled in a list, so it is not a second registered copy of the model (state_dict keys stay the same)
        self._train_model = [torch.compile(self.model)] if config.get("compile") else [self.model]
        self._last = None  # (time, tokens) at the previous update, for tokens/s
        self.micro_steps = 0  # training_step calls so far (checkpointed): keys the draws of batches without positions
        self._window: list[torch.Tensor] = []  # per micro-batch: its ELBO and per-modality sums, on the device
        self._last_elbo: torch.Tensor | None = None  # the last micro-batch's ELBO (bits per item), on the device
        self._log_cadence = sl.LogCadence()
        self.window_elbo_bits: dict[str, float] = {}  # the last complete window's training ELBO per modality
        self.window_micro_elbo_bits: list[float] = []  # and each of its micro-batches' ELBO, in order
        self.val_results: list[dict] = []
        self.record: dict | None = None  # config + data vocabulary, saved in checkpoints (set by build)

    def forward(self, tokens, pad=None, select=None):
        return self.model(tokens, pad=pad, select=select)

    def loss(self, batch: dict) -> dict:
        """:func:`mdm_loss` of a training batch. The masking draws are a function of the seed and each sample's
        stream position (common random numbers: the same draws at every physical batch size); for batches without
        positions, of (seed, rank, micro-step). Never of the global RNG, which a checkpoint does not hold: a resumed
        run draws what the uninterrupted run drew."""
        if "position" in batch:
            t, u, drop_u = sample_draws(batch["position"], batch["tokens"].shape[1], seed=seed_of(self.config, "draw"))
            draws = dict(t=t, u=u, drop_u=drop_u)
        else:
            gen = torch.Generator(device=batch["tokens"].device)
            gen.manual_seed((seed_of(self.config, "draw") * 1_000_003 + self.global_rank * 7919
                             + self.micro_steps * 104_729) % 2**63)
            draws = dict(generator=gen)
        return mdm_loss(self._train_model[0], batch, schedules=self.config["schedule"],
                        cond_drop=self.config["cond_drop"], **draws)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.loss(batch)
        self.micro_steps += 1
        sl.count(self, num_items=out["num_items"], num_tokens=batch["pad"].sum())
        # The window's ELBO sums stay on the device, read in one transfer at the update (float64: exact for the
        # float32 sums and the integer counts); logged at the updates the cadence says are due.
        self._last_elbo = out["elbo_bits"].detach()
        self._window.append(torch.stack([self._last_elbo.double(), *(out[f"{k}/{m}"].double() for m in MODALITIES
                                                                      for k in ("sum", "count"))]))
        opt = sl.find_optimizer(self)
        if opt.next_step_updates:
            rows = torch.stack(self._window).tolist()
            self._window = []
            self.window_micro_elbo_bits = [r[0] for r in rows]
            self.window_elbo_bits, counts = {}, {}
            for i, m in enumerate(MODALITIES):
                total, c = 0.0, 0
                for r in rows:
                    total += r[1 + 2 * i]
                    c += int(r[2 + 2 * i])
                if c:
                    self.window_elbo_bits[m], counts[m] = total / c / math.log(2), c
            if self._log_cadence.due(self.trainer):
                self.log("elbo_bits", rows[-1][0], prog_bar=True, batch_size=max(sum(counts.values()), 1))
                for m, v in self.window_elbo_bits.items():
                    self.log(f"elbo_bits/{m}", v, batch_size=counts[m])
                now = time.time()
                if self._last is not None and opt.tokens_seen > self._last[1]:
                    self.log("tok/s", (opt.tokens_seen - self._last[1]) / max(now - self._last[0], 1e-9),
                             prog_bar=True, batch_size=1)
                self._last = (now, opt.tokens_seen)
        return out["loss_sum"]

    @property
    def last_elbo_bits(self) -> float:
        """The last training micro-batch's ELBO in bits per item (reading it waits for the device); nan before any."""
        return float("nan") if self._last_elbo is None else float(self._last_elbo)

    def on_fit_start(self) -> None:
        # after the callback's ClockSchedule hook (registered when the optimizer was wrapped), before any update (a
        # resumed run may flush a window in the callback's on_train_start)
        if self.config["batch_schedule"] and self.config["ramp"] == "lr_only":
            sl.find_optimizer(self).register_pre_update_hook(_lr_times_sqrt_kappa)

    def on_train_start(self) -> None:
        self._window = []  # training starts a window: not rows of passes before it (physical_batch_size="auto")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mdm_micro_steps"] = self.micro_steps
        if self.record is not None:  # the checkpoint knows its config and data: `sdebatch eval/sample` need no --config
            checkpoint[RECORD_KEY] = self.record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.micro_steps = int(checkpoint.get("mdm_micro_steps", 0))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        r = elbo(self.model, batch, n_t=4, schedules=self.config["schedule"], seed=batch_idx)
        self.val_results.append({k: float(v) for k, v in r.items() if not isinstance(v, (dict, torch.Tensor))})
        self.log("val_elbo_bits", float(r["bits_per_token"]), batch_size=int(r["num_items"]), sync_dist=True)

    def configure_optimizers(self):
        c = self.config
        groups = param_groups(self.model, c["lr"], c["weight_decay"])
        return torch.optim.AdamW(groups, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"])


def _lr_times_sqrt_kappa(opt, window: dict) -> None:
    """The lr-only ramp arm (rule "none"): the lr the clock's schedule just set, times sqrt(kappa) of this update's own
    window (its batch / the logical batch), set afresh by the schedule before every update, so never compounded."""
    factor = math.sqrt(window["kappa"])
    for group in opt.param_groups:
        group["lr"] = group["lr"] * factor


class MDMDataModule(pl.LightningDataModule):
    """The prepared data as a mixture stream (train) and a fixed validation set."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        self.train_set = TriModalDataset(config["data"], "train", generate_prob=config["generate_prob"],
                                         seed=seed_of(config, "data"))
        # the held-out set (which pairs are scored in which direction) depends on the data folder alone: runs of
        # any seed are scored on the same sequences
        self.val_set = TriModalDataset(config["data"], "val", generate_prob=config["generate_prob"], seed=0)

    @property
    def vocab(self):
        return self.train_set.vocab

    def samples_per_epoch(self) -> int:
        # an "epoch" is a stretch of the stream large enough to hold the budget; the budget stops the run
        tokens_per_seq = self.train_set.seq_len
        return int(self.config["tokens"] / (0.5 * tokens_per_seq)) + self.config["logical_batch_size"] * 4

    def train_sampler(self) -> MixtureSampler:
        """The training stream: the sources mixed by ``mix``, seeded by ``seed``, with stream positions."""
        c, sizes = self.config, self.train_set.sizes
        weights = {k: float(c["mix"].get(k, 0.0)) for k in sizes}
        return MixtureSampler(sizes, weights, self.samples_per_epoch(), seed=seed_of(c, "data"), with_position=True)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, self.config["physical_batch_size"], sampler=self.train_sampler(),
                                   drop_last=False)

    def val_dataloader(self) -> DataLoader:
        sizes = self.val_set.sizes
        keys = [(k, i) for k in ("text", "image", "audio") for i in range(sizes[k])]
        n = min(self.config["val_sequences"], len(keys))
        picked = [keys[i * len(keys) // n] for i in range(n)]  # evenly spaced: every modality in proportion
        return DataLoader([self.val_set[k] for k in picked], self.config["val_batch_size"])


def build(config: dict) -> tuple[MDMModule, MDMDataModule, sl.LogicalBatch]:
    """The module, the data and the sdebatch callback a config describes."""
    # exact beyond the logical batch = logical-sized chunks in sequence, i.e. a physical batch of the logical size
    config = {**config, "physical_batch_size": presets.update_batch(config["rule"], config["logical_batch_size"],
                                                                    config["physical_batch_size"])}
    data = MDMDataModule(config)
    module = MDMModule(config, data.vocab.size)
    module.record = training_record(config, data.vocab)
    rule = presets.wrapper_kwargs(config["rule"])
    lr_schedule = sdebatch.warmup_cosine(total=config["tokens"], warmup=config["warmup"] * config["tokens"],
                                         final=config["final_lr"])
    ramp = None
    if config["batch_schedule"] == "seesaw":  # the cosine's halvings become doublings of the batch (Seesaw)
        from sdebatch.batch_schedules import seesaw

        ramp = seesaw(lr_schedule, config["logical_batch_size"], config["max_batch_size"], config["tokens"],
                      unit="tokens")
    elif config["batch_schedule"]:
        ramp = sdebatch.batch_schedule(config["batch_schedule"], unit="tokens")
    if ramp is not None and config["ramp"] != "rules":  # the baselines: nothing rescaled, or the lr alone
        rule["rule"] = "none"  # lr_only: the module multiplies each update's lr by its own sqrt(kappa)
    callback = sl.LogicalBatch(
        config["logical_batch_size"], physical_batch_size=config["physical_batch_size"], lr_schedule=lr_schedule,
        schedule_unit="tokens", max_tokens=config["tokens"], ema_rho=config["ema"] or None,
        estimate_noise_scale=config["estimate_noise_scale"], max_grad_norm=config["max_grad_norm"] or None,
        batch_schedule=ramp,
        second_moment_rescale=config["second_moment_rescale"], **rule)
    return module, data, callback


def train(config: dict, *, progress: bool = True, ckpt_path: str | None = None,
          callbacks: list | None = None) -> dict:
    """Train one config; returns final metrics (validation ELBO per modality, tokens, wall clock, tokens/s)."""
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    pl.seed_everything(seed_of(config, "init"), verbose=False)
    module, data, callback = build(config)
    if ckpt_path is not None:  # a checkpoint of another model or data: say so now, not as a shape error in Lightning
        from .checkpoint import model_state, open_checkpoint

        obj = open_checkpoint(ckpt_path, config=config)[0]
        model_state(obj, module.model)
        del obj
    callbacks = list(callbacks or [])
    if config["checkpoint_every"]:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=Path(config["out"]) / "checkpoints", every_n_train_steps=config["checkpoint_every"],
            save_top_k=-1, save_last=True, filename="{step}"))
    if progress:
        print(describe(module.model_config, config["model"]), flush=True)
    else:  # quiet runs (sweep workers, tests): no Lightning banners ("GPU available", tips) either
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    bar = progress and sys.stdout.isatty()  # a log or a pipe gets a line every 30 s instead of a redrawn bar
    if progress and not bar:
        callbacks.append(sl.ProgressLines(every_s=30.0, metric="elbo_bits"))
    checkpointing = any(isinstance(cb, pl.callbacks.Checkpoint) for cb in callbacks)
    trainer = pl.Trainer(accelerator="auto", devices=config["devices"], precision=config["precision"],
                         strategy=config["strategy"],
                         max_epochs=1000, callbacks=[callback] + callbacks, logger=False,
                         enable_checkpointing=checkpointing, enable_progress_bar=bar, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False,
                         limit_val_batches=0 if not config["eval_every_tokens"] else 1.0,
                         default_root_dir=config["out"])
    start = time.time()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    wall = time.time() - start
    opt = callback.optimizer
    result = {"tokens_seen": opt.tokens_seen, "samples_seen": opt.samples_seen, "updates": opt.updates,
              "wall_clock_s": wall, "tokens_per_s": opt.tokens_seen / max(wall, 1e-9),
              "noise_scale": opt.noise_scale,
              "train_elbo_bits": module.last_elbo_bits}
    if config["noise_probe"] and trainer.world_size == 1:  # a diagnostic of single-device runs (not of sharded ones)
        result["noise_probe"] = noise_probe(module, data, start=opt.samples_seen, sequences=config["noise_probe"])
    if config["val_sequences"]:
        if callback.ema is not None:
            with callback.ema.swapped(module):
                result["val"] = validate(module, data)
        else:
            result["val"] = validate(module, data)
    if config["out"]:
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
        if callback.ema is not None:  # evaluate the averaged weights, as validation did
            names = [n for n, _ in module.model.named_parameters()]
            weights.update({n: p.detach().cpu() for n, p in zip(names, callback.ema.params[-len(names):])})
        atomic_write(out / "model.pt", lambda f: torch.save(weights, f))
        atomic_write(out / RECORD_FILE, json.dumps(module.record, indent=1).encode())
        result["weights"] = str(out / "model.pt")
    result["module"] = module
    return result


def probe_positions(n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` positions drawn at random from [2^40, 2^41), far beyond any training stream: keys of independent draws
    (their golden-ratio times are as good as i.i.d. uniform, unlike those of consecutive positions)."""
    g = torch.Generator().manual_seed(seed + 7_777)
    return torch.randint(2 ** 40, 2 ** 41, (n,), generator=g)


def noise_probe(module: MDMModule, data: MDMDataModule, *, start: int, sequences: int, micro_batch: int = 4,
                group_size: int = 16) -> dict:
    """B_simple of the final (raw, not EMA) weights on the next ``sequences`` of the training stream (from position
    ``start``), by :func:`sdebatch.noise.probe_noise_scale`: micro-batches of ``micro_batch`` sequences, groups of
    ``group_size``; each micro-batch's loss is its ELBO per target token, as the optimizer sees it.

    The masking draws are keyed by :func:`probe_positions`, not by the sequences' own positions: consecutive positions
    have stratified times (the golden-ratio sequence), which would correlate the micro-batches of a group and bias the
    two-size estimator (it assumes independent samples; tr Sigma came out ~3x low in a toy check)."""
    from sdebatch.noise import probe_noise_scale

    keys = data.train_sampler().stream(start, start + sequences)
    draw_at = probe_positions(sequences, seed=module.config["seed"])
    items = [data.train_set[(name, i, int(draw_at[k]))] for k, (name, i) in enumerate(keys)]
    collate = torch.utils.data.default_collate
    device = next(module.parameters()).device

    def loss(chunk):
        def fn():
            out = module.loss({k: v.to(device) for k, v in collate(chunk).items()})
            return out["loss_sum"] / out["num_items"].clamp(min=1)
        return fn

    losses = [loss(items[i:i + micro_batch]) for i in range(0, len(items) - micro_batch + 1, micro_batch)]
    return probe_noise_scale(module.model.parameters(), losses, micro_batch_size=micro_batch, group_size=group_size)


@torch.no_grad()
def validate(module: MDMModule, data: MDMDataModule) -> dict:
    """Held-out ELBO in bits per token, overall and per modality, each with the estimator's own standard error
    (``*_se``: from the time/mask draws alone, see :func:`elbo_standard_error`; None with one replicate). The draws
    are fixed (seeded by batch), so runs compare like for like. ``rows`` holds each held-out sequence's estimate per
    replicate (``nats`` R x N), ``items`` and ``modality``, for paired comparisons between runs."""
    module.eval()
    c = module.config
    nats, items, modality = [], [], []
    for i, batch in enumerate(data.val_dataloader()):
        batch = {k: v.to(module.device) for k, v in batch.items()}
        r = elbo(module.model, batch, n_t=c["val_time_points"], replicates=c["val_replicates"],
                 schedules=c["schedule"], seed=i)
        nats.append(r["row_nats"])
        items.append(r["row_items"])
        modality.append(r["row_modality"])
    module.train()
    rows = {"nats": torch.cat(nats, 1), "items": torch.cat(items), "modality": torch.cat(modality)}
    out = summarize_rows(rows)
    out["rows"] = {k: v.tolist() for k, v in rows.items()}
    return out


def summarize_rows(rows: dict) -> dict:
    """Bits per token and its estimator standard error, overall and per modality, from per-sequence estimates
    (``nats`` (R, N), ``items`` (N,), ``modality`` (N,) as :func:`validate` records them; lists or tensors)."""
    nats = torch.as_tensor(rows["nats"], dtype=torch.float64)
    items = torch.as_tensor(rows["items"], dtype=torch.float64)
    modality = torch.as_tensor(rows["modality"])
    out = {}
    for name, sel in [("bits_per_token", torch.ones_like(modality, dtype=torch.bool))] + [
            (m, modality == MODALITY_NAMES[m]) for m in ("text", "image", "audio")]:
        n = float(items[sel].sum())
        if n <= 0:
            continue
        out[name] = float(nats[:, sel].mean(0).sum()) / n / math.log(2)
        out[f"{name}_se"] = elbo_standard_error(nats[:, sel], n) if nats.shape[0] > 1 else None
    return out
