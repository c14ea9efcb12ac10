"""sdebatch.figures.lr_transfer and paper_figures.variance on hand-made tables: the fitted optimum and its standard
error against closed forms, the optimum's shift, the paired lr sensitivity, the variance decomposition."""
import math
import statistics

import pytest

from sdebatch.figures.lr_transfer import fit_optimum, sensitivity, summarise
from paper_figures.variance import decompose, spread


def test_fit_optimum_exact_parabola_and_delta_method_se():
    """y = 1 + 0.1 (x - 0.3)^2 in x = log2 lr, 5 equally weighted points at x = -2..2 (se sigma each): the vertex is
    exact and its se is se(b) / (2a) = sigma / sqrt(sum x^2) / (2a) at a symmetric design centred on the vertex's
    grid point (b and a are uncorrelated there, and the vertex is near 0)."""
    xs = [-2, -1, 0, 1, 2]
    lrs = [2.0 ** x for x in xs]
    ys = [1 + 0.1 * (x - 0.3) ** 2 for x in xs]
    sigma = 0.01
    f = fit_optimum(lrs, ys, [sigma] * 5)
    assert f["log2_lr"] == pytest.approx(0.3, abs=1e-10) and not f["at_edge"] and f["points"] == 5
    a, b = 0.1, -0.06
    # Var(b) = sigma^2 / 10, Var(a) = sigma^2 / (sum x^4 - (sum x^2)^2 / 5) = sigma^2 / 14, Cov(a, b) = 0
    expect = math.sqrt((1 / (2 * a)) ** 2 * sigma ** 2 / 10 + (b / (2 * a * a)) ** 2 * sigma ** 2 / 14)
    assert f["se"] == pytest.approx(expect, rel=1e-9)


def test_fit_optimum_at_the_edge_is_not_a_vertex():
    f = fit_optimum([1e-3, 2e-3, 4e-3], [3.0, 2.0, 1.0], [0.1] * 3)
    assert f["at_edge"] and f["lr"] == pytest.approx(4e-3) and f["se"] is None


def row(lr, loss, seed, rule="sqrt_exact", b=16, lb=16):
    return {"lr": lr, "final_loss": loss, "seed": seed, "rule": rule, "physical_batch_size": b,
            "logical_batch_size": lb}


def test_sensitivity_is_paired_by_seed():
    """Seed 1 is 10% worse everywhere: paired differences remove it."""
    by_lr = {1.0: {0: 2.2, 1: 2.42}, 2.0: {0: 2.0, 1: 2.2}, 4.0: {0: 2.1, 1: 2.31}}
    s = sensitivity(by_lr)
    assert s["best"] == 2.0
    r = s["rows"][1.0]
    assert r["mean"] == pytest.approx(0.1) and r["se"] == pytest.approx(0.0, abs=1e-12) and r["seeds"] == 2
    assert s["rows"][4.0]["mean"] == pytest.approx(0.05)


def test_summary_shift_of_the_optimum():
    """Three seeds per point on exact parabolas: the logical run's optimum at log2 lr = 0, the naive run at kappa 4
    at +1 octave (= 0.5 log2 4, what the square-root rule predicts), the rescaled run at 0."""
    rows = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        for x in (-2, -1, 0, 1, 2):
            rows.append(row(2.0 ** x, 1 + 0.1 * x ** 2 + noise, seed, rule="accumulate"))
            rows.append(row(2.0 ** x, 1 + 0.1 * (x - 1) ** 2 + noise, seed, rule="naive", b=64))
            rows.append(row(2.0 ** x, 1.02 + 0.1 * x ** 2 + noise, seed, rule="sqrt_exact", b=64))
    s = summarise(rows)
    assert s["reference"] == ("accumulate", 16)
    naive, sqrt = s["cells"][("naive", 64)]["shift"], s["cells"][("sqrt_exact", 64)]["shift"]
    assert naive["octaves"] == pytest.approx(1.0, abs=1e-9) and naive["expected_naive"] == pytest.approx(1.0)
    assert sqrt["octaves"] == pytest.approx(0.0, abs=1e-9)
    # the seed noise is a common offset: the per-lr se is its spread over seeds, the same at every lr
    assert s["cells"][("naive", 64)]["ses"][0] == pytest.approx(statistics.stdev([0, 0.01, -0.01]) / math.sqrt(3))


def test_variance_decomposition_groups_runs_by_the_one_source_they_change():
    base = {"rule": "accumulate", "physical_batch_size": 4, "logical_batch_size": 4, "final_loss": 6.0,
            "final_loss_se": 0.03}
    rows = [base] + [dict(base, init_seed=i, final_loss=v) for i, v in ((1, 6.6), (2, 5.4))] + [
        dict(base, data_seed=1, final_loss=6.06), dict(base, physical_batch_size=2, final_loss=5.94),
        dict(base, init_seed=1, data_seed=1, final_loss=9.0)]  # changes two sources: in no group
    d = decompose(rows)
    assert d["base"] == 6.0
    init = d["sources"]["init_seed"]
    assert init["runs"] == 3 and init["std"] == pytest.approx(statistics.stdev([6.0, 6.6, 5.4]) / 6.0)
    assert init["ci"][0] < init["std"] < init["ci"][1]
    assert d["sources"]["data_seed"]["runs"] == 2 and d["sources"]["rounding"]["runs"] == 2
    assert d["sources"]["rounding"]["estimator_se"] == pytest.approx(0.005)
    assert "draw_seed" not in d["sources"]
    # the chi-square interval covers the true sigma ~95% of the time (normal samples of 5)
    import random
    rng = random.Random(0)
    hits = sum(lo <= 1.0 <= hi for lo, hi in (spread([rng.gauss(0, 1) for _ in range(5)])[1:] for _ in range(4000)))
    assert 0.93 < hits / 4000 < 0.97


def test_variance_decomposition_estimator_error_of_a_difference(tmp_path):
    import json

    import torch

    from sdebatch.mdm.objective import elbo_standard_error

    base = {"rule": "accumulate", "physical_batch_size": 4, "logical_batch_size": 4, "final_loss": 6.0,
            "run_id": "a"}
    other = dict(base, draw_seed=1, final_loss=6.3, run_id="b")
    nats = {"a": [[10.0, 20.0, 5.0], [12.0, 18.0, 5.0]], "b": [[11.0, 20.0, 7.0], [11.0, 19.0, 6.0]]}
    for rid, n in nats.items():
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "val_rows.json").write_text(json.dumps({"nats": n, "items": [4, 4, 4], "modality": [1] * 3}))
    d = decompose([base, other], folder=tmp_path)
    diff = torch.tensor(nats["b"]) - torch.tensor(nats["a"])
    assert d["sources"]["draw_seed"]["paired_estimator_se"] == pytest.approx(elbo_standard_error(diff, 12) / 6.0)
