"""paper_figures.batch_ablation.summarise on a hand-made table: the logical run, its seed spread, deviations, knees."""
import statistics

import pytest

from paper_figures.batch_ablation import summarise


def row(rule, b, loss, seed=0, lb=32, noise=None, diverged=False):
    return {"rule": rule, "physical_batch_size": b, "logical_batch_size": lb, "final_loss": loss, "seed": seed,
            "noise_scale": noise, "diverged": diverged}


def test_reference_is_exact_accumulation_and_knee_is_first_batch_past_tolerance():
    rows = [row("accumulate", 8, 4.0, 0, noise=100.0), row("accumulate", 8, 4.2, 1, noise=140.0),
            row("sqrt_exact", 8, 4.1), row("sqrt_exact", 64, 4.15), row("sqrt_exact", 128, 4.5),
            row("naive", 8, 4.6), row("naive", 64, 4.4), row("naive", 128, 5.0, diverged=True)]
    s = summarise(rows, tolerance=0.05)
    assert s["reference"] == pytest.approx(4.1) and s["reference_runs"] == 2
    assert s["reference_spread"] == pytest.approx(statistics.stdev([4.0, 4.2]) / 4.1)
    assert s["deviation"][("sqrt_exact", 64)] == pytest.approx(0.05 / 4.1)
    assert s["knee"]["sqrt_exact"] == 128  # 64 is within 5%, 128 is not
    assert s["knee"]["naive"] == 64  # 4.4 is 7% off
    assert s["means"][("naive", 128)] == float("inf")  # a diverged run counts as infinitely bad
    assert s["noise_scale"] == pytest.approx(120.0)  # median of the estimates


def test_without_accumulation_the_logical_run_is_physical_equal_logical():
    s = summarise([row("sqrt_exact", 32, 3.0), row("sqrt_exact", 64, 3.3), row("naive", 64, 3.6)])
    assert s["reference"] == 3.0 and s["reference_spread"] is None
    assert s["knee"]["sqrt_exact"] == 64 and s["knee"]["naive"] == 64


def test_rules_at_kappa_one_are_one_run_not_seeds():
    s = summarise([row("sqrt_exact", 32, 3.0), row("naive", 32, 3.0), row("naive", 64, 3.3)])
    assert s["reference_runs"] == 1 and s["reference_spread"] is None
