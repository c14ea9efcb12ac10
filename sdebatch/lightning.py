"""Lightning integration: one callback gives a LightningModule a logical batch size.

    trainer = L.Trainer(callbacks=[sdebatch.lightning.LogicalBatch(logical_batch_size=256)], devices=4, ...)

The callback wraps the optimizer returned by ``configure_optimizers`` in a :class:`LogicalBatchOptimizer`:
Lightning then calls ``step`` once per batch (``accumulate_grad_batches`` stays 1) and the wrapper does the
accumulation, the token-weighted normalisation, the SDE rescaling and the sample/token clock. Global batch =
per-device batch x devices x nodes x accumulation. The callback also

- counts the samples of every batch (``batch_size_fn``) and, under DDP, skips the gradient all-reduce on
  micro-steps that do not end a window (``require_backward_grad_sync``);
- applies a short last window at the end of each epoch with its own normalisation and kappa;
- drives the lr from the clock (``lr_schedule``, in samples or tokens) and steps torch schedulers with
  ``interval="step"`` once per update (a short window flushed at an epoch's end included; ``frequency`` counts
  updates);
- logs ``samples_seen``, ``tokens_seen``, ``updates``, ``batch_per_update``, ``kappa``, the effective ``lr`` (and
  betas) per update;
- keeps the window's gradients and the clock in checkpoints, and fixes the data position of a
  :class:`sdebatch.data.ResumableDataLoader` (Lightning fetches one batch ahead), so a run resumed mid-epoch and
  mid-window follows the uninterrupted trajectory.

For a loss whose item count varies, return the sum-reduced loss from ``training_step`` and report the count with
:func:`count` (``count(self, num_items=n_tokens, num_tokens=n_tokens)``).
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size

from .data import ResumableDataLoader
from .ema import ModelEMA
from .rules import ema_decay
from .optimizer import LogicalBatchOptimizer, check_options
from . import checks
from .progress import fmt_seconds, interactive
from .schedules import ClockSchedule, PerUpdateScheduler

__all__ = ["LogCadence", "LogicalBatch", "ProgressLines", "count", "find_optimizer"]


# LogicalBatchOptimizer arguments the callback sets itself
_CALLBACK_OWNS = {"physical_batch_size": "LogicalBatch(physical_batch_size=...) or the loader's batch size",
                  "model": "the LightningModule", "ema": "LogicalBatch(ema_rho=...)",
                  "grad_scaler": "precision='bf16-mixed' (Lightning's GradScaler unscales every batch)"}


def find_optimizer(module: pl.LightningModule) -> LogicalBatchOptimizer:
    """The LogicalBatchOptimizer the callback installed for ``module``."""
    for opt in module.trainer.optimizers:
        if isinstance(opt, LogicalBatchOptimizer):
            return opt
    raise RuntimeError("no LogicalBatchOptimizer on this trainer: add sdebatch.lightning.LogicalBatch to callbacks")


def count(module: pl.LightningModule, num_items: float | torch.Tensor | None = None, *,
          num_tokens: int | torch.Tensor | None = None) -> None:
    """Call from ``training_step``: the loss it returns is a sum over ``num_items`` items (tokens, masked tokens);
    the window is then divided by its total over micro-batches and ranks. ``num_tokens`` feeds the token clock.
    Tensors stay on their device until the update reads the window's counts (one transfer per update)."""
    find_optimizer(module).count(num_items, num_tokens=num_tokens)


class LogCadence:
    """When to log values computed once per update: Lightning's ``self.log`` costs about a millisecond a call, a few
    percent of a small model's update when a dozen values are logged at every one.

    Due at an update when a progress bar is shown (it displays every update), when the Trainer's logging step
    (``Trainer(log_every_n_steps)``, in batches; 0 logs nothing) has been passed since the last time it was due (so a
    logger, which Lightning writes at that cadence from the last logged values, gets current ones), at the first
    update, and when ``final`` (the update that ends training).
    """

    def __init__(self) -> None:
        self._last_step: int | None = None

    def due(self, trainer: pl.Trainer, *, final: bool = False) -> bool:
        every, step = trainer.log_every_n_steps, trainer.global_step
        if every == 0:
            return False
        due = (final or trainer.progress_bar_callback is not None or self._last_step is None
               or step // every > self._last_step // every)
        if due:
            self._last_step = step
        return due


class LogicalBatch(pl.Callback):
    """Logical batch size, accumulation, SDE rescaling and a sample/token clock for any LightningModule.

    Args:
        logical_batch_size: B_L, samples per update the module's hyperparameters were tuned for.
        physical_batch_size: samples per device per batch. Default None: the train dataloader's ``batch_size``.
            "auto": chosen for the hardware before training (:func:`sdebatch.choose_physical_batch`): a few real
            forward/backward passes of the module's ``training_step`` at each candidate, the fastest that fits with
            ``physical_batch_margin`` of CUDA memory free (CPU: throughput only); the table and the choice are
            printed and kept as ``callback.physical_batch_choice``. It sets the per-device batch through the
            attribute ``batch_arg_name`` of the LightningModule or its datamodule, which ``train_dataloader()``
            must read (Lightning's BatchSizeFinder convention). The logical batch never changes; the accumulation
            (or kappa) follows. Under DDP rank 0's choice is used by all ranks.
        physical_batch_candidates: the micro-batches "auto" tries (samples per device). Default None: the powers
            of two (and the largest) that divide the logical batch per device.
        physical_batch_margin: fraction of CUDA memory "auto" keeps free (default 0.1).
        batch_arg_name: the attribute "auto" sets (default "batch_size").
        lr_schedule: optional multiplier t -> factor of the base lr (e.g. ``sdebatch.warmup_cosine(...)``), t in
            ``schedule_unit``; applied before every update.
        schedule_unit: "samples" (default) or "tokens".
        ema_rho: optional model EMA, its decay rho at the logical batch (rho**kappa per update, see ``ema_rescale``).
            The EMA is ``callback.ema`` and is saved in checkpoints. Default None: none.
        max_samples: stop training once the clock reaches this many samples (at an update).
        max_tokens: stop training once the clock reaches this many tokens (at an update).
        batch_size_fn: batch -> number of samples. Default: Lightning's ``extract_batch_size``.
        verbose: print the batch arithmetic at the start of training (default True).
        **optimizer_options: keyword arguments of :class:`sdebatch.LogicalBatchOptimizer`, passed through unchanged
            and checked here, before training: ``accumulation_steps`` (batches per update; default
            ceil(B_L / (physical x devices x nodes))), ``reparameterize`` (one update per batch with kappa > 1 when
            physical x devices x nodes > B_L; otherwise an error), ``rule``, ``beta_form``, ``momentum_mode``,
            ``weight_decay_form``, ``horizon``, ``reference_horizon``, ``gamma``, ``max_grad_norm`` (use it, not the
            Trainer's ``gradient_clip_val``, which would clip every micro-batch), ``ema_rescale``,
            ``estimate_noise_scale`` (logged as ``noise_scale``) and its ``noise_scale_decay`` /
            ``noise_scale_warn`` / ``noise_scale_every``, ``batch_schedule`` (with it, drive the lr with
            ``lr_schedule``, not a torch scheduler stepped per update), ``second_moment_rescale``,
            ``process_group``. The callback sets ``physical_batch_size``, ``model`` and ``ema`` itself.

    Logged (``on_step``, at the updates a :class:`LogCadence` says are due: every update with a progress bar, else at
    the Trainer's ``log_every_n_steps`` and the last update): ``samples_seen``, ``tokens_seen``, ``updates``,
    ``kappa``, ``lr``, ``beta1``/``beta2``, ``batch_per_update`` (of the update just taken), ``noise_scale``;
    ``samples``/``tokens`` on the bar.
    """

    def __init__(self, logical_batch_size: int, *, physical_batch_size: int | str | None = None,
                 lr_schedule: Callable[[float], float] | None = None, schedule_unit: str = "samples",
                 ema_rho: float | None = None, max_samples: int | None = None, max_tokens: int | None = None,
                 batch_size_fn: Callable[[Any], int] | None = None,
                 physical_batch_candidates: Sequence[int] | None = None, physical_batch_margin: float = 0.1,
                 batch_arg_name: str = "batch_size", verbose: bool = True, **optimizer_options: Any) -> None:
        auto = physical_batch_size == "auto"
        sizes = checks.batch_sizes(logical_batch_size, physical_batch_size=None if auto else physical_batch_size,
                                   max_samples=max_samples, max_tokens=max_tokens)
        options = check_options(optimizer_options, _CALLBACK_OWNS)
        if physical_batch_candidates is not None:
            checks.candidates("physical_batch_candidates", physical_batch_candidates)
        if not 0 <= physical_batch_margin < 1:
            raise ValueError(f"physical_batch_margin must be in [0, 1), got {physical_batch_margin!r}")
        if schedule_unit not in ("samples", "tokens"):
            raise ValueError(f"schedule_unit must be 'samples' or 'tokens', got {schedule_unit!r}")
        if ema_rho is not None:
            ema_decay(ema_rho, 1.0)  # rho in [0, 1)
        self.logical_batch_size = sizes["logical_batch_size"]
        self.physical_batch_size = "auto" if auto else sizes["physical_batch_size"]
        self.physical_batch_candidates, self.physical_batch_margin = physical_batch_candidates, physical_batch_margin
        self.batch_arg_name = batch_arg_name
        self.physical_batch_choice = None  # a PhysicalBatchChoice once "auto" has measured
        self.optimizer_options = options
        self.lr_schedule, self.schedule_unit = lr_schedule, schedule_unit
        self.ema_rho, self.ema = ema_rho, None
        self.max_samples, self.max_tokens = sizes["max_samples"], sizes["max_tokens"]
        self.batch_size_fn = batch_size_fn or extract_batch_size
        self.verbose = verbose
        self.optimizer: LogicalBatchOptimizer | None = None
        self._original_configure = None
        self._ema_state: dict | None = None
        self._sdebatch_state: dict | None = None  # the wrapper's clock etc. from a checkpoint's callback state
        self._flush_on_resume = False
        self._trainer: pl.Trainer | None = None
        self._log_cadence = LogCadence()
        self._warned: set[str] = set()
        self._odd_batch: int | None = None  # the size of the last batch if it was not the physical batch

    # --- before training: validate, then wrap the optimizer where Lightning makes it ---
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) conflicts with "
                             "LogicalBatch, which derives the accumulation from logical_batch_size; leave it at 1")
        if trainer.max_steps is not None and trainer.max_steps != -1:
            raise ValueError(f"Trainer(max_steps={trainer.max_steps}) counts optimizer.step() calls, which Lightning "
                             "makes once per batch, and an update under LogicalBatch takes several batches (fewer at "
                             "a ragged epoch's end): the run would stop after that many batches, not updates. Give "
                             "the budget as LogicalBatch(max_samples=...) or LogicalBatch(max_tokens=...) (updates x "
                             "logical_batch_size samples), or by max_epochs, and leave max_steps at -1")
        if trainer.gradient_clip_val:
            raise ValueError("Trainer(gradient_clip_val=...) would clip every micro-batch; pass max_grad_norm= to "
                             "LogicalBatch instead (it clips the window's gradient once per update)")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("precision='16-mixed' uses a GradScaler that Lightning unscales every batch, which breaks "
                             "accumulation; use precision='bf16-mixed' or '32-true' with LogicalBatch")
        if not pl_module.automatic_optimization:
            raise ValueError("LogicalBatch needs automatic optimization; with manual optimization wrap your optimizer "
                             "in sdebatch.LogicalBatchOptimizer directly")
        strategy = type(trainer.strategy).__name__
        if strategy == "FSDPStrategy" and self.optimizer_options.get("max_grad_norm") is not None:
            raise ValueError("max_grad_norm under FSDPStrategy (FSDP1's flat parameters) is not supported: the norm "
                             "of its sharded gradients needs FSDP's own clip_grad_norm_. Use ModelParallelStrategy "
                             "(FSDP2), where it is exact, or leave it None")
        original = pl_module.configure_optimizers
        self._original_configure = original

        def configure_optimizers():
            return self._wrap(original(), trainer, pl_module)

        pl_module.configure_optimizers = configure_optimizers  # the instance attribute shadows the method
        zero_before_validation = pl_module.on_validation_model_zero_grad

        def on_validation_model_zero_grad():
            # Lightning frees the gradients before a validation run; an open window's must survive it (validation,
            # under no_grad, adds none): a validation at an epoch's end comes before the flush of its short window,
            # and a val_check_interval may fall inside a window
            if self.optimizer is None or not self.optimizer.in_window:
                zero_before_validation()

        pl_module.on_validation_model_zero_grad = on_validation_model_zero_grad
        plain_backward = pl_module.backward

        def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            # a loss the training_step did not count (no sdebatch.lightning.count(num_items=...)) is a mean over its
            # batch: weigh it by its samples, as opt.backward(loss, num_samples=n) does, so a short batch in a
            # window (an epoch's last) counts by its size, not as a full one
            opt = self.optimizer
            pending = None if opt is None else opt.window.pending
            if pending is not None and not pending.sum and pending.samples is not None \
                    and opt.window.protocol != "mean":  # (a mean window restored from a checkpoint stays mean)
                loss = loss * pending.samples
                opt.count(num_items=pending.samples)
            plain_backward(loss, *args, **kwargs)

        pl_module.backward = backward

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._original_configure is not None:
            pl_module.__dict__.pop("configure_optimizers", None)
            pl_module.__dict__.pop("on_validation_model_zero_grad", None)
            pl_module.__dict__.pop("backward", None)
            self._original_configure = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception: restore the module, so it can be fitted again
        self.teardown(trainer, pl_module, "fit")

    def _wrap(self, out: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        optimizers = _optimizers_in(out)
        if len(optimizers) != 1:
            raise ValueError(f"LogicalBatch supports exactly one optimizer, configure_optimizers returned "
                             f"{len(optimizers)}")
        inner = optimizers[0]
        world = trainer.num_devices * trainer.num_nodes
        physical = self._fixed_physical()
        if physical is None:  # the loader's batch, read at train start, where configure_batch checks it
            # until then a placeholder; under a batch schedule one sample, which refuses no batch a real per-device
            # batch could reach (a multiple of physical x world is a multiple of world)
            schedule = self.optimizer_options.get("batch_schedule")
            physical = 1 if schedule is not None else max(1, self.logical_batch_size // world)
        self.ema = ModelEMA(pl_module, self.ema_rho) if self.ema_rho is not None else None
        opt = LogicalBatchOptimizer(inner, self.logical_batch_size, physical, model=pl_module, ema=self.ema,
                                    **self.optimizer_options)
        if opt.world_size != world:
            raise ValueError(f"torch.distributed reports {opt.world_size} processes, the Trainer {world} "
                             "devices x nodes")
        if self.lr_schedule is not None:
            ClockSchedule(opt, self.lr_schedule, unit=self.schedule_unit)
        self.optimizer = opt
        return _replace_optimizer(out, inner, opt)

    def _fixed_physical(self) -> int | None:
        return None if self.physical_batch_size == "auto" else self.physical_batch_size

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.physical_batch_size == "auto":  # after the optimizer is wrapped, before a checkpoint is restored
            self._choose_physical_batch(trainer, pl_module)

    def _choose_physical_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr

        from .physical_batch import choose_physical_batch

        name = self.batch_arg_name
        if not lightning_hasattr(pl_module, name):
            raise ValueError(f"physical_batch_size='auto' sets the per-device batch through `{name}` on the "
                             "LightningModule or its datamodule, read by train_dataloader(); neither has it (set "
                             "batch_arg_name=, or give physical_batch_size as an int)")
        holder = trainer.datamodule if trainer.datamodule is not None and hasattr(trainer.datamodule, name) \
            else pl_module
        world = trainer.num_devices * trainer.num_nodes
        per_device = max(1, self.logical_batch_size // world)
        candidates = self.physical_batch_candidates or sorted(
            {b for b in [2 ** i for i in range(per_device.bit_length())] + [per_device] if per_device % b == 0})
        opt, original = self.optimizer, lightning_getattr(pl_module, name)
        batches: dict[int, Any] = {}

        def step(b: int) -> None:  # one forward/backward of the real module on a real batch of b
            if b not in batches:
                lightning_setattr(pl_module, name, b)
                batches[b] = trainer.strategy.batch_to_device(next(iter(holder.train_dataloader())))
            with torch.enable_grad():
                out = pl_module.training_step(batches[b], 0)
                (out["loss"] if isinstance(out, dict) else out).backward()
            pl_module.zero_grad(set_to_none=True)

        # the measuring passes log nothing and leave the optimizer's window empty
        pl_module.log, pl_module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)
        try:
            choice = choose_physical_batch(step, candidates, margin=self.physical_batch_margin,
                                           device=pl_module.device)
        except BaseException:
            lightning_setattr(pl_module, name, original)
            raise
        finally:
            del pl_module.log, pl_module.log_dict
            opt.zero_grad(set_to_none=True)
            opt.discard_window()
        lightning_setattr(pl_module, name, choice.physical_batch_size)
        self.physical_batch_choice = choice
        if self.verbose:
            rank_zero_info(f"sdebatch: physical batch measured on the model (logical batch "
                           f"{self.logical_batch_size} unchanged):\n{choice.describe()}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("LogicalBatch did not see configure_optimizers; was the callback added after setup?")
        self._restore_pending(opt)
        self._gate_schedulers(trainer, opt)  # before the flushes below, which step them
        if self._flush_on_resume:  # resumed from an epoch's last batch: the epoch-end flush it had not reached
            self._flush_on_resume = False
            if opt.in_window and opt.flush():
                self._after_update(trainer, pl_module, in_batch=False)
            opt.zero_grad()
        _align_epoch_progress(trainer)
        physical = self._physical_batch(trainer)
        if physical is None:
            raise ValueError("cannot read the per-device batch size from the train dataloader; pass "
                             "LogicalBatch(physical_batch_size=...)")
        # elastic resume: another per-device batch than the checkpoint's; a window restored with other arithmetic is
        # flushed (applied as a short update) and the run continues in samples
        self._configure_batch(trainer, pl_module, physical)
        if self.verbose:
            rank_zero_info(f"sdebatch: {physical} per device x {trainer.num_devices} devices x {trainer.num_nodes} "
                           f"node(s) x {opt.accumulation_steps} accumulation = {opt.window_batch_size} samples "
                           f"per update (logical batch {self.logical_batch_size}), kappa = {opt.window_kappa:.4g}, "
                           f"rule = {opt.rule}")

    def _physical_batch(self, trainer: pl.Trainer) -> int | None:
        """The per-device batch: the one given, else the train loader's (they must agree when both are known)."""
        fixed, loader = self._fixed_physical(), _loader_batch_size(trainer.train_dataloader)
        # (a batch_size_fn of its own may count other than the loader's items, e.g. two views per item)
        if fixed is not None and loader is not None and loader != fixed and self.batch_size_fn is extract_batch_size:
            raise ValueError(f"LogicalBatch(physical_batch_size={fixed}) but the train dataloader's batch size is "
                             f"{loader}: the accumulation would be derived from {fixed} and every window would hold "
                             "other samples. Leave physical_batch_size None (it is read from the loader) or make "
                             "the two equal")
        return fixed or loader

    def _configure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, physical: int) -> None:
        """The wrapper's arithmetic for this per-device batch (a window it flushes: an update outside a batch)."""
        if self.optimizer.configure_batch(physical, self.optimizer_options.get("accumulation_steps")):
            self._after_update(trainer, pl_module, in_batch=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a loader reloaded with another batch size (reload_dataloaders_every_n_epochs): new arithmetic from here,
        # between windows, as in an elastic resume
        opt = self.optimizer
        physical = self._physical_batch(trainer)
        if opt is not None and physical is not None and physical != opt.physical_batch_size:
            self._configure_batch(trainer, pl_module, physical)
            if self.verbose:
                rank_zero_info(f"sdebatch: the train dataloader's batch is now {physical}: {opt.describe()}")

    @staticmethod
    def _gate_schedulers(trainer: pl.Trainer, opt: LogicalBatchOptimizer) -> None:
        """Torch schedulers with interval="step": Lightning steps them after every batch; gated, they step once per
        update, every ``frequency`` updates (a frequency in batches would miss the short window flushed at a ragged
        epoch's end, and lag one step per such epoch)."""
        for config in trainer.lr_scheduler_configs:
            if config.interval != "step" or isinstance(config.scheduler, _EveryUpdates):
                continue
            if opt.batch_schedule is not None:
                raise ValueError("a torch lr scheduler with interval='step' under a batch_schedule would count "
                                 "updates, whose samples the schedule changes, so its lr would not follow the samples "
                                 "seen: pass the lr schedule as LogicalBatch(lr_schedule=...), which follows the clock")
            config.scheduler, config.frequency = _EveryUpdates(config.scheduler, opt, config.frequency), 1

    def _step_schedulers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step the gated schedulers for an update taken outside a batch (a flushed window), as Lightning does after
        a batch (a plateau scheduler only once its metric is known)."""
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, _EveryUpdates):
                continue
            metric = trainer.callback_metrics.get(config.monitor) if config.reduce_on_plateau else None
            if config.reduce_on_plateau and metric is None:
                continue
            pl_module.lr_scheduler_step(config.scheduler, metric)

    # --- every batch ---
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        opt = self.optimizer
        if trainer.accumulate_grad_batches != 1:  # e.g. a GradientAccumulationScheduler, changing it mid-run
            raise ValueError(f"Trainer's accumulate_grad_batches became {trainer.accumulate_grad_batches} (a "
                             "GradientAccumulationScheduler?): Lightning would then accumulate too, and each update "
                             "would hold that many windows. LogicalBatch derives the accumulation from "
                             "logical_batch_size: leave Lightning's at 1, and ramp the batch with "
                             "LogicalBatch(batch_schedule=...)")
        samples = int(self.batch_size_fn(batch))
        # a batch of another size, other than an epoch's last (known once the next batch comes: an iterable loader
        # has no length): warned once
        if self._odd_batch is not None and "batch size" not in self._warned:
            self._warned.add("batch size")
            warnings.warn(f"a batch of {self._odd_batch} samples where the physical batch is "
                          f"{opt.physical_batch_size}: the accumulation ({opt.accumulation_steps}) was derived from "
                          f"{opt.physical_batch_size}, so each window holds that many batches of whatever size (kappa "
                          "follows the samples counted). If the loader's batch changed, let LogicalBatch read it "
                          "(physical_batch_size=None), or give batches of the physical size", stacklevel=2)
        odd = samples != opt.physical_batch_size and self.batch_size_fn is extract_batch_size
        self._odd_batch = samples if odd else None
        opt.count(num_samples=samples)
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            sync = opt.next_step_updates
            model.require_backward_grad_sync = sync  # what DDP.no_sync() toggles, across Lightning's hooks
            opt.mark_backward_sync(sync)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.optimizer.did_update:
            self._after_update(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._odd_batch = None  # an epoch's last batch may be short
        opt = self.optimizer
        if opt is not None and opt.in_window and opt.flush():
            self._after_update(trainer, pl_module, in_batch=False)
        if opt is not None:
            opt.zero_grad()

    def _after_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_batch: bool = True) -> None:
        opt = self.optimizer
        stop = (self.max_samples is not None and opt.samples_seen >= self.max_samples) or \
            (self.max_tokens is not None and opt.tokens_seen >= self.max_tokens)
        if not in_batch:  # self.log(on_step) is not allowed at epoch end: straight to the logger
            self._step_schedulers(trainer, pl_module)
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics(self._metrics(), step=trainer.global_step)
        elif self._log_cadence.due(trainer, final=stop):
            metrics = self._metrics()
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=trainer.logger is not None,
                               batch_size=opt.physical_batch_size, rank_zero_only=True)
            pl_module.log("samples", metrics["samples_seen"], on_step=True, on_epoch=False, prog_bar=True,
                          logger=False, batch_size=opt.physical_batch_size, rank_zero_only=True)
            if opt.tokens_seen:  # the run counts tokens: show its clock too
                pl_module.log("tokens", metrics["tokens_seen"], on_step=True, on_epoch=False, prog_bar=True,
                              logger=False, batch_size=opt.physical_batch_size, rank_zero_only=True)
        if stop:
            trainer.should_stop = True

    def _metrics(self) -> dict[str, float]:
        """The clock and the effective hyperparameters of the last update."""
        opt = self.optimizer
        eff = opt.effective_hyperparameters()[0]
        metrics = {"samples_seen": float(opt.samples_seen), "tokens_seen": float(opt.tokens_seen),
                   "updates": float(opt.updates), "kappa": float(opt.last_kappa), "lr": float(eff["lr"]),
                   "batch_per_update": float(opt.last_batch_size)}
        if "betas" in eff:
            metrics["beta1"], metrics["beta2"] = (float(b) for b in eff["betas"])
        if opt.noise_scale is not None:
            metrics["noise_scale"] = float(opt.noise_scale)
        return metrics

    # --- checkpoints ---
    def _restore_pending(self, opt: LogicalBatchOptimizer) -> None:
        """A resumed run's EMA, and the wrapper's clock where the optimizer's state came back without it (strategies
        that checkpoint the optimizer through torch.distributed.checkpoint keep only torch's keys)."""
        if self.ema is not None and self._ema_state is not None:
            self.ema.load_state_dict(self._ema_state)
        self._ema_state = None
        if self._sdebatch_state is not None and not opt.sdebatch_state_restored:
            opt.load_sdebatch_state_dict(self._sdebatch_state)
        self._sdebatch_state = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.optimizer is not None and self.optimizer.in_window and _checkpoints_through_dcp(trainer):
            raise RuntimeError(
                f"a checkpoint inside an accumulation window (micro-step {self.optimizer.window.micro_steps} of "
                f"{self.optimizer.accumulation_steps}) under {type(trainer.strategy).__name__}: Lightning saves the "
                "optimizer through torch.distributed.checkpoint, which would drop the window's sharded gradients. "
                "Checkpoint at window ends: ModelCheckpoint(every_n_train_steps=k) with k a multiple of "
                f"{self.optimizer.accumulation_steps} (Lightning counts batches), or at epoch ends.")
        # Lightning fetched one batch ahead: record the batches actually trained on as the loader's position.
        # (Lightning 2.x keeps the loader states under fit_loop.state_dict.combined_loader; older ones one level up.)
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        states = fit_loop.get("state_dict", {}).get("combined_loader", []) or fit_loop.get("combined_loader", [])
        for state in states:
            if isinstance(state, dict) and state.get("sdebatch_resumable"):
                if self._epoch_complete(trainer):  # resume at the start of the next epoch
                    state["epoch"], state["batches"] = state["epoch"] + 1, 0
                else:
                    state["batches"] = processed

    @staticmethod
    def _epoch_complete(trainer: pl.Trainer) -> bool:
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches

    def state_dict(self) -> dict:
        # a checkpoint taken on an epoch's last batch holds the window that on_train_epoch_end is about to flush:
        # a run resumed from it must flush that window before the next epoch, as the uninterrupted run did
        trainer = getattr(self, "_trainer", None)
        pending = bool(trainer is not None and self.optimizer is not None and self.optimizer.in_window
                       and self._epoch_complete(trainer))
        opt = self.optimizer
        return {"ema": self.ema.state_dict() if self.ema is not None else None, "flush_on_resume": pending,
                "sdebatch": opt.sdebatch_state_dict(window=False) if opt is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._ema_state = state_dict.get("ema")
        self._sdebatch_state = state_dict.get("sdebatch")
        self._flush_on_resume = bool(state_dict.get("flush_on_resume", False))


class _EveryUpdates(PerUpdateScheduler):
    """A torch scheduler stepped at most once per update of the wrapper, at every ``every``-th: step() may be called
    after every batch and after a flushed window; it acts when the update count moved since the last call."""

    def __init__(self, scheduler: Any, optimizer: LogicalBatchOptimizer, every: int) -> None:
        super().__init__(scheduler, optimizer)
        self.__dict__["every"], self.__dict__["seen"] = int(every), optimizer.updates

    def step(self, *args: Any, **kwargs: Any) -> None:
        updates = self.__dict__["_logical"].updates
        if updates != self.__dict__["seen"]:
            self.__dict__["seen"] = updates
            if updates % self.__dict__["every"] == 0:
                self.scheduler.step(*args, **kwargs)


def _checkpoints_through_dcp(trainer: pl.Trainer) -> bool:
    """Whether the strategy saves optimizer states with torch.distributed.checkpoint's optimizer state dicts (which
    keep only torch's ``state`` and ``param_groups``)."""
    return type(trainer.strategy).__name__ in ("ModelParallelStrategy", "FSDPStrategy")


def _align_epoch_progress(trainer: pl.Trainer) -> None:
    """Elastic resume: Lightning restored the epoch's batch count in the checkpoint's batch size, and ends the epoch
    when that count reaches the new loader's length; count in the new batches, where the loader resumes."""
    loader = trainer.train_dataloader
    if not isinstance(loader, ResumableDataLoader):
        return
    skip = loader.resume_batches()
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    shift = skip - current.processed
    if current.processed and shift:  # keep Lightning's own offsets between its counters (a batch mid-hooks)
        current.ready, current.started = current.ready + shift, current.started + shift
        current.processed, current.completed = skip, current.completed + shift


class ProgressLines(pl.Callback):
    """Progress as a plain line every ``every_s`` seconds, for runs whose output is a log or a pipe (a progress bar
    there writes thousands of carriage-return redraws). Use with the bar off when not on a terminal::

        pl.Trainer(enable_progress_bar=sys.stdout.isatty(), callbacks=[LogicalBatch(...), ProgressLines()])

    A line: ``[train] update 120, 245,760/1,000,000 tokens (25%), loss 6.81, 13,200 tokens/s, 18.6s elapsed, ETA
    57.2s``; the clock and budget come from the :class:`LogicalBatch` callback (tokens when it counts them, else
    samples; the budget from its ``max_tokens`` / ``max_samples``, else none). Rank zero only.

    Args:
        every_s: seconds between lines (default 30.0).
        metric: the logged value to show (default: ``"loss"`` if logged, else none).
        when: "not_interactive" (default: silent when stdout is a terminal, where the bar is) or "always".
        stream: where to print (default stdout).
    """

    def __init__(self, every_s: float = 30.0, metric: str | None = None, *, when: str = "not_interactive",
                 stream: Any = None) -> None:
        checks.positive_finite("every_s", every_s)
        checks.choice("when", when, ("not_interactive", "always"))
        self.every_s, self.metric, self.when, self.stream = float(every_s), metric, when, stream
        self._start = self._last = 0.0
        self._clock0 = 0

    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and (self.when == "always" or not interactive(self._out()))

    @staticmethod
    def _logical_batch(trainer: pl.Trainer) -> "LogicalBatch | None":
        return next((cb for cb in trainer.callbacks if isinstance(cb, LogicalBatch)), None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        lb = self._logical_batch(trainer)
        opt = lb.optimizer if lb is not None else None
        self._clock0 = 0 if opt is None else (opt.tokens_seen or opt.samples_seen)  # a resumed run's clock

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s or not self._active(trainer):
            return
        self._last = now
        print(self.line(trainer, now), file=self._out(), flush=True)

    def line(self, trainer: pl.Trainer, now: float) -> str:
        """The progress line (see the class docstring)."""
        lb = self._logical_batch(trainer)
        opt = lb.optimizer if lb is not None else None
        elapsed = now - self._start
        parts = []
        if opt is not None:
            tokens = opt.tokens_seen or lb.max_tokens is not None  # a token budget counts tokens from the start
            unit, seen = ("tokens", opt.tokens_seen) if tokens else ("samples", opt.samples_seen)
            budget = lb.max_tokens if unit == "tokens" else lb.max_samples
            parts.append(f"update {opt.updates:,}, {seen:,}" + (f"/{budget:,}" if budget else "") + f" {unit}"
                         + (f" ({seen / budget:.0%})" if budget else ""))
        else:
            unit, seen, budget = "steps", trainer.global_step, None
            parts.append(f"step {seen:,}")
        key = self.metric or ("loss" if "loss" in trainer.callback_metrics else None)
        value = trainer.callback_metrics.get(key) if key else None
        if value is not None:
            parts.append(f"{key} {float(value):.4g}")
        rate = (seen - self._clock0) / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate:,.0f} {unit}/s")
        parts.append(f"{fmt_seconds(elapsed)} elapsed")
        if budget and rate > 0:
            parts.append(f"ETA {fmt_seconds(max(budget - seen, 0) / rate)}")
        return "[train] " + ", ".join(parts)


def _optimizers_in(out: Any) -> list:
    if isinstance(out, torch.optim.Optimizer):
        return [out]
    if isinstance(out, dict):
        return [out["optimizer"]]
    if isinstance(out, (list, tuple)):
        if len(out) == 2 and isinstance(out[0], (list, tuple)):
            return list(out[0])
        found = []
        for item in out:
            found += _optimizers_in(item)
        return found
    raise ValueError(f"configure_optimizers returned {type(out).__name__}; LogicalBatch understands an optimizer, "
                     "a dict with 'optimizer', or ([optimizer], [schedulers])")


def _replace_optimizer(out: Any, inner: torch.optim.Optimizer, opt: LogicalBatchOptimizer) -> Any:
    """The same structure with the optimizer wrapped. Schedulers are re-pointed at the wrapper (Lightning checks
    that they belong to a returned optimizer); they drive the same param groups, which the wrapper proxies."""
    if out is inner:
        return opt
    if getattr(out, "optimizer", None) is inner:  # a torch scheduler
        out.optimizer = opt
        if not hasattr(opt.step, "_wrapped_by_lr_sched"):
            # torch schedulers warn unless optimizer.step carries this mark; ours reaches the inner step they patched
            step = opt.step

            def marked_step(*args: Any, **kwargs: Any) -> Any:
                return step(*args, **kwargs)
            marked_step._wrapped_by_lr_sched = True
            opt.step = marked_step
        return out
    if isinstance(out, dict):
        return {k: _replace_optimizer(v, inner, opt) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_replace_optimizer(o, inner, opt) for o in out)
    return out


def _loader_batch_size(loader: Any) -> int | None:
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    if isinstance(loader, dict) and len(loader) == 1:
        loader = next(iter(loader.values()))
    bs = getattr(loader, "batch_size", None)
    if bs is None:
        bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return bs
