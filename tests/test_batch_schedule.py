"""Batch-size schedules (sdebatch.batch_schedule): the parser and its errors; a ramp reached by accumulation equals a
hand-written Adam that takes each big batch with the rules applied by hand (lr sqrt(kappa), betas**kappa,
eps / sqrt(kappa), bias correction through the product of the betas) to round-off; the same for SGD; the values
applied at each change; a resume mid-ramp; the Lightning callback = the plain loop."""
import math

import pytest
import torch

import sdebatch
from reference import make_data, make_model, sample_loss_mean

SCHEDULE = "0:8, 32:16, 96:32"  # samples per update: 8 from 0, 16 from 32, 32 from 96 samples seen
LOGICAL, PHYSICAL = 8, 4


@pytest.mark.parametrize("spec,unit,needle", [
    ("0:64, 10:0", "samples", "entry 2 ('10:0'): the batch must be a positive int"),
    ("0:64, 10:-8", "samples", "entry 2 ('10:-8')"),
    ("5:64", "samples", "entry 1 ('5:64'): the first entry must start at 0 samples"),
    ("0:64, 20M:128, 20M:256", "tokens", "entry 3 ('20M:256'): clock values must increase"),
    ("0:64, 1e6:128", "samples", "entry 2 ('1e6:128'): '1e6' is not a number"),
    ("0:64; 10:128", "samples", "is not a number"),
    ("0", "samples", "entry 1 ('0') is not clock:batch"),
    ("", "samples", "batch_schedule is empty"),
    ("0:64", "steps", "unit must be one of 'samples', 'tokens'"),
    ([(0, 64), (10, 1.5)], "samples", "entry 2 ('10:1.5'): the batch must be a positive int"),
])
def test_invalid_schedules_name_the_entry(spec, unit, needle):
    with pytest.raises(ValueError) as e:
        sdebatch.batch_schedule(spec, unit=unit)
    assert needle in str(e.value)


def test_parser_and_description():
    s = sdebatch.batch_schedule("0:64, 20M:128, 0.1G:256", unit="tokens")
    assert s.points == [(0.0, 64), (2e7, 128), (1e8, 256)]
    assert [s(t) for t in (0, 2e7 - 1, 2e7, 99_999_999, 1e8, 1e12)] == [64, 64, 128, 128, 256, 256]
    assert s.describe() == "64 from 0, 128 from 20M, 256 from 100M tokens"
    assert sdebatch.batch_schedule([(0, 8), (100, 16)])(150) == 16


def _stream(n=224):
    x, y, _ = make_data(n=n)
    return x, y


def _wrapped_run(inner_cls, kw, schedule, *, stop_after=None, state=None, **wrapper_kw):
    """The wrapper on the schedule, micro-batches of PHYSICAL in stream order; optionally stopped / resumed."""
    x, y = _stream()
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(inner_cls(model.parameters(), **kw), LOGICAL, PHYSICAL,
                                         batch_schedule=schedule, **wrapper_kw)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["micro"]
    used = []
    for i in range(start, len(x) // PHYSICAL):
        if stop_after is not None and i == stop_after:
            return model, opt, {"model": model.state_dict(), "opt": opt.state_dict(), "micro": i}
        sl = slice(i * PHYSICAL, (i + 1) * PHYSICAL)
        sample_loss_mean(model, x[sl], y[sl]).backward()
        opt.step()
        if opt.did_update:
            assert opt.last_batch_size == opt.last_kappa * LOGICAL
            used.append((opt.last_kappa, dict(opt.effective_hyperparameters()[0])))
        opt.zero_grad()
    return model, opt, used


def _batches(schedule, n):
    """The update batches the schedule gives over a stream of n samples: (start, size)."""
    out, seen = [], 0
    while seen < n:
        b = schedule(seen)
        out.append((seen, b))
        seen += b
    return out


@pytest.mark.parametrize("second_moment_rescale", [False, True])
def test_ramp_by_accumulation_equals_hand_written_adam_with_the_rules_and_the_product_bias_correction(
        second_moment_rescale):
    lr, b1, b2, eps = 0.01, 0.9, 0.99, 1e-8
    schedule = sdebatch.batch_schedule(SCHEDULE)
    model, opt, used = _wrapped_run(torch.optim.Adam, dict(lr=lr, betas=(b1, b2), eps=eps), schedule,
                                    second_moment_rescale=second_moment_rescale)
    # the reference: plain float64 Adam on each update's whole batch, every hyperparameter rescaled by hand
    x, y = _stream()
    ref = make_model()
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    k_sum = 0.0
    batches = _batches(schedule, len(x))
    for (start, b), (kappa, applied) in zip(batches, used):
        k = b / LOGICAL
        assert kappa == k
        # the values applied at this update are the rules computed by hand
        assert applied["lr"] == pytest.approx(lr * math.sqrt(k), rel=1e-15)
        assert applied["betas"] == pytest.approx((b1 ** k, b2 ** k), rel=1e-15)
        assert applied["eps"] == pytest.approx(eps / math.sqrt(k), rel=1e-15)
        ref.zero_grad()
        sample_loss_mean(ref, x[start:start + b], y[start:start + b]).backward()
        k_sum += k
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                if second_moment_rescale and start > 0 and b != schedule(start - 1):
                    vi.mul_(schedule(start - 1) / b)  # v's noise-dominated limit: trace / B
                mi.mul_(b1 ** k).add_((1 - b1 ** k) * p.grad)
                vi.mul_(b2 ** k).add_((1 - b2 ** k) * p.grad ** 2)
                m_hat = mi / (1 - b1 ** k_sum)  # bias correction through prod_s beta1**kappa_s
                v_hat = vi / (1 - b2 ** k_sum)
                p.sub_(lr * math.sqrt(k) * m_hat / (v_hat.sqrt() + eps / math.sqrt(k)))
    assert [b for _, b in batches] == [8] * 4 + [16] * 4 + [32] * 4 and len(used) == len(batches) == 12
    assert opt.samples_seen == len(x) and opt.accumulation_steps == 8
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_ramp_by_accumulation_equals_the_piecewise_big_batch_sgd():
    lr = 0.05
    schedule = sdebatch.batch_schedule(SCHEDULE)
    model, _, used = _wrapped_run(torch.optim.SGD, dict(lr=lr), schedule)
    x, y = _stream()
    ref = make_model()
    for (start, b), (kappa, applied) in zip(_batches(schedule, len(x)), used):
        assert applied["lr"] == pytest.approx(lr * b / LOGICAL, rel=1e-15)  # the linear rule
        ref.zero_grad()
        sample_loss_mean(ref, x[start:start + b], y[start:start + b]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(lr * (b / LOGICAL) * p.grad)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("stop_after", [5, 8, 13, 30])  # mid-window and at a window's end, before / after changes
def test_resume_mid_ramp_equals_uninterrupted(stop_after):
    kw = dict(lr=0.01, betas=(0.9, 0.99))
    schedule = sdebatch.batch_schedule(SCHEDULE)
    full, full_opt, _ = _wrapped_run(torch.optim.Adam, kw, schedule)
    _, _, state = _wrapped_run(torch.optim.Adam, kw, schedule, stop_after=stop_after)
    resumed, opt, _ = _wrapped_run(torch.optim.Adam, kw, schedule, state=state)
    assert opt.updates == full_opt.updates and opt.samples_seen == full_opt.samples_seen
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_schedule_errors_before_any_state_changes():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="12 samples per update from 32 samples is not a multiple of physical x "
                                         "world size = 8"):
        sdebatch.LogicalBatchOptimizer(inner, 8, 8, batch_schedule=sdebatch.batch_schedule("0:8, 32:12"))
    with pytest.raises(ValueError, match="leave accumulation_steps None"):
        sdebatch.LogicalBatchOptimizer(inner, 8, 4, accumulation_steps=2,
                                       batch_schedule=sdebatch.batch_schedule("0:8"))
    with pytest.raises(TypeError, match="sdebatch.batch_schedule"):
        sdebatch.LogicalBatchOptimizer(inner, 8, 4, batch_schedule="0:8")
    opt = sdebatch.LogicalBatchOptimizer(inner, 8, 4, batch_schedule=sdebatch.batch_schedule(lambda n: 12))
    model(torch.ones(4, 6)).sum().backward()
    with pytest.raises(ValueError, match="batch_schedule asks 12 samples per update"):
        opt.configure_batch(8)  # a callable that asks what 8-sample micro-batches cannot reach
    assert "batch schedule: <lambda> of the samples seen" in opt.describe()


def test_lightning_ramp_equals_the_plain_loop(tmp_path):
    import sdebatch.lightning as sl
    from lightning_helpers import Regression, loader, trainer

    n = 96
    schedule = sdebatch.batch_schedule("0:8, 32:16")
    module = Regression("adam")
    cb = sl.LogicalBatch(LOGICAL, batch_schedule=schedule, verbose=False)
    trainer(cb, epochs=1).fit(module, train_dataloaders=loader(n, PHYSICAL))
    # the plain loop: the same data in the same order, the same schedule
    from reference import OPTIMIZERS
    x, y, _ = make_data(n=n)
    model = make_model()
    cls, kw = OPTIMIZERS["adam"]
    opt = sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **kw), LOGICAL, PHYSICAL, batch_schedule=schedule)
    for i in range(0, n, PHYSICAL):
        sample_loss_mean(model, x[i:i + PHYSICAL], y[i:i + PHYSICAL]).backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    assert cb.optimizer.updates == opt.updates == 4 + 4 and cb.optimizer.samples_seen == n
    for p, q in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec,logical,n", [("0:8, 32:12", 8, 92), ("megatron", 16, 100)])
def test_lightning_ramp_is_checked_against_the_loaders_batch(spec, logical, n):
    """The per-device batch comes from the loader (4): a ramp it reaches runs (each update's batch is the schedule's
    at the clock before the window, the parameters those of the plain loop), and one it cannot reach is refused
    before training naming 4."""
    import sdebatch.lightning as sl
    from lightning_helpers import Regression, flat_params, loader, trainer
    from reference import OPTIMIZERS

    def make():
        return sdebatch.batch_schedules.megatron_ramp(8, 4, 64, 16) if spec == "megatron" \
            else sdebatch.batch_schedule(spec)

    module = Regression("adam")
    cb = sl.LogicalBatch(logical, batch_schedule=make(), verbose=False)
    trainer(cb, epochs=1).fit(module, train_dataloaders=loader(n, 4))
    clock = [t for t, _, _ in module.lrs]
    sizes = [b - a for a, b in zip([0] + clock, clock)]
    assert sizes == [b for _, b in _batches(make(), n)] and clock[-1] == n
    assert sizes == ([8] * 4 + [12] * 5 if spec != "megatron" else [8] * 4 + [12] * 3 + [16] * 2)
    x, y, _ = make_data(n=n)
    model = make_model()
    cls, kw = OPTIMIZERS["adam"]
    opt = sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **kw), logical, 4, batch_schedule=make())
    for i in range(0, n, 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
        opt.zero_grad()
    assert opt.updates == cb.optimizer.updates == len(sizes)
    for p, q in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)

    module = Regression("adam")
    before = flat_params(module.net).clone()
    cb = sl.LogicalBatch(logical, batch_schedule=sdebatch.batch_schedule("0:8, 32:10"), verbose=False)
    with pytest.raises(ValueError, match=r"10 samples per update from 32 samples is not a multiple of physical x "
                                         r"world size = 4$"):
        trainer(cb, epochs=1).fit(module, train_dataloaders=loader(n, 4))
    assert torch.equal(flat_params(module.net), before)


def test_lightning_lr_schedule_follows_the_clock_through_a_ramp_and_step_schedulers_are_refused():
    """The Megatron-Bridge #2609 class of bug: a batch ramp must not bend the lr schedule. Under a ramp the lr of
    every update is the schedule at the clock, exactly as without one; a torch scheduler stepped per update (whose
    step count a change of accumulation would skew) is refused before training."""
    import sdebatch.lightning as sl
    from lightning_helpers import Regression, flat_params, loader, trainer

    f = sdebatch.warmup_cosine(total=2 * 96, warmup=32)
    ramp = Regression("adam")
    trainer(sl.LogicalBatch(LOGICAL, lr_schedule=f, batch_schedule=sdebatch.batch_schedule("0:8, 32:16, 96:32"),
                            verbose=False), epochs=2).fit(ramp, train_dataloaders=loader(96, PHYSICAL))
    assert len(ramp.lrs) == 4 + 4 + 3 and [t for t, _, _ in ramp.lrs][-1] == 192
    for t, reference, used in ramp.lrs:
        assert reference == pytest.approx(0.01 * f(t), abs=1e-15)
    module = Regression("adam", scheduler="step")
    before = flat_params(module.net).clone()
    with pytest.raises(ValueError, match="interval='step' under a batch_schedule"):
        trainer(sl.LogicalBatch(LOGICAL, batch_schedule=sdebatch.batch_schedule("0:8, 32:16"), verbose=False),
                epochs=1).fit(module, train_dataloaders=loader(96, PHYSICAL))
    assert torch.equal(flat_params(module.net), before)


def test_megatron_ramp_is_megatrons_arithmetic():
    """--rampup-batch-size 32 32 1000 with global batch 128: 32, 64, 96, 128, each step after 1000 / 3 samples."""
    from sdebatch.batch_schedules import megatron_ramp

    s = megatron_ramp(32, 32, 1000, 128)
    assert s.points == [(0.0, 32), (1000 / 3, 64), (2000 / 3, 96), (1000.0, 128)]
    assert [s(n) for n in (0, 333, 334, 999, 1000, 10 ** 6)] == [32, 32, 64, 96, 128, 128]
    with pytest.raises(ValueError, match="multiple of increment"):
        megatron_ramp(32, 28, 1000, 128)


def test_seesaw_doubles_the_batch_where_the_lr_would_halve():
    from sdebatch.batch_schedules import seesaw

    def steps(t):  # a step decay: halved at 100, 200, 300 (after a warmup to 1 by 10)
        return min(t / 10, 1.0) * 0.5 ** sum(t >= x for x in (100, 200, 300))

    s = seesaw(steps, 64, 256, 400)
    assert [b for _, b in s.points] == [64, 128, 256]  # capped: the third halving stays an lr halving
    assert [t for t, _ in s.points][1:] == pytest.approx([100, 200], abs=400 * 1e-6)
    f = sdebatch.warmup_cosine(total=1000, warmup=100)
    c = seesaw(f, 8, 64, 1000, "tokens")
    for k, (t, b) in enumerate(c.points[1:], 1):  # each point: the cosine has fallen to 2**-k of its peak
        assert b == 8 * 2 ** k and f(t) == pytest.approx(2.0 ** -k, abs=1e-5)
    assert c.unit == "tokens" and len(c.points) == 4
    # under the square-root rule the effective lr at each point is the reference lr / sqrt 2 per doubling
    for k, (t, b) in enumerate(c.points[1:], 1):
        assert f(t) * math.sqrt(b / 8) == pytest.approx(2.0 ** (-k / 2), abs=1e-5)


def test_critical_batch_warmup_follows_the_online_estimate_and_resumes(monkeypatch):
    from sdebatch.batch_schedules import critical_batch_warmup

    with pytest.raises(ValueError, match="estimate_noise_scale=True"):
        sdebatch.LogicalBatchOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), 8, 4,
                                       batch_schedule=critical_batch_warmup(8, 64))
    ramp = critical_batch_warmup(8, 64, fraction=0.5)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 4, batch_schedule=ramp,
                                         estimate_noise_scale=True)
    assert opt.accumulation_steps == 2  # no estimate yet: the start
    from types import SimpleNamespace

    fake = [SimpleNamespace(value=None, value_se=None)]
    monkeypatch.setattr(type(opt), "noise_scale_estimator", property(lambda self: fake[0]))  # set per window
    seen = []
    for value, se in [(None, None), (20.0, None), (13.0, 1.0), (70.0, 30.0), (70.0, 5.0), (500.0, 10.0),
                      (30.0, 1.0)]:
        fake[0] = SimpleNamespace(value=value, value_se=se)
        opt._reset_window()  # what each update does at its end
        seen.append(opt.window_batch_size)
    monkeypatch.undo()
    # 0.5 x (B_simple - 2 se) rounded down to a multiple of 4, never below the last, capped at 64; no estimate or no
    # error yet: keep; a noisy estimate (70 +- 30) does not move it, a sure one (70 +- 5) does
    assert seen == [8, 8, 8, 8, 28, 64, 64]
    state = opt.state_dict()
    fresh = critical_batch_warmup(8, 64, fraction=0.5)
    opt2 = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), 8, 4,
                                          batch_schedule=fresh, estimate_noise_scale=True)
    opt2.load_state_dict(state)
    assert fresh.current == 64 and opt2.window_batch_size == 64


def test_critical_batch_warmup_refuses_a_cap_off_the_physical_pass_before_training():
    """The warmup grows in multiples of physical x world size and stops at its cap: a cap (or start) off that grid
    would end the run at the window reaching it; refused where the schedule learns the pass, naming the nearest
    valid values, before anything changes."""
    from sdebatch.batch_schedules import critical_batch_warmup

    def wrap(physical, ramp):
        return sdebatch.LogicalBatchOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), 8, physical,
                                              batch_schedule=ramp, estimate_noise_scale=True)

    with pytest.raises(ValueError, match=r"max_batch_size=60 is not a multiple of physical x world size = 8; the "
                                         r"nearest valid max_batch_size: 56 or 64$"):
        wrap(8, critical_batch_warmup(8, 60))
    with pytest.raises(ValueError, match=r"start=4 is not a multiple of physical x world size = 8; the nearest "
                                         r"valid start: 8$"):
        wrap(8, critical_batch_warmup(4, 64))
    opt = wrap(4, critical_batch_warmup(8, 60))  # 60 = 15 x 4: reachable with 4-sample micro-batches
    with pytest.raises(ValueError, match=r"max_batch_size=60 .* = 8; the nearest valid max_batch_size: 56 or 64$"):
        opt.configure_batch(8)
    assert (opt.physical_batch_size, opt.accumulation_steps) == (4, 2)
    wrap(8, critical_batch_warmup(8, 64))


def test_choose_physical_batch_picks_the_fastest_that_fits_from_a_measured_table():
    """Faked timings and memory: throughput peaks at 32, 64 is over the memory margin, 128 runs out of memory (and
    256 is never tried); the choice is 32, and configuring the wrapper with it keeps the logical batch."""
    clock = [0.0]
    tried = []
    seconds = {8: 1.0, 16: 1.4, 32: 2.0, 64: 3.0, 128: None}  # per micro-step; samples/s = b / seconds
    peak = {8: 10, 16: 20, 32: 40, 64: 95, 128: None}

    def step(b):
        tried.append(b)
        if seconds[b] is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        clock[0] += seconds[b]
        return None

    def memory():  # (peak bytes of the candidate just run, total bytes)
        return (peak[tried[-1]] if tried else None), 100

    choice = sdebatch.choose_physical_batch(step, [64, 8, 256, 32, 16, 128], steps=2, warmup=1, margin=0.1,
                                            device="cpu", timer=lambda: clock[0], memory=memory)
    assert 256 not in tried
    rows = {r["batch"]: r for r in choice.rows}
    assert rows[8]["throughput"] == pytest.approx(8.0) and rows[32]["throughput"] == pytest.approx(16.0)
    assert rows[64]["status"] == "over the 10% margin" and rows[128]["status"] == "out of memory"
    assert choice.physical_batch_size == 32 and "chosen: 32 per device" in choice.describe()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), 256, 256)
    opt.configure_batch(choice.physical_batch_size)
    assert opt.logical_batch_size == 256 and opt.accumulation_steps == 8 and opt.window_kappa == 1.0
    with pytest.raises(ValueError, match="candidates must be positive ints"):
        sdebatch.choose_physical_batch(step, [0, 8])
    with pytest.raises(RuntimeError, match="no candidate micro-batch fits"):
        sdebatch.choose_physical_batch(step, [128], device="cpu")


def _plain(model, opt, x, y, start, stop, physical):
    for i in range(start, stop, physical):
        sample_loss_mean(model, x[i:i + physical], y[i:i + physical]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("before,after", [(4, 8), (8, 4), (2, 8)])
def test_elastic_resume_at_a_window_end_equals_the_continuous_run(before, after):
    """Stop after 3 updates of logical batch 8 with one physical batch, resume with another (accumulation derived):
    the clock continues in samples and the weights equal the continuous run's (the same samples per update)."""
    x, y = _stream(96)
    ref = make_model()
    ref_opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(ref.parameters(), lr=0.01), LOGICAL, before)
    _plain(ref, ref_opt, x, y, 0, 96, before)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), LOGICAL, before)
    _plain(model, opt, x, y, 0, 24, before)
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    model2 = make_model()
    opt2 = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model2.parameters(), lr=0.01), LOGICAL, after)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert opt2.configure_batch(after) is False and opt2.accumulation_steps == LOGICAL // after
    _plain(model2, opt2, x, y, 24, 96, after)
    assert opt2.samples_seen == ref_opt.samples_seen == 96 and opt2.updates == ref_opt.updates == 12
    for p, q in zip(model2.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_elastic_resume_mid_window_flushes_the_restored_window_then_continues_in_samples():
    x, y = _stream(96)
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), LOGICAL, 2)
    _plain(model, opt, x, y, 0, 28, 2)  # 3 updates of 8, then 2 micro-steps of 2 (4 samples) in the window
    assert opt.in_window and opt.samples_seen == 24
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    # the reference: the same 24 samples in 3 updates, then the 4 held samples as one short update (kappa 1/2)
    ref = make_model()
    ref_opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(ref.parameters(), lr=0.05), LOGICAL, 2)
    _plain(ref, ref_opt, x, y, 0, 28, 2)
    ref_opt.flush()
    model2 = make_model()
    opt2 = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model2.parameters(), lr=0.05), LOGICAL, 2)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert opt2.configure_batch(4) is True  # the restored window (of physical 2) is applied before the change
    assert opt2.samples_seen == 28 and opt2.updates == 4 and opt2.last_kappa == 0.5 and not opt2.in_window
    for p, q in zip(model2.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    _plain(model2, opt2, x, y, 28, 92, 4)  # continues at sample 28 in windows of 2 x 4
    assert opt2.samples_seen == 92 and opt2.updates == 12


def test_a_mid_window_checkpoint_does_not_resume_on_another_world_size():
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), LOGICAL, 2)
    x, y = _stream(8)
    _plain(model, opt, x, y, 0, 4, 2)
    state = opt.state_dict()
    state["sdebatch"]["config"]["world_size"] = 2  # as if saved on 2 ranks
    opt2 = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.05), LOGICAL, 2)
    before = opt2.state_dict()
    with pytest.raises(ValueError, match="inside a window on 2 ranks and is resumed on 1"):
        opt2.load_state_dict(state)
    assert opt2.state_dict()["sdebatch"]["clock"] == before["sdebatch"]["clock"] and not opt2.in_window


@pytest.mark.parametrize("before,after,ranks_before,ranks_after", [(4, 8, 1, 1), (8, 2, 1, 1), (4, 4, 2, 1),
                                                                  (4, 2, 1, 2), (2, 4, 1, 2)])
def test_resumable_loader_resumes_at_the_same_sample_with_another_batch_or_rank_count(before, after, ranks_before,
                                                                                       ranks_after):
    from torch.utils.data import TensorDataset

    from sdebatch.data import ResumableDataLoader, ResumableSampler

    data = TensorDataset(torch.arange(64))

    def loader(b, ranks, rank):
        return ResumableDataLoader(data, b, sampler=ResumableSampler(64, seed=3, num_replicas=ranks, rank=rank))

    order = ResumableSampler(64, seed=3).order(0)
    saved = []
    for rank in range(ranks_before):  # every rank hands out 2 batches
        ld = loader(before, ranks_before, rank)
        it = iter(ld)
        next(it), next(it)
        saved.append(ld.state_dict())
    consumed = 2 * before * ranks_before
    if consumed % (after * ranks_after):  # 4 samples consumed, passes of 2 x 4: no whole batch to resume at
        with pytest.raises(ValueError, match=f"resuming at sample {consumed} of the epoch with {ranks_after} rank"):
            ld = loader(after, ranks_after, 0)
            ld.load_state_dict(saved[0])
            next(iter(ld))
        return
    got = []
    for rank in range(ranks_after):
        ld = loader(after, ranks_after, rank)
        ld.load_state_dict(saved[0])
        got += [int(v) for batch in ld for v in batch[0]]
    # together the new ranks hand out exactly the samples of the order not yet consumed
    assert sorted(got) == sorted(order[consumed:])


def test_ramp_summary_pairs_by_seed_and_finds_the_updates_to_the_fixed_loss(tmp_path):
    """sdebatch.figures.ramp.summarise on hand-made runs: the paired relative difference by hand, and the first
    evaluation whose loss reaches the fixed run's final loss, as a fraction of the fixed run's updates."""
    from sdebatch.figures.ramp import summarise

    rows = []
    for seed in (0, 1):
        for arm, final, curve in (("fixed", 1.0 + seed, [(100, 3.0), (200, 1.0 + seed)]),
                                  ("rules", 1.02 + seed, [(20, 2.0 + seed), (50, 0.9 + seed), (64, 1.02 + seed)]),
                                  ("none", 1.5 + seed, [(64, 1.5 + seed)])):
            rid = f"{arm}{seed}"
            (tmp_path / rid).mkdir()
            (tmp_path / rid / "curve.csv").write_text("updates,loss\n" + "".join(f"{u},{v}\n" for u, v in curve))
            rows.append({"run_id": rid, "seed": seed, "final_loss": final, "updates": curve[-1][0],
                         "batch_schedule": "" if arm == "fixed" else "0:8, 10:16", "ramp": arm})
    s = summarise(rows, tmp_path)
    d = [0.02 / 1.0, 0.02 / 2.0]
    assert s["arms"]["rules"]["vs_fixed"][0] == pytest.approx(sum(d) / 2)
    assert s["arms"]["rules"]["vs_fixed"][1] == pytest.approx(abs(d[0] - d[1]) / 2)  # se of two = |diff| / 2
    assert s["arms"]["rules"]["updates_to_fixed_loss"][:3:2] == (pytest.approx(50 / 200), 2)
    assert s["arms"]["none"]["updates_to_fixed_loss"] == (None, None, 0)
    assert s["arms"]["fixed"]["updates"] == 200


def test_resume_mid_ramp_with_the_same_physical_batch_carries_the_window():
    """What the Lightning callback does at the start of a resumed run: configure_batch with the same per-device
    batch. The restored window is carried, not flushed: the run equals the uninterrupted one."""
    kw = dict(lr=0.01, betas=(0.9, 0.99))
    schedule = sdebatch.batch_schedule(SCHEDULE)
    full, full_opt, _ = _wrapped_run(torch.optim.Adam, kw, schedule)
    _, _, state = _wrapped_run(torch.optim.Adam, kw, schedule, stop_after=13)  # inside a window of 4 micro-steps
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters(), **kw), LOGICAL, PHYSICAL,
                                         batch_schedule=schedule)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    assert opt.configure_batch(PHYSICAL) is False and opt.in_window
    x, y = _stream()
    _plain(model, opt, x, y, 13 * PHYSICAL, len(x), PHYSICAL)
    assert opt.updates == full_opt.updates
    for p, q in zip(full.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_second_moment_rescale_resumes_across_a_change_and_is_refused_off_adam():
    """The batch of the last update is in the checkpoint, so a run resumed just before a change rescales v as the
    uninterrupted one does; the option needs an Adam-family rule and a bool, refused before anything changes."""
    kw = dict(lr=0.01, betas=(0.9, 0.99))
    schedule = sdebatch.batch_schedule(SCHEDULE)
    full, _, _ = _wrapped_run(torch.optim.Adam, kw, schedule, second_moment_rescale=True)
    _, _, state = _wrapped_run(torch.optim.Adam, kw, schedule, stop_after=8, second_moment_rescale=True)
    resumed, _, _ = _wrapped_run(torch.optim.Adam, kw, schedule, state=state, second_moment_rescale=True)
    plain, _, _ = _wrapped_run(torch.optim.Adam, kw, schedule)
    for p, q, r in zip(full.parameters(), resumed.parameters(), plain.parameters()):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)  # the option changes the run (so the resume test can fail)
    model = make_model()
    for inner, rule, flag, needle in ((torch.optim.SGD, "auto", True, "needs an Adam-family rule"),
                                      (torch.optim.Adam, "none", True, "got rule 'none'"),
                                      (torch.optim.Adam, "auto", 1, "must be True or False")):
        opt = inner(model.parameters(), lr=0.1)
        before = opt.state_dict()
        with pytest.raises(ValueError, match="second_moment_rescale"):
            sdebatch.LogicalBatchOptimizer(opt, LOGICAL, PHYSICAL, rule=rule, second_moment_rescale=flag)
        assert opt.state_dict() == before
    from sdebatch.lightning import LogicalBatch

    with pytest.raises(ValueError, match="second_moment_rescale must be True or False"):
        LogicalBatch(8, second_moment_rescale="yes")


def test_ramp_arms_of_named_schedules_pair_against_their_own_rescaled_ramp():
    from sdebatch.figures.ramp import arm_of, summarise

    rows = []
    for seed in (0, 1):
        for spec, ramp, v, final in (("", "rules", False, 1.0), ("seesaw", "rules", False, 1.1),
                                     ("seesaw", "none", False, 1.3 + 0.1 * seed), ("seesaw", "rules", True, 1.0),
                                     ("0:8, 16:16", "rules", False, 2.0)):
            rows.append({"run_id": f"{spec}{ramp}{v}{seed}", "seed": seed, "final_loss": final, "updates": 10,
                         "batch_schedule": spec, "ramp": ramp, "second_moment_rescale": str(v)})
    assert [arm_of(r) for r in rows[:5]] == ["fixed", "seesaw rules", "seesaw none", "seesaw rules+v", "rules"]
    s = summarise(rows)
    assert list(s["arms"]) == ["fixed", "rules", "seesaw rules", "seesaw rules+v", "seesaw none"]
    # paired against Seesaw's own rescaled ramp (1.1), not the clock:batch ramp's (2.0), relative to the fixed run
    assert s["arms"]["seesaw none"]["vs_rules"][0] == pytest.approx(((1.3 - 1.1) + (1.4 - 1.1)) / 2)
    assert s["arms"]["seesaw rules+v"]["vs_rules"][0] == pytest.approx(-0.1)


def _lightning_ramp(tmp_path, physical, *, epochs=2, every=None, ckpt=None):
    import sdebatch.lightning as sl
    from lightning_helpers import Regression, loader, trainer

    module = Regression("adam")
    cb = sl.LogicalBatch(LOGICAL, batch_schedule=sdebatch.batch_schedule("0:8, 32:16, 96:32"), verbose=False)
    trainer(cb, epochs=epochs, ckpt_dir=tmp_path, every=every).fit(
        module, train_dataloaders=loader(96, physical, shuffle=True, seed=5), ckpt_path=ckpt)
    return module, cb


@pytest.mark.parametrize("step", [10, 15, 30])  # mid-window in the 16s, mid-window in the 32s, a window's end
def test_lightning_resume_mid_ramp_equals_uninterrupted(tmp_path, step):
    from lightning_helpers import flat_params

    full, cb_full = _lightning_ramp(tmp_path, PHYSICAL, every=5)
    state = torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)
    assert state["optimizer_states"][0]["sdebatch"]["clock"]["samples_seen"] < step * PHYSICAL or step == 30
    resumed, cb = _lightning_ramp(tmp_path / "again", PHYSICAL, ckpt=str(tmp_path / f"step={step}.ckpt"))
    assert cb.optimizer.clock == cb_full.optimizer.clock and cb.optimizer.updates == 4 + 4 + 3
    torch.testing.assert_close(flat_params(resumed.net), flat_params(full.net), rtol=0, atol=1e-10)


@pytest.mark.parametrize("before,after", [(4, 8), (8, 4)])
def test_lightning_elastic_resume_mid_ramp_equals_the_continuous_run(tmp_path, before, after):
    """A checkpoint at a window's end (32 samples, where the ramp goes 8 -> 16) resumed with another per-device
    batch: the loader resumes at the same sample, the schedule's accumulation follows the new batch, and the run
    equals the continuous one in samples (to round-off: the windows are summed in other groupings)."""
    from lightning_helpers import flat_params

    full, cb_full = _lightning_ramp(tmp_path, before, every=32 // before)
    resumed, cb = _lightning_ramp(tmp_path / "again", after, ckpt=str(tmp_path / f"step={32 // before}.ckpt"))
    assert cb.optimizer.physical_batch_size == after and cb.optimizer.accumulation_steps == 32 // after
    assert cb.optimizer.clock == cb_full.optimizer.clock
    torch.testing.assert_close(flat_params(resumed.net), flat_params(full.net), rtol=0, atol=1e-10)


def test_lightning_auto_physical_batch_picks_the_fastest_measured_and_keeps_the_logical_batch(tmp_path, monkeypatch):
    """physical_batch_size="auto": the measurement reads a fake clock that each training_step advances by a set cost
    per micro-batch size, so the measured throughputs are known exactly, whatever the machine's load, and 4 is the
    fastest per sample; the loader is rebuilt at 4 through the module's batch_size, the accumulation follows
    (logical 16 = 4 x 4), and the run equals a run given physical 4 from the start (the measuring passes leave no
    gradient, window or log behind)."""
    import functools

    import sdebatch.lightning as sl
    import sdebatch.physical_batch as physical_batch
    from lightning_helpers import Regression, flat_params, loader, trainer

    clock = [0.0]
    cost = {1: 1.0, 2: 1.5, 4: 1.0, 8: 4.0, 16: 16.0}  # seconds of fake clock per micro-step of each size
    monkeypatch.setattr(physical_batch, "choose_physical_batch",
                        functools.partial(physical_batch.choose_physical_batch, timer=lambda: clock[0]))

    class Sized(Regression):
        def __init__(self, slow=True):
            super().__init__("adam")
            self.batch_size, self.slow, self.seen = 2, slow, []

        def train_dataloader(self):
            return loader(64, self.batch_size, shuffle=True, seed=1)

        def training_step(self, batch, batch_idx):
            self.seen.append(len(batch[0]))
            if self.slow:
                clock[0] += cost[len(batch[0])]
            self.log("loss_logged", 1.0)  # would fail outside the fit loop if the measuring passes logged
            return super().training_step(batch, batch_idx)

    module = Sized()
    cb = sl.LogicalBatch(16, physical_batch_size="auto", verbose=False)
    trainer(cb, epochs=1).fit(module)
    choice = cb.physical_batch_choice
    assert [r["batch"] for r in choice.rows] == [1, 2, 4, 8, 16] and choice.physical_batch_size == 4
    # samples per second of fake clock: b / cost(b), every timed step alike
    assert [r["throughput"] for r in choice.rows] == pytest.approx([1.0, 2 / 1.5, 4.0, 2.0, 1.0], rel=1e-12)
    assert choice.unit == "samples"
    opt = cb.optimizer
    assert (opt.logical_batch_size, opt.physical_batch_size, opt.accumulation_steps) == (16, 4, 4)
    assert opt.samples_seen == 64 and opt.updates == 4 and module.batch_size == 4
    assert "chosen: 4 per device" in choice.describe()
    reference = Sized(slow=False)
    reference.batch_size = 4
    trainer(sl.LogicalBatch(16, verbose=False), epochs=1).fit(reference)
    assert torch.equal(flat_params(module.net), flat_params(reference.net))
    with pytest.raises(ValueError, match="physical_batch_candidates must be positive ints"):
        sl.LogicalBatch(16, physical_batch_size="auto", physical_batch_candidates=[4, 0])
    plain = Regression("adam")
    with pytest.raises(ValueError, match="sets the per-device batch through `batch_size`"):
        trainer(sl.LogicalBatch(16, physical_batch_size="auto", verbose=False), epochs=1).fit(
            plain, train_dataloaders=loader(64, 4))
