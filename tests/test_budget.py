"""The training-budget study (issue 26): a tiny study on the digits, checked against its own runs' files by hand,
resumed without training, refused on bad input before anything runs; the budget helpers and the paper-regime reading."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from routing_lottery.budget import (
    BudgetResult, Point, closest_budget, epoch_points, learning_rate_points, load_budget, paper_regime_point,
    per_class_points, point_configs, regime_markdown, samples_seen, budget_study,
)
from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.errors import ConfigError
from routing_lottery.training import Stream

DIGITS = packaged_config("digits")
TINY = {"data": {"test_per_class": 4, "image_size": 8, "calibration": 0.0}, "model": {"options": {"width": 0.25}},
        "pruning": {"step": 0.5}, "training": {"batch_size": 32}, "deploy": {"routers": []}}
PER_CLASS = (6, 10)
SEEDS = 2
METRIC = "balanced_accuracy"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    result = budget_study(DIGITS, out, per_class_points(PER_CLASS), SEEDS, [0.5], scale="smoke", overrides=TINY,
                          log=lambda m: None)
    return out, result


def _seed_records(out: Path, point: str) -> dict[tuple[str, float, int], dict]:
    """(method, sparsity, seed) -> the record each seed's own run wrote to its results.json."""
    found = {}
    for seed_dir in sorted((out / "points" / point / "seeds").iterdir()):
        for r in json.loads((seed_dir / "results.json").read_text()):
            assert r["seed"] == int(seed_dir.name)
            found[(r["method"], float(r["sparsity"]), r["seed"])] = r
    return found


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    x = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


@pytest.mark.slow
def test_the_study_writes_its_files_and_its_numbers_are_the_runs_numbers(study):
    out, result = study
    assert json.loads((out / "budget.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    assert (out / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "budget.md").read_text()
    assert "## Sparsity 50%" in text and "`per_class_6`" in text and "RTL - multiple IMP" in text
    assert result.seeds == [0, 1] and result.levels == [0.5] and result.metric == METRIC
    for point in ("per_class_6", "per_class_10"):
        runs = _seed_records(out, point)
        expected_methods = {"dense", "single_imp", "multi_imp", "multi_imp+argmax", "rtl", "rtl+argmax"}
        assert {m for m, _, _ in runs} == expected_methods
        for method, level in {(m, lv) for m, lv, _ in runs}:
            row = result.value(point, level, method)
            values = [runs[(method, level, s)][METRIC] for s in result.seeds]
            mean, low, high = _t_interval(values)
            assert row["n"] == SEEDS and row["seeds"] == result.seeds
            assert row[METRIC] == pytest.approx(mean) and row[METRIC + "_low"] == pytest.approx(low)
            assert row[METRIC + "_high"] == pytest.approx(high)
            assert row["recall"] == pytest.approx(np.mean([runs[(method, level, s)]["recall"] for s in result.seeds]))
        for other, label in (("single_imp", "RTL - single IMP"), ("multi_imp", "RTL - multiple IMP"),
                             ("single_imp", "RTL, argmax - single IMP")):
            ours = "rtl+argmax" if "argmax" in label else "rtl"
            [paired] = [c for c in result.paired if c["point"] == point and c["comparison"] == label]
            d = [runs[(ours, 0.5, s)][METRIC] - runs[(other, 0.5, s)][METRIC] for s in result.seeds]
            assert paired["difference"] == pytest.approx(np.mean(d)) and paired["n"] == SEEDS
        # equal samples: single IMP trains twice the epochs on all N images, the 10 detectors see ~2N per epoch
        n_train = 10 * int(point.rsplit("_", 1)[1])
        seen = {m: result.value(point, 0.5, m)["samples_seen"] for m in ("dense", "single_imp", "multi_imp", "rtl")}
        assert seen["dense"] == 2 * n_train and seen["single_imp"] == 2 * (1 + 1) * n_train
        assert seen["rtl"] == seen["multi_imp"] == seen["single_imp"]
    assert load_budget(out).rows == result.rows


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_leaves_every_finished_file_alone(study, monkeypatch):
    out, result = study
    kept = [p for p in (out / "points").rglob("*") if p.is_file() and
            ({"records", "imp", "checkpoints", "train"} & set(p.relative_to(out).parts) or p.name == "theta0.safetensors")]
    assert any("imp" in p.parts for p in kept) and any("checkpoints" in p.parts for p in kept)
    before = {p: p.stat().st_mtime_ns for p in kept}

    from routing_lottery.methods import METHODS

    def refuse(*args, **kwargs):
        raise AssertionError("a finished budget point was trained again")

    for name in ("dense", "single_imp", "multi_imp", "rtl"):
        monkeypatch.setattr(type(METHODS.get(name)), "fit", refuse)
    # IMP rounds recomputed would be saved again: the unchanged mtimes of imp/ below say they were read
    again = budget_study(DIGITS, out, per_class_points(PER_CLASS), SEEDS, [0.5], scale="smoke", overrides=TINY,
                         log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    assert again.rows == result.rows and again.paired == result.paired


@pytest.mark.parametrize("points, seeds, overrides, expected", [
    ([], 2, {}, "at least one budget point"),
    ([Point("typo", {"training": {"imp_epoch": 2}})], 2, {}, r"budget point 'typo'.*training\.imp_epoch"),
    ([Point("a", {"training": {"epochs": 0}})], 2, {}, r"budget point 'a'.*training\.epochs must be >= 1"),
    (per_class_points([5]), 0, {}, "seeds must be an integer >= 1"),
    (per_class_points([5, 5]), 2, {}, r"repeated: \['per_class_5'\]"),
    ([Point("a", {"replicates": 3})], 2, {}, "budget point 'a': replicates cannot be overridden.*seeds argument"),
    ([Point("a", {"seed": 3})], 2, {}, "budget point 'a': seed cannot be overridden.*same seeds"),
    ([Point("a", {"pruning": {"sparsities": [0.9]}})], 2, {}, "pruning.sparsities cannot be overridden.*levels argument"),
    (per_class_points([5]), 2, {"methods": ["rtl"]}, "overrides: methods cannot be overridden"),
])
def test_bad_input_is_refused_by_name_before_anything_runs(tmp_path, points, seeds, overrides, expected):
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=expected):
        budget_study(DIGITS, out, points, seeds, [0.5], scale="smoke", overrides=overrides, log=lambda m: None)
    assert not out.exists()


def test_a_bad_point_name_or_level_is_refused():
    with pytest.raises(ConfigError, match="names the point's directory"):
        Point("../up", {})
    with pytest.raises(ConfigError, match="overrides must be a mapping"):
        Point("a", [("training", 1)])
    with pytest.raises(ConfigError, match="sparsity level > 0"):
        point_configs(DIGITS, per_class_points([5]), 2, [0.0], scale="smoke")


def test_the_budget_helpers_make_the_points_they_say():
    base = load_config(DIGITS)  # imp_epochs 3, epochs 6
    points = epoch_points([1, 2, 1 / 3], base)
    assert [p.name for p in points] == ["epochs_x1", "epochs_x2", "epochs_x0.333333"]
    assert [p.overrides["training"] for p in points] == [{"imp_epochs": 3, "epochs": 6}, {"imp_epochs": 6, "epochs": 12},
                                                         {"imp_epochs": 1, "epochs": 2}]
    with pytest.raises(ConfigError, match=r"imp_epochs 3 x 0.5 = 1.5"):
        epoch_points([0.5], base)
    with pytest.raises(ConfigError, match="positive finite"):
        epoch_points([0], base)
    assert [p.overrides for p in per_class_points([40, None])] == [{"data": {"train_per_class": 40}},
                                                                  {"data": {"train_per_class": None}}]
    with pytest.raises(ConfigError, match="integers >= 1"):
        per_class_points([0])
    assert learning_rate_points([1e-4])[0].overrides == {"training": {"optimizer": {"lr": 1e-4}}}
    regime = paper_regime_point(lr=1e-4, train_per_class=20)
    assert regime.overrides == {"training": {"imp_epochs": 1, "epochs": 1, "optimizer": {"lr": 1e-4}},
                                "data": {"train_per_class": 20}}
    assert "imp_epochs 1, epochs 1, lr 0.0001, train_per_class 20" in regime.note
    configs = point_configs(DIGITS, [*epoch_points([2], base), regime], 5, [0.5])  # every override is a real setting
    assert configs["paper_regime"].training.optimizer.lr == 1e-4 and configs["paper_regime"].replicates == 5
    assert configs["epochs_x2"].training.epochs == 12 and configs["epochs_x2"].pruning.sparsities == (0.5,)


def _stream(name: str, sizes: list[int]) -> Stream:
    batches = [(torch.zeros(n, 1), torch.zeros(n)) for n in sizes]
    return Stream(name, lambda gen: list(batches), lambda a, b: a.sum(), len(sizes))


def test_samples_seen_counts_each_methods_training_from_the_streams():
    # two contexts of unequal size: joint retraining cycles the smaller one's batch up to the larger's count
    detectors = [_stream("a", [2, 2, 1]), _stream("b", [2])]
    tickets = SimpleNamespace(level_round={0.5: 1})  # level 0.5 is reached after the second IMP round
    run = SimpleNamespace(detectors=detectors, classifier=_stream("all", [3, 2]), factor=2, tickets=tickets,
                          shared_tickets=SimpleNamespace(level_round={0.5: 0}),
                          config=SimpleNamespace(training=SimpleNamespace(imp_epochs=3, epochs=4)))
    seen = samples_seen(run, [0.5])
    assert seen[("dense", 0.0)] == 2 * 4 * 5
    assert seen[("single_imp", 0.5)] == 2 * (3 * 1 + 4) * 5
    assert seen[("multi_imp", 0.5)] == (3 * 2 + 4) * 7
    assert seen[("rtl", 0.5)] == 3 * 2 * 7 + 4 * (5 + 3 * 2)
    assert samples_seen(SimpleNamespace(), [0.5]) == {}  # a run without streams (several parts): not counted


def _hand_made(values: dict[str, float]) -> BudgetResult:
    rows, paired = [], []
    for i, (point, value) in enumerate(values.items()):
        rows.append({"point": point, "sparsity": 0.5, "method": "single_imp", "n": 3, "seeds": [0, 1, 2],
                     "samples_seen": 100 * (i + 1), "balanced_accuracy": value, "balanced_accuracy_low": value - 0.01,
                     "balanced_accuracy_high": value + 0.01, "recall": value, "recall_low": None, "recall_high": None})
        paired.append({"point": point, "sparsity": 0.5, "comparison": "RTL - single IMP", "metric": "balanced_accuracy",
                       "n": 3, "difference": 0.1 * i, "difference_low": None, "difference_high": None,
                       "p_wilcoxon": 0.25, "p_t": 0.1})
    return BudgetResult(Path("."), "digits.yaml", None, "balanced_accuracy", ["balanced_accuracy", "recall"], [0, 1, 2],
                        [0.5], ["single_imp", "rtl"], [{"name": p} for p in values], rows, paired)


def test_the_budget_closest_to_the_papers_single_mask_accuracy_is_read_not_searched():
    result = _hand_made({"tiny": 0.30, "small": 0.52, "medium": 0.90})
    [match] = closest_budget(result)  # recall against the paper's 48 %
    assert (match.point, match.value, match.bracketed) == ("small", 0.52, True)
    assert match.distance == pytest.approx(0.04) and match.samples_seen == 200
    assert [c["difference"] for c in match.comparisons] == [pytest.approx(0.1)]  # RTL's test at that point only
    [low] = closest_budget(result, target=0.1)
    assert (low.point, low.bracketed) == ("tiny", False)  # below every point: an end of the range, said so
    assert "an end of the range" in regime_markdown([low]) and "point `tiny`" in regime_markdown([low])
    [tie] = closest_budget(_hand_made({"more": 0.5, "fewer": 0.46}), target=0.48, metric="balanced_accuracy")
    assert tie.point == "more" and tie.low == pytest.approx(0.49)  # equal distance: the smaller budget (100 samples)
    with pytest.raises(ValueError, match="metric 'psnr' is not in the study's results"):
        closest_budget(result, metric="psnr")
    with pytest.raises(ValueError, match="no finite recall of method 'rtl'"):
        closest_budget(result, method="rtl")


def test_the_command_names_what_is_missing(tmp_path):
    from typer.testing import CliRunner

    from routing_lottery.cli import app

    result = CliRunner().invoke(app, ["budget", "digits", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "name the budgets to compare" in result.output
    result = CliRunner().invoke(app, ["budget", "digits", "--epochs", "1,x", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "--epochs expects comma-separated" in result.output
    assert not (tmp_path / "b").exists()
