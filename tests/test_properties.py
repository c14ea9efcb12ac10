"""Property-based tests of the window arithmetic: random micro-batch sizes, token counts, batch ramps (in samples or
tokens), flushed short windows and checkpoint positions, each run through the wrapper's public API and compared with
a plain big-batch reference written here: float64, a linear model, one step per window on the window's whole batch
(its mean over samples, or over valid tokens for a sum-reduced loss), with the rules applied by hand for kappa =
samples / logical: SGD at lr x kappa, and Adam by tests/reference.py's hand-written Adam (lr sqrt(kappa),
betas**kappa, eps / sqrt(kappa), bias correction through the product of the betas), which at kappa 1 is plain Adam.
"""
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdebatch
from reference import reference_adam

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
D, SEQ, N = 3, 4, 160
SGD = {"lr": 0.05, "weight_decay": 0.01}
ADAMW = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1}
KINDS = ("sgd", "adam")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, SEQ, D, generator=g, dtype=torch.float64)
    y = torch.randn(N, SEQ, generator=g, dtype=torch.float64)
    valid = torch.randint(1, SEQ + 1, (N,), generator=g)  # 1..SEQ loss-bearing tokens per sample
    return x, y, torch.arange(SEQ)[None, :] < valid[:, None]


X, Y, MASK = _data()
TOKENS = MASK.sum(1)  # per sample


def _model():
    m = torch.nn.Linear(D, 1, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64))
        m.bias.fill_(0.1)
    return m


def _losses(m, start, stop):
    """The mean squared error over the samples [start, stop), the sum over their valid tokens, and that count."""
    err = (m(X[start:stop]).squeeze(-1) - Y[start:stop]) ** 2
    return err.mean(), (err * MASK[start:stop]).sum(), int(MASK[start:stop].sum())


def _inner(kind, m):
    return torch.optim.SGD(m.parameters(), **SGD) if kind == "sgd" else torch.optim.AdamW(m.parameters(), **ADAMW)


# ------------------------------------------------------------------ the reference

def _reference(kind, windows, logical, protocol):
    """One plain step per window (start, stop) on its whole batch, at the reference's own iterate."""
    m = _model()
    params = list(m.parameters())

    def grads():  # drawn one window at a time: each at the parameters the previous step left
        for start, stop in windows:
            mean, total, n = _losses(m, start, stop)
            yield [g.detach() for g in torch.autograd.grad(mean if protocol == "mean" else total / n, params)]

    kappas = [(stop - start) / logical for start, stop in windows]
    if kind == "adam":
        reference_adam([p.detach() for p in params], grads(), kappas, lr=ADAMW["lr"], betas=ADAMW["betas"],
                       eps=ADAMW["eps"], wd=ADAMW["weight_decay"], decoupled=True)
    else:  # the linear rule: lr x kappa, the decay unchanged
        for g, k in zip(grads(), kappas):
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(SGD["lr"] * k * (gi + SGD["weight_decay"] * p))
    return torch.cat([p.detach().flatten() for p in params])


def _windows(sizes, flushes, accumulation):
    """The windows as the rule says: a window closes after ``accumulation(clock)`` micro-steps (clock = (samples,
    tokens) before the window), at a flush, and at the end. Returns (start, stop) sample ranges."""
    out, start, pos, count = [], 0, 0, 0
    clock = (0, 0)
    for i, m in enumerate(sizes):
        if count == 0:
            need = accumulation(clock)
        pos += m
        count += 1
        if count == need or i in flushes or i == len(sizes) - 1:
            out.append((start, pos))
            clock = (pos, int(TOKENS[:pos].sum()))
            start, count = pos, 0
    return out


# ------------------------------------------------------------------ the wrapper

def _micro_step(opt, m, start, size, protocol):
    mean, total, n = _losses(m, start, start + size)
    if protocol == "mean":
        opt.backward(mean, num_samples=size, num_tokens=n)
    else:
        opt.backward(total, num_items=n, num_tokens=n, num_samples=size)
    opt.step()
    opt.zero_grad()


def _run(kind, sizes, flushes, protocol, logical, physical, *, checkpoint_at=None, **options):
    """The plain loop through the wrapper; with ``checkpoint_at``, stopped after that micro-step (before its flush),
    saved, and continued by a fresh model and optimizer loaded from the saved bytes."""
    def build():
        m = _model()
        return m, sdebatch.LogicalBatchOptimizer(_inner(kind, m), logical, physical, **options)

    m, opt = build()
    start = 0
    for i, size in enumerate(sizes):
        _micro_step(opt, m, start, size, protocol)
        start += size
        if i == checkpoint_at:
            buf = io.BytesIO()
            torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=False)
            m, opt = build()
            m.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        if i in flushes or i == len(sizes) - 1:
            opt.flush()
            opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in m.parameters()]), opt


def _check(kind, sizes, flushes, protocol, logical, physical, accumulation, **run_kw):
    got, opt = _run(kind, sizes, flushes, protocol, logical, physical, **run_kw)
    windows = _windows(sizes, flushes, accumulation)
    want = _reference(kind, windows, logical, protocol)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    total = sum(sizes)
    assert (opt.updates, opt.samples_seen, opt.tokens_seen) == (len(windows), total, int(TOKENS[:total].sum()))
    last = windows[-1]
    assert opt.last_kappa == pytest.approx((last[1] - last[0]) / logical, rel=1e-12)


# ------------------------------------------------------------------ the properties

micro_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=12)


@SETTINGS
@given(sizes=micro_sizes, accumulation=st.integers(1, 4), logical=st.integers(2, 12),
       protocol=st.sampled_from(["mean", "sum"]), flushes=st.sets(st.integers(0, 11), max_size=4))
def test_accumulation_with_flushes_equals_the_big_batch(sizes, accumulation, logical, protocol, flushes):
    """Micro-batches of any sizes and token counts, windows of ``accumulation`` micro-steps, short windows flushed
    anywhere: each update is one big-batch step on its window with kappa = its samples / logical."""
    physical = max(sizes)
    for kind in KINDS:
        _check(kind, sizes, flushes, protocol, logical, physical, lambda clock: accumulation,
               accumulation_steps=accumulation, reparameterize=physical * accumulation > logical)


@st.composite
def ramps(draw):
    """A piecewise ramp in samples or tokens: batches that are multiples of the micro-batch, changing at increasing
    clock values."""
    unit = draw(st.sampled_from(["samples", "tokens"]))
    physical = draw(st.integers(1, 3))
    batches = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    scale = 1 if unit == "samples" else 2  # about two valid tokens per sample
    steps = draw(st.lists(st.integers(1, 12 * scale), min_size=len(batches) - 1, max_size=len(batches) - 1))
    points, t = [(0, physical * batches[0])], 0
    for b, dt in zip(batches[1:], steps):
        t += dt
        points.append((t, physical * b))
    return unit, physical, points


def _at(points, t):
    return [b for start, b in points if t >= start][-1]


@SETTINGS
@given(ramp=ramps(), micro_steps=st.integers(1, 16), logical=st.integers(2, 12),
       protocol=st.sampled_from(["mean", "sum"]), flushes=st.sets(st.integers(0, 15), max_size=3))
def test_a_ramp_with_flushes_equals_the_big_batch_at_each_windows_batch(ramp, micro_steps, logical, protocol,
                                                                         flushes):
    """A batch schedule (samples or tokens) reached by accumulation: each window's batch is the schedule at the
    clock before it (a flushed window shorter), each update one big-batch step with kappa = its samples / logical."""
    unit, physical, points = ramp
    schedule = sdebatch.batch_schedule(", ".join(f"{t}:{b}" for t, b in points), unit=unit)
    sizes = [physical] * micro_steps

    def accumulation(clock):
        return _at(points, clock[0] if unit == "samples" else clock[1]) // physical

    for kind in KINDS:
        _check(kind, sizes, flushes, protocol, logical, physical, accumulation, batch_schedule=schedule)


@SETTINGS
@given(sizes=micro_sizes, accumulation=st.integers(1, 4), logical=st.integers(2, 12),
       protocol=st.sampled_from(["mean", "sum"]), flushes=st.sets(st.integers(0, 11), max_size=3),
       at=st.integers(0, 11), ramp=st.booleans())
def test_a_checkpoint_anywhere_resumes_the_big_batch_run(sizes, accumulation, logical, protocol, flushes, at, ramp):
    """Saved after any micro-step (inside a window or at its end, before a flush) and loaded into a fresh model and
    optimizer, the run goes on as the uninterrupted big-batch reference, with or without a ramp."""
    at = min(at, len(sizes) - 1)
    if ramp:
        physical = 1
        sizes = [1] * len(sizes)
        points = [(0, accumulation), (4, accumulation + 1)]
        options = {"batch_schedule": sdebatch.batch_schedule(f"0:{accumulation}, 4:{accumulation + 1}")}

        def acc(clock):
            return _at(points, clock[0])
    else:
        physical = max(sizes)
        options = {"accumulation_steps": accumulation, "reparameterize": physical * accumulation > logical}

        def acc(clock):
            return accumulation
    for kind in KINDS:
        _check(kind, sizes, flushes, protocol, logical, physical, acc, checkpoint_at=at, **options)
