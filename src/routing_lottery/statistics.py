"""Seed statistics: the mean and 95 % interval of a metric over replicates, and paired tests between methods.

One seed is one draw of θ₀, the masks and the data order; a difference between methods means
something only beside the spread across such draws. The interval is Student's t interval of the
mean (exact for normal seed-to-seed variation, and the usual reading with 5 to 10 seeds). The
paired comparison uses the per-seed differences of two methods run on the same seeds: the
Wilcoxon signed-rank test (exact, no normality assumed) and the paired t test beside it. With n
seeds the exact two-sided Wilcoxon p-value cannot fall below 2 / 2**n (0.0625 at n = 5): report
it as measured rather than choose the test that clears 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided ``confidence`` interval (None when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    def overlaps(self, other: Interval) -> bool:
        """Whether the two intervals share a point (a point estimate counts as a zero-width interval)."""
        lo_a, hi_a = (self.mean, self.mean) if self.low is None else (self.low, self.high)
        lo_b, hi_b = (other.mean, other.mean) if other.low is None else (other.low, other.high)
        return bool(lo_a <= hi_b and lo_b <= hi_a)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and Student's t interval around it.

    Raises ValueError on no values or a non-finite one (a diverged seed must be looked at, not averaged).
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to average")
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite values among {list(values)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size))


@dataclass(frozen=True)
class PairedTest:
    """``a - b`` over paired seeds: the mean difference, its interval and two p-values (None when undefined)."""

    difference: Interval
    p_wilcoxon: float | None
    p_t: float | None

    @property
    def n(self) -> int:
        return self.difference.n


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedTest:
    """Compare two methods measured on the same seeds (``a[i]`` and ``b[i]`` share seed i).

    The Wilcoxon p-value is exact (two-sided; seeds with a zero difference are dropped, as
    Wilcoxon's original test); it is 1.0 when every difference is zero and None with fewer than
    two pairs. The paired t p-value is None when every difference is the same (no spread to test).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need the same length; got {x.shape} and {y.shape}")
    d = x - y
    difference = mean_interval(d, confidence)
    if d.size < 2:
        return PairedTest(difference, None, None)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        p_wilcoxon: float | None = 1.0
    else:
        p_wilcoxon = float(stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method="exact").pvalue)
    p_t = None if np.allclose(d, d[0], rtol=0, atol=0) else float(stats.ttest_1samp(d, 0.0).pvalue)
    return PairedTest(difference, p_wilcoxon, p_t)
