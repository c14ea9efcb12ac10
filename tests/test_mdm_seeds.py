"""The seeds table's statistics on a hand-made sweep: paired differences, their standard errors, seed counts, the
seeds a 0.5% standard error would take, and the knee's bracket, each computed here by hand."""
import math
import statistics

import pytest

pytest.importorskip("matplotlib")

from paper_figures.mdm_seeds import analyse, markdown  # noqa: E402


def rows_of(table):
    return [{"rule": rule, "physical_batch_size": b, "logical_batch_size": 4, "seed": s, "final_loss": v,
             "diverged": False} for (rule, b), per_seed in table.items() for s, v in per_seed.items()]


def test_paired_contrasts_and_the_knee_by_hand():
    logical = {0: 6.0, 1: 6.3, 2: 5.9, 3: 6.1}
    sqrt16 = {0: 6.03, 1: 6.31, 2: 5.93, 3: 6.10}   # within 1% of its own seed's logical run
    naive16 = {0: 6.20, 1: 6.45, 2: 6.10, 3: 6.30}
    sqrt64 = {0: 6.50, 1: 6.80, 2: 6.40, 3: 6.62}   # ~8% worse: the knee
    naive64 = {0: 7.00, 1: 7.20, 2: 6.90, 3: 7.10}
    result = analyse(rows_of({("accumulate", 4): logical, ("sqrt_exact", 16): sqrt16, ("naive", 16): naive16,
                              ("sqrt_exact", 64): sqrt64, ("naive", 64): naive64}))
    by = {r["batch"]: r for r in result["table"]}
    for b, arm, ref, name in ((16, sqrt16, logical, "sqrt_exact - logical"),
                              (16, naive16, sqrt16, "naive - sqrt_exact"), (64, naive64, logical, "naive - logical")):
        d = [(arm[s] - ref[s]) / ref[s] for s in range(4)]
        c = by[b][name]
        assert c["mean"] == pytest.approx(statistics.fmean(d), rel=1e-12)
        assert c["se"] == pytest.approx(statistics.stdev(d) / 2, rel=1e-12) and c["n"] == 4
        assert c["seeds_for_target"] == math.ceil((statistics.stdev(d) / 0.005) ** 2)
    # kappa 4 stays within 1% (its upper 2-se bound too), kappa 16 is beyond 2 se and 1%: the knee in (16, 64]
    assert result["knee"] == 64 and result["knee_bracket"] == [16, 64]
    assert "(16, 64] samples per update" in markdown(result)
