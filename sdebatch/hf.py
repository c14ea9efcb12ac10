"""Hugging Face ``transformers.Trainer`` with a logical batch size (``pip install sdebatch[hf]``).

    trainer = sdebatch.hf.LogicalBatchTrainer(model=model, args=TrainingArguments(per_device_train_batch_size=8, ...),
                                              train_dataset=ds, logical_batch_size=256)

Trainer's loop owns the accumulation: it fetches a window of micro-batches, counts its loss-bearing tokens over the
window and the ranks (``num_items_in_batch``), skips the gradient all-reduce on all but the last micro-batch, clips
once, steps the optimizer and its lr scheduler once, and applies a short last window at the end of an epoch. What a
wrapper accumulating under Trainer would break (Trainer zeroes the model's gradients after every ``optimizer.step()``,
steps the scheduler and clips at every call), this class avoids by giving the window to Trainer:

- ``gradient_accumulation_steps`` = logical / (per-device batch x world size), derived when left at 1;
- the optimizer is wrapped in a :class:`sdebatch.LogicalBatchOptimizer` at accumulation 1 whose micro-step is
  Trainer's whole window: it counts the window's samples and tokens (all ranks), rescales the hyperparameters for
  kappa = samples / logical (a short last window, or ``reparameterize=True`` with a batch above the logical one),
  keeps the sample / token clock and updates an EMA;
- the logged ``learning_rate`` is the lr the update used (x sqrt(kappa) under the square-root rule), with ``kappa``,
  ``samples_seen`` and ``tokens_seen`` beside it.

What it cannot make exact it refuses at construction: a batch ramp (Trainer fixes the accumulation for the whole
run), the in-run noise scale, fp16 (its GradScaler skips steps the clock would count; use bf16), DeepSpeed and FSDP
through Trainer, ``auto_find_batch_size``, and an optimizer that is already a LogicalBatchOptimizer.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
import transformers

from . import checks
from .optimizer import LogicalBatchOptimizer, check_options

__all__ = ["LogicalBatchTrainer", "window_counts"]

# LogicalBatchOptimizer options that Trainer owns, and what to use instead
_TRAINER_OWNS = {
    "physical_batch_size": "TrainingArguments(per_device_train_batch_size=...)",
    "accumulation_steps": "TrainingArguments(gradient_accumulation_steps=...)",
    "max_grad_norm": "TrainingArguments(max_grad_norm=...), which clips the window's gradient once per update",
    "grad_scaler": "TrainingArguments(bf16=True)",
    "model": "the Trainer's model",
    "process_group": "Trainer's own data-parallel group",
}
_REFUSED = {
    "batch_schedule": "a batch ramp changes the accumulation during the run, which transformers.Trainer fixes for "
                      "the whole run: use sdebatch.LogicalBatchOptimizer in your own loop (or with accelerate) or "
                      "sdebatch.lightning.LogicalBatch, which support batch_schedule",
    "estimate_noise_scale": "the in-run noise scale needs the window's micro-batches, which Trainer's loop keeps to "
                            "itself: measure B_simple with sdebatch.noise.probe_noise_scale, or train with "
                            "sdebatch.lightning",
}


def window_counts(batches: list[Any]) -> tuple[list[int], int]:
    """Samples per micro-batch and tokens in a window of Trainer batches: samples from the first dimension of
    ``input_ids`` (else the first tensor), tokens from ``attention_mask`` when present (padding excluded), else the
    numel of ``input_ids`` (0 without it)."""
    samples, tokens = [], 0
    for batch in batches:
        tensors = batch if isinstance(batch, dict) else {"input": batch}
        first = tensors.get("input_ids")
        if first is None:
            first = next((v for v in tensors.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if first is None:
            raise ValueError("cannot count the samples of a batch without tensors; LogicalBatchTrainer needs "
                             "batches with input_ids or another batched tensor")
        samples.append(int(first.shape[0]))
        mask = tensors.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            tokens += int(mask.sum())
        elif isinstance(tensors.get("input_ids"), torch.Tensor):
            tokens += tensors["input_ids"].numel()
    return samples, tokens


def _label_counts(batches: list[Any], shifted: bool) -> list[int] | None:
    """Loss-bearing labels (not -100) per micro-batch, counted as Trainer counts them; None without labels."""
    labels = [b.get("labels") if isinstance(b, dict) else None for b in batches]
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in labels):
        return None
    return torch.stack([(t[..., 1:] if shifted else t).ne(-100).sum() for t in labels]).tolist()


class LogicalBatchTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose hyperparameters belong to ``logical_batch_size`` (see the module docstring).

    Args:
        *args: ``transformers.Trainer``'s positional arguments.
        **kwargs: ``transformers.Trainer``'s keyword arguments. ``optimizers=(optimizer, scheduler)`` takes a plain
            torch optimizer (wrapped here), not a LogicalBatchOptimizer.
        logical_batch_size: B_L, samples per update the hyperparameters (learning_rate, betas, eps, weight decay,
            the EMA) were tuned for. Required.
        optimizer_options: keyword arguments of :class:`sdebatch.LogicalBatchOptimizer` (``rule``, ``beta_form``,
            ``weight_decay_form``, ``ema``, ``ema_rescale``, ``reparameterize``, ``second_moment_rescale``, the
            horizon term). Default None: the defaults. Those Trainer owns (``physical_batch_size``,
            ``accumulation_steps``, ``max_grad_norm``, ...) and those it cannot run (``batch_schedule``,
            ``estimate_noise_scale``) are refused, naming what to use.

    The batch arithmetic: with ``gradient_accumulation_steps`` left at 1 it becomes ceil(B_L / (per-device batch x
    world size)); set explicitly, it is kept. Samples per update above B_L need ``reparameterize=True`` (kappa > 1).
    ``trainer.logical_batch_optimizer`` is the wrapper (its clock: ``samples_seen``, ``tokens_seen``, ``updates``).
    """

    def __init__(self, *args: Any, logical_batch_size: int, optimizer_options: dict | None = None,
                 **kwargs: Any) -> None:
        logical_batch_size = checks.batch_sizes(logical_batch_size)["logical_batch_size"]
        for key, value in (optimizer_options or {}).items():
            if key in _REFUSED and value not in (None, False):
                raise ValueError(f"optimizer_options[{key!r}] is not supported under transformers.Trainer: "
                                 f"{_REFUSED[key]}")
        options = check_options(dict(optimizer_options or {}), _TRAINER_OWNS)
        reparameterize = bool(options.pop("reparameterize", False))
        args_ = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if args_ is None:
            raise ValueError("LogicalBatchTrainer needs TrainingArguments (args=...): the per-device batch and the "
                             "accumulation come from them")
        self._check_arguments(args_)
        world = max(1, args_.world_size)
        per_device = args_.per_device_train_batch_size
        accumulation = args_.gradient_accumulation_steps
        if accumulation == 1 and per_device * world < logical_batch_size:
            accumulation = math.ceil(logical_batch_size / (per_device * world))
        checks.reparameterization(per_device, accumulation, world, logical_batch_size, reparameterize)
        if accumulation != args_.gradient_accumulation_steps:  # a copy: the caller's arguments stay as given
            args_ = dataclasses.replace(args_, gradient_accumulation_steps=accumulation)
            if "args" in kwargs:
                kwargs["args"] = args_
            else:
                args = (args[0], args_, *args[2:])
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and isinstance(optimizers[0], LogicalBatchOptimizer):
            raise ValueError("LogicalBatchTrainer wraps the optimizer itself: pass optimizers=(inner_optimizer, "
                             "scheduler) and the sdebatch options as optimizer_options=dict(...)")
        self.logical_batch_size = logical_batch_size
        self.optimizer_options = {**options, "reparameterize": reparameterize}
        self.logical_batch_optimizer: LogicalBatchOptimizer | None = None
        self._warned_unequal = False
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            self.optimizer = self._wrap(self.optimizer)

    @staticmethod
    def _check_arguments(args: Any) -> None:
        if getattr(args, "fp16", False):
            raise ValueError("fp16=True: Trainer's GradScaler skips optimizer steps the sample clock would count; use "
                             "bf16=True with LogicalBatchTrainer")
        if getattr(args, "deepspeed", None):
            raise ValueError("DeepSpeed replaces the optimizer, so the logical batch cannot be applied through "
                             "Trainer; use sdebatch.LogicalBatchOptimizer in your own loop")
        if getattr(args, "fsdp", None) or getattr(args, "fsdp_config", None):
            raise ValueError("FSDP through transformers.Trainer is not supported by LogicalBatchTrainer; FSDP2 "
                             "(torch.distributed.fsdp.fully_shard) with sdebatch.LogicalBatchOptimizer in your own "
                             "loop is (see examples/fsdp2_two_processes.py)")
        if getattr(args, "auto_find_batch_size", False):
            raise ValueError("auto_find_batch_size changes the per-device batch during training, and with it the "
                             "accumulation the logical batch needs; choose it with sdebatch.choose_physical_batch")
        if args.world_size > 1 and not getattr(args, "average_tokens_across_devices", True):
            raise ValueError("average_tokens_across_devices=False normalises each rank by its own token count (a "
                             "mean of means across ranks); leave it True")

    def _wrap(self, inner: torch.optim.Optimizer) -> LogicalBatchOptimizer:
        if isinstance(inner, LogicalBatchOptimizer):
            return inner
        per_window = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        opt = LogicalBatchOptimizer(inner, self.logical_batch_size, per_window, accumulation_steps=1,
                                    **self.optimizer_options)
        self.logical_batch_optimizer = opt
        if self.args.process_index == 0:
            print(f"sdebatch: {self.args.per_device_train_batch_size} per device x {max(1, self.args.world_size)} "
                  f"device(s) x {self.args.gradient_accumulation_steps} accumulation = {opt.window_batch_size} "
                  f"samples per update (logical batch {self.logical_batch_size}), kappa = {opt.window_kappa:.4g}, "
                  f"rule = {opt.rule}")
        return opt

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        super().create_optimizer(model)
        self.optimizer = self._wrap(self.optimizer)
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``, after checking that the loss is normalised the way the window needs."""
        custom = type(self).compute_loss is not transformers.Trainer.compute_loss or self.compute_loss_func is not None
        accumulation = self.args.gradient_accumulation_steps
        if custom and accumulation > 1 and self.loss_is_scaled_for_ga is None:
            raise ValueError(
                f"a custom compute_loss or compute_loss_func under {accumulation} micro-batches per update "
                "(gradient_accumulation_steps, derived from the logical batch): Trainer cannot tell whether its loss "
                "is normalised over the window, and guesses 'yes' for a model that takes loss kwargs, so a "
                f"per-micro-batch mean would give a gradient {accumulation}x too large. Say which: "
                "trainer.loss_is_scaled_for_ga = True if the loss is a sum divided by num_items_in_batch (exact), "
                "False if it is a mean over its own micro-batch (Trainer divides it by the accumulation; exact "
                "for equal micro-batches)")
        return super().train(*args, **kwargs)

    def _loss_is_per_micro_batch(self, num_items: Any) -> bool:
        """Whether Trainer takes each micro-batch's loss as a mean over that micro-batch (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return not self.loss_is_scaled_for_ga
        return not ((self.model_accepts_loss_kwargs and num_items is not None) or self.compute_loss_func is not None)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches and self.logical_batch_optimizer is not None:
            samples, tokens = window_counts(batches)
            if len(batches) > 1 and not self._warned_unequal and self._loss_is_per_micro_batch(num_items):
                items = _label_counts(batches, getattr(self, "_loss_shifts_labels", False))
                unequal = (f"{samples} samples" if len(set(samples)) > 1 else
                           f"{items} loss-bearing labels" if items is not None and len(set(items)) > 1 else None)
                if unequal is not None:
                    self._warned_unequal = True
                    warnings.warn(f"micro-batches of {unequal} in one window, each loss a mean over its own "
                                  "micro-batch: Trainer weighs them equally, not by size (a mean of means). Use a "
                                  "model (or compute_loss_func) that takes num_items_in_batch, which normalises "
                                  "over the window, or equal micro-batches (dataloader_drop_last=True, no "
                                  "padding)", stacklevel=2)
            # the window is the wrapper's one micro-step: its counts join it now, the update reads them (all ranks)
            self.logical_batch_optimizer.count(num_samples=sum(samples), num_tokens=tokens)
        return batches, num_items

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        opt = self.logical_batch_optimizer
        if opt is not None and "loss" in logs and opt.last_kappa is not None:
            logs["learning_rate"] = float(opt.effective_hyperparameters()[0]["lr"])  # the update's, not the reference
            logs["kappa"] = float(opt.last_kappa)
            logs["samples_seen"] = float(opt.samples_seen)
            logs["tokens_seen"] = float(opt.tokens_seen)
        super().log(logs, start_time)
