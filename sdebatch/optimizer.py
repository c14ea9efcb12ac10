"""LogicalBatchOptimizer: accumulation plus SDE rescaling around any torch optimizer.

The hyperparameters on the inner optimizer (and whatever a scheduler writes there) are the *reference* values,
tuned for ``logical_batch_size``. Each call to :meth:`LogicalBatchOptimizer.step` is one micro-step; every
``accumulation_steps`` micro-steps the window's gradient is normalised, clipped, and one update is taken with the
rule applied for kappa = (samples in the window, all ranks) / logical_batch_size (times the horizon term). The
rescaled values are written into the param groups only for the inner step and restored afterwards, so schedulers
and loggers always see the reference values (the petuum/adaptdl approach).

Two protocols, both exact:

    loss = loss_fn(model(x), y)                  # mean over the micro-batch (equal-size micro-batches)
    loss.backward(); opt.step(); opt.zero_grad()

    opt.backward(loss_sum, num_items=n)          # sum-reduced; the window is divided by its total item count
    opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from . import checks, rules
from .clock import Clock
from .batch_schedules import BatchSchedule
from .facade import Handle, InnerOptimizerProxy
from .families import KNOWN_OPTIMIZERS, family_of
from .noise import NoiseScaleEstimator, NoiseScaleMonitor
from .stepping import rescaled_step
from .window import GradWatch, Window, read_sums


class LogicalBatchOptimizer(InnerOptimizerProxy):
    """Wrap a torch optimizer so its hyperparameters belong to a logical batch, whatever the physical one.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``; its param-group values are the reference values.
        logical_batch_size: B_L, samples per update the reference hyperparameters were tuned for.
        physical_batch_size: samples per micro-batch on one rank (the batch the data loader yields, chosen for the
            hardware). A micro-batch's actual count, when it differs (a short last batch), is given to
            :meth:`backward` / :meth:`count` / :meth:`step` as ``num_samples``.
        accumulation_steps: micro-steps per update. Default None: ceil(B_L / (physical x world size)) when that
            is below B_L, else 1 (the paper's reparameterization: one update per physical batch, kappa > 1).
        rule: "auto" (default: SGD -> "sgd"; Adam, AdamW, RMSprop, NAdam, RAdam -> "adam"), "sgd", "adam", or
            "none" (accumulation only; also the naive baseline). "auto" on another optimizer is an error.
        beta_form: "exact" (default, beta**kappa) or "linear" (1 - kappa (1 - beta)); see :func:`sdebatch.rescale`.
        momentum_mode: "fixed" (default) or "timescale", for a ``momentum`` key (SGD, RMSprop).
        weight_decay_form: None (default: from the optimizer: AdamW's decay is "lr_coupled", Adam's and SGD's are
            "l2"), or "l2", "lr_coupled", "independent".
        horizon: D, the run's horizon, for the horizon term of kappa (see :func:`sdebatch.kappa`). Default None: off.
        reference_horizon: D_ref, the horizon the hyperparameters were tuned at (see :func:`sdebatch.kappa`).
        gamma: the horizon exponent (see :func:`sdebatch.kappa`). Default 0.0: off.
        max_grad_norm: clip the window's normalised (unscaled) gradient to this 2-norm once per update.
            Default None (no clipping).
        grad_scaler: a ``torch.amp.GradScaler``; the window is unscaled before clipping, and a window with
            inf/nan is dropped (clock not advanced, counted in ``clock.skipped_updates``). Default None.
        model: the model (optionally DDP-wrapped). Used to warn about BatchNorm and by :meth:`accumulate`.
        ema: an object with ``update(kappa)`` (e.g. :class:`sdebatch.ModelEMA`), updated after each update.
        ema_rescale: whether the EMA's decay follows the rule too (rho**kappa per update, its half-life fixed in
            samples) or stays rho per update (``ema.update(1.0)``). Default None: follows ``rule``, rescaled unless
            ``rule="none"``, so a run without rescaling rescales nothing.
        process_group: data-parallel group for counting samples across ranks. Default: the world, when
            ``torch.distributed`` is initialised.
        estimate_noise_scale: estimate the gradient noise scale B_simple (``opt.noise_scale``, in samples): the
            small batches are the window's micro-batches, each read by tensor hooks as its backward runs, the big
            batch the window's whole gradient (see :class:`sdebatch.noise.NoiseScaleMonitor`); needs accumulation
            or several ranks. Default False. Costs one norm per parameter per backward in observed windows, and
            one over the window's gradient at the update.
        noise_scale_decay: EMA decay of the estimator, per observed window. Default 0.95.
        noise_scale_warn: warn once when samples per update exceed this fraction of the estimated B_simple, a rough
            estimate of the critical batch (McCandlish et al.: B_crit ~ B_simple; measured ~4x above the loss's
            knee on the MDM, docs/results/mdm-ablation.md). Default 1.0; None: never warn.
        noise_scale_every: observe one window in this many (default 1: every window). On small models where the
            norms are a visible share of the update, observing every 2-4 windows keeps the overhead down at the
            price of a noisier EMA.
        batch_schedule: a :func:`sdebatch.batch_schedule` of the samples per update over the clock, reached by
            accumulation (each batch a multiple of physical x world size; set at the start of each window), with the
            rules applied at every update from the logical batch's reference values. Default None: the fixed
            ``accumulation_steps``. Not with ``accumulation_steps``.
        second_moment_rescale: at an update whose batch differs from the previous update's (a ramp, a short last
            window), multiply the second moment of an Adam-family optimizer (``exp_avg_sq``, ``max_exp_avg_sq``,
            RMSprop's ``square_avg``) by B_old / B_new, its noise-dominated limit (v ~ trace / B), so it need not
            relearn its scale over ~1 / (1 - beta2**kappa) updates. Default False; with ``rule="adam"`` (or "auto"
            on an Adam-family optimizer) only. Measured on the noisy quadratic in ``experiments/results/``
            (``quadratic_ramp.csv``): see the ramps results page (docs/results/ramps.md) before turning it on.
        reparameterize: allow a fixed batch per update (physical x accumulation x world size) above the logical
            batch, taking updates with kappa > 1 (the paper's reparameterization, valid below the critical batch).
            Default False: that is an error, so a physical batch set for the hardware never changes the dynamics
            unnoticed. A ``batch_schedule`` is its own opt-in.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, logical_batch_size: int, physical_batch_size: int, *,
                 accumulation_steps: int | None = None,
                 rule: str = "auto", beta_form: str = "exact", momentum_mode: str = "fixed",
                 weight_decay_form: str | None = None, horizon: float | None = None,
                 reference_horizon: float | None = None, gamma: float = 0.0, max_grad_norm: float | None = None,
                 grad_scaler: "torch.amp.GradScaler | None" = None, model: torch.nn.Module | None = None,
                 ema: Any = None, ema_rescale: bool | None = None, process_group: Any = None,
                 estimate_noise_scale: bool = False,
                 noise_scale_decay: float = 0.95, noise_scale_warn: float | None = 1.0,
                 noise_scale_every: int = 1, batch_schedule: BatchSchedule | None = None,
                 second_moment_rescale: bool = False, reparameterize: bool = False) -> None:
        # --- validate everything before touching any state ---
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, LogicalBatchOptimizer):
            raise TypeError("optimizer is already a LogicalBatchOptimizer; wrap the inner optimizer once")
        checks.batch_sizes(logical_batch_size, physical_batch_size=physical_batch_size,
                           accumulation_steps=accumulation_steps)
        logical_batch_size, physical_batch_size, accumulation_steps = (  # numpy integers become ints
            None if v is None else int(v) for v in (logical_batch_size, physical_batch_size, accumulation_steps))
        checks.wrapper_options(rule=rule, beta_form=beta_form, momentum_mode=momentum_mode,
                               weight_decay_form=weight_decay_form, horizon=horizon,
                               reference_horizon=reference_horizon, gamma=gamma, max_grad_norm=max_grad_norm,
                               ema_rescale=ema_rescale, noise_scale_decay=noise_scale_decay,
                               noise_scale_warn=noise_scale_warn, noise_scale_every=noise_scale_every,
                               second_moment_rescale=second_moment_rescale)
        family = family_of(optimizer) if rule == "auto" else rule
        if family is None:
            raise ValueError(
                f"rule='auto' knows no scaling rule for {type(optimizer).__name__} "
                f"(known: {', '.join(KNOWN_OPTIMIZERS)}). "
                "Pass rule='none' (accumulation only, no rescaling) or a family: rule='adam' (square-root rule) or "
                "rule='sgd' (linear rule); for optimizers outside the known list these are heuristics to measure.")
        if rule != "auto" and rule != "none" and family_of(optimizer) is None:
            warnings.warn(f"rule={rule!r} on {type(optimizer).__name__} is a heuristic (the SDE rules are derived for "
                          f"{', '.join(KNOWN_OPTIMIZERS)}); measure it, e.g. with a batch sweep.", stacklevel=2)
        if ema is not None and not callable(getattr(ema, "update", None)):
            raise TypeError("ema must have an update(kappa) method (for example sdebatch.ModelEMA)")
        if batch_schedule is not None and not isinstance(batch_schedule, BatchSchedule):
            raise TypeError(f"batch_schedule must come from sdebatch.batch_schedule(...), got "
                            f"{type(batch_schedule).__name__}")
        if batch_schedule is not None and accumulation_steps is not None:
            raise ValueError("batch_schedule sets the accumulation per window; leave accumulation_steps None")
        if not isinstance(reparameterize, bool):
            raise ValueError(f"reparameterize must be True or False, got {reparameterize!r}")
        if second_moment_rescale and family != "adam":
            raise ValueError(f"second_moment_rescale=True needs an Adam-family rule (rule='adam', or 'auto' on Adam, "
                             f"AdamW, RMSprop, NAdam, RAdam), got rule {family!r}")

        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        self.reparameterize = reparameterize
        if physical_batch_size is None:
            raise ValueError("physical_batch_size is required: the samples per micro-batch on one rank (the data "
                             "loader's batch size)")
        physical_batch_size, accumulation_steps = self._batch_arithmetic(logical_batch_size, physical_batch_size,
                                                                         accumulation_steps, batch_schedule)
        if batch_schedule is not None:
            batch_schedule.check_reachable(physical_batch_size * self.world_size)
            if hasattr(batch_schedule, "attach") and not estimate_noise_scale:
                raise ValueError("critical_batch_warmup needs the wrapper's noise-scale estimator: pass "
                                 "estimate_noise_scale=True")
        self.optimizer = optimizer
        self.batch_schedule = batch_schedule
        self.logical_batch_size = logical_batch_size
        self.physical_batch_size = physical_batch_size
        self.accumulation_steps = accumulation_steps
        self.rule = family
        self.beta_form = beta_form
        self.momentum_mode = momentum_mode
        self.weight_decay_form = weight_decay_form
        self.horizon, self.reference_horizon, self.gamma = horizon, reference_horizon, gamma
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        self.model = model
        self.ema = ema
        self.ema_rescale = family != "none" if ema_rescale is None else ema_rescale
        self.second_moment_rescale = second_moment_rescale
        self.clock = Clock()
        # the in-run noise scale: a monitor the window calls at each micro-step and at its end
        self._noise = NoiseScaleMonitor((p for g in optimizer.param_groups for p in g["params"]), noise_scale_decay,
                                        noise_scale_warn, noise_scale_every) if estimate_noise_scale else None
        self.last_kappa: float | None = None
        self.last_batch_size: float | None = None  # samples in the last update (all ranks)
        self._grad_norm: torch.Tensor | None = None
        self.did_update = False
        self.sdebatch_state_restored = False  # set by load_sdebatch_state_dict (a resume)
        self._grad_watch = GradWatch()
        self._built_arithmetic: tuple[int, int] | None = None  # set by a mid-window resume with other arithmetic
        self._lr_marks: list | None = None
        self._first_samples: float | None = None
        self._warned: set[str] = set()
        self._unflushed = _UnflushedWindow()
        weakref.finalize(self, self._unflushed)  # holds the small state object, not the optimizer
        self._effective: list[dict] = []
        self._pre_update_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._post_update_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._init_torch_hooks()
        if hasattr(batch_schedule, "attach"):
            batch_schedule.attach(self)
        self._reset_window()
        self._backward_synced = True
        if model is not None and accumulation_steps > 1:
            _warn_batchnorm(model)

    def __repr__(self) -> str:
        return (f"LogicalBatchOptimizer(rule={self.rule!r}, logical_batch_size={self.logical_batch_size}, "
                f"physical_batch_size={self.physical_batch_size}, accumulation_steps={self.accumulation_steps}, "
                f"world_size={self.world_size})\n{self.optimizer!r}")

    # --- the batch arithmetic ---
    def _batch_arithmetic(self, logical: int, physical: int, accumulation: int | None,
                          batch_schedule: Any = None) -> tuple[int, int]:
        if accumulation is None:
            per_pass = physical * self.world_size
            accumulation = math.ceil(logical / per_pass) if per_pass < logical else 1
        if batch_schedule is None:
            checks.reparameterization(physical, accumulation, self.world_size, logical, self.reparameterize)
        return physical, accumulation

    def configure_batch(self, physical_batch_size: int, accumulation_steps: int | None = None) -> bool:
        """Set the physical batch (and accumulation, default derived as in the constructor) before training, e.g.
        once the data loader is known, or after a resume with another physical batch (elastic resume: the clock and
        the logical batch continue). Call it before the first backward. Not allowed inside a running window; a
        window restored from a checkpoint with other arithmetic is flushed first (applied as a short update with its
        own kappa, its gradients then cleared). Everything is checked before anything changes. Returns whether it
        flushed."""
        checks.batch_sizes(self.logical_batch_size, physical_batch_size=physical_batch_size,
                           accumulation_steps=accumulation_steps)
        physical_batch_size = int(physical_batch_size)
        accumulation_steps = None if accumulation_steps is None else int(accumulation_steps)
        changes = physical_batch_size != self.physical_batch_size or (
            accumulation_steps is not None and accumulation_steps != self.accumulation_steps)
        # restored mid-window (no micro-step since) with other arithmetic: that window is applied first
        will_flush = self.window.saved_grads is not None and changes
        still_open = self.in_window and not will_flush
        if self.batch_schedule is not None:
            if accumulation_steps is not None:
                raise ValueError("batch_schedule sets the accumulation per window; leave accumulation_steps None")
            self.batch_schedule.check_reachable(physical_batch_size * self.world_size)
            if still_open and physical_batch_size != self.physical_batch_size:
                raise RuntimeError(f"configure_batch({physical_batch_size}) inside an unfinished window of physical "
                                   f"batch {self.physical_batch_size}; change it between updates")
            new = (physical_batch_size, self.accumulation_steps)
        else:
            new = self._batch_arithmetic(self.logical_batch_size, physical_batch_size, accumulation_steps)
            if still_open and new != (self.physical_batch_size, self.accumulation_steps):
                raise RuntimeError(f"configure_batch{new} inside an unfinished window of "
                                   f"{(self.physical_batch_size, self.accumulation_steps)}; change it between updates")
        self._built_arithmetic = None  # the arithmetic is now the caller's
        flushed = False
        if will_flush:
            flushed = self.flush()
            self.optimizer.zero_grad(set_to_none=True)  # the checkpoint's gradients, now applied
            self._grad_watch.forget()
        if not self.in_window:
            self._set_arithmetic(new)
        return flushed

    def _set_arithmetic(self, arithmetic: tuple[int, int]) -> None:
        """(physical batch, accumulation) from the next window on (the noise monitor told of it); between windows."""
        self.physical_batch_size, self.accumulation_steps = arithmetic
        self._reset_window()

    @property
    def window_batch_size(self) -> int:
        """Samples in a full window, all ranks: physical x accumulation x world size (B_step of a full window; the
        last update's is ``last_batch_size``)."""
        return self.physical_batch_size * self.accumulation_steps * self.world_size

    @property
    def window_kappa(self) -> float:
        """kappa of a full window (the last update's, e.g. a short last window's, is ``last_kappa``)."""
        return rules.kappa(self.window_batch_size, self.logical_batch_size, horizon=self.horizon,
                           reference_horizon=self.reference_horizon, gamma=self.gamma)

    def describe(self) -> str:
        """The batch arithmetic as one line, e.g. "32 per device x 4 accumulation x 2 devices = 256 = logical ..."."""
        b = self.window_batch_size
        rel = "=" if b == self.logical_batch_size else ("<" if b < self.logical_batch_size else ">")
        ramp = f"; batch schedule: {self.batch_schedule.describe()}" if self.batch_schedule is not None else ""
        return (f"{self.physical_batch_size} per device x {self.accumulation_steps} accumulation x {self.world_size} "
                f"device(s) = {b} samples per update {rel} logical batch {self.logical_batch_size}, "
                f"kappa = {self.window_kappa:.4g}, rule = {self.rule}{ramp}")

    @property
    def samples_seen(self) -> int:
        return self.clock.samples_seen

    @property
    def tokens_seen(self) -> int:
        return self.clock.tokens_seen

    @property
    def updates(self) -> int:
        return self.clock.updates

    @property
    def in_window(self) -> bool:
        """True while micro-steps of an unfinished window hold gradients."""
        return self.window.open

    @property
    def next_step_updates(self) -> bool:
        """Whether the next micro-step completes a window (use it to sync gradients only then)."""
        return self.window.micro_steps + 1 >= self.accumulation_steps

    def effective_hyperparameters(self) -> list[dict]:
        """Per param group, the hyperparameters the last update actually used (after the rule)."""
        return [dict(g) for g in self._effective]

    # --- hooks ---
    def register_pre_update_hook(self, hook: Callable[["LogicalBatchOptimizer", dict], None]):
        """``hook(opt, window)`` runs before each update; ``window`` has the samples/tokens the update adds.

        Schedules use it to set the reference lr from the clock. Returns a handle with ``remove()``.
        """
        return Handle(self._pre_update_hooks, hook)

    def register_post_update_hook(self, hook: Callable[["LogicalBatchOptimizer"], None]):
        """``hook(opt)`` runs after each applied update. Returns a handle with ``remove()``."""
        return Handle(self._post_update_hooks, hook)

    # --- micro-steps ---
    def _reset_window(self) -> None:
        self.window = Window()
        if self.batch_schedule is not None:  # the next window's accumulation, from the clock
            self.accumulation_steps = self.batch_schedule.accumulation(self.clock, self.physical_batch_size,
                                                                       self.world_size)
        if self._noise is not None:
            self._noise.start_window(self.clock.updates)

    def backward(self, loss: torch.Tensor, num_items: float | torch.Tensor | None = None, *,
                 num_samples: int | None = None, num_tokens: int | None = None, reduction: str = "sum",
                 **backward_kwargs: Any) -> None:
        """Backward one micro-batch's loss (scaled by ``grad_scaler`` if one is set).

        Args:
            loss: scalar loss of the micro-batch.
            num_items: what the loss is a sum over (samples, tokens, masked tokens). Given: the window's gradient
                is divided by the window's total, summed over ranks (exact for varying counts). Default None:
                ``loss`` is a micro-batch mean and micro-batches weigh equally.
            num_samples: samples in this micro-batch, for the clock and kappa. Default: ``physical_batch_size``.
                Given without ``num_items``, ``loss`` is taken as a mean over these samples and the micro-batch
                weighs by them in the window (exact when the last batch of the data is short).
            num_tokens: tokens in this micro-batch, for the clock. Default: not counted.
            reduction: "sum" (default; ``loss`` is a sum over ``num_items``) or "mean" (``loss`` is a mean over
                ``num_items``; it is multiplied back to a sum, so unequal micro-batches still weigh by size).
        """
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        n = None if num_items is None else checks.count("num_items", num_items, allow_zero=True)
        self._check_counts(num_samples, num_tokens)
        if n is None and num_samples is not None:  # a mean over the micro-batch's samples: weigh it by them
            n, reduction = checks.count("num_samples", num_samples), "mean"
        self.window.set_protocol("mean" if n is None else "sum")
        if n is not None and reduction == "mean":
            loss = loss * n
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward(**backward_kwargs)
        self.count(num_items=n, num_samples=num_samples, num_tokens=num_tokens)

    def count(self, num_items: float | torch.Tensor | None = None, *, num_samples: int | None = None,
              num_tokens: int | None = None) -> None:
        """Report counts for the current micro-step when something else runs the backward (e.g. Lightning).

        Same arguments as :meth:`backward`: ``num_items`` given means the loss is sum-reduced over that many items.
        Calls add up within a micro-step.
        """
        n = None if num_items is None else checks.count("num_items", num_items, allow_zero=True)
        self._check_counts(num_samples, num_tokens)
        self.window.report(n, num_samples, num_tokens)

    @staticmethod
    def _check_counts(num_samples, num_tokens) -> None:
        if num_samples is not None:
            checks.count("num_samples", num_samples)
        if num_tokens is not None:
            checks.count("num_tokens", num_tokens, allow_zero=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, num_samples: int | None = None,
             num_tokens: int | None = None) -> Any:
        """End one micro-step; every ``accumulation_steps`` micro-steps, take one update.

        Args:
            closure: optional; re-evaluates the micro-batch loss and calls backward (torch convention). It runs
                once: accumulation does not re-evaluate.
            num_samples: samples in this micro-batch. Default: what :meth:`backward` was told, else
                ``physical_batch_size``.
            num_tokens: tokens in this micro-batch, for the clock. Default: what :meth:`backward` was told, else 0.

        Returns:
            The closure's loss, or None.
        """
        self._check_counts(num_samples, num_tokens)
        self._check_caller()
        for hook in list(self._optimizer_step_pre_hooks.values()):  # torch's step hooks: once per step() call
            hook(self, (), {})
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        w = self.window
        params = self._params()
        if w.saved_grads is not None:
            w.add_saved_grads(params)
        else:
            self._check_grads(params)
        self._check_lr(w.open)
        pending, n = w.end_micro_step(num_samples, num_tokens, self.physical_batch_size)
        self._check_equal_weights(pending, n)
        if self._noise is not None and self._noise.wants_micro_step:  # this micro-batch's own gradient norm
            self._noise.micro_step([p.grad for p in self._params_with_grad()] if self._noise.sharded else [], n,
                                   pending.items if pending.sum else None, self.grad_scaler)
        self.did_update = False
        if w.micro_steps >= self.accumulation_steps:
            self._update()
        self._grad_watch.record(params)
        self._unflushed.micro_steps = self.window.micro_steps
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return loss

    @torch.no_grad()
    def flush(self) -> bool:
        """Apply a short last window (end of data) with its own normalisation and kappa. Returns whether an update
        was applied (False if the window was empty or AMP skipped it)."""
        self.did_update = False
        if self.window.open:
            if self.window.saved_grads is not None:  # a window restored from a checkpoint, flushed before any step
                self.window.add_saved_grads(self._params())
            else:  # the window's gradients as its last micro-step left them ("nothing" moved is right here)
                fault = self._grad_watch.check(self._params(), True)
                if fault == "cleared":
                    raise RuntimeError("flush(): " + self._GRAD_FAULTS[fault].format(
                        k=self.window.micro_steps, n=self.accumulation_steps))
            self._update()
            self._grad_watch.record(self._params())
            self._unflushed.micro_steps = 0
        if self._built_arithmetic is not None:  # a restored window of the checkpoint's arithmetic, now applied
            self._set_arithmetic(self._built_arithmetic)
            self._built_arithmetic = None
        return self.did_update

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, except inside an unfinished window (there it does nothing)."""
        if not self.in_window:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module | None = None) -> Iterator[None]:
        """Context for one micro-step's forward and backward: under DDP, skips the gradient all-reduce
        (``model.no_sync()``) unless this micro-step completes the window.

        Args:
            model: the DDP-wrapped model. Default: the ``model`` given to the constructor.
        """
        model = model if model is not None else self.model
        sync = self.next_step_updates or not hasattr(model, "no_sync")
        self.mark_backward_sync(sync)
        with (contextlib.nullcontext() if sync else model.no_sync()):
            yield

    def mark_backward_sync(self, synced: bool) -> None:
        """Tell the optimizer whether this micro-step's backward all-reduces gradients across ranks (DDP). A window
        that ends unsynced (a flushed short window) is then averaged across ranks before the update."""
        self._backward_synced = bool(synced)

    @property
    def last_grad_norm(self) -> float | None:
        """The last update's gradient norm before clipping (``max_grad_norm``); reading it waits for the device."""
        return None if self._grad_norm is None else float(self._grad_norm)

    @property
    def noise_scale_estimator(self) -> NoiseScaleEstimator | None:
        """The in-run noise-scale estimator (``estimate_noise_scale=True``), else None."""
        return None if self._noise is None else self._noise.estimator

    @property
    def noise_scale(self) -> float | None:
        """Estimated gradient noise scale B_simple in samples (None if not tracked or not yet known)."""
        return None if self._noise is None else self._noise.estimator.value

    def discard_window(self) -> None:
        """Drop the open window's counts without an update (its gradients in ``.grad`` are the caller's to clear),
        e.g. after measuring passes that must not train."""
        self._reset_window()
        self._grad_watch.forget()
        self._unflushed.micro_steps = 0

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, between updates only (a group added inside a window would join it part-way).
        """
        if self.in_window:
            raise RuntimeError(_GROUP_INSIDE_WINDOW)
        super().add_param_group(param_group)

    # --- what would silently corrupt a window: refused or warned, naming the fix ---
    _GRAD_FAULTS = {
        "cleared": "the open window's gradients were cleared or replaced between its micro-steps (micro-step {k} of "
                   "{n}): something called zero_grad() on the model or on the inner optimizer inside the window. "
                   "transformers.Trainer does after every optimizer.step(): use sdebatch.hf.LogicalBatchTrainer. In "
                   "your own loop call opt.zero_grad() on the wrapper, which waits for the update. (A backward with "
                   "create_graph=True also replaces .grad, by the sum: accumulation with it is not supported.)",
        "edited": "the open window's partial gradient was changed in place between its micro-steps (micro-step {k} of "
                  "{n}): an edit per micro-batch acts on the window's partial sum. A linear one (a mask, a term added "
                  "per micro-batch) is still exact; clip_grad_norm_ to a finite norm, GradScaler.unscale_ and "
                  "accelerator.clip_grad_norm_ per micro-batch, or a zero_grad() on the inner optimizer, are not. "
                  "Clip once per update with LogicalBatchOptimizer(max_grad_norm=...); scale with grad_scaler=scaler, "
                  "opt.backward(loss) and opt.step() (it unscales once per update); clear with opt.zero_grad(). "
                  "(Warned once; silence a linear edit with warnings.filterwarnings.)",
        "nothing": "step() with nothing backpropagated since the last step(): call loss.backward() (or "
                   "opt.backward(loss, ...)) once per micro-batch before opt.step(). Under Lightning a training_step "
                   "that returns None skips the backward but not the step: with LogicalBatch, filter such batches "
                   "out of the data instead. Under FSDP2 leave gradient sync "
                   "on (set_requires_gradient_sync(False) keeps gradients out of .grad until a synced backward): "
                   "the wrapper accumulates the reduce-scattered shards.",
        "stale": "this micro-batch's gradient was added onto the last update's (no zero_grad() after the update): "
                 "call opt.zero_grad() after every opt.step() (it clears only between windows).",
    }

    # GradScaler.step(opt) calls step() directly on an optimizer that says it handles scaling, with the scale and
    # found_inf set on it (torch's contract): the wrapper refuses there, before any unscale, naming the fix.
    _step_supports_amp_scaling = True

    def _check_caller(self) -> None:
        """Refuse the loops that would call step() on something other than one micro-batch (before any change)."""
        if "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:
            raise RuntimeError(
                "scaler.step(opt) on a LogicalBatchOptimizer: a GradScaler stepped and updated once per micro-batch "
                "unscales each partial sum of the window and may change the scale inside it. Pass the scaler to "
                "the wrapper, LogicalBatchOptimizer(..., grad_scaler=scaler), backward with opt.backward(loss) "
                "(it scales) and call opt.step() itself (it unscales, checks for inf/nan and updates the scale "
                "once per update; no scaler.update()). Under accelerate, whose fp16 steps through its GradScaler, "
                "use mixed_precision='bf16' or 'no'.")
        state = sys.modules.get("accelerate.state")
        gradient_state = getattr(state, "GradientState", None)
        if gradient_state is not None and gradient_state._shared_state:
            steps = gradient_state().num_steps
            if steps > 1 and _called_by_accelerate():
                raise RuntimeError(
                    f"accelerate.Accelerator(gradient_accumulation_steps={steps}) with a LogicalBatchOptimizer: "
                    f"accelerate calls step() once per {steps} micro-batches, which the wrapper would count as one "
                    "and accumulate again. Let the wrapper accumulate: Accelerator(gradient_accumulation_steps=1) "
                    "and `with sdebatch.unwrap(opt).accumulate(model):` around each micro-batch's forward and "
                    "backward (docs: tutorials/huggingface-accelerate).")
        if self._built_arithmetic is not None and self.window.saved_grads is not None:
            (physical, accumulation), (saved_p, saved_a) = self._built_arithmetic, (self.physical_batch_size,
                                                                                   self.accumulation_steps)
            raise RuntimeError(
                f"this optimizer was built for physical_batch_size={physical} x accumulation {accumulation}, and the "
                f"checkpoint stopped inside a window of {saved_p} x {saved_a}: call opt.configure_batch({physical}) "
                "after load_state_dict and before the first backward (it applies the restored window as a short "
                f"update with its own kappa, then continues with {physical} x {accumulation}), or build the "
                f"optimizer with physical_batch_size={saved_p} to continue the checkpoint's arithmetic.")

    def _check_grads(self, params: list[torch.Tensor]) -> None:
        # a backward that all-reduces (DDP outside no_sync) writes the gradients itself: no edit check then
        all_reduced = dist.is_available() and dist.is_initialized() and self._backward_synced
        fault = self._grad_watch.check(params, self.window.open, watch_edits=not all_reduced)
        if fault == "edited":  # exact when the edit is linear: loud, not refused
            if "edited" not in self._warned:
                self._warned.add("edited")
                warnings.warn(self._GRAD_FAULTS[fault].format(k=self.window.micro_steps + 1,
                                                              n=self.accumulation_steps), stacklevel=4)
        elif fault is not None:
            raise RuntimeError(self._GRAD_FAULTS[fault].format(k=self.window.micro_steps + 1,
                                                              n=self.accumulation_steps))

    def _check_lr(self, window_open: bool) -> None:
        """A torch scheduler stepped per micro-step changes the lr inside a window: warn once, naming the fix."""
        marks = [_lr_mark(g.get("lr")) for g in self.param_groups]
        if not window_open or self._lr_marks is None:
            self._lr_marks = marks
        elif len(marks) != len(self._lr_marks):
            raise RuntimeError(_GROUP_INSIDE_WINDOW)
        elif marks != self._lr_marks and "lr" not in self._warned:
            self._warned.add("lr")
            warnings.warn("the lr changed inside an accumulation window: a torch scheduler stepped once per "
                          "micro-batch advances accumulation_steps times too fast. Step it once per update: "
                          "`if opt.did_update: sched.step()`, or wrap it, sched = sdebatch.per_update(sched, opt); "
                          "or drive the lr from the clock with sdebatch.ClockSchedule.", stacklevel=3)

    def _check_equal_weights(self, pending: Any, samples: Any) -> None:
        """Mean-reduced micro-batches weigh equally: exact only when they hold the same number of samples."""
        if self.window.protocol != "mean" or isinstance(samples, torch.Tensor):
            return
        if self.window.micro_steps == 1 or self._first_samples is None:  # (None: resumed mid-window)
            self._first_samples = samples
        elif samples != self._first_samples and "weights" not in self._warned:
            self._warned.add("weights")
            warnings.warn(f"micro-batches of {self._first_samples:g} and {samples:g} samples in one window with a "
                          "mean-reduced loss (loss.backward()) weigh equally, not by their size: pass "
                          "opt.backward(loss, num_samples=len(batch)) so each weighs by its samples, or a "
                          "sum-reduced loss with num_items= (under Lightning: return the sum-reduced loss and call "
                          "sdebatch.lightning.count(self, num_items=len(batch)) in training_step)", stacklevel=3)

    # --- the update ---
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for p in self._params() if p.grad is not None]

    def _update(self) -> None:
        w = self.window
        device = next((p.device for p in self._params()), torch.device("cpu"))
        params = self._params_with_grad()
        grads = [p.grad for p in params]
        if self.world_size > 1 and not self._backward_synced:
            # The window ended on a micro-step that skipped DDP's all-reduce (a flushed short window): average here.
            for g in grads:
                dist.all_reduce(g, group=self.process_group)
                g.div_(self.world_size)
        found_inf = None
        if self.grad_scaler is not None:  # unscaling commutes with the normalisation below
            self.grad_scaler.unscale_(self.optimizer)
            found_inf = sum(self.grad_scaler._found_inf_per_device(self.optimizer).values())
        observe = self._noise is not None and self._noise.observing
        # the unnormalised window gradient's squared norm; sharded gradients give each rank's part, summed below
        window_sq, summed = self._noise.window_sq_norm(grads) if observe else (None, False)
        # everything the update needs from the device and the other ranks: one all-reduce, one transfer
        reduced = [w.samples, w.tokens, w.items, *(self._noise.sums() if observe else [])]
        (samples, tokens, items, *micro), local = read_sums(
            reduced + ([window_sq] if summed else []), [found_inf] + ([] if summed else [window_sq]),
            self.world_size, self.process_group, device)
        found_inf = local[0]
        window_sq = micro.pop() if summed else local[1]
        checks.check_read_counts(samples=samples, tokens=tokens, items=items)
        if found_inf:
            self.grad_scaler.update()  # backs the scale off; the window is dropped, the clock does not move
            self.clock.skipped_updates += 1
            self._reset_window()
            self._backward_synced = True
            return
        # Normalise the window: DDP/FSDP average over ranks, so a sum protocol multiplies back by the world size.
        if w.protocol == "sum":
            if items <= 0:
                raise RuntimeError("the window's num_items add up to 0 across ranks: nothing to normalise by")
            scale = self.world_size / items
        else:
            scale = 1.0 / w.micro_steps
        if grads and scale != 1.0:
            torch._foreach_mul_(grads, scale)
        if observe and grads:
            self._noise.window_end(samples, micro, window_sq * scale ** 2, self.world_size,
                                   sum_protocol=w.protocol == "sum")
            if self.world_size == 1 and self.accumulation_steps == 1 and "noise" not in self._warned:
                self._warned.add("noise")
                warnings.warn("estimate_noise_scale=True measures nothing here: one micro-batch per update on one "
                              "process gives one batch size, and B_simple needs two. Accumulate (a physical batch "
                              "below the logical one), train on several ranks, or measure it at fixed weights with "
                              "sdebatch.noise.probe_noise_scale", stacklevel=3)
        if self.max_grad_norm is not None and params:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)  # read when asked

        k = rules.kappa(samples, self.logical_batch_size, horizon=self.horizon,
                        reference_horizon=self.reference_horizon, gamma=self.gamma)
        window = {"samples": samples, "tokens": tokens, "items": items, "kappa": k}
        for hook in list(self._pre_update_hooks.values()):
            hook(self, window)
        if self.second_moment_rescale and self.last_batch_size and samples != self.last_batch_size:
            _scale_second_moment(self.optimizer, self.last_batch_size / samples)
        self._effective = rescaled_step(self.optimizer, self.rule, k, kappa_sum=self.clock.kappa_sum,
                                        updates=self.clock.updates, beta_form=self.beta_form,
                                        momentum_mode=self.momentum_mode, weight_decay_form=self.weight_decay_form,
                                        grad_scaler=self.grad_scaler)

        c = self.clock
        c.updates += 1
        c.samples_seen += int(round(samples))
        c.tokens_seen += int(round(tokens))
        c.kappa_sum += k
        self.last_kappa = k
        self.last_batch_size = samples
        self.did_update = True
        self._reset_window()
        self._backward_synced = True
        if self.ema is not None:
            self.ema.update(k if self.ema_rescale else 1.0)
        for hook in list(self._post_update_hooks.values()):
            hook(self)

    # --- checkpointing ---
    def state_dict(self) -> dict:
        """The inner optimizer's state dict (torch's ``state`` and ``param_groups``, so tools that read an optimizer's
        state dict, such as ``torch.distributed.checkpoint``, find them) plus ``sdebatch``: the clock and, when
        stopped inside a window, its counts and gradients.

        With several ranks the window's counts and its replicated (DDP) gradients are averaged over the ranks, so the
        checkpoint of any one rank resumes every rank (a collective: call it on all ranks, as trainers do). Sharded
        gradients (FSDP2 DTensors) are each rank's own shard, already reduced: save each rank's state."""
        out = dict(self.optimizer.state_dict())
        out["sdebatch"] = self.sdebatch_state_dict()
        return out

    def sdebatch_state_dict(self, *, window: bool = True) -> dict:
        """The wrapper's own state: the clock, the last update's kappa and batch, the noise-scale estimator and the
        batch schedule, and (``window=True``) an unfinished window's counts and gradients."""
        open_ = window and self.in_window
        grads = self.window.grads_to_save(self._params()) if open_ else None
        counts = self.window.state_dict() if open_ else {}
        if open_ and self._noise is not None:
            counts.update(self._noise.window_state())
        if open_ and self.world_size > 1:
            grads, counts = self._average_over_ranks(grads, counts)
        if open_:
            self._unflushed.saved = self.window.micro_steps  # a checkpoint holds this window
        return {
            "clock": self.clock.state_dict(),
            "last_kappa": self.last_kappa,
            "last_batch_size": self.last_batch_size,
            "window": counts,
            "noise": self.noise_scale_estimator.state_dict() if self.noise_scale_estimator is not None else None,
            "batch_schedule": self.batch_schedule.state_dict() if hasattr(self.batch_schedule, "state_dict") else None,
            "window_grads": grads,
            "config": {"logical_batch_size": self.logical_batch_size, "rule": self.rule,
                       "physical_batch_size": self.physical_batch_size,
                       "accumulation_steps": self.accumulation_steps, "world_size": self.world_size},
        }

    def _average_over_ranks(self, grads: list, counts: dict) -> tuple[list, dict]:
        """Each rank's partial window made rank-agnostic: the update sums counts over ranks and DDP averages the
        gradients, so every rank holding the mean of both continues the same trajectory."""
        keys = [k for k in ("samples", "tokens", "items") if k in counts]
        small = counts.get("noise_prefix_sq") or []
        values = [counts[k] for k in keys] + list(small) + list(counts.get("noise_prefix_n") or [])
        device = next((p.device for p in self._params()), torch.device("cpu"))
        if dist.get_backend(self.process_group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=self.process_group)
        t = (t / self.world_size).tolist()
        counts = dict(counts)
        for k, v in zip(keys, t):
            counts[k] = v
        if small:
            counts["noise_prefix_sq"], counts["noise_prefix_n"] = t[len(keys):len(keys) + len(small)], \
                t[len(keys) + len(small):]
        replicated = [g for g in grads if g is not None and not hasattr(g, "_local_tensor")]
        for g in replicated:  # (grads_to_save made copies)
            dist.all_reduce(g, group=self.process_group)
            g.div_(self.world_size)
        return grads, counts

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved; a run resumed inside a window continues the same trajectory.

        Also takes an earlier format (``{"optimizer": ..., "sdebatch": ...}``) and a torch optimizer state dict
        without ``sdebatch`` (what ``torch.distributed.checkpoint`` returns): then only the inner optimizer is
        restored, the window is emptied, and the wrapper's own state comes from :meth:`load_sdebatch_state_dict`."""
        if not isinstance(state_dict, dict) or not ("optimizer" in state_dict or "state" in state_dict):
            raise ValueError("state_dict must come from LogicalBatchOptimizer.state_dict() or a torch optimizer's "
                             "state_dict() (keys 'state' and 'param_groups')")
        inner = state_dict["optimizer"] if "optimizer" in state_dict else {
            k: v for k, v in state_dict.items() if k != "sdebatch"}
        ours = state_dict.get("sdebatch")
        if ours is not None:
            self._check_sdebatch_state(ours)
        self.optimizer.load_state_dict(inner)
        if ours is not None:
            self.load_sdebatch_state_dict(ours)
        else:
            self.discard_window()

    def _check_sdebatch_state(self, ours: dict) -> None:
        grads = ours.get("window_grads")
        if grads is not None and len(grads) != len(self._params()):
            raise ValueError(f"state_dict holds window gradients for {len(grads)} parameters, "
                             f"the optimizer has {len(self._params())}")
        saved_world = ours.get("config", {}).get("world_size", self.world_size)
        if ours.get("window", {}).get("micro_steps", 0) > 0 and saved_world != self.world_size:
            raise ValueError(f"the checkpoint stopped inside a window on {saved_world} ranks and is resumed on "
                             f"{self.world_size}: each rank's partial gradients do not carry over; resume on the same "
                             "world size, or checkpoint at window ends (every_n_train_steps a multiple of the "
                             "accumulation) to change it")
        Clock().load_state_dict(ours["clock"])  # validates before anything changes

    def load_sdebatch_state_dict(self, ours: dict) -> None:
        """Restore what :meth:`sdebatch_state_dict` saved (the inner optimizer is not touched)."""
        self._check_sdebatch_state(ours)
        clock = Clock()
        clock.load_state_dict(ours["clock"])
        self.clock = clock
        self.sdebatch_state_restored = True
        self.last_kappa = ours.get("last_kappa")
        self.last_batch_size = ours.get("last_batch_size")
        if self.noise_scale_estimator is not None and ours.get("noise") is not None:
            self.noise_scale_estimator.load_state_dict(ours["noise"])
        if hasattr(self.batch_schedule, "load_state_dict") and ours.get("batch_schedule") is not None:
            self.batch_schedule.load_state_dict(ours["batch_schedule"])
        self.discard_window()
        self._first_samples = None
        window = ours.get("window") or {}
        self.window.load_state_dict(window)
        if self._noise is not None:
            self._noise.load_window_state(window)
        config = ours.get("config", {})
        saved_logical = config.get("logical_batch_size", self.logical_batch_size)
        if saved_logical != self.logical_batch_size:
            warnings.warn(f"the checkpoint was trained at logical_batch_size={saved_logical} and is resumed at "
                          f"{self.logical_batch_size}: the hyperparameters now belong to {self.logical_batch_size}, "
                          "so the dynamics change (build the optimizer with the checkpoint's logical batch to "
                          "continue the same run)", stacklevel=2)
        self._built_arithmetic = None
        if self.in_window:  # the saved window only makes sense with the arithmetic it was saved with
            built = (self.physical_batch_size, self.accumulation_steps)
            self.physical_batch_size = config.get("physical_batch_size", self.physical_batch_size)
            self.accumulation_steps = config.get("accumulation_steps", self.accumulation_steps)
            # other arithmetic than this optimizer was built with: configure_batch decides (else step() refuses)
            if (self.physical_batch_size, self.accumulation_steps) != built and self.batch_schedule is None:
                self._built_arithmetic = built
        # The window's gradients are added at the next micro-step, not now: trainers clear .grad when they start
        # (Lightning's fit does), and a sum does not care about order.
        grads = ours.get("window_grads")
        self.window.saved_grads = None if grads is None else [
            None if g is None else g.to(device=p.device, dtype=p.dtype) for p, g in zip(self._params(), grads)]


def _keyword_options() -> tuple[str, ...]:
    import inspect

    params = inspect.signature(LogicalBatchOptimizer.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY or p.name == "physical_batch_size")


def check_options(options: dict, owned: dict[str, str]) -> dict:
    """LogicalBatchOptimizer keyword arguments given to an integration, checked before the optimizer exists (unknown
    names, those the integration sets (``owned``: name -> what to use instead), and bad values are ValueErrors)."""
    return checks.optimizer_options(options, owned=owned, accepted=_keyword_options())


_GROUP_INSIDE_WINDOW = ("a param group was added inside an unfinished accumulation window: its parameters would "
                        "join the window part-way. Add it between updates (when opt.in_window is False: right "
                        "after an update, or after opt.flush()).")


class _UnflushedWindow:
    """Called when the optimizer is garbage-collected or the interpreter exits: warns if the last window holds
    micro-steps that were neither applied (``flush()``) nor saved in a checkpoint."""

    def __init__(self) -> None:
        self.micro_steps = 0  # of the open window, after the last step()
        self.saved = -1  # the window's micro-steps when a checkpoint last saved it

    def __call__(self) -> None:
        if self.micro_steps > 0 and self.saved != self.micro_steps:
            warnings.warn(f"a LogicalBatchOptimizer was discarded with {self.micro_steps} micro-step(s) of an "
                          "unfinished window never applied: call opt.flush() after the last micro-batch (the end of "
                          "the data or of training) to apply it with its own kappa", stacklevel=1)


def _called_by_accelerate() -> bool:
    """Whether step() was called by accelerate's AcceleratedOptimizer (read only when accelerate accumulates: the
    process-wide GradientState may be left over from another Accelerator)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if type(frame.f_locals.get("self")).__name__ == "AcceleratedOptimizer":
            return True
        frame = frame.f_back
    return False


def _lr_mark(lr: Any) -> Any:
    """The lr as compared between micro-steps; a tensor lr by identity and version (reading it would sync)."""
    return (id(lr), lr._version) if isinstance(lr, torch.Tensor) else lr


def unwrap(optimizer: Any) -> "LogicalBatchOptimizer":
    """The :class:`LogicalBatchOptimizer` inside ``optimizer`` (itself, or under wrappers that keep it as
    ``.optimizer``, such as accelerate's ``AcceleratedOptimizer``), to reach ``did_update``, the clock and
    ``flush()``. Raises TypeError when there is none."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, LogicalBatchOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
    raise TypeError(f"no LogicalBatchOptimizer inside {type(optimizer).__name__}")


SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg")


def _scale_second_moment(optimizer: torch.optim.Optimizer, ratio: float) -> None:
    """v <- v * ratio for every second-moment buffer (one foreach call; no host sync)."""
    buffers = [st[k] for st in optimizer.state.values() for k in SECOND_MOMENT_KEYS
               if isinstance(st.get(k), torch.Tensor)]
    if buffers:
        torch._foreach_mul_(buffers, ratio)


def _warn_batchnorm(model: torch.nn.Module) -> None:
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn("the model has BatchNorm layers: with gradient accumulation they normalise over the micro-batch "
                      "only, so accumulation is not the same as one big batch (consider GroupNorm/LayerNorm or "
                      "SyncBatchNorm with a larger physical batch)", stacklevel=3)
