"""Mean and standard error over seeds, for the figures, the report and the demos (plain Python).

A run's number repeated over seeds is summarised as its mean and the standard error of that mean, the sample standard
deviation (n - 1 in the denominator) over sqrt(n). Two arms run on the same seeds compare best seed by seed
(:func:`paired`); two independent means through the delta method (:func:`ratio_se`).
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable

__all__ = ["mean_se", "paired", "relative", "ratio_se"]


def mean_se(values: Iterable[float]) -> tuple[float, float | None, int]:
    """(mean, standard error of the mean, n) of ``values``: the standard error is the sample standard deviation over
    sqrt(n), None for a single value or when a value is not finite (a diverged run: the mean is then inf or nan and
    no error can be given)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values must hold at least one number, got none")
    if not all(math.isfinite(x) for x in v):
        return (math.inf if all(x == math.inf or math.isfinite(x) for x in v) else math.nan), None, len(v)
    return statistics.fmean(v), (statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None), len(v)


def relative(a: float, b: float) -> float:
    """The relative difference a / b - 1, computed as (a - b) / b (exact for a close to b)."""
    return (a - b) / b


def paired(a: Iterable[float], b: Iterable[float]) -> tuple[float, float | None, int]:
    """:func:`mean_se` of the relative differences (a_i - b_i) / b_i of paired values, e.g. one arm's final loss
    against the reference's of the same seed: the seed's common noise cancels in each difference."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired values come in pairs: got {len(a)} and {len(b)}")
    return mean_se(relative(x, y) for x, y in zip(a, b))


def ratio_se(a: float, se_a: float | None, b: float, se_b: float | None) -> float | None:
    """Standard error of a / b - 1 for two independent means ``a`` and ``b`` with standard errors ``se_a`` and
    ``se_b`` (delta method): (a / b) sqrt((se_a / a)^2 + (se_b / b)^2). None when either error is None or a mean is
    not finite; a missing error is not taken as zero."""
    if se_a is None or se_b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return math.hypot(se_a / b, a * se_b / (b * b))
