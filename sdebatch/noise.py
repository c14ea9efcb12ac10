"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), estimated for free.

A run with accumulation (or data parallelism) already has gradients at two batch sizes: each micro-batch's (b
samples) and the window's (B samples). Since E|g_b|^2 = |G|^2 + tr(Sigma)/b, two sizes give unbiased estimates

    |G|^2    ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr Sigma ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)

which are noisy, so the ratio is taken of their exponential moving averages (bias-corrected), not averaged itself.
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
        self.last_g2: float | None = None
        self.last_trace: float | None = None

    def observe(self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float) -> None:
        """Add one observation: mean |g_b|^2 over micro-batches of ``small_batch`` samples and |g_B|^2 of the
        ``big_batch``-sample mean gradient that contains them. Needs big_batch > small_batch."""
        b, B = float(small_batch), float(big_batch)
        if not (0 < b < B) or not all(math.isfinite(v) for v in (small_sq_norm, big_sq_norm, b, B)):
            raise ValueError(f"need finite norms and 0 < small_batch < big_batch, got small_batch={small_batch}, "
                             f"big_batch={big_batch}, norms {small_sq_norm}, {big_sq_norm}")
        g2, trace = two_size(small_sq_norm, b, big_sq_norm, B)
        self.last_g2, self.last_trace = g2, trace
        d = self.decay
        self._g2 = d * self._g2 + (1 - d) * g2
        self._trace = d * self._trace + (1 - d) * trace
        self.count += 1

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

    def state_dict(self) -> dict:
        return {"decay": self.decay, "count": self.count, "g2": self._g2, "trace": self._trace}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.count = float(state["decay"]), int(state["count"])
        self._g2, self._trace = float(state["g2"]), float(state["trace"])


class MicroGradNorms:
    """The squared norm of each micro-batch's own gradient, read by tensor hooks before it is added to ``.grad``.

    No parameter-sized buffer: each hook adds one scalar. Under DDP the hooks see the rank's local gradient (before
    the all-reduce), which is what the two-batch estimator needs. A micro-step with several backward calls adds the
    squared norms of each call, not of their sum.
    """

    def __init__(self, params) -> None:
        self._norms: list[torch.Tensor] = []
        self.active = True  # off: the hooks return at once (windows the estimator skips cost nearly nothing)
        self._handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> None:
        if not self.active:
            return
        # one fused reduction per parameter, no squared copy; half precision accumulates in float32
        self._norms.append(torch.linalg.vector_norm(grad.detach(),
                                                    dtype=torch.promote_types(grad.dtype, torch.float32)))

    def take(self) -> "torch.Tensor | None":
        """The micro-step's squared norm (summed over parameters), and reset."""
        if not self._norms:
            return None
        norms, self._norms = self._norms, []
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).square().sum()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class NoiseScaleMonitor:
    """The in-run B_simple of :class:`sdebatch.LogicalBatchOptimizer`, called at each micro-step and window end.

    Each micro-batch's own squared gradient norm (:class:`MicroGradNorms`, kept as a device tensor: no sync per
    micro-step) is summed over the window; at the window's end the sums (added to the window's one all-reduce) and
    the window's gradient give one observation of :attr:`estimator`. Warns once when the samples per update exceed
    ``warn`` x B_simple.

    Args:
        params: the parameters whose gradients are observed.
        decay: the estimator's EMA decay per observation (default 0.95).
        warn: warn above this multiple of B_simple (default 1.0; None: never).
        every: observe one window in this many (default 1).
    """

    def __init__(self, params, decay: float = 0.95, warn: float | None = 1.0, every: int = 1) -> None:
        self.estimator = NoiseScaleEstimator(decay)
        self.warn, self.every = warn, every
        self._warned = False
        self._norms = MicroGradNorms(params)
        self.start_window(0)

    def start_window(self, updates: int) -> None:
        """A new window begins after ``updates`` updates: clear its sums, arm the hooks if it is observed."""
        self.sq: float | torch.Tensor = 0.0
        self.sq_samples, self.sq_count = 0.0, 0.0
        self._norms.active = updates % self.every == 0

    def micro_step(self, samples: float | torch.Tensor, items: float | torch.Tensor | None, grad_scaler=None) -> None:
        """Record the micro-step just ended: ``items`` its sum-reduced loss's count (None: a mean loss);
        ``grad_scaler`` the AMP scaler its loss was multiplied by, if any. Nothing is read from the device."""
        sq = self._norms.take()
        if sq is None:
            return
        scale = _scale_of(grad_scaler)
        denom = scale * (items if items is not None else 1.0)
        if isinstance(denom, torch.Tensor):  # a device count: an empty micro-step is masked out, not tested here
            ok = denom > 0
            self.sq = self.sq + torch.where(ok, sq / denom.clamp_min(torch.finfo(denom.dtype).tiny) ** 2, 0.0)
            self.sq_samples = self.sq_samples + ok * samples
            self.sq_count = self.sq_count + ok
            return
        if denom <= 0:
            return
        self.sq = self.sq + sq / denom ** 2  # a tensor: no device sync per micro-step
        self.sq_samples = self.sq_samples + samples
        self.sq_count = self.sq_count + 1

    def sums(self) -> list:
        """What the window's all-reduce adds up: sum of micro squared norms, their samples, their count."""
        return [self.sq, self.sq_samples, self.sq_count]

    @property
    def observing(self) -> bool:
        """Whether this window is observed (its micro-steps' norms were taken)."""
        return self._norms.active

    @staticmethod
    def window_sq_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
        """The squared norm of the window's gradient as a device tensor (read with the update's other values)."""
        return torch.stack(torch._foreach_norm(grads)).double().square().sum() if grads else None

    def window_end(self, samples: float, sums: list[float], big_sq_norm: float) -> None:
        """One observation from the window's normalised gradient's squared norm ``big_sq_norm`` over ``samples``
        (all ranks) and the micro-batch ``sums`` (all ranks), all read to the host by the update."""
        sq_sum, sq_samples, sq_count = sums
        if sq_count == 0:
            return
        b = sq_samples / sq_count
        if samples <= b:
            return  # one micro-batch on one rank: only one batch size, nothing to compare
        self.estimator.observe(sq_sum / sq_count, b, big_sq_norm, samples)
        value = self.estimator.value
        if (value is not None and self.warn is not None and not self._warned
                and samples > self.warn * value and self.estimator.count >= 10):
            self._warned = True
            warnings.warn(f"{int(samples)} samples per update exceed {self.warn:g} x the estimated gradient noise "
                          f"scale B_simple ~ {value:.4g}: beyond the critical batch the SDE rules stop holding (the "
                          "loss per sample gets worse); consider a smaller batch per update", stacklevel=4)

    def window_state(self) -> dict:
        """The open window's sums, for a checkpoint taken mid-window."""
        return {"micro_sq": float(self.sq), "micro_sq_samples": float(self.sq_samples),
                "micro_sq_count": float(self.sq_count)}

    def load_window_state(self, state: dict) -> None:
        self.sq = state.get("micro_sq", 0.0)
        self.sq_samples = state.get("micro_sq_samples", 0.0)
        self.sq_count = state.get("micro_sq_count", 0.0)


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
