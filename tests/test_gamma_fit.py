"""The gamma fit recovers a known exponent from synthetic loss-vs-lr curves at several horizons."""
import math

import pytest

from paper_figures.gamma_fit import fit_gamma, optimal_lr


def test_optimal_lr_is_the_parabola_vertex():
    lrs = [0.5, 1.0, 2.0, 4.0]
    losses = [(math.log(lr) - math.log(1.3)) ** 2 for lr in lrs]  # exact parabola in log lr, vertex 1.3
    assert optimal_lr(lrs, losses) == pytest.approx(1.3, rel=1e-9)
    assert optimal_lr(lrs, [1, 2, 3, 4]) == 0.5  # the best point at the grid edge


@pytest.mark.parametrize("gamma", [0.44, 1.0])
def test_recovers_gamma(gamma):
    rows = []
    for d in (1e4, 2e4, 4e4, 8e4):
        best = 1e-3 * (d / 1e4) ** (-gamma / 2)
        for lr in (6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3):  # wide enough: no optimum at an edge
            rows.append({"samples": d, "lr": lr, "final_loss": 1 + (math.log(lr / best)) ** 2})
    fit = fit_gamma(rows)
    assert fit["gamma"] == pytest.approx(gamma, abs=1e-6)
    with pytest.raises(ValueError, match="two horizons"):
        fit_gamma(rows[:5])


def test_gamma_se_from_seeded_noisy_curves_covers_the_truth():
    """Three seeds per point with independent noise: the weighted fit's gamma lands within 3 of its standard errors
    of the truth, and a horizon whose optimum is at the grid's edge is dropped, not fitted."""
    import random

    rng = random.Random(0)
    gamma, rows = 0.44, []
    for d in (1e4, 2e4, 4e4, 8e4):
        best = 1e-3 * (d / 1e4) ** (-gamma / 2)
        for lr in (6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3):
            for seed in range(3):
                rows.append({"samples": d, "lr": lr, "seed": seed,
                             "final_loss": 1 + 0.05 * math.log2(lr / best) ** 2 + rng.gauss(0, 0.005)})
    for lr in (1e-3, 2e-3, 4e-3):  # a horizon with its best lr at the edge
        rows.append({"samples": 1.6e5, "lr": lr, "seed": 0, "final_loss": 1 + lr})
    fit = fit_gamma(rows)
    assert fit["dropped"] == [1.6e5] and fit["weighted"] and 0 < fit["gamma_se"] < 0.2
    assert abs(fit["gamma"] - gamma) < 3 * fit["gamma_se"]
