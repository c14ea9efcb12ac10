"""The accumulation window of :class:`sdebatch.LogicalBatchOptimizer`: the micro-steps since the last update.

A window holds what its update needs: the counts (samples, tokens, items), the loss protocol of its micro-steps
(mean- or sum-reduced, one per window), the counts reported for the micro-step in progress (``pending``, from
``backward`` / ``count`` before ``step``), and the gradients of a window saved in a checkpoint, added back at the
next micro-step. At its end the counts are summed over data-parallel ranks in one all-reduce and read to the host in
one transfer, with whatever else the update reads (:func:`read_sums`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PROTOCOLS = ("mean", "sum")


@dataclass
class Pending:
    """Counts reported for the micro-step in progress; ``sum``: the loss was sum-reduced over ``items``."""

    items: float | torch.Tensor = 0.0
    samples: float | torch.Tensor | None = None
    tokens: float | torch.Tensor | None = None
    sum: bool = False


@dataclass
class Window:
    """The open window: counts so far, its protocol, the pending micro-step, gradients restored from a checkpoint."""

    micro_steps: int = 0
    samples: float | torch.Tensor = 0.0  # counts given as device tensors stay tensors until the update reads them
    tokens: float | torch.Tensor = 0.0
    items: float | torch.Tensor = 0.0
    protocol: str | None = None
    pending: Pending | None = None
    saved_grads: list | None = field(default=None, repr=False)

    @property
    def open(self) -> bool:
        """True while micro-steps of an unfinished window hold gradients."""
        return self.micro_steps > 0

    def set_protocol(self, protocol: str) -> None:
        if self.protocol is not None and self.protocol != protocol:
            raise RuntimeError("a window mixed mean-reduced micro-steps (loss.backward() or opt.backward(loss)) with "
                               "sum-reduced ones (opt.backward(loss_sum, num_items=n)); use one protocol per window")
        self.protocol = protocol

    def report(self, items: float | None, samples: float | None, tokens: float | None) -> None:
        """Add counts to the micro-step in progress (calls add up); ``items`` given: a sum-reduced loss."""
        if items is not None:
            self.set_protocol("sum")
        p = self.pending if self.pending is not None else Pending()  # (no truth test of a tensor: it would sync)
        if items is not None:
            p.items, p.sum = p.items + items, True
        if samples is not None:
            p.samples = samples if p.samples is None else p.samples + samples
        if tokens is not None:
            p.tokens = tokens if p.tokens is None else p.tokens + tokens
        self.pending = p

    def end_micro_step(self, samples: float | None, tokens: float | None,
                       default_samples: int) -> tuple[Pending, float]:
        """Close the micro-step: its counts join the window (``samples`` / ``tokens`` given to ``step`` override the
        reported ones; samples default to ``default_samples``). Returns its pending counts and its samples."""
        pending = self.pending if self.pending is not None else Pending()
        # a micro-step that reported no num_items was mean-reduced (plain loss.backward()); mixing is an error
        self.set_protocol("sum" if pending.sum else "mean")
        n = samples if samples is not None else (pending.samples if pending.samples is not None else default_samples)
        self.samples = self.samples + n
        if tokens is not None or pending.tokens is not None:
            self.tokens = self.tokens + (tokens if tokens is not None else pending.tokens)
        if pending.sum:
            self.items = self.items + pending.items
        self.micro_steps += 1
        self.pending = None
        return pending, n

    def add_saved_grads(self, params: list[torch.Tensor]) -> None:
        """Add the gradients a checkpoint saved for this window to ``.grad`` (once)."""
        for p, g in zip(params, self.saved_grads or []):
            if g is not None:
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self.saved_grads = None

    def grads_to_save(self, params: list[torch.Tensor]) -> list:
        """The window's gradients so far, per parameter (what a checkpoint taken mid-window must keep)."""
        restored = self.saved_grads or [None] * len(params)
        return [_sum_or_none(p.grad, r) for p, r in zip(params, restored)]

    def state_dict(self) -> dict:
        return {"micro_steps": self.micro_steps, "samples": float(self.samples), "tokens": float(self.tokens),
                "items": float(self.items), "protocol": self.protocol}  # read: a checkpoint is not the hot path

    def load_state_dict(self, state: dict) -> None:
        for key in ("micro_steps", "samples", "tokens", "items", "protocol"):
            if key in state:
                setattr(self, key, state[key])


def read_sums(reduced: list, local: list, world_size: int, process_group=None,
              device: torch.device | None = None) -> tuple[list[float], list[float]]:
    """Host floats of ``reduced`` summed over the ranks of ``process_group`` (one all-reduce) and of ``local`` as they
    are, read in one device-to-host transfer; entries may be numbers, 0-dim tensors or None (read as 0). With one
    rank and no tensor there is nothing to transfer."""
    values = [0.0 if v is None else v for v in [*reduced, *local]]
    tensors = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if world_size == 1 and not tensors:
        out = [float(v) for v in values]
    elif world_size == 1:  # only the tensors travel, gathered on an accelerator if one holds any (no read there)
        target = next((values[i].device for i in tensors if values[i].device.type != "cpu"), torch.device("cpu"))
        read = iter(torch.stack([values[i].to(device=target, dtype=torch.float64) for i in tensors]).tolist())
        out = [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]
    else:
        device = device if device is not None else torch.device("cpu")
        if dist.get_backend(process_group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        as_t = [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]
        t = torch.stack(as_t[:len(reduced)])
        dist.all_reduce(t, group=process_group)
        out = torch.cat([t, *(v.reshape(1) for v in as_t[len(reduced):])]).tolist()
    return out[:len(reduced)], out[len(reduced):]


def _sum_or_none(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return None if b is None else b.detach().clone()
    return a.detach().clone() if b is None else a.detach() + b


class _Counter:
    """A probe parameter's post-accumulate-grad hook: one more backward into its gradient."""

    def __init__(self, watch: "weakref.ref[GradWatch]") -> None:
        self.watch = watch

    def __call__(self, _param: torch.Tensor) -> None:
        watch = self.watch()
        if watch is not None:
            watch.backwards += 1


def _bucket_view(g: torch.Tensor | None) -> bool:
    """Whether ``g`` replaced a window's gradient as DDP's ``gradient_as_bucket_view=True`` does: the reducer copies
    the accumulated gradient into a bucket (rebuilt after the first iteration, so into a new one then) and points
    ``.grad`` at a view of it, values kept."""
    return g is not None and g._is_view()


def _version(g: torch.Tensor) -> int:
    """The in-place version counter of a gradient (a DTensor's is its local shard's: the wrapper's never moves)."""
    return g._version if type(g) is torch.Tensor else getattr(g, "_local_tensor", g)._version


class GradWatch:
    """What each parameter's ``.grad`` was after the last ``step()``, to catch what silently corrupts a window:

    - the window's gradients replaced or cleared between its micro-steps (``model.zero_grad()`` inside a window, as
      ``transformers.Trainer`` does after every ``optimizer.step()``);
    - the window's partial gradient edited in place between its micro-steps (``clip_grad_norm_`` or
      ``GradScaler.unscale_`` / ``scaler.step(opt)`` per micro-batch, a zero_grad(set_to_none=False) on the inner
      optimizer): a backward adds to ``.grad`` in place, one version per backward; one probe parameter counts its
      backwards with a hook, and a version that moved further was edited;
    - a ``step()`` with nothing backpropagated since the last one;
    - a new window added onto the last update's gradient (no ``zero_grad()`` after an update).

    One reference and one version read per parameter per micro-step, one counter hook, nothing copied, nothing read
    from the device.
    """

    def __init__(self) -> None:
        self.marks: list | None = None  # per parameter: (grad, version) or None; None: nothing recorded yet
        self.probe: torch.Tensor | None = None  # the parameter whose accumulations are counted
        self.backwards = 0  # backwards that accumulated into the probe's gradient since record()
        self._handle: object | None = None

    def record(self, params: list[torch.Tensor]) -> None:
        self.marks = [None if (g := p.grad) is None else (g, _version(g)) for p in params]
        self.backwards = 0
        if self._handle is None:
            # a plain tensor (a sharded DTensor's gradient arrives through FSDP, not through its own accumulation)
            self.probe = next((p for p in params if p.requires_grad and type(p.data) is torch.Tensor), None)
            if self.probe is not None:
                # the hook holds a weak reference: the parameter must not keep this watch (and the gradients its
                # marks hold) alive after the optimizer; the hook goes with the watch
                self._handle = self.probe.register_post_accumulate_grad_hook(_Counter(weakref.ref(self)))
                weakref.finalize(self, self._handle.remove)

    def forget(self) -> None:
        self.marks = None

    def check(self, params: list[torch.Tensor], window_open: bool, watch_edits: bool = True) -> str | None:
        """None if the gradients moved as a micro-step's backward moves them since :meth:`record`, else the fault:
        "cleared", "edited", "nothing" or "stale". ``watch_edits``: False where something else legitimately writes
        the gradients between micro-steps (a DDP backward that all-reduces)."""
        if self.marks is None:
            return None if any(p.grad is not None for p in params) else "nothing"
        if len(self.marks) != len(params):
            return None  # a param group was added: nothing to compare with
        changed = False
        for p, mark in zip(params, self.marks):
            g = p.grad
            if mark is None:
                changed = changed or g is not None
                continue
            g0, v0 = mark
            if g is not g0:
                if window_open and not _bucket_view(g):
                    return "cleared"
                changed = changed or g is not None  # a new gradient after zero_grad(set_to_none=True)
                continue
            v = _version(g)
            if v != v0:
                if not window_open and v == v0 + 1:
                    return "stale"  # one backward added onto the last update's gradient, no zeroing between
                # (a view's version counter is its base's, shared with other gradients: a DDP bucket view)
                if (window_open and watch_edits and p is self.probe and self.backwards
                        and v - v0 > self.backwards and not g._is_view()):
                    return "edited"
                changed = True
        return None if changed else "nothing"
