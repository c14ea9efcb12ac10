"""The rescale path: updates with kappa != 1 use the rule's values, Adam's bias correction follows the product of
betas, reference values stay visible to schedulers, and AMP-skipped windows do not move the clock."""
import math

import pytest
import torch

import sdebatch
from reference import flat, make_data, make_model, reference_adam, sample_loss_mean


def one_update(inner_cls, kw, *, logical, physical, x, y, **wkw):
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(inner_cls(model.parameters(), **kw), logical, physical,
                                         accumulation_steps=1, reparameterize=True, **wkw)
    sample_loss_mean(model, x[:physical], y[:physical]).backward()
    opt.step()
    return model, opt


def plain_step(inner_cls, kw, x, y, physical):
    model = make_model()
    opt = inner_cls(model.parameters(), **kw)
    sample_loss_mean(model, x[:physical], y[:physical]).backward()
    opt.step()
    return model


# closed forms written out (kappa = 4 and 0.25), independent of sdebatch.rescale
CASES = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, 4.0,
     {"lr": 0.4, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1}, 0.25, {"lr": 0.025}),
    (torch.optim.Adam, {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01}, 4.0,
     {"lr": 0.02, "betas": (0.9 ** 4, 0.99 ** 4), "eps": 5e-7, "weight_decay": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.5}, 0.25,
     {"lr": 0.005, "betas": (0.9 ** 0.25, 0.99 ** 0.25), "eps": 2e-6,
      "weight_decay": (1 - (1 - 0.005) ** 0.25) / 0.005}),
    (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9, "eps": 1e-6}, 4.0,
     {"lr": 0.02, "alpha": 0.9 ** 4, "eps": 5e-7}),
]


@pytest.mark.parametrize("cls,ref,k,expected", CASES)
def test_rescaled_update_matches_plain_optimizer_with_closed_form_values(cls, ref, k, expected):
    x, y, _ = make_data()
    logical = 8
    physical = int(logical * k)
    model, opt = one_update(cls, ref, logical=logical, physical=physical, x=x, y=y)
    target = plain_step(cls, expected, x, y, physical)
    assert opt.last_kappa == k
    assert torch.allclose(flat(model), flat(target), atol=1e-12, rtol=0)
    eff = opt.effective_hyperparameters()[0]
    for key, v in expected.items():
        assert eff[key] == pytest.approx(v, rel=1e-12)
    # the reference values are back in place for schedulers and loggers
    for key, v in ref.items():
        assert opt.param_groups[0][key] == v


def test_timescale_momentum_mode():
    x, y, _ = make_data()
    k, mu, lr = 0.25, 0.9, 0.1
    model, opt = one_update(torch.optim.SGD, {"lr": lr, "momentum": mu}, logical=16, physical=4, x=x, y=y,
                            momentum_mode="timescale")
    target = plain_step(torch.optim.SGD, {"lr": k * lr * (1 - mu ** k) / (1 - mu), "momentum": mu ** k}, x, y, 4)
    assert torch.allclose(flat(model), flat(target), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls,decoupled", [(torch.optim.Adam, False), (torch.optim.AdamW, True)])
def test_bias_correction_with_changing_kappa(cls, decoupled):
    """Windows of 8, 8, 4, 12, 8, 2 samples at logical 8: kappa 1, 1, .5, 1.5, 1, .25."""
    x, y, _ = make_data()
    sizes = [8, 8, 4, 12, 8, 2]
    kw = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1}
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(cls(model.parameters(), **kw), 8, 8, accumulation_steps=1)
    # gradients are taken at the wrapper's own iterates, and the reference replays them
    ref_params = [p.detach().clone() for p in model.parameters()]
    grads_seen, start = [], 0
    ref_model = make_model()
    for n in sizes:
        sl = slice(start, start + n)
        start += n
        ref_model.load_state_dict(model.state_dict())
        model.zero_grad()
        sample_loss_mean(model, x[sl], y[sl]).backward()
        grads_seen.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step(num_samples=n)
        opt.zero_grad()
    kappas = [n / 8 for n in sizes]
    reference_adam(ref_params, grads_seen, kappas, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"],
                   wd=kw["weight_decay"], decoupled=decoupled)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    want = torch.cat([p.flatten() for p in ref_params])
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    # torch's state keeps the true update count
    assert all(float(s["step"]) == len(sizes) for s in opt.state.values())
    # and the naive correction 1 - beta_eff**step (what torch alone would do) is measurably different
    naive = [p.detach().clone() for p in make_model().parameters()]
    b1, b2 = kw["betas"]
    m = [torch.zeros_like(p) for p in naive]
    v = [torch.zeros_like(p) for p in naive]
    for t, (grads, k) in enumerate(zip(grads_seen, kappas), start=1):
        for i, p in enumerate(naive):
            g = grads[i] if decoupled else grads[i] + kw["weight_decay"] * p
            if decoupled:
                lr_k = kw["lr"] * math.sqrt(k)
                p.mul_(1 - lr_k * (1 - (1 - kw["lr"] * kw["weight_decay"]) ** k) / lr_k)
            m[i] = b1 ** k * m[i] + (1 - b1 ** k) * g
            v[i] = b2 ** k * v[i] + (1 - b2 ** k) * g * g
            p.sub_(kw["lr"] * math.sqrt(k) * (m[i] / (1 - b1 ** (k * t))) /
                   ((v[i] / (1 - b2 ** (k * t))).sqrt() + kw["eps"] / math.sqrt(k)))
    assert (torch.cat([p.flatten() for p in naive]) - want).abs().max() > 1e-6


def test_scheduler_sees_reference_values_and_survives_load_state_dict():
    x, y, _ = make_data()
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), 8, 32,
                                         accumulation_steps=1, reparameterize=True)  # kappa = 4: lr = 2 x reference
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    state = opt.state_dict()
    model2 = make_model()
    opt2 = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model2.parameters(), lr=0.1), 8, 32, accumulation_steps=1,
                                          reparameterize=True)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(state)  # replaces the inner param_groups: a cached copy would now be dead
    for i in range(3):
        sample_loss_mean(model2, x[:32], y[:32]).backward()
        opt2.step()
        opt2.zero_grad()
        assert opt2.effective_hyperparameters()[0]["lr"] == pytest.approx(2 * 0.1 * 0.5 ** i, rel=1e-12)
        sched2.step()
        assert opt2.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (i + 1), rel=1e-12)
    assert opt2.param_groups is opt2.optimizer.param_groups
    del sched


def _all_schedulers(opt):
    S = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda: S.LambdaLR(opt, lambda e: 0.9 ** e),
        "MultiplicativeLR": lambda: S.MultiplicativeLR(opt, lambda e: 0.9),
        "StepLR": lambda: S.StepLR(opt, 2),
        "MultiStepLR": lambda: S.MultiStepLR(opt, [1, 3]),
        "ConstantLR": lambda: S.ConstantLR(opt, factor=0.5, total_iters=2),
        "LinearLR": lambda: S.LinearLR(opt, total_iters=3),
        "ExponentialLR": lambda: S.ExponentialLR(opt, 0.9),
        "PolynomialLR": lambda: S.PolynomialLR(opt, total_iters=4),
        "CosineAnnealingLR": lambda: S.CosineAnnealingLR(opt, T_max=4),
        "CosineAnnealingWarmRestarts": lambda: S.CosineAnnealingWarmRestarts(opt, T_0=2),
        "CyclicLR": lambda: S.CyclicLR(opt, 0.01, 0.1, step_size_up=2),
        "OneCycleLR": lambda: S.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        "SequentialLR": lambda: S.SequentialLR(opt, [S.ConstantLR(opt, 0.5, 2), S.ExponentialLR(opt, 0.9)], [2]),
        "ChainedScheduler": lambda: S.ChainedScheduler([S.ConstantLR(opt, 0.5, 2), S.ExponentialLR(opt, 0.9)]),
        "ReduceLROnPlateau": lambda: S.ReduceLROnPlateau(opt, patience=0),
    }


@pytest.mark.parametrize("name", sorted(_all_schedulers(None)))
def test_every_torch_scheduler_drives_the_reference_lr(name):
    """Each scheduler, stepped once per update, drives the wrapped optimizer exactly as it drives a plain one:
    the reference lr sequences match, and the effective lr is sqrt(kappa) x reference (Adam, kappa = 4)."""
    x, y, _ = make_data()

    def run(wrap):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if name == "CyclicLR" else \
            torch.optim.Adam(model.parameters(), lr=0.05)
        opt = sdebatch.LogicalBatchOptimizer(inner, 8, 32, accumulation_steps=1, reparameterize=True) if wrap else inner
        sched = _all_schedulers(opt)[name]()
        lrs, eff = [], []
        for i in range(5):
            loss = sample_loss_mean(model, x[:32], y[:32])
            loss.backward()
            opt.step()
            opt.zero_grad()
            if wrap:
                eff.append(opt.effective_hyperparameters()[0]["lr"])
            lrs.append(inner.param_groups[0]["lr"])
            sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()  # a plateau by construction
        return lrs, eff

    plain_lrs, _ = run(False)
    lrs, eff = run(True)
    assert lrs == pytest.approx(plain_lrs, rel=1e-12)
    factor = 2.0 if name != "CyclicLR" else 4.0  # SGD: linear rule
    assert eff == pytest.approx([factor * v for v in lrs], rel=1e-12)


def test_clock_schedule_is_identical_across_splits():
    """lr vs samples seen is the same whatever the split into micro-batches and updates."""
    x, y, _ = make_data(n=256)
    f = sdebatch.warmup_cosine(total=512, warmup=64, final=0.1)

    def run(physical, acc):
        model = make_model()
        opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), 16, physical,
                                             accumulation_steps=acc)
        sdebatch.ClockSchedule(opt, f, unit="samples")
        seen = {}
        for _ in range(2):
            for i in range(0, 256, physical):
                sample_loss_mean(model, x[i:i + physical], y[i:i + physical]).backward()
                opt.step()
                opt.zero_grad()
                if opt.did_update:
                    seen[opt.samples_seen] = (opt.param_groups[0]["lr"], opt.effective_hyperparameters()[0]["lr"],
                                              opt.last_kappa)
        return seen

    a, b, c = run(4, 4), run(16, 1), run(8, 1)
    for t, (ref_lr, eff, k) in a.items():
        assert ref_lr == pytest.approx(0.01 * f(t), rel=1e-12, abs=1e-15)
        assert b[t][0] == ref_lr and b[t][1] == eff
        assert k == 1.0
    for t, (ref_lr, eff, k) in c.items():  # kappa 0.5: reference lr from the clock, then the square-root rule
        assert k == 0.5
        assert ref_lr == pytest.approx(0.01 * f(t), rel=1e-12, abs=1e-15)
        assert eff == pytest.approx(math.sqrt(0.5) * ref_lr, rel=1e-12)
    assert set(a) < set(c)


def test_amp_skip_does_not_move_the_clock_or_the_weights():
    torch.set_default_dtype(torch.float32)
    x, y, _ = make_data()
    x, y = x.float(), y.float()
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), 8, 4, grad_scaler=scaler)
    before = flat(model).clone()
    for i, bad in ((0, False), (4, True)):  # the second micro-batch of the first window has an inf gradient
        loss = sample_loss_mean(model, x[i:i + 4], y[i:i + 4])
        opt.backward(loss * (float("inf") if bad else 1.0))
        opt.step()
    assert not opt.did_update and opt.clock.updates == 0 and opt.clock.samples_seen == 0
    assert opt.clock.skipped_updates == 1 and scaler.get_scale() == 2.0 ** 7
    assert torch.equal(flat(model), before) and not opt.state
    opt.zero_grad()
    for i in (8, 12):  # the next window applies normally, unscaled
        opt.backward(sample_loss_mean(model, x[i:i + 4], y[i:i + 4]))
        opt.step()
    opt.zero_grad()
    assert opt.did_update and opt.clock.updates == 1 and opt.clock.samples_seen == 8
    ref = make_model()
    ropt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    sample_loss_mean(ref, x[8:16], y[8:16]).backward()
    ropt.step()
    assert torch.allclose(flat(model), flat(ref), atol=1e-6)


def test_gradient_clipping_acts_once_on_the_window():
    x, y, _ = make_data()
    model = make_model()
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 16, 4, max_grad_norm=0.01)
    for i in range(0, 16, 4):
        sample_loss_mean(model, x[i:i + 4], y[i:i + 4]).backward()
        opt.step()
    ref = make_model()
    sample_loss_mean(ref, x[:16], y[:16]).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.01)
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert opt.last_grad_norm == pytest.approx(float(norm), rel=1e-12)
    assert torch.allclose(flat(model), flat(ref), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [0.125, 0.5, 2.0, 8.0])
def test_weight_decay_and_ema_are_invariant_in_samples(k):
    """Zero gradients: AdamW's decay and a model EMA follow the same curve vs samples at any kappa (exact forms)."""
    logical, total = 16, 512
    physical = int(logical * k)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = sdebatch.ModelEMA(model, rho=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5),
                                         logical, physical, accumulation_steps=1, ema=ema, reparameterize=True)
    for _ in range(total // physical):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    n_logical = total / logical
    expect_p = 2.0 * (1 - 0.01 * 0.5) ** n_logical
    p0 = next(model.parameters())
    assert torch.allclose(p0, torch.full_like(p0, expect_p), rtol=1e-12, atol=0)
    # EMA of a decaying signal: closed form of e_{t+1} = d e_t + (1 - d) p_{t+1}, with d, p per logical batch
    d, r = 0.9, 1 - 0.01 * 0.5
    # per update: d_k = d**k, p_{u} = 2 r^{k u}; sum as a geometric series in u
    n = total // physical
    dk, rk = d ** k, r ** k
    e = dk ** n * 1.0 + (1 - dk) * 2.0 * rk * (rk ** n - dk ** n) / (rk - dk)
    e0 = ema.params[0]
    assert torch.allclose(e0, torch.full_like(e0, e), rtol=1e-10, atol=0)


@pytest.mark.parametrize("rule,ema_rescale,per_update", [
    ("adam", None, 0.9 ** 4),      # the square-root rule rescales the EMA too: rho**kappa
    ("none", None, 0.9),           # no rescaling means none: rho per update, as a user without sdebatch has it
    ("none", True, 0.9 ** 4),      # forced either way
    ("adam", False, 0.9),
])
def test_ema_decay_follows_the_rule(rule, ema_rescale, per_update):
    """A constant model (zero gradients, no decay) seen by an EMA from 0: after n updates at kappa 4 the EMA is
    1 - d**n with d the per-update decay the rule implies (closed form of e <- d e + (1 - d) 1)."""
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    ema = sdebatch.ModelEMA(model, rho=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), 4, 16, rule=rule,
                                         ema=ema, ema_rescale=ema_rescale, reparameterize=True)
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    assert opt.last_kappa == 4 and opt.ema_rescale == (rule != "none" if ema_rescale is None else ema_rescale)
    e0 = ema.params[0]
    assert torch.allclose(e0, torch.full_like(e0, 1 - per_update ** 5), rtol=1e-12, atol=0)


def test_ema_rescale_must_be_a_bool():
    model = make_model()
    with pytest.raises(ValueError, match="ema_rescale must be True, False or None"):
        sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters()), 4, 4, ema_rescale="yes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ema_of_a_half_precision_model_keeps_moving(dtype):
    """A lerp step of 1 - rho = 1e-3 is below bf16's spacing near 1 (2**-7): a bf16 average would stay at 1.0. The
    float32 shadow follows the closed form 2 - rho**n of a weight that jumped from 1 to 2."""
    model = torch.nn.Linear(4, 4).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = sdebatch.ModelEMA(model, rho=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    for _ in range(25):
        ema.update(1.0)
    exact = 2.0 - 0.999 ** 25
    assert all(e.dtype == torch.float32 for e in ema.params)
    assert all(torch.allclose(e, torch.full_like(e, exact), rtol=0, atol=1e-6) for e in ema.params)
    target = torch.nn.Linear(4, 4).to(dtype)
    ema.copy_to(target)
    assert all(p.dtype == dtype and torch.allclose(p.float(), torch.full_like(p.float(), exact), atol=1e-2)
               for p in target.parameters())
