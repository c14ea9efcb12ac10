"""sdebatch.stats against numbers worked out by hand."""
import math

import pytest

from sdebatch.stats import mean_se, paired, ratio_se, relative


def test_mean_se_by_hand():
    # mean 3; squared deviations 4, 1, 0, 9 sum to 14; sample variance 14 / 3; se = sqrt(14 / 3 / 4) = sqrt(7 / 6)
    m, se, n = mean_se([1.0, 2.0, 3.0, 6.0])
    assert (m, n) == (3.0, 4) and se == pytest.approx(math.sqrt(7 / 6), rel=1e-15)
    assert mean_se(iter([2, 4])) == (3.0, 1.0, 2)  # sd sqrt(2), over sqrt(2)
    assert mean_se([5.0]) == (5.0, None, 1)  # one value: no error


def test_mean_se_of_a_diverged_seed_has_no_error():
    assert mean_se([1.0, math.inf, 2.0]) == (math.inf, None, 3)
    m, se, n = mean_se([1.0, math.nan])
    assert math.isnan(m) and se is None and n == 2
    m, _, _ = mean_se([math.inf, -math.inf])
    assert math.isnan(m)
    with pytest.raises(ValueError, match="at least one number"):
        mean_se([])


def test_paired_relative_differences_by_hand():
    # differences 0.1, 0.2, 0.1: mean 2 / 15; deviations -1/30, 2/30, -1/30; variance (1 + 4 + 1) / 900 / 2 = 1 / 300;
    # se = sqrt(1 / 300 / 3) = 1 / 30
    m, se, n = paired([1.1, 2.4, 3.3], [1.0, 2.0, 3.0])
    assert n == 3 and m == pytest.approx(2 / 15, rel=1e-14) and se == pytest.approx(1 / 30, rel=1e-12)
    assert relative(3.0, 2.0) == 0.5 and relative(1.0, 4.0) == -0.75
    assert paired([math.inf, 2.0], [1.0, 1.0]) == (math.inf, None, 2)
    with pytest.raises(ValueError, match="pairs: got 2 and 3"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])


def test_ratio_se_is_the_delta_method():
    # a / b - 1 with a = 3 +- 0.3, b = 2 +- 0.1: (3 / 2) sqrt(0.1^2 + 0.05^2) = 1.5 sqrt(0.0125)
    assert ratio_se(3.0, 0.3, 2.0, 0.1) == pytest.approx(1.5 * math.sqrt(0.0125), rel=1e-14)
    # far from 1 the reference's error is magnified by a / b: a deviation of +562%, se_a = se_b = 0.01 (b = 1)
    assert ratio_se(6.62, 0.01, 1.0, 0.01) == pytest.approx(math.sqrt(0.01 ** 2 + (6.62 * 0.01) ** 2), rel=1e-14)
    assert ratio_se(1.0, 0.0, 1.0, 0.0) == 0.0
    assert ratio_se(1.0, None, 1.0, 0.1) is None and ratio_se(math.inf, 0.1, 1.0, 0.1) is None
