"""Label-free collapse warning: when does the masks' similarity score leave its trend?

The paper sees subnetwork collapse as sparsity grows: the K masks stay distinct, then their
similarity spikes (most figures) or falls towards disjoint (one INR figure), and the task metric
drops. The similarity score needs only the masks, so a sweep can warn before any label is used.

The rule (``CollapseSettings`` holds its numbers; ``rule_text`` states it in words):

1. Put each level on the axis x = -log(1 - sparsity) (default; IMP sweeps are geometric in
   density, so their levels are evenly spaced there) or x = sparsity.
2. At level i, fit a least-squares line to the scores of the last ``window`` earlier levels
   (at least ``min_history`` of them; earlier levels only, so the verdict at i never depends on
   later levels and running the detector after each level of a sweep gives the same answer).
3. Residual r = score_i - line(x_i). Scale s = max(1.4826 * median |residual| of the fitted
   levels, ``min_scale``): a robust spread of the recent trend, floored because a line through
   three smooth points has almost no residual.
4. Flag the first level with |r| > ``threshold`` * s: a rise (masks converging) or a fall (masks
   drifting apart) -- both directions, as the paper reports both.

Levels at sparsity 0 are skipped: dense masks are all-ones, so their Jaccard is 1 by definition
and would bend the trend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Axis = Literal["log_density", "sparsity"]
MAD_TO_SIGMA = 1.4826  # median absolute deviation of a normal sample, in standard deviations


@dataclass(frozen=True)
class CollapseSettings:
    """Numbers of the collapse rule (see the module docstring for the rule itself)."""

    threshold: float = 3.0  # flag when |residual| exceeds this many residual scales
    min_scale: float = 0.02  # floor on the residual scale, in score (Jaccard) units
    min_history: int = 3  # earlier levels needed before a level can be judged
    window: int = 4  # at most this many earlier levels define the trend (local, so curvature is tolerated)
    axis: Axis = "log_density"  # x for the trend: -log(1 - sparsity), or sparsity itself

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive number; got {self.threshold!r}")
        if not (math.isfinite(self.min_scale) and self.min_scale > 0):
            raise ValueError(f"min_scale must be a positive number; got {self.min_scale!r}")
        if self.min_history < 2:
            raise ValueError(f"min_history must be at least 2 (a line needs two points); got {self.min_history!r}")
        if self.window < self.min_history:
            raise ValueError(f"window ({self.window}) must be at least min_history ({self.min_history})")
        if self.axis not in ("log_density", "sparsity"):
            raise ValueError(f"axis must be 'log_density' or 'sparsity'; got {self.axis!r}")


def rule_text(settings: CollapseSettings) -> str:
    """The rule in one sentence, with its numbers, for reports and log lines."""
    x = "-log(1 - sparsity)" if settings.axis == "log_density" else "sparsity"
    return (
        f"At each sparsity level, fit a least-squares line to the mean similarity score against {x} "
        f"over the previous {settings.window} levels (at least {settings.min_history}; sparsity 0 skipped); "
        f"warn at the first level whose score departs from the line's prediction by more than "
        f"{settings.threshold:g} x max(1.4826 x median |residual| of those levels, {settings.min_scale:g}), "
        f"upward (masks converging) or downward (masks drifting apart)."
    )


@dataclass(frozen=True)
class LevelCheck:
    """The rule applied at one level: expected score from the trend and how far the score is from it."""

    index: int  # position in the input arrays
    level: float  # sparsity
    score: float
    expected: float  # the trend line's prediction
    residual: float  # score - expected, in score units
    scale: float  # residual scale used (>= min_scale)
    departure: float  # residual / scale, signed
    flagged: bool


@dataclass(frozen=True)
class CollapseWarning:
    """Result of ``detect_collapse``: the first flagged level, or ``level=None`` if none fired."""

    level: float | None
    index: int | None
    direction: Literal["rise", "fall"] | None
    residual: float | None  # score - expected at the flagged level, in score units
    departure: float | None  # residual in units of the residual scale
    expected: float | None
    rule: str
    settings: CollapseSettings
    checks: tuple[LevelCheck, ...] = field(default=())  # every judged level, flagged or not

    @property
    def fired(self) -> bool:
        return self.level is not None

    def message(self) -> str:
        """One line for a log or a report."""
        if self.level is None:
            return f"no collapse warning over {len(self.checks)} judged levels"
        toward = "converging" if self.direction == "rise" else "drifting apart"
        return (
            f"collapse warning at sparsity {self.level:.1%}: similarity {self.direction}s by {self.residual:+.3f} "
            f"from its trend ({self.departure:+.1f} residual scales; masks {toward})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "index": self.index,
            "direction": self.direction,
            "residual": self.residual,
            "departure": self.departure,
            "expected": self.expected,
            "rule": self.rule,
            "settings": asdict(self.settings),
            "checks": [asdict(c) for c in self.checks],
        }


def _levels(levels: Sequence[float], name: str = "levels") -> np.ndarray:
    x = np.asarray(levels, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of sparsities; got shape {x.shape}")
    if not np.all(np.isfinite(x)) or np.any(x < 0) or np.any(x >= 1):
        raise ValueError(f"{name} must be sparsities in [0, 1); got {x.tolist()}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"{name} must be strictly ascending; got {x.tolist()}")
    return x


def _values(values: Sequence[float], n: int, name: str) -> np.ndarray:
    y = np.asarray(values, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"{name} must have one value per level ({n}); got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{name} must be finite; got {y.tolist()}")
    return y


def _check(x: np.ndarray, y: np.ndarray, history: list[int], i: int, level: float, s: CollapseSettings) -> LevelCheck:
    slope, intercept = np.polyfit(x[history], y[history], 1)
    fitted = slope * x[history] + intercept
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(y[history] - fitted))), s.min_scale)
    expected = float(slope * x[i] + intercept)
    residual = float(y[i] - expected)
    departure = residual / scale
    return LevelCheck(i, level, float(y[i]), expected, residual, scale, departure, abs(departure) > s.threshold)


def detect_collapse(
    levels: Sequence[float], scores: Sequence[float], settings: CollapseSettings | None = None
) -> CollapseWarning:
    """Apply the collapse rule to a similarity-vs-sparsity curve.

    Parameters
    ----------
    levels : sparsities in [0, 1), strictly ascending.
    scores : the label-free similarity score at each level (usually the mean over subnetworks).
    settings : the rule's numbers; defaults to ``CollapseSettings()``.

    Returns
    -------
    CollapseWarning with the first flagged level (or ``None``), its residual and the rule text;
    ``checks`` holds the verdict at every level that had enough history.

    Example
    -------
    >>> lv = [0.2, 0.36, 0.49, 0.59, 0.67, 0.74, 0.79]
    >>> detect_collapse(lv, [0.30, 0.31, 0.32, 0.33, 0.34, 0.60, 0.80]).level
    0.74
    """
    s = settings or CollapseSettings()
    lv = _levels(levels)
    y = _values(scores, len(lv), "scores")
    x = -np.log1p(-lv) if s.axis == "log_density" else lv
    usable = [i for i in range(len(lv)) if lv[i] > 0]
    checks: list[LevelCheck] = []
    for pos, i in enumerate(usable):
        history = usable[max(0, pos - s.window):pos]
        if len(history) >= s.min_history:
            checks.append(_check(x, y, history, i, float(lv[i]), s))
    first = next((c for c in checks if c.flagged), None)
    if first is None:
        return CollapseWarning(None, None, None, None, None, None, rule_text(s), s, tuple(checks))
    return CollapseWarning(
        level=first.level,
        index=first.index,
        direction="rise" if first.residual > 0 else "fall",
        residual=first.residual,
        departure=first.departure,
        expected=first.expected,
        rule=rule_text(s),
        settings=s,
        checks=tuple(checks),
    )


def metric_drop_level(
    levels: Sequence[float], metric: Sequence[float], tolerance: float, higher_is_better: bool = True,
    sustained: bool = False,
) -> float | None:
    """First level where the metric is worse than its best earlier value by more than ``tolerance``.

    This is where performance "actually drops"; comparing it with the collapse warning's level
    gives the warning's lead. ``tolerance`` is in the metric's own units (e.g. 0.02 balanced
    accuracy, 0.5 dB PSNR). With ``sustained``, the metric must also stay that far below for every
    later level: one noisy dip that recovers is not a drop.

    Example
    -------
    >>> metric_drop_level([0.5, 0.7, 0.8, 0.9], [0.80, 0.81, 0.79, 0.70], tolerance=0.05)
    0.9
    """
    lv = np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or np.any(np.diff(lv) <= 0):
        raise ValueError(f"levels must be a strictly ascending 1-D sequence; got {lv.tolist()}")
    m = _values(metric, len(lv), "metric")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number; got {tolerance!r}")
    signed = m if higher_is_better else -m
    for i in range(1, len(lv)):
        floor = signed[:i].max() - tolerance
        if signed[i] < floor and (not sustained or bool(np.all(signed[i:] < floor))):
            return float(lv[i])
    return None
