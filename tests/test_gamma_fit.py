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
