"""sdebatch: separate the logical batch size (the dynamics) from the physical one (the hardware).

Public API:
    kappa, rescale, ema_decay, lr_factor          the SDE scaling rules (pure functions)
    LogicalBatchOptimizer, unwrap                  accumulation + rescaling around any torch optimizer
    Clock                                          samples_seen / tokens_seen / updates
    ClockSchedule, warmup_cosine, linear, constant, warmup_stable_decay   schedules in samples or tokens
    per_update, PerUpdateScheduler                 a torch lr scheduler stepped once per update
    ModelEMA, ema_avg_fn                           model EMA with decay rho**kappa
    LogicalChunker                                 exact split of a physical batch into logical chunks
    batch_schedule, BatchSchedule                  the batch per update over the sample / token clock
    choose_physical_batch                          the fastest micro-batch that fits, measured on the real model
"""
from .rules import kappa, rescale, ema_decay, lr_factor
from .clock import Clock
from .optimizer import LogicalBatchOptimizer, unwrap
from .schedules import (ClockSchedule, PerUpdateScheduler, constant, linear, per_update, warmup_cosine,
                        warmup_stable_decay)
from .ema import ModelEMA, ema_avg_fn
from .chunking import LogicalChunker
from .batch_schedules import BatchSchedule, batch_schedule
from .physical_batch import choose_physical_batch

__version__ = "0.1.0"

__all__ = ["kappa", "rescale", "ema_decay", "lr_factor", "Clock", "LogicalBatchOptimizer", "unwrap", "ClockSchedule",
           "per_update", "PerUpdateScheduler",
           "constant", "linear", "warmup_cosine", "warmup_stable_decay", "ModelEMA", "ema_avg_fn", "LogicalChunker",
           "batch_schedule", "BatchSchedule", "choose_physical_batch"]
