"""sdebatch.figures.batch_ablation.summarise on a hand-made table: the logical run, its seed spread, deviations,
knees."""
import statistics

import pytest

from sdebatch.figures.batch_ablation import summarise


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
    assert s["noise_scale"] == pytest.approx(120.0)  # median of the logical runs' estimates
    assert s["deviation_se"][("sqrt_exact", 64)] is None  # one run: no error to give


def test_noise_scale_prefers_the_logical_runs_probe():
    rows = [row("accumulate", 8, 4.0, 0, noise=100.0), row("accumulate", 8, 4.1, 1, noise=300.0),
            row("naive", 64, 4.4, noise=5.0)]
    assert summarise(rows)["noise_scale"] == pytest.approx(200.0)  # the naive run's estimate is not the logical's
    rows[0]["noise_probe.b_simple"], rows[1]["noise_probe.b_simple"] = 50.0, None
    assert summarise(rows)["noise_scale"] == pytest.approx(50.0)


def test_deviation_standard_error_over_seeds():
    """se of cell mean / reference - 1, the two sets of seeds independent: the delta method for a ratio of means,
    (a / b) sqrt((se_a / a)^2 + (se_b / b)^2), worked out by hand."""
    rows = [row("accumulate", 8, 4.0, 0), row("accumulate", 8, 4.2, 1), row("accumulate", 8, 4.1, 2),
            row("naive", 64, 4.4, 0), row("naive", 64, 4.8, 1)]
    s = summarise(rows)
    a, b = 4.6, 4.1
    se_b = 0.1 / 3 ** 0.5  # 4.0, 4.1, 4.2: sample std 0.1
    se_a = 0.2 * 2 ** 0.5 / 2 ** 0.5  # 4.4, 4.8: sample std 0.2 sqrt(2), over sqrt(2)
    assert s["deviation"][("naive", 64)] == pytest.approx(0.5 / b)
    assert s["deviation_se"][("naive", 64)] == pytest.approx((a / b) * ((se_a / a) ** 2 + (se_b / b) ** 2) ** 0.5)
    assert s["deviation_se"][("accumulate", 8)] is None  # the reference itself: 0 by construction


def test_deviation_far_from_the_reference_carries_the_references_error():
    """A naive arm at +562%: the reference's error, magnified by a / b = 6.62, dominates. Sum of the variances over
    b (the reference taken as exact in the ratio) gives 7.0%; the delta method gives 10.3%."""
    rows = [row("accumulate", 8, v, s) for s, v in enumerate((0.98, 1.0, 1.02))]
    rows += [row("naive", 256, v, s) for s, v in enumerate((6.50, 6.62, 6.74))]
    s = summarise(rows)
    se_b, se_a = 0.02 / 3 ** 0.5, 0.12 / 3 ** 0.5  # sample stds 0.02 and 0.12 (evenly spaced), over sqrt(3)
    assert s["deviation"][("naive", 256)] == pytest.approx(5.62)
    delta = 6.62 * ((se_a / 6.62) ** 2 + (se_b / 1.0) ** 2) ** 0.5
    assert delta == pytest.approx(0.10317, abs=1e-5) and ((se_a ** 2 + se_b ** 2) ** 0.5) == pytest.approx(0.07024,
                                                                                                          abs=1e-5)
    assert s["deviation_se"][("naive", 256)] == pytest.approx(delta, rel=1e-9)


def test_a_knee_is_a_worse_loss_not_a_better_one():
    """The square-root rule is 10% better at 16 (paired, beyond 2 se and the tolerance) and 5% worse at 32: the knee
    is 32. A single unpaired run 7% better at 64 is no knee either; 7% worse at 128 is."""
    rows = [row("accumulate", 8, v, s, lb=8) for s, v in enumerate((4.0, 4.1, 4.2))]
    rows += [row("sqrt_exact", 16, v * f, s, lb=8) for s, (v, f) in enumerate(((4.0, 0.90), (4.1, 0.89), (4.2, 0.91)))]
    rows += [row("sqrt_exact", 32, v * f, s, lb=8) for s, (v, f) in enumerate(((4.0, 1.05), (4.1, 1.04), (4.2, 1.06)))]
    rows += [row("naive", 64, 4.1 * 0.93, lb=8), row("naive", 128, 4.1 * 1.07, lb=8)]
    for r in rows[-2:]:
        del r["seed"]
    s = summarise(rows)
    m, se, n = s["paired"][("sqrt_exact", 16)]  # -10%, -11%, -9%: mean -10%, se 0.01 / sqrt(3)
    assert n == 3 and m == pytest.approx(-0.10) and se == pytest.approx(0.01 / 3 ** 0.5)
    assert abs(m) > 2 * se and abs(m) > s["tolerance"]  # a difference beyond the bar, but an improvement
    m, se, n = s["paired"][("sqrt_exact", 32)]
    assert m == pytest.approx(0.05) and se == pytest.approx(0.01 / 3 ** 0.5)
    assert s["knee"]["sqrt_exact"] == 32
    assert s["deviation"][("naive", 64)] == pytest.approx(-0.07) and s["knee"]["naive"] == 128


def test_a_seeds_logical_runs_count_once():
    """Seed 0's logical run twice (4 at once, 2 x 2 accumulated) and seed 1's once: the reference is the mean over
    seeds of each seed's mean, and its spread is over 2 seeds, not 3 runs."""
    rows = [row("accumulate", 4, 4.0, 0, lb=4), row("accumulate", 2, 4.2, 0, lb=4), row("accumulate", 4, 5.0, 1, lb=4),
            row("naive", 64, 5.5, 0, lb=4, diverged=True), row("naive", 64, 5.5, 1, lb=4)]
    s = summarise(rows)
    assert s["reference"] == pytest.approx((4.1 + 5.0) / 2) and s["reference_runs"] == 2
    assert s["reference_spread"] == pytest.approx(statistics.stdev([4.1, 5.0]) / 4.55)
    assert s["paired"][("naive", 64)][0] == float("inf")  # a diverged seed is not dropped from the paired mean


def test_without_accumulation_the_logical_run_is_physical_equal_logical():
    s = summarise([row("sqrt_exact", 32, 3.0), row("sqrt_exact", 64, 3.3), row("naive", 64, 3.6)])
    assert s["reference"] == 3.0 and s["reference_spread"] is None
    assert s["knee"]["sqrt_exact"] == 64 and s["knee"]["naive"] == 64


def test_rules_at_kappa_one_are_one_run_not_seeds():
    s = summarise([row("sqrt_exact", 32, 3.0), row("naive", 32, 3.0), row("naive", 64, 3.3)])
    assert s["reference_runs"] == 1 and s["reference_spread"] is None


def test_loss_vs_tokens_averages_seeds_bin_by_bin():
    from sdebatch.figures.batch_ablation import seed_mean

    a = [{"tokens": 10.0, "loss": 4.0}, {"tokens": 30.0, "loss": 2.0}, {"tokens": 40.0, "loss": 1.0}]
    b = [{"tokens": 15.0, "loss": 6.0}, {"tokens": 35.0, "loss": 3.0}]
    x, y = seed_mean([a, b], "tokens", bins=2, hi=40.0)  # bins [0, 20) and [20, 40]
    assert x == [10.0, 30.0]
    assert y == pytest.approx([(4.0 + 6.0) / 2, ((2.0 + 1.0) / 2 + 3.0) / 2])


def test_paired_deviations_use_each_seeds_own_logical_run():
    rows = [row("accumulate", 8, 4.0, 0), row("accumulate", 8, 5.0, 1),
            row("sqrt_exact", 64, 4.4, 0), row("sqrt_exact", 64, 5.5, 1),
            row("naive", 64, 4.8, 0), row("naive", 64, 5.0, 1), row("naive", 128, 9.0, 7)]  # seed 7: no logical run
    s = summarise(rows)
    m, se, n = s["paired"][("sqrt_exact", 64)]
    assert n == 2 and m == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)  # +10% for both seeds
    m, se, n = s["paired"][("naive", 64)]
    assert n == 2 and m == pytest.approx((0.2 + 0.0) / 2)
    assert se == pytest.approx(statistics.stdev([0.2, 0.0]) / 2 ** 0.5)
    c = s["contrast"][("naive", 64)]  # naive - sqrt, relative to the seed's logical run: (0.4 / 4, -0.5 / 5)
    assert c[2] == 2 and c[0] == pytest.approx((0.1 - 0.1) / 2)
    assert ("naive", 128) not in s["paired"]


def test_knee_needs_two_paired_standard_errors_and_the_tolerance():
    """Three seeds: at 64 the rescaled runs are +2% +- 1% (paired): beyond 1% but within 2 se, not the knee; at
    128 +3% with no spread: the knee. Contrasts of every rule against the square-root rule, run for run."""
    rows = [row("accumulate", 8, 4.0, s) for s in range(3)]
    rows += [row("sqrt_exact", 64, 4.0 * (1 + d), s) for s, d in enumerate((0.01, 0.02, 0.03 + 0.03))]
    rows += [row("sqrt_exact", 128, 4.12, s) for s in range(3)]
    rows += [row("linear", 64, 4.4, s) for s in range(3)]
    s = summarise(rows)
    m, se, n = s["paired"][("sqrt_exact", 64)]
    assert n == 3 and m == pytest.approx(0.03) and 0.015 < 2 * se and abs(m) < 2 * se
    assert s["knee"]["sqrt_exact"] == 128 and s["tolerance"] == 0.01
    c = s["contrast"][("linear", 64)]
    assert c[2] == 3 and c[0] == pytest.approx(statistics.fmean([0.1 - 0.01, 0.1 - 0.02, 0.1 - 0.06]))
    assert ("sqrt_exact", 64) not in s["contrast"]


def test_estimator_error_of_paired_numbers_from_val_rows(tmp_path):
    """Two runs of one seed whose per-sequence replicates differ by known amounts: the paired estimator se is the
    closed form sqrt(sum_i var_i / R) / items / ln 2 of their differences, relative to the seed's logical loss."""
    import json
    import math

    import torch

    rows = []
    for rid, rule, b, nats in (("ref", "accumulate", 8, [[10.0, 20.0], [12.0, 20.0]]),
                               ("sq", "sqrt_exact", 64, [[11.0, 21.0], [13.0, 23.0]])):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "val_rows.json").write_text(json.dumps({"nats": nats, "items": [5, 5], "modality": [1, 1]}))
        rows.append(dict(row(rule, b, 4.0 if rule == "accumulate" else 4.4, 0), run_id=rid))
    s = summarise(rows, folder=tmp_path)
    diff = torch.tensor([[1.0, 1.0], [1.0, 3.0]])  # sq - ref per replicate (rows) and sequence (columns)
    var = diff.var(0, unbiased=True) / 2  # per sequence: 0 and 2 / 2
    expect = math.sqrt(float(var.sum())) / 10 / math.log(2) / 4.0
    assert s["paired_estimator_se"][("sqrt_exact", 64)] == pytest.approx(expect)


def test_paired_figure_has_a_symmetric_log_axis_linear_within_the_tolerance():
    """A naive arm at +500% next to a rescaled arm within 2%: a linear axis would flatten the rescaled one."""
    import matplotlib.pyplot as plt

    from sdebatch.figures.batch_ablation import _paired_panel

    rows = [row("accumulate", 8, 4.0 + 0.1 * s, s) for s in range(3)]
    rows += [row("sqrt_exact", 64, (4.0 + 0.1 * s) * (1.01 + 0.005 * s), s) for s in range(3)]
    rows += [row("naive", 64, (4.0 + 0.1 * s) * (6.0 + 0.1 * s), s) for s in range(3)]
    s = summarise(rows, tolerance=0.02)
    fig, ax = plt.subplots()
    _paired_panel(ax, s)
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_transform().linthresh == pytest.approx(2.0)  # percent
    lo, hi = ax.get_ylim()
    tops = [100 * (m + se) for m, se, _ in s["paired"].values()]
    bottoms = [100 * (m - se) for m, se, _ in s["paired"].values()]
    assert hi > max(tops) > 500 and lo < min(-2.0, min(bottoms))  # every error bar and the band on the axis
    assert ax.get_title() == "3 seeds per point"
    plt.close(fig)
