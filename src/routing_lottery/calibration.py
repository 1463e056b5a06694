"""Calibrated detectors: one decision threshold per context, fitted on a calibration split.

RTL's K one-vs-rest detectors are recall-biased: at logit 0 they fire on most of their context and
on much of the rest (embedded demo at 50 %: macro precision 0.526, recall 0.938). Moving each
detector's threshold trades recall for precision. This module holds the pieces that do not depend
on a run: fitting thresholds for an objective, deciding with them (and routing when zero or several
detectors fire), scoring before and after, and the precision-recall figure.

The split matters. Thresholds are fitted on a **calibration split held out from the training data,
never on the test set**: a threshold chosen on test scores makes the test metrics optimistic by
construction. ``fit_thresholds`` therefore takes calibration arrays only and nothing else; the test
set is only ever passed to ``decide`` and ``detector_metrics``.

Conventions
-----------
- ``scores`` is (N, K): ``scores[i, k]`` is detector k's score (its logit) for example i.
- ``contexts`` is (N,): example i's true context id in ``0..K-1``. Detector k's positives are the
  examples of context k, as ``metrics`` and ``tasks/classification.py`` count them.
- A calibrated detector fires when ``score >= threshold`` (scikit-learn's convention in
  ``precision_recall_curve``). The uncalibrated detector fires when ``score > 0``, as
  ``tasks/classification.py`` scores it; ``detector_metrics(..., thresholds=None)`` reproduces it.
- Every threshold is one of the detector's calibration scores, so the calibration counts stored in
  ``Thresholds`` are exactly those of the precision-recall curve at the chosen point.

The finite-sample option (``objective="precision"`` with ``delta``) is a Learn-Then-Test fixed
sequence test (Angelopoulos, Bates, Candès, Jordan & Lei, 2021) with exact binomial p-values; see
``fit_thresholds`` for what it guarantees and why it is implemented here rather than taken from
MAPIE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import BinaryCounts, binary_counts, macro
from .plotting import context_colors, save_png

OBJECTIVES = ("f1", "balanced_accuracy", "precision")
RULES = ("abstain", "most_confident")
FORMAT_VERSION = 1
ABSTAIN = -1  # the routed decision of ``rule="abstain"`` when not exactly one detector fires


# -- the fitted thresholds -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Thresholds:
    """One decision threshold per context, with how it was chosen and what it gave on calibration.

    Saved beside the tickets as ``to_dict()`` (JSON-safe); ``from_dict`` restores it exactly.

    Attributes
    ----------
    thresholds : (K,) float64 tensor; detector k fires when its score is ``>= thresholds[k]``.
    objective : ``"f1"``, ``"balanced_accuracy"`` or ``"precision"``.
    target_precision : the precision asked for (``objective="precision"`` only, else None).
    delta : the allowed probability that the finite-sample guarantee fails (None: no guarantee).
    met : per detector, whether the target was met (always True for f1 and balanced accuracy).
    messages : per detector, why the target was not met and what was done instead ("" when met).
    counts : per detector, its confusion counts on the calibration split at its threshold.
    """

    thresholds: torch.Tensor
    objective: str
    target_precision: float | None
    delta: float | None
    met: tuple[bool, ...]
    messages: tuple[str, ...]
    counts: tuple[BinaryCounts, ...]

    def __post_init__(self) -> None:
        t = torch.as_tensor(self.thresholds).detach().to("cpu", torch.float64).clone()
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"thresholds must be a non-empty 1-D tensor; got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"thresholds must be finite; got {t.tolist()}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}")
        k = t.numel()
        for name in ("met", "messages", "counts"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {k} thresholds")
        object.__setattr__(self, "thresholds", t)
        object.__setattr__(self, "met", tuple(bool(m) for m in self.met))
        object.__setattr__(self, "messages", tuple(str(m) for m in self.messages))
        object.__setattr__(self, "counts", tuple(self.counts))

    @property
    def num_contexts(self) -> int:
        return self.thresholds.numel()

    @property
    def all_met(self) -> bool:
        return all(self.met)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (floats are written with ``repr`` precision, so the round trip is exact)."""
        return {
            "format_version": FORMAT_VERSION,
            "objective": self.objective,
            "target_precision": self.target_precision,
            "delta": self.delta,
            "thresholds": [float(x) for x in self.thresholds.tolist()],
            "met": list(self.met),
            "messages": list(self.messages),
            "counts": [{"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn} for c in self.counts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Inverse of ``to_dict``; refuses another format version or missing keys by name."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"thresholds format_version must be {FORMAT_VERSION}; got {version!r}")
        missing = [key for key in ("objective", "target_precision", "delta", "thresholds", "met", "messages", "counts")
                   if key not in data]
        if missing:
            raise ValueError(f"thresholds dict is missing {missing}")
        return cls(
            thresholds=torch.tensor([float(x) for x in data["thresholds"]], dtype=torch.float64),
            objective=str(data["objective"]),
            target_precision=None if data["target_precision"] is None else float(data["target_precision"]),
            delta=None if data["delta"] is None else float(data["delta"]),
            met=tuple(bool(m) for m in data["met"]),
            messages=tuple(str(m) for m in data["messages"]),
            counts=tuple(BinaryCounts(**{key: int(c[key]) for key in ("tp", "fp", "fn", "tn")}) for c in data["counts"]),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Thresholds):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # holds a tensor: mutable


# -- validation at the public edge -----------------------------------------------------------------
def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64).numpy()
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"{name} must be (N, K) with K >= 1, detector k's score for example i; got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} must be finite; got {int((~np.isfinite(s)).sum())} non-finite entries")
    return s


def _as_contexts(contexts: Any, n: int, k: int) -> np.ndarray:
    c = torch.as_tensor(contexts).detach().cpu()
    if c.dim() != 1 or c.numel() != n:
        raise ValueError(f"contexts must be (N,) = ({n},), one context id per row of scores; got shape {tuple(c.shape)}")
    if c.is_floating_point() or c.dtype == torch.bool:
        raise ValueError(f"contexts must hold integer context ids; got dtype {c.dtype}")
    c = c.long().numpy()
    if n and (c.min() < 0 or c.max() >= k):
        raise ValueError(f"contexts must be ids in 0..{k - 1} (scores has K = {k} columns); got range {c.min()}..{c.max()}")
    return c


def _check_thresholds(thresholds: Thresholds, k: int) -> None:
    if not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a Thresholds (from fit_thresholds); got {type(thresholds).__name__}")
    if thresholds.num_contexts != k:
        raise ValueError(f"thresholds has {thresholds.num_contexts} contexts but scores has K = {k} columns")


# -- fitting ---------------------------------------------------------------------------------------
def fit_thresholds(
    scores: Any,
    contexts: Any,
    objective: str,
    target_precision: float | None = None,
    delta: float | None = None,
) -> Thresholds:
    """Fit one decision threshold per detector on a **calibration split** (never the test set).

    The calibration split is held out from the training data before training: thresholds fitted on
    test scores would make every test metric optimistic. This function therefore takes the
    calibration arrays only; apply the result to test scores with ``decide``/``detector_metrics``.

    Parameters
    ----------
    scores : (N, K) detector scores (logits) on the calibration split; ``scores[i, k]`` is detector
        k's score for example i.
    contexts : (N,) true context ids of the calibration examples. Every context must occur, and
        every context must be absent from some example (each detector needs positives and negatives).
    objective : how each detector's threshold is chosen, from scikit-learn's curves:

        - ``"f1"``: the threshold of best F1 (``precision_recall_curve``);
        - ``"balanced_accuracy"``: the threshold of best (TPR + TNR) / 2 (``roc_curve``);
        - ``"precision"``: the lowest threshold whose calibration precision is ``>= target_precision``,
          which maximizes recall among those. If none reaches it, the detector's ``met`` flag is
          False, its message says so, and it falls back to its highest-precision threshold.

        Ties between equally good thresholds go to the lowest (the higher recall).
    target_precision : in (0, 1]; required for, and only for, ``objective="precision"``.
    delta : optional, in (0, 0.5), ``objective="precision"`` only: ask for a finite-sample guarantee.
        Candidate thresholds are tested from high to low (a Learn-Then-Test fixed sequence); at
        each, H0 "precision < target" gets the p-value ``P(Binomial(n, target) >= tp)`` of the tp
        true positives among its n predicted positives on the calibration split, and the sequence
        stops at the first candidate with p-value > delta. The threshold is the lowest candidate
        that passed. It is never lower than the plain precision threshold, and with probability at
        least 1 - delta over the calibration draw, every passing threshold, so the chosen one, has
        precision >= target on fresh data from the same distribution (per detector; the K
        detectors are not corrected jointly). The sequence starts at the first candidate with
        enough predicted positives to pass with one false positive among them, so one negative
        scoring above all positives does not end it; where it starts depends on the scores alone,
        never on the labels. If no candidate passes, ``met`` is False and the detector falls back
        as above (its precision then carries no guarantee).

    Returns
    -------
    Thresholds
        With each detector's calibration counts at its threshold.

    Notes
    -----
    Why not MAPIE (checked with 1.6.0): its ``BinaryClassificationController(risk="precision",
    fwer_method="fixed_sequence")`` runs the same kind of procedure, but with Hoeffding-Bentkus
    p-values (for a binary loss, e times the exact binomial tail used here), through a
    ``predict_proba`` callable over a grid of probability thresholds, and its sequence starts at the
    top of the grid, where a handful of predicted positives can never pass. On the Gaussian toy of
    ``tests/test_calibration.py`` (400 examples, target 0.9, delta 0.1) it found no threshold in 40
    of 40 draws (5 of 40 with its default Bonferroni-Holm), where this code passed in 39. So it
    would be one more dependency for less power than a dozen lines of scipy.

    Examples
    --------
    >>> s = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 3.0], [0.1, 1.0]])
    >>> t = fit_thresholds(s, torch.tensor([0, 0, 1, 1]), "f1")
    >>> t.thresholds.tolist()
    [0.5, 1.0]
    """
    s = _as_scores(scores)
    n, k = s.shape
    c = _as_contexts(contexts, n, k)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    if objective == "precision":
        if target_precision is None or not (0.0 < float(target_precision) <= 1.0):
            raise ValueError(f"objective='precision' needs target_precision in (0, 1]; got {target_precision!r}")
        target_precision = float(target_precision)
        if delta is not None:
            delta = float(delta)
            if not (0.0 < delta < 0.5):
                raise ValueError(f"delta must be in (0, 0.5), the allowed probability that the guarantee fails; got {delta!r}")
    else:
        if target_precision is not None:
            raise ValueError(f"target_precision is for objective='precision' only; got {target_precision!r} with {objective!r}")
        if delta is not None:
            raise ValueError(f"delta (a precision guarantee) is for objective='precision' only; got {delta!r} with {objective!r}")
    present = np.bincount(c, minlength=k)
    lacking = [j for j in range(k) if present[j] == 0 or present[j] == n]
    if lacking:
        raise ValueError(f"every context needs positives and negatives in the calibration split; "
                         f"contexts {lacking} have {[int(present[j]) for j in lacking]} of {n} examples")

    thresholds, met, messages, counts = [], [], [], []
    for j in range(k):
        y, score = c == j, s[:, j]
        if objective == "f1":
            t, ok, msg = _best_f1(y, score), True, ""
        elif objective == "balanced_accuracy":
            t, ok, msg = _best_balanced_accuracy(y, score), True, ""
        elif delta is None:
            t, ok, msg = _precision_target(y, score, target_precision)
        else:
            t, ok, msg = _precision_guaranteed(y, score, target_precision, delta)
        thresholds.append(t)
        met.append(ok)
        messages.append(f"detector {j}: {msg}" if msg else "")
        counts.append(binary_counts(torch.from_numpy(score >= t), torch.from_numpy(y)))
    return Thresholds(
        thresholds=torch.tensor(thresholds, dtype=torch.float64),
        objective=objective,
        target_precision=target_precision,
        delta=delta,
        met=tuple(met),
        messages=tuple(messages),
        counts=tuple(counts),
    )


def _pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import precision_recall_curve  # an optional dependency of the core: imported when used

    # scikit-learn appends a last point (precision 1, recall 0) with no threshold: drop it.
    precision, recall, thresholds = precision_recall_curve(y, score)
    return precision[:-1], recall[:-1], thresholds


def _best_f1(y: np.ndarray, score: np.ndarray) -> float:
    precision, recall, thresholds = _pr_curve(y, score)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(thresholds[int(np.argmax(f1))])  # thresholds ascend: argmax's first is the lowest


def _best_balanced_accuracy(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first point (fire on nothing) has threshold +inf
    fpr, tpr, thresholds = fpr[finite][::-1], tpr[finite][::-1], thresholds[finite][::-1]
    return float(thresholds[int(np.argmax((tpr + 1 - fpr) / 2))])


def _highest_precision(precision: np.ndarray, thresholds: np.ndarray) -> float:
    return float(thresholds[int(np.flatnonzero(precision == precision.max())[0])])


def _precision_target(y: np.ndarray, score: np.ndarray, target: float) -> tuple[float, bool, str]:
    precision, _, thresholds = _pr_curve(y, score)
    reaching = np.flatnonzero(precision >= target)
    if reaching.size:
        return float(thresholds[reaching[0]]), True, ""
    fallback = _highest_precision(precision, thresholds)
    return fallback, False, (f"no threshold reaches precision {target:g} on the calibration split "
                             f"(best {precision.max():.3f}); fell back to the highest-precision threshold {fallback:g}")


def _precision_guaranteed(y: np.ndarray, score: np.ndarray, target: float, delta: float) -> tuple[float, bool, str]:
    from scipy.stats import binom

    precision, _, thresholds = _pr_curve(y, score)
    # Candidates from high to low; n and tp count the calibration examples at or above each.
    candidates = thresholds[::-1]
    order = np.argsort(-score, kind="stable")
    sorted_scores, sorted_y = score[order], y[order]
    n = np.searchsorted(-sorted_scores, -candidates, side="right")
    tp = np.concatenate([[0], np.cumsum(sorted_y)])[n]
    p_values = binom.sf(tp - 1, n, target)
    # The sequence starts at the first candidate that would pass even with one false positive among
    # its n: where only tp = n could pass, one unlucky negative at the very top would end the whole
    # sequence. The start depends on n, i.e. on the scores alone, never on the labels.
    testable = np.flatnonzero(binom.sf(n - 2, n, target) <= delta)  # n grows down the sequence
    if testable.size:
        start = testable[0]
        failed = np.flatnonzero(p_values[start:] > delta)
        end = start + (failed[0] if failed.size else len(candidates) - start)
        if end > start:
            return float(candidates[end - 1]), True, ""
        reason = f"the first testable threshold {candidates[start]:g} has p-value {p_values[start]:.3g} > delta"
    else:
        reason = f"{len(y)} calibration examples are too few to pass at any threshold"
    fallback = _highest_precision(precision, thresholds)
    return fallback, False, (f"no threshold passes the test of precision >= {target:g} at delta {delta:g}: {reason}; "
                             f"fell back to the highest-precision threshold {fallback:g}, with no guarantee")


# -- deciding and routing --------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What calibrated detectors say about each example.

    Attributes
    ----------
    fires : (N, K) bool, detector k fires on example i (``scores[i, k] >= thresholds[k]``).
    routed : (N,) int64, the K-way answer: the one detector that fires, else by ``rule``
        (``-1``, ``ABSTAIN``, for ``"abstain"``).
    rule : ``"abstain"`` or ``"most_confident"``.
    zero, one, several : how many examples had no detector, exactly one, or more than one firing.
    """

    fires: torch.Tensor
    routed: torch.Tensor
    rule: str
    zero: int
    one: int
    several: int

    def firing_counts(self) -> dict[str, int]:
        return {"zero": self.zero, "one": self.one, "several": self.several}


def decide(scores: Any, thresholds: Thresholds, rule: str = "abstain") -> Decision:
    """Apply calibrated thresholds to scores, and route each example to one context.

    Parameters
    ----------
    scores : (N, K) detector scores (logits), e.g. on the test set.
    thresholds : from ``fit_thresholds`` on the calibration split.
    rule : what the routed answer is when zero or several detectors fire:

        - ``"abstain"``: ``-1`` unless exactly one fires (an honest "don't know");
        - ``"most_confident"``: the detector with the largest margin ``score - threshold`` (among
          those firing when several fire, the least far below when none does); always an answer.
          Margins are in logit units, so this assumes the detectors' logits are comparable, as
          they are for one network whose K outputs are trained alike.

    Returns
    -------
    Decision, with the counts of zero, one and several detectors firing.

    Examples
    --------
    >>> t = fit_thresholds(torch.tensor([[2.0, -1.0], [-1.0, 3.0]]), torch.tensor([0, 1]), "f1")
    >>> decide(torch.tensor([[2.5, 4.0], [0.0, 0.0]]), t, "most_confident").routed.tolist()
    [1, 0]
    """
    s = _as_scores(scores)
    _check_thresholds(thresholds, s.shape[1])
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    margin = torch.from_numpy(s) - thresholds.thresholds
    fires = margin >= 0
    firing = fires.sum(dim=1)
    exactly_one = firing == 1
    if rule == "abstain":
        routed = torch.where(exactly_one, fires.long().argmax(dim=1), torch.full_like(firing, ABSTAIN))
    else:
        routed = margin.argmax(dim=1)  # with exactly one firing, it has the only margin >= 0
    return Decision(
        fires=fires,
        routed=routed.long(),
        rule=rule,
        zero=int((firing == 0).sum()),
        one=int(exactly_one.sum()),
        several=int((firing > 1).sum()),
    )


# -- scoring before and after ----------------------------------------------------------------------
def detector_counts(scores: Any, contexts: Any, thresholds: Thresholds | None = None) -> list[BinaryCounts]:
    """Per-detector one-vs-rest counts; ``thresholds=None`` is the uncalibrated rule ``score > 0``."""
    s = _as_scores(scores)
    n, k = s.shape
    c = torch.from_numpy(_as_contexts(contexts, n, k))
    st = torch.from_numpy(s)
    if thresholds is None:
        fires = st > 0
    else:
        _check_thresholds(thresholds, k)
        fires = st >= thresholds.thresholds
    return [binary_counts(fires[:, j], c == j) for j in range(k)]


def detector_metrics(scores: Any, contexts: Any, thresholds: Thresholds | None = None) -> dict[str, float]:
    """Macro precision, recall and balanced accuracy of the K detectors (``metrics.macro``).

    Call it with ``thresholds=None`` (fire at logit > 0, as the tasks score detectors) and with the
    fitted thresholds on the same test scores to compare before and after calibration.
    """
    return macro(detector_counts(scores, contexts, thresholds))


# -- figure ----------------------------------------------------------------------------------------
def plot_precision_recall(
    scores: Any,
    contexts: Any,
    thresholds: Thresholds,
    path: str | Path,
    names: Sequence[str] | None = None,
    title: str = "Detector precision-recall curves",
) -> Path:
    """One PNG: each detector's precision-recall curve, its chosen threshold marked (filled dot)
    and the uncalibrated logit-0 point (hollow), with the precision target as a dashed line.

    Pass the calibration scores to see where the thresholds were chosen, or test scores to see
    where they land. Written atomically (``plotting.save_png``); returns the path.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from sklearn.metrics import precision_recall_curve as _curve

    s = _as_scores(scores)
    n, k = s.shape
    c = _as_contexts(contexts, n, k)
    _check_thresholds(thresholds, k)
    names = [f"context {j}" for j in range(k)] if names is None else list(names)
    if len(names) != k:
        raise ValueError(f"names has {len(names)} entries for K = {k} detectors")
    colors = context_colors(k)
    chosen = detector_counts(s, c, thresholds)
    before = detector_counts(s, c, None)
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.add_subplot()
    for j in range(k):
        y = c == j
        if not y.any() or y.all():
            continue  # no curve without positives and negatives
        precision, recall, _ = _curve(y, s[:, j])
        ax.plot(recall, precision, color=colors[j], lw=1.5, drawstyle="steps-post", label=names[j])
        ax.plot(chosen[j].recall, chosen[j].precision, "o", color=colors[j], ms=8, mec="black")
        ax.plot(before[j].recall, before[j].precision, "o", mfc="none", mec=colors[j], ms=8, mew=1.5)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", color="gray", mec="black", ms=8, label="chosen threshold"),
                Line2D([], [], ls="", marker="o", mfc="none", mec="gray", ms=8, mew=1.5, label="logit 0 (uncalibrated)")]
    if thresholds.target_precision is not None:
        ax.axhline(thresholds.target_precision, color="dimgray", ls="--", lw=1)
        handles.append(Line2D([], [], color="dimgray", ls="--", lw=1, label=f"target precision {thresholds.target_precision:g}"))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    guarantee = f", delta {thresholds.delta:g}" if thresholds.delta is not None else ""
    ax.set_title(f"{title}\n(objective: {thresholds.objective}{guarantee})")
    return save_png(fig, path)


__all__ = [
    "ABSTAIN", "Decision", "OBJECTIVES", "RULES", "Thresholds", "decide", "detector_counts",
    "detector_metrics", "fit_thresholds", "plot_precision_recall",
]
