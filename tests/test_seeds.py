"""Seed statistics on hand-checked inputs, summary records, and a replicate run that resumes seed by seed."""

import json
import math

import pytest

from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.errors import ConfigError
from routing_lottery.report import markdown_table
from routing_lottery.run import Replicates, make_runner
from routing_lottery.seeds import interval_of, paired_comparisons, summarize_seeds
from routing_lottery.statistics import Interval, mean_interval, paired_test

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)
T_975_DF4 = 2.7764451051977987


def test_the_interval_of_known_values_is_students_t():
    interval = mean_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # sample sd of 1, 2, 3 is 1
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.low == pytest.approx(2.0 - half) and interval.high == pytest.approx(2.0 + half)
    assert mean_interval([0.7]).low is None  # one seed: no interval, not a zero-width one
    assert mean_interval([5.0, 5.0, 5.0]).half_width == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_the_paired_test_on_a_case_with_a_known_answer():
    # differences 1..5, all positive: the exact two-sided Wilcoxon p is 2 / 2**5 (only the all-positive and
    # all-negative sign patterns are as extreme); the paired t statistic is 3 / (sd / sqrt 5) with sd = sqrt(2.5)
    test = paired_test([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    assert test.p_wilcoxon == pytest.approx(2 / 32)
    t = 3 / (math.sqrt(2.5) / math.sqrt(5))
    assert t == pytest.approx(4.242640687)
    assert test.p_t == pytest.approx(0.013236, abs=1e-6)  # 2 * (1 - F_t4(4.2426)), from tables
    assert test.difference.mean == 3.0
    assert test.difference.high - 3.0 == pytest.approx(T_975_DF4 * math.sqrt(2.5) / math.sqrt(5))
    same = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same.p_wilcoxon == 1.0 and same.p_t is None and same.difference.mean == 0.0
    # the order of the pairs does not matter, the pairing does
    assert paired_test([1, 3, 2], [0, 1, 1]).p_t == pytest.approx(paired_test([3, 1, 2], [1, 0, 1]).p_t)
    with pytest.raises(ValueError, match="same length"):
        paired_test([1.0, 2.0], [1.0])


def _records():
    rows = []
    for seed, (single, rtl) in enumerate([(0.80, 0.85), (0.82, 0.88), (0.78, 0.86)]):
        for method, value, params in (("single_imp", single, 100), ("rtl", rtl, 130 + seed)):
            rows.append({"experiment": "toy", "seed": seed, "method": method, "sparsity": 0.5,
                         "balanced_accuracy": value, "balanced_accuracy_context_0": value, "parameters": params,
                         "target_met": seed == 0})
    return rows


def test_summary_records_carry_mean_interval_and_n():
    summary = {r["method"]: r for r in summarize_seeds(_records())}
    rtl = summary["rtl"]
    assert rtl["n"] == 3 and rtl["seeds"] == [0, 1, 2]
    assert rtl["balanced_accuracy"] == pytest.approx((0.85 + 0.88 + 0.86) / 3)
    expected = mean_interval([0.85, 0.88, 0.86])
    assert (rtl["balanced_accuracy_low"], rtl["balanced_accuracy_high"]) == pytest.approx((expected.low, expected.high))
    assert rtl["parameters"] == pytest.approx(131.0)
    assert "balanced_accuracy_context_0_low" not in rtl  # per-context breakdowns: the mean only
    assert rtl["target_met"] == pytest.approx(1 / 3)  # a flag becomes the share of seeds where it held
    single = interval_of(summary["single_imp"], "balanced_accuracy")
    assert interval_of(rtl, "balanced_accuracy").overlaps(single)  # [0.825, 0.901] and [0.750, 0.850] share points
    assert not Interval(0.95, 0.9, 1.0, 3).overlaps(single) and Interval(0.84, None, None, 1).overlaps(single)
    table = markdown_table(list(summary.values()))
    half = (expected.high - expected.low) / 2
    assert f"{rtl['balanced_accuracy']:.3f} ± {half:.3f}" in table and "_low" not in table


def test_paired_comparisons_pair_by_seed():
    [row] = paired_comparisons(_records())
    assert row["comparison"] == "RTL - single IMP" and row["n"] == 3
    assert row["difference"] == pytest.approx((0.05 + 0.06 + 0.08) / 3)
    assert row["p_wilcoxon"] == pytest.approx(0.25)  # three positive differences: 2 / 2**3
    # a seed that one method lacks is left out of the pairs
    partial = [r for r in _records() if not (r["seed"] == 2 and r["method"] == "rtl")]
    assert paired_comparisons(partial)[0]["n"] == 2


TINY = {"data": {"train_per_class": 8, "test_per_class": 4, "image_size": 8, "calibration": 0.0},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.5},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}, "methods": ["single_imp", "rtl"],
        "deploy": {"routers": []}}


@pytest.mark.slow
def test_a_killed_replicate_run_resumes_seed_by_seed(tmp_path, monkeypatch):
    config = load_config(packaged_config("digits"), "smoke", {**TINY, "replicates": 2, "seed": 7})
    runner = make_runner(config, tmp_path)
    assert isinstance(runner, Replicates) and runner.seeds == [7, 8]

    from routing_lottery.run.experiment import Experiment

    real = Experiment._run_all
    calls = []

    def dies_on_the_second_seed(self):
        calls.append(self.config.seed)
        if self.config.seed == 8:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Experiment, "_run_all", dies_on_the_second_seed)
    with pytest.raises(KeyboardInterrupt):
        runner.run_all()
    assert (tmp_path / "seeds" / "7" / "results.json").exists() and not (tmp_path / "results.json").exists()
    monkeypatch.setattr(Experiment, "_run_all", real)

    fitted = []
    from routing_lottery.methods import METHODS

    rtl = METHODS.get("rtl")
    real_fit = type(rtl).fit
    monkeypatch.setattr(type(rtl), "fit", lambda self, run, level: fitted.append(run.config.seed) or real_fit(self, run, level))
    summary = make_runner(config, tmp_path).run_all()
    assert fitted == [8]  # seed 7's records were reused from disk
    by = {r["method"]: r for r in summary}
    assert by["rtl"]["n"] == 2 and by["rtl"]["seeds"] == [7, 8]
    per_seed = json.loads((tmp_path / "replicates.json").read_text())
    assert {r["seed"] for r in per_seed} == {7, 8}
    solo = json.loads((tmp_path / "seeds" / "8" / "results.json").read_text())
    rtl8 = next(r for r in solo if r["method"] == "rtl")
    rtl7 = next(r for r in per_seed if r["method"] == "rtl" and r["seed"] == 7)
    assert by["rtl"]["balanced_accuracy"] == pytest.approx((rtl7["balanced_accuracy"] + rtl8["balanced_accuracy"]) / 2)
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert [p["comparison"] for p in paired] == ["RTL - single IMP", "RTL, argmax - single IMP"]
    assert "Paired over seeds" in (tmp_path / "results.md").read_text()
    # another recipe on the same directory is refused; more seeds resume
    with pytest.raises(ConfigError, match="training.epochs"):
        make_runner(config.replace(training={"epochs": 2}), tmp_path)
    assert make_runner(config.replace(replicates=3), tmp_path).seeds == [7, 8, 9]


def test_replicates_must_be_positive():
    with pytest.raises(ConfigError, match="replicates must be >= 1"):
        load_config(packaged_config("digits"), "smoke", {"replicates": 0})


def test_a_diverged_seed_shows_and_labels_do_not_split_groups():
    rows = [{"method": "rtl", "sparsity": 0.5, "seed": s, "psnr": v, "note": f"seed {s}", "kind": "mlp"}
            for s, v in enumerate([30.0, float("nan"), 31.0])]
    [summary] = summarize_seeds(rows)
    assert summary["n"] == 3 and math.isnan(summary["psnr"]) and summary["psnr_nonfinite"] == 1
    assert summary["kind"] == "mlp" and "note" not in summary  # agreed labels kept, differing ones dropped
