"""Calibrated detectors on synthetic scores where the right threshold is known by hand."""

import inspect
import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from routing_lottery.calibration import (
    ABSTAIN,
    Thresholds,
    decide,
    detector_counts,
    detector_metrics,
    fit_thresholds,
    plot_precision_recall,
)
from routing_lottery.metrics import BinaryCounts, macro


def two_detectors(pos0, neg0):
    """(N, 2) scores and contexts: detector 0 sees ``pos0`` on context 0 and ``neg0`` on context 1;
    detector 1 is the mirror image, so both detectors have positives and negatives."""
    s0 = torch.tensor(list(pos0) + list(neg0), dtype=torch.float64)
    contexts = torch.tensor([0] * len(pos0) + [1] * len(neg0))
    return torch.stack([s0, -s0], dim=1), contexts


def gaussian_scores(n, rng, k=2, pos_mean=2.0, neg_mean=0.0, neg_std=1.0):
    """Detector j's score is N(pos_mean, 1) on context j and N(neg_mean, neg_std) elsewhere."""
    contexts = rng.integers(0, k, n)
    scores = rng.normal(neg_mean, neg_std, (n, k))
    scores[np.arange(n), contexts] = rng.normal(pos_mean, 1.0, n)
    return torch.from_numpy(scores), torch.from_numpy(contexts)


def population_precision(t, pos_mean=2.0, neg_mean=0.0, k=2):
    """Precision of ``score >= t`` on unlimited fresh data from ``gaussian_scores``."""
    tp = norm.sf(t - pos_mean) / k
    fp = norm.sf(t - neg_mean) * (k - 1) / k
    return tp / (tp + fp)


# -- objectives ------------------------------------------------------------------------------------
def test_best_f1_threshold_by_hand():
    # Thresholds 3, 2, 1, 0.5, -1 give F1 0.5, 0.8, 0.667, 0.857, 0.75: the best is 0.5.
    scores, contexts = two_detectors([3.0, 2.0, 0.5], [1.0, -1.0, -2.0])
    t = fit_thresholds(scores, contexts, "f1")
    assert t.thresholds[0].item() == 0.5
    assert t.counts[0] == BinaryCounts(tp=3, fp=1, fn=0, tn=2)
    assert t.met == (True, True) and t.messages == ("", "")


def test_balanced_accuracy_and_f1_disagree_by_hand():
    # Two positives (3, 0) among eight negatives. At 3: F1 0.667, BA 0.75. At 0: F1 0.571, BA 0.8125.
    scores, contexts = two_detectors([3.0, 0.0], [2.0, 1.5, 1.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    assert fit_thresholds(scores, contexts, "f1").thresholds[0].item() == 3.0
    t = fit_thresholds(scores, contexts, "balanced_accuracy")
    assert t.thresholds[0].item() == 0.0
    assert t.counts[0] == BinaryCounts(tp=2, fp=3, fn=0, tn=5)


@pytest.mark.parametrize("objective,kwargs", [
    ("f1", {}), ("balanced_accuracy", {}), ("precision", {"target_precision": 0.99}),
])
def test_separable_scores_give_perfect_detectors(objective, kwargs):
    scores, contexts = two_detectors(np.linspace(2.0, 6.0, 40), np.linspace(-3.0, 1.0, 40))
    t = fit_thresholds(scores, contexts, objective, **kwargs)
    assert t.all_met
    for counts in t.counts:
        assert counts.precision == 1.0 and counts.recall == 1.0
    assert t.thresholds[0].item() == 2.0  # the lowest positive score: the highest recall at precision 1


def test_precision_target_is_lowest_threshold_reaching_it():
    rng = np.random.default_rng(0)
    scores, contexts = gaussian_scores(400, rng)
    t = fit_thresholds(scores, contexts, "precision", target_precision=0.85)
    assert t.all_met
    for j in range(2):
        chosen = t.thresholds[j].item()
        assert t.counts[j].precision >= 0.85
        y = contexts == j
        for lower in scores[:, j][scores[:, j] < chosen].unique():
            fires = scores[:, j] >= lower
            assert (fires & y).sum().item() / fires.sum().item() < 0.85


def test_impossible_precision_target_is_flagged_with_fallback():
    # A negative above every positive: precision at 2, 1, 0.5, -1 is 0, 0.5, 0.667, 0.5.
    scores, contexts = two_detectors([1.0, 0.5], [2.0, -1.0])
    t = fit_thresholds(scores, contexts, "precision", target_precision=0.9)
    assert t.met[0] is False and not t.all_met
    assert "detector 0" in t.messages[0] and "no threshold reaches precision 0.9" in t.messages[0]
    assert t.thresholds[0].item() == 0.5  # the highest-precision threshold
    assert t.counts[0].precision == pytest.approx(2 / 3)


# -- the finite-sample guarantee -------------------------------------------------------------------
def test_guarantee_on_separable_scores_is_met():
    scores, contexts = two_detectors(np.linspace(2.0, 6.0, 100), np.linspace(-3.0, 1.0, 100))
    t = fit_thresholds(scores, contexts, "precision", target_precision=0.95, delta=0.2)
    assert t.all_met and t.messages == ("", "")
    # The sequence may pass below the lowest positive (at n = 101, tp = 100 the p-value is 0.035),
    # but every threshold it passes has calibration precision above target.
    assert t.counts[0].recall == 1.0 and t.counts[0].precision >= 0.95


@pytest.mark.parametrize("seed", range(5))
def test_guarantee_is_at_least_as_high_as_plain_threshold(seed):
    scores, contexts = gaussian_scores(300, np.random.default_rng(seed), k=3)
    plain = fit_thresholds(scores, contexts, "precision", target_precision=0.8)
    guaranteed = fit_thresholds(scores, contexts, "precision", target_precision=0.8, delta=0.1)
    assert bool((guaranteed.thresholds >= plain.thresholds).all())
    assert guaranteed.delta == 0.1 and guaranteed.target_precision == 0.8
    for counts, met in zip(guaranteed.counts, guaranteed.met):
        assert not met or counts.precision >= 0.8


def test_guarantee_controls_precision_on_fresh_data():
    # A threshold that passed the test has precision below target on unlimited fresh data in at most
    # delta of the calibration draws; the plain point estimate misses about half the time. (A draw
    # where no threshold passes is flagged, not a miss: the run says it has no guarantee.)
    rng = np.random.default_rng(1)
    target, delta, repetitions = 0.9, 0.1, 200
    misses = {"plain": 0, "guaranteed": 0}
    met = 0
    for _ in range(repetitions):
        scores, contexts = gaussian_scores(400, rng)
        plain = fit_thresholds(scores, contexts, "precision", target_precision=target)
        guaranteed = fit_thresholds(scores, contexts, "precision", target_precision=target, delta=delta)
        assert plain.met[0]
        misses["plain"] += population_precision(plain.thresholds[0].item()) < target
        if guaranteed.met[0]:
            met += 1
            misses["guaranteed"] += population_precision(guaranteed.thresholds[0].item()) < target
    assert met >= 0.8 * repetitions
    assert misses["guaranteed"] <= delta * repetitions
    assert misses["plain"] > 0.25 * repetitions


def test_guarantee_with_too_few_examples_is_flagged():
    # Passing at target 0.9, delta 0.1 needs at least 22 predicted positives: there are 6.
    scores, contexts = two_detectors([2.0, 3.0, 4.0], [-1.0, 0.0, 1.0])
    t = fit_thresholds(scores, contexts, "precision", target_precision=0.9, delta=0.1)
    assert t.met == (False, False)
    assert "too few" in t.messages[0] and "no guarantee" in t.messages[0]
    assert t.counts[0].precision == 1.0  # fell back to the highest-precision threshold


# -- inputs ----------------------------------------------------------------------------------------
def test_fit_takes_calibration_arrays_only():
    assert list(inspect.signature(fit_thresholds).parameters) == [
        "scores", "contexts", "objective", "target_precision", "delta"]
    assert "never the test set" in fit_thresholds.__doc__


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(4), torch.tensor([0, 1, 0, 1]), "f1"), {}, "scores must be"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0]), "f1"), {}, "contexts must be"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0, 2]), "f1"), {}, "0..1"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), "recall"), {}, "objective"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), "precision"), {}, "target_precision"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), "f1"), {"delta": 0.1}, "delta"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), "precision"), {"target_precision": 0.9, "delta": 0.7}, "delta"),
    ((torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), "f1"), {}, r"contexts \[2\]"),
    ((torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), "f1"), {}, "finite"),
])
def test_fit_refuses_bad_inputs_by_name(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_thresholds(*args, **kwargs)


# -- deciding --------------------------------------------------------------------------------------
def fixed(thresholds):
    k = len(thresholds)
    return Thresholds(thresholds=torch.tensor(thresholds, dtype=torch.float64), objective="f1",
                      target_precision=None, delta=None, met=(True,) * k, messages=("",) * k,
                      counts=(BinaryCounts(0, 0, 0, 0),) * k)


def test_decide_rules_on_hand_made_scores():
    t = fixed([0.0, 5.0, 0.0])
    scores = torch.tensor([
        [1.0, 0.0, -1.0],   # one fires: 0
        [-1.0, 4.5, -2.0],  # none fires; margins -1, -0.5, -2: most confident 1
        [1.0, 5.5, -1.0],   # two fire; margins 1, 0.5: most confident 0 (not the larger score)
        [0.0, 6.0, 0.0],    # all three fire at or above threshold; margins 0, 1, 0: 1
        [-3.0, 0.0, 0.5],   # one fires: 2
    ])
    abstain = decide(scores, t, "abstain")
    assert abstain.routed.tolist() == [0, ABSTAIN, ABSTAIN, ABSTAIN, 2]
    assert abstain.firing_counts() == {"zero": 1, "one": 2, "several": 2}
    assert abstain.fires.tolist()[3] == [True, True, True]
    confident = decide(scores, t, "most_confident")
    assert confident.routed.tolist() == [0, 1, 0, 1, 2]
    assert (confident.zero, confident.one, confident.several) == (1, 2, 2)
    assert confident.routed.dtype == torch.int64


def test_decide_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="K = 2"):
        decide(torch.zeros(3, 2), fixed([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="rule"):
        decide(torch.zeros(3, 3), fixed([0.0, 0.0, 0.0]), "vote")


# -- before and after ------------------------------------------------------------------------------
def test_detector_metrics_before_is_logit_zero():
    scores = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0]])
    contexts = torch.tensor([0, 0, 1])
    # score > 0, strictly: example 0 is not claimed by detector 0.
    assert detector_counts(scores, contexts) == [BinaryCounts(1, 1, 1, 0), BinaryCounts(1, 1, 0, 1)]
    assert detector_metrics(scores, contexts) == macro(detector_counts(scores, contexts))


def test_calibration_raises_precision_of_recall_biased_detectors():
    # Negatives centred at logit 1: at logit 0 most negatives fire (high recall, low precision).
    rng = np.random.default_rng(2)
    cal_scores, cal_contexts = gaussian_scores(600, rng, k=3, pos_mean=3.0, neg_mean=1.0)
    test_scores, test_contexts = gaussian_scores(600, rng, k=3, pos_mean=3.0, neg_mean=1.0)
    t = fit_thresholds(cal_scores, cal_contexts, "precision", target_precision=0.8)
    before = detector_metrics(test_scores, test_contexts)
    after = detector_metrics(test_scores, test_contexts, t)
    assert before["recall"] > 0.95 and before["precision"] < 0.5
    assert after["precision"] > 0.7 and after["precision"] > before["precision"] + 0.2


# -- saving and plotting ---------------------------------------------------------------------------
def test_thresholds_dict_round_trip_is_exact():
    rng = np.random.default_rng(3)
    scores, contexts = gaussian_scores(200, rng, k=3)
    scores = scores.float()  # float32 scores: thresholds must survive float64 and JSON exactly
    for t in (fit_thresholds(scores, contexts, "f1"),
              fit_thresholds(scores, contexts, "precision", target_precision=0.99, delta=0.05)):
        text = json.dumps(t.to_dict(), allow_nan=False)
        back = Thresholds.from_dict(json.loads(text))
        assert back == t
        assert torch.equal(back.thresholds, t.thresholds) and back.thresholds.dtype == torch.float64
        assert (back.met, back.messages, back.counts) == (t.met, t.messages, t.counts)
        assert decide(scores, back).routed.tolist() == decide(scores, t).routed.tolist()
    with pytest.raises(ValueError, match="format_version"):
        Thresholds.from_dict({**t.to_dict(), "format_version": 99})


def test_precision_recall_png_is_written(tmp_path):
    rng = np.random.default_rng(4)
    scores, contexts = gaussian_scores(200, rng, k=3)
    t = fit_thresholds(scores, contexts, "precision", target_precision=0.8)
    path = plot_precision_recall(scores, contexts, t, tmp_path / "pr.png", names=["a", "b", "c"])
    assert path == tmp_path / "pr.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pr.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="names"):
        plot_precision_recall(scores, contexts, t, tmp_path / "x.png", names=["a"])
