"""The gradient noise scale estimator against closed forms: exact expectations, and a linear regression whose
tr(Sigma)/|G|^2 is known analytically."""
import math

import pytest
import torch

import sdebatch
from sdebatch.noise import NoiseScaleEstimator


def test_estimator_inverts_the_expectations_exactly():
    """E|g_b|^2 = |G|^2 + tr(Sigma)/b: feeding exact expectations returns |G|^2 and tr(Sigma)."""
    G2, T = 3.0, 120.0
    est = NoiseScaleEstimator(decay=0.9)
    for b, B in ((4, 16), (8, 64), (2, 6)):
        est.observe(G2 + T / b, b, G2 + T / B, B)
    assert est.gradient_sq_norm == pytest.approx(G2, rel=1e-12)
    assert est.trace_sigma == pytest.approx(T, rel=1e-12)
    assert est.value == pytest.approx(T / G2, rel=1e-12)
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        est.observe(1.0, 8, 1.0, 8)
    with pytest.raises(ValueError, match="decay"):
        NoiseScaleEstimator(decay=1.0)


def regression_run(physical, logical, windows, *, d=8, sigma=1.0, offset=0.5, seed=0, protocol="mean", decay=0.999):
    """SGD with lr = 0 (parameters fixed at w* + offset) on y = x.w* + eps, x ~ N(0, I): per-sample gradients
    g = x (x.delta - eps) have |G|^2 = |delta|^2 and tr(Sigma) = d(|delta|^2 + sigma^2) + |delta|^2."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star + offset)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), logical, physical,
                                         estimate_noise_scale=True, noise_scale_decay=decay)
    gs, ts = [], []
    for _ in range(windows * opt.accumulation_steps):
        x = torch.randn(physical, d, generator=g)
        y = x @ w_star + sigma * torch.randn(physical, generator=g)
        err = (model(x).squeeze(-1) - y) ** 2 / 2
        if protocol == "mean":
            err.mean().backward()
        else:
            opt.backward(err.sum(), num_items=physical)
        opt.step()
        if opt.did_update and opt.noise_scale_estimator.last_g2 is not None:
            gs.append(opt.noise_scale_estimator.last_g2)
            ts.append(opt.noise_scale_estimator.last_trace)
        opt.zero_grad()
    delta2 = d * offset ** 2
    truth = (d * (delta2 + sigma ** 2) + delta2) / delta2
    return opt, truth, torch.tensor(gs), torch.tensor(ts)


@pytest.mark.parametrize("protocol", ["mean", "sum"])
def test_recovers_the_analytic_noise_scale_of_a_linear_regression(protocol):
    opt, truth, gs, ts = regression_run(8, 32, 1500, protocol=protocol)
    # the EMA weights, bias-corrected; its standard error by the delta method on the ratio of weighted means
    n = len(gs)
    w = 0.001 * 0.999 ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
    w = w / w.sum()
    mg, mt = float((w * gs).sum()), float((w * ts).sum())
    assert opt.noise_scale_estimator.gradient_sq_norm == pytest.approx(mg, rel=1e-9)
    assert opt.noise_scale == pytest.approx(mt / mg, rel=1e-9)
    cov = torch.cov(torch.stack([gs, ts]))
    n_eff = 1.0 / float((w ** 2).sum())
    var_ratio = (cov[1, 1] / mg ** 2 + mt ** 2 * cov[0, 0] / mg ** 4 - 2 * mt * cov[0, 1] / mg ** 3) / n_eff
    se = math.sqrt(float(var_ratio))
    assert abs(opt.noise_scale - truth) < 4 * se, (opt.noise_scale, truth, se)
    assert se < 0.15 * truth  # and the interval is tight enough to mean something


def test_value_se_is_the_delta_method_on_the_ema_weighted_window_estimates():
    """The estimate's standard error, recomputed here from the per-window estimates: EMA weights written out,
    weighted variances and covariance, the variance of a weighted mean (sum of squared weights), the ratio's delta
    method."""
    opt, truth, gs, ts = regression_run(4, 16, 300, decay=0.98)
    n = len(gs)
    w = 0.02 * 0.98 ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
    w = w / w.sum()
    mg, mt = (w * gs).sum(), (w * ts).sum()
    vg, vt, c = (w * (gs - mg) ** 2).sum(), (w * (ts - mt) ** 2).sum(), (w * (gs - mg) * (ts - mt)).sum()
    ratio = mt / mg
    se = ratio * torch.sqrt((w ** 2).sum() * (vt / mt ** 2 + vg / mg ** 2 - 2 * c / (mt * mg)))
    assert opt.noise_scale_estimator.value_se == pytest.approx(float(se), rel=1e-9)


@pytest.mark.filterwarnings("ignore:.*noise scale")
def test_every_micro_batch_makes_a_tight_estimate_within_its_standard_error():
    """b = 4, windows of 16 micro-batches, 400 windows, EMA 0.998: three seeds each within 3 of its own standard
    errors of the closed form, the error about 1.5% (reading only each window's first micro-batch, the spread over
    seeds was ~7%)."""
    for seed in range(3):
        opt, truth, _, _ = regression_run(4, 64, 400, seed=seed, decay=0.998)
        se = opt.noise_scale_estimator.value_se
        assert abs(opt.noise_scale - truth) < 3 * se and se < 0.03 * truth, (seed, opt.noise_scale, truth, se)


def test_warns_once_when_the_batch_per_update_exceeds_the_noise_scale():
    # offset 3 -> |delta|^2 = 72, B_simple = (8 * 73 + 72) / 72 ~ 9: 64 samples per update is far above it
    with pytest.warns(UserWarning, match="noise scale") as record:
        opt, truth, _, _ = regression_run(16, 64, 30, offset=3.0)
    assert sum("noise scale" in str(r.message) for r in record) == 1
    assert truth < 10


def test_needs_two_batch_sizes():
    """One micro-batch per update on one rank: nothing to compare, so no estimate (and no crash)."""
    opt, _, gs, _ = regression_run(32, 32, 5)
    assert opt.noise_scale is None and len(gs) == 0
    assert opt.noise_scale_estimator.count == 0


def test_probe_matches_the_regression_closed_form():
    """probe_noise_scale at fixed weights on y = x.w* + eps: the group means of the unbiased two-size estimates
    agree with |G|^2 = |delta|^2 and tr(Sigma) = d(|delta|^2 + sigma^2) + |delta|^2 within 4 standard errors;
    nothing is written to .grad or to the weights."""
    from sdebatch.noise import probe_noise_scale

    d, sigma, offset, b = 8, 1.0, 0.5, 4
    g = torch.Generator().manual_seed(3)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star + offset)
    before = model.weight.detach().clone()

    def loss(x, y):
        return lambda: 0.5 * (model(x).squeeze(1) - y).square().mean()

    losses = []
    for _ in range(300 * 16):
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        losses.append(loss(x, x @ w_star + sigma * torch.randn(b, generator=g, dtype=torch.float64)))
    r = probe_noise_scale(model.parameters(), losses, micro_batch_size=b, group_size=16)
    delta2 = d * offset ** 2
    g2_true, trace_true = delta2, d * (delta2 + sigma ** 2) + delta2
    assert r["groups"] == 300 and r["small_batch"] == 4 and r["big_batch"] == 64
    assert abs(r["gradient_sq_norm"] - g2_true) < 4 * r["gradient_sq_norm_se"]
    assert abs(r["trace_sigma"] - trace_true) < 4 * r["trace_sigma_se"]
    assert r["b_simple"] == pytest.approx(trace_true / g2_true, rel=0.15)
    assert model.weight.grad is None and torch.equal(model.weight, before)


def test_probe_is_the_two_size_formula_per_group():
    """Given fixed micro-batch gradients (loss = g_i . w), one group's estimates are the formulas written out."""
    from sdebatch.noise import probe_noise_scale

    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    vecs = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = probe_noise_scale([w], [lambda v=v: v @ w for v in vecs], micro_batch_size=2, group_size=3)
    assert r["groups"] == 2 and r["gradient_sq_norm_se"] is not None
    est = []
    for grp in (vecs[:3], vecs[3:]):
        small, big = grp.square().sum(1).mean(), grp.mean(0).square().sum()
        est.append(((6 * big - 2 * small) / 4, (small - big) / (1 / 2 - 1 / 6)))
    assert r["gradient_sq_norm"] == pytest.approx(float(sum(e[0] for e in est) / 2), rel=1e-12)
    assert r["trace_sigma"] == pytest.approx(float(sum(e[1] for e in est) / 2), rel=1e-12)
    with pytest.raises(ValueError, match="group_size >= 2"):
        probe_noise_scale([w], [lambda: vecs[0] @ w], micro_batch_size=2, group_size=1)
    with pytest.raises(ValueError, match="at least group_size"):
        probe_noise_scale([w], [lambda: vecs[0] @ w], micro_batch_size=2, group_size=3)


@pytest.mark.parametrize("protocol", ["mean", "sum"])
def test_in_run_estimate_is_every_micro_batch_against_the_window(protocol):
    """Four micro-steps per window, weights moving (Adam): each window's observation is the two-size formula on the
    mean squared norm of the micro-batches' own gradients (b: the harmonic mean of their sizes) and the whole window
    (B: its samples), computed here from gradients taken by hand at the window's weights, and the EMA over windows
    matches. Under the sum protocol the micro-batches carry unequal item counts and the last one fewer samples, so
    the normalisation (per item of each micro-batch, per item of the window) and the harmonic mean are exercised."""
    d, b, k, windows = 6, 3, 4, 5
    sizes = [b] * k if protocol == "mean" else [b, b, b, b - 1]
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Linear(d, 1, bias=False).double()
    ref = torch.nn.Linear(d, 1, bias=False).double()
    ref.load_state_dict(model.state_dict())
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), b * k, b,
                                         estimate_noise_scale=True, noise_scale_decay=0.9, noise_scale_warn=None)
    g2_ema = trace_ema = 0.0
    for _ in range(windows):
        xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for n in sizes]
        ys = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
        items = [torch.tensor([1.0, 2.0, 3.0 + i][:n], dtype=torch.float64) for i, n in enumerate(sizes)]

        def loss_sum(m, i):  # a per-sample loss weighted by its item count: sum over items
            return (items[i] * (m(xs[i]).squeeze(1) - ys[i]).square()).sum()

        def grad(idx):  # the gradient at the window's weights, normalised as the wrapper normalises it
            ref.zero_grad()
            if protocol == "mean":
                (sum(loss_sum(ref, i) / items[i].sum() for i in idx) / len(idx)).backward()
            else:
                (sum(loss_sum(ref, i) for i in idx) / sum(items[i].sum() for i in idx)).backward()
            return ref.weight.grad.square().sum().item()

        small, big = sum(grad([i]) for i in range(k)) / k, grad(range(k))
        b_small, b_big = k / sum(1 / n for n in sizes), sum(sizes)
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1 / b_small - 1 / b_big)
        g2_ema, trace_ema = 0.9 * g2_ema + 0.1 * g2, 0.9 * trace_ema + 0.1 * trace
        for i in range(k):
            if protocol == "mean":
                (loss_sum(model, i) / items[i].sum()).backward()
            else:
                opt.backward(loss_sum(model, i), num_items=items[i].sum(), num_samples=sizes[i])
            opt.step()
            opt.zero_grad()
        assert opt.noise_scale_estimator.last_g2 == pytest.approx(g2, rel=1e-10)
        assert opt.noise_scale_estimator.last_trace == pytest.approx(trace, rel=1e-10)
        ref.load_state_dict(model.state_dict())  # the next window starts from the wrapper's updated weights
    assert opt.noise_scale_estimator.count == windows
    assert opt.noise_scale_estimator.gradient_sq_norm == pytest.approx(g2_ema / (1 - 0.9 ** windows), rel=1e-10)
    assert opt.noise_scale_estimator.trace_sigma == pytest.approx(trace_ema / (1 - 0.9 ** windows), rel=1e-10)


def test_one_process_without_accumulation_says_the_estimate_cannot_exist():
    """One micro-batch per update on one process has a single batch size: the estimate stays None, and says why."""
    model = torch.nn.Linear(3, 1)
    opt = sdebatch.LogicalBatchOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 8, 8,
                                         estimate_noise_scale=True)
    with pytest.warns(UserWarning, match="probe_noise_scale"):
        for _ in range(3):
            model(torch.randn(8, 3)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert opt.noise_scale is None
