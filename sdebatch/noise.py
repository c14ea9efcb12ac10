"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), estimated for free.

A run with accumulation (or data parallelism) already has gradients at two batch sizes: the window's first
micro-batch (the accumulated gradient after one micro-step: one foreach norm) and the window's whole gradient. Since
E|g_b|^2 = |G|^2 + tr(Sigma)/b, the two sizes give unbiased estimates

    |G|^2    ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr Sigma ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)

The estimates are noisy, so the ratio is taken of their exponential moving averages (bias-corrected), not averaged
itself.
B_simple grows as the loss falls; the SDE scaling rules need the batch per update well below it. It is a proxy:
the measured knee of a loss-vs-batch sweep is the ground truth (Merrill et al. 2025).
"""
from __future__ import annotations

import math
import warnings

import torch


def two_size(small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr Sigma) from the mean squared gradient norm at ``small_batch`` samples and the squared norm
    at ``big_batch`` samples (the formulas above; needs big_batch > small_batch)."""
    b, B = small_batch, big_batch
    return (B * big_sq_norm - b * small_sq_norm) / (B - b), (small_sq_norm - big_sq_norm) / (1.0 / b - 1.0 / B)


class NoiseScaleEstimator:
    """EMA-smoothed two-batch-size estimator of the gradient noise scale.

    Args:
        decay: EMA decay per observation (one per optimizer update), in [0, 1). Default 0.95, about a 20-update
            memory.
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.count = 0
        self._g2 = 0.0  # EMA of the |G|^2 estimates (not bias-corrected)
        self._trace = 0.0  # EMA of the tr(Sigma) estimates
        self._moments = [0.0, 0.0, 0.0]  # EMAs of g2^2, trace^2, g2 trace: the spread of the window estimates
        self._moment_count = 0  # observations in the moments (a checkpoint from before they were kept has none)
        self.last_g2: float | None = None
        self.last_trace: float | None = None

    def observe(self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float) -> None:
        """Add one observation: mean |g_b|^2 over micro-batches of ``small_batch`` samples and |g_B|^2 of the
        ``big_batch``-sample mean gradient that contains them. Needs big_batch > small_batch."""
        b, B = float(small_batch), float(big_batch)
        if not (0 < b < B) or not all(math.isfinite(v) for v in (small_sq_norm, big_sq_norm, b, B)):
            raise ValueError(f"need finite norms and 0 < small_batch < big_batch, got small_batch={small_batch}, "
                             f"big_batch={big_batch}, norms {small_sq_norm}, {big_sq_norm}")
        self.observe_estimates(*two_size(small_sq_norm, b, big_sq_norm, B))

    def observe_estimates(self, g2: float, trace: float) -> None:
        """Add one observation given as unbiased estimates of |G|^2 and tr(Sigma)."""
        if not (math.isfinite(g2) and math.isfinite(trace)):
            raise ValueError(f"need finite estimates, got |G|^2 = {g2}, tr(Sigma) = {trace}")
        self.last_g2, self.last_trace = g2, trace
        d = self.decay
        self._g2 = d * self._g2 + (1 - d) * g2
        self._trace = d * self._trace + (1 - d) * trace
        self._moments = [d * m + (1 - d) * v for m, v in zip(self._moments, (g2 * g2, trace * trace, g2 * trace))]
        self.count += 1
        self._moment_count += 1

    @property
    def gradient_sq_norm(self) -> float | None:
        """EMA estimate of |G|^2 (bias-corrected), or None before the first observation."""
        return None if self.count == 0 else self._g2 / (1 - self.decay ** self.count)

    @property
    def trace_sigma(self) -> float | None:
        """EMA estimate of tr(Sigma), the per-sample gradient variance (bias-corrected)."""
        return None if self.count == 0 else self._trace / (1 - self.decay ** self.count)

    @property
    def value(self) -> float | None:
        """B_simple = tr(Sigma) / |G|^2 in samples, or None while unknown (no data, or |G|^2 estimate <= 0)."""
        if self.count == 0 or self._g2 <= 0 or self._trace <= 0:
            return None
        return self._trace / self._g2  # the bias corrections cancel

    @property
    def value_se(self) -> float | None:
        """The standard error of :attr:`value`, from the spread of the per-window estimates (their EMA-weighted
        variances and covariance, over the EMA's effective number of windows, by the delta method for a ratio);
        None with fewer than 2 observations or while the value is unknown. It treats windows as independent, which
        they nearly are (each is fresh data at slowly moving weights)."""
        value, n = self.value, self._moment_count
        if value is None or n < 2:
            return None
        d = self.decay
        norm = 1 - d ** n
        g, t = self._g2 / norm, self._trace / norm
        gg, tt, gt = (m / norm for m in self._moments)
        var_g, var_t, cov = max(gg - g * g, 0.0), max(tt - t * t, 0.0), gt - g * t
        # Var of a weighted mean of independent draws: sum w^2 / (sum w)^2 for the EMA's weights (1 - d) d^i
        factor = (1 - d) * (1 - d ** (2 * n)) / ((1 + d) * norm ** 2) if d > 0 else 1.0
        rel = factor * (var_t / t ** 2 + var_g / g ** 2 - 2 * cov / (t * g))
        return value * math.sqrt(max(rel, 0.0))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "count": self.count, "g2": self._g2, "trace": self._trace,
                "moments": list(self._moments), "moment_count": self._moment_count}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.count = float(state["decay"]), int(state["count"])
        self._g2, self._trace = float(state["g2"]), float(state["trace"])
        self._moments = [float(v) for v in state.get("moments", [0.0, 0.0, 0.0])]
        self._moment_count = int(state.get("moment_count", 0))


class NoiseScaleMonitor:
    """The in-run B_simple of :class:`sdebatch.LogicalBatchOptimizer`, called at each micro-step and window end.

    The small batches are the window's micro-batches, each read on its own: tensor hooks take the squared norm of
    each parameter's gradient as the backward computes it, before it is added to ``.grad`` (and before DDP's
    all-reduce, so each rank's own micro-batch), summed into one device scalar per micro-step; nothing is read back
    until the update. The big batch is the window's whole gradient (all ranks). With k micro-batches of b samples,
    the mean of their k squared norms estimates |G|^2 + tr(Sigma) / b with about 1 / k the variance of one of them:
    on Gaussian gradients its B_simple is up to 2.5x less noisy than the window's first micro-batch alone, and never
    worse (``python -m benchmarks.noise_variance``). Micro-batches of unequal size enter through the harmonic mean
    of their sizes. The hooks cost one norm per parameter per backward in observed windows (``every`` thins them).

    Sharded parameters (FSDP2's DTensors) take their gradients through FSDP's unsharded copies, out of the hooks'
    reach: there the small batch is the window's first micro-step, all ranks, read from the reduce-scattered
    ``.grad`` shards (each rank's part of the squared norm, summed by the update's all-reduce).

    Warns once when the samples per update exceed ``warn`` x B_simple.

    Args:
        params: the parameters (hooks are registered on them the first time a window is observed).
        decay: the estimator's EMA decay per observation (default 0.95).
        warn: warn above this multiple of B_simple (default 1.0; None: never).
        every: observe one window in this many (default 1).
    """

    def __init__(self, params, decay: float = 0.95, warn: float | None = 1.0, every: int = 1) -> None:
        params = [p for p in params if p.requires_grad]
        self.estimator = NoiseScaleEstimator(decay)
        self.warn, self.every = warn, every
        self._warned = False
        self.sharded = any(hasattr(p, "_local_tensor") for p in params)
        self._hooks = None if self.sharded else MicroGradNorms(params)
        self.start_window(0)

    def start_window(self, updates: int) -> None:
        """A new window begins after ``updates`` updates: clear its small batches; is it observed?"""
        # sums over micro-steps (and, at the update, over ranks): own mode, the normalised squared norms, their
        # number and the sum of 1 / samples; sharded mode, the first micro-step's squared norm (this rank's part),
        # its items and samples
        self.small: list | None = None
        self.observing = updates % self.every == 0
        if self._hooks is not None:
            self._hooks.active = self.observing

    @property
    def wants_micro_step(self) -> bool:
        """Whether the micro-step that just ended is read."""
        return self.observing and (not self.sharded or self.small is None)

    def micro_step(self, grads: list[torch.Tensor], samples: float | torch.Tensor, items: float | torch.Tensor | None,
                   grad_scaler=None) -> None:
        """Record the micro-step that just ended: ``samples`` its samples on this rank, ``items`` what its
        sum-reduced loss was summed over (None: a mean-reduced loss), ``grad_scaler`` the AMP scaler the loss was
        multiplied by, ``grads`` the accumulated ``.grad`` (read only for sharded parameters, after the first
        micro-step). Reads nothing back from the device."""
        if not self.wants_micro_step:
            return
        scale = _scale_of(grad_scaler)
        if self.sharded:
            sq = _total_sq_norm(grads, local=True) if grads else None
            if sq is not None:
                self.small = [sq / scale ** 2, 0.0 if items is None else items, samples]
            return
        sq = self._hooks.take()
        if sq is None:
            return
        denom = scale if items is None else scale * items
        if isinstance(denom, torch.Tensor) or isinstance(samples, torch.Tensor):  # device counts: no branch, no read
            denom, samples = (torch.as_tensor(v, dtype=torch.float64, device=sq.device) for v in (denom, samples))
            ok = (denom > 0) & (samples > 0)
            terms = [torch.where(ok, sq / denom.clamp_min(1e-300) ** 2, 0.0), ok.double(),
                     torch.where(ok, 1.0 / samples.clamp_min(1e-300), 0.0)]
        elif denom > 0 and samples > 0:
            terms = [sq / denom ** 2, 1.0, 1.0 / samples]
        else:
            return
        self.small = terms if self.small is None else [a + b for a, b in zip(self.small, terms)]

    def sums(self) -> list:
        """What the window's all-reduce adds up over the ranks (none if nothing was recorded)."""
        return [] if self.small is None else list(self.small)

    def window_sq_norm(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor | None, bool]:
        """The squared norm of the window's gradient as a device tensor (read with the update's other values), and
        whether it is this rank's part, to be summed over the ranks (sharded gradients)."""
        return (_total_sq_norm(grads, local=self.sharded) if grads else None), self.sharded

    def window_end(self, samples: float, sums: list[float], big_sq_norm: float, world_size: int = 1,
                   sum_protocol: bool = False) -> None:
        """One observation: ``sums`` as returned by :meth:`sums` (summed over ``world_size`` ranks) and the window's
        normalised gradient's squared norm ``big_sq_norm`` over ``samples`` (all ranks), all read by the update.
        ``sum_protocol``: the losses were sum-reduced (the sharded small batch is then normalised here)."""
        if not sums:
            return
        if self.sharded:  # the first micro-step of every rank, averaged over the ranks by the reduce-scatter
            sq, items, small_n = sums
            if sum_protocol:
                if items <= 0:
                    return
                sq = sq * (world_size / items) ** 2
        else:
            total, count, inverse = sums
            if count <= 0 or inverse <= 0:
                return
            sq, small_n = total / count, count / inverse
        if not 0 < small_n < samples:
            return  # one micro-batch on one rank: only one batch size, nothing to compare
        self.estimator.observe(sq, small_n, big_sq_norm, samples)
        value = self.estimator.value
        if (value is not None and self.warn is not None and not self._warned
                and samples > self.warn * value and self.estimator.count >= 10):
            self._warned = True
            warnings.warn(f"{int(samples)} samples per update exceed {self.warn:g} x the estimated gradient noise "
                          f"scale B_simple ~ {value:.4g}: beyond the critical batch the SDE rules stop holding (the "
                          "loss per sample gets worse); consider a smaller batch per update", stacklevel=4)

    def window_state(self) -> dict:
        """The open window's small-batch sums, for a checkpoint taken mid-window."""
        return {"noise_small": [] if self.small is None else [float(v) for v in self.small]}

    def load_window_state(self, state: dict) -> None:
        small = state.get("noise_small")
        if small is None and state.get("noise_prefix_sq"):  # an earlier layout: the first micro-batch alone
            sq, n = state["noise_prefix_sq"][0], state["noise_prefix_n"][0]
            small = [sq, 0.0, n] if self.sharded else [sq, 1.0, 1.0 / n]
        self.small = list(small) if small else None


def _total_sq_norm(grads: list[torch.Tensor], local: bool = False) -> torch.Tensor:
    """|g|^2 over all tensors: one foreach norm (float32 accumulation for half precision), then the norm of the norms
    (gathered on the first tensor's device when they are spread over several). ``local``: of each DTensor's local
    shard (this rank's part of the sum)."""
    if local:
        grads = [getattr(g, "_local_tensor", g) for g in grads]
    half = grads[0].dtype in (torch.float16, torch.bfloat16)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32) if half else torch._foreach_norm(grads)
    device = norms[0].device
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), dtype=torch.float64) ** 2


class MicroGradNorms:
    """The squared norm of a micro-batch's own gradient, read by tensor hooks before DDP's all-reduce and before it is
    added to ``.grad`` (one scalar per parameter). The hooks are registered the first time ``active`` is set: runs
    that never estimate the noise scale pay nothing per backward."""

    BATCH_NUMEL = 1 << 22  # incoming gradients held for one foreach norm: at most ~4M elements (16 MB in float32)

    def __init__(self, params) -> None:
        self._norms: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []  # incoming gradients not yet normed (one foreach launch per batch)
        self._pending_numel = 0
        self._params = [p for p in params if p.requires_grad]
        self._handles: list = []
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        if on and not self._handles:
            self._handles = [p.register_hook(self._hook) for p in self._params]
        self._active = on

    def _hook(self, grad: torch.Tensor) -> None:
        if self._active:
            # the tensor itself, not a detached view: a held reference keeps autograd from stealing it into .grad,
            # where DDP's all-reduce or the next micro-step would change it in place before it is normed
            self._pending.append(grad)
            self._pending_numel += grad.numel()
            if self._pending_numel >= self.BATCH_NUMEL:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            groups: dict = {}  # foreach norms take one device and dtype at a time
            for g in self._pending:
                groups.setdefault((g.device, g.dtype), []).append(g)
            for grads in groups.values():  # (half precision accumulates in float32)
                self._norms.append(_total_sq_norm(grads))
            self._pending, self._pending_numel = [], 0

    def take(self) -> "torch.Tensor | None":
        """The micro-step's squared norm (summed over parameters), and reset."""
        self._flush()
        if not self._norms:
            return None
        norms, self._norms = self._norms, []
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).sum()


def _scale_of(grad_scaler) -> float | torch.Tensor:
    """The AMP loss scale as a device tensor (``get_scale()`` reads it back, a sync per micro-step), or 1.0."""
    if grad_scaler is None:
        return 1.0
    get = getattr(grad_scaler, "_get_scale_async", None)
    scale = get() if get is not None else None
    return scale if scale is not None else grad_scaler.get_scale()


def probe_noise_scale(params, losses, *, micro_batch_size: int, group_size: int) -> dict:
    """B_simple at fixed weights, from gradients at two batch sizes far apart (an offline probe, not an EMA).

    The in-run estimator compares a micro-batch with its window, often only 2-4x larger, and its |G|^2 estimate can
    stay within noise of zero. This probe takes ``losses`` (callables, each returning the mean loss of one
    micro-batch of ``micro_batch_size`` samples), computes each micro-batch's gradient, and per group of
    ``group_size`` micro-batches uses the micro-batch (b) and group-mean (B = b x group_size) gradients in the
    unbiased two-size formulas of :class:`NoiseScaleEstimator`. The weights are not changed; ``.grad`` is left None.

    Args:
        params: the parameters (an iterable of tensors that require grad).
        losses: iterable of zero-argument callables; a multiple of ``group_size`` of them is used (the tail is not).
        micro_batch_size: samples per micro-batch, b (>= 1).
        group_size: micro-batches per group (>= 2), so B = b x group_size.

    Returns a dict: ``gradient_sq_norm`` and ``trace_sigma`` (means over groups), their standard errors
    (``*_se``, None with one group), ``b_simple`` = trace_sigma / gradient_sq_norm (None if either mean is <= 0),
    ``groups``, ``small_batch``, ``big_batch``.
    """
    if int(micro_batch_size) < 1 or int(group_size) < 2:
        raise ValueError(f"micro_batch_size must be >= 1 and group_size >= 2, got {micro_batch_size}, {group_size}")
    params = [p for p in params if p.requires_grad]
    b, B = float(micro_batch_size), float(micro_batch_size * group_size)
    g2s, traces = [], []
    small, total, n = 0.0, None, 0
    def sq_norm(tensors) -> float:  # summed in float64 without float64 copies of the parameters
        return float(sum(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in tensors))

    for fn in losses:
        grads = torch.autograd.grad(fn(), params, allow_unused=True)
        grads = [(g if g is not None else torch.zeros_like(p)).detach().to(torch.promote_types(p.dtype, torch.float32))
                 for g, p in zip(grads, params)]  # half precision accumulates in float32
        small += sq_norm(grads)
        total = grads if total is None else [t.add_(g) for t, g in zip(total, grads)]
        n += 1
        if n == group_size:
            g2, trace = two_size(small / n, b, sq_norm(t / n for t in total), B)
            g2s.append(g2)
            traces.append(trace)
            small, total, n = 0.0, None, 0
    if not g2s:
        raise ValueError(f"losses must hold at least group_size = {group_size} micro-batches")

    def mean_se(v: list[float]) -> tuple[float, float | None]:
        m = sum(v) / len(v)
        if len(v) < 2:
            return m, None
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))

    g2, g2_se = mean_se(g2s)
    trace, trace_se = mean_se(traces)
    return {"gradient_sq_norm": g2, "gradient_sq_norm_se": g2_se, "trace_sigma": trace, "trace_sigma_se": trace_se,
            "b_simple": trace / g2 if g2 > 0 and trace > 0 else None, "groups": len(g2s), "small_batch": int(b),
            "big_batch": int(B)}
