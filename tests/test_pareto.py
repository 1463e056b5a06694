"""Equal-storage comparison on hand-made records whose answers can be read off: which point fits each
budget, the verdicts, the table's counts and the figure."""

import pytest

from routing_lottery.pareto import budget_comparison, budget_markdown, pareto_frontier, plot_pareto

PNG = b"\x89PNG\r\n\x1a\n"
METRIC = "balanced_accuracy"


def _row(method, sparsity, value, parameters, half=0.01, **extra):
    """A summary record over 5 seeds with interval value ± half (half=None: one seed, no interval)."""
    row = {"experiment": "x", "method": method, "sparsity": sparsity, METRIC: value, "parameters": parameters,
           "n": 5 if half is not None else 1, **extra}
    if half is not None:
        row[METRIC + "_low"], row[METRIC + "_high"] = value - half, value + half
    return row


def _records(half=0.01):
    """RTL's budgets 30k, 20k, 10k; single IMP at 25k, 20k (dominated by 15k), 15k and 8k.

    Budget 30k: single IMP's best is 25k (0.90), RTL 0.85 lies below -> behind.
    Budget 20k: the 20k point (0.84) fits but the 15k point is better (0.86) -> chosen; RTL 0.865 overlaps.
    Budget 10k: only 8k fits (0.70); RTL 0.80 lies above -> ahead.
    Multiple IMP's smallest point (40k) and dense (100k) exceed every budget.
    """
    return [
        _row("dense", 0.0, 0.95, 100_000),
        _row("rtl", 0.5, 0.85, 30_000), _row("rtl", 0.75, 0.865, 20_000), _row("rtl", 0.9, 0.80, 10_000),
        _row("rtl+argmax", 0.5, 0.99, 30_000), _row("rtl+argmax", 0.9, 0.99, 10_000),
        _row("single_imp", 0.5, 0.90, 25_000, half=half), _row("single_imp", 0.6, 0.84, 20_000, half=half),
        _row("single_imp", 0.75, 0.86, 15_000, half=half), _row("single_imp", 0.9, 0.70, 8_000, half=half),
        _row("multi_imp", 0.9, 0.99, 40_000),
    ]


def _by(rows, method):
    return {r["sparsity"]: r for r in rows if r["method"] == method}


def test_each_budget_takes_the_best_point_that_fits_and_judges_by_intervals():
    rows = budget_comparison(_records())
    single = _by(rows, "single_imp")
    assert [single[lv]["budget"] for lv in (0.5, 0.75, 0.9)] == [30_000, 20_000, 10_000]
    assert [single[lv]["other_parameters"] for lv in (0.5, 0.75, 0.9)] == [25_000, 15_000, 8_000]
    assert [single[lv]["other_sparsity"] for lv in (0.5, 0.75, 0.9)] == [0.5, 0.75, 0.9]
    assert [single[lv]["verdict"] for lv in (0.5, 0.75, 0.9)] == ["behind", "overlap", "ahead"]
    assert all(r["intervals"] for r in single.values())
    first = single[0.5]
    assert first["value"] == 0.85
    assert (first["value_low"], first["value_high"]) == (pytest.approx(0.84), pytest.approx(0.86))
    assert first["other_value"] == 0.90 and first["other_low"] == pytest.approx(0.89)
    assert [r["sparsity"] for r in rows] == sorted(r["sparsity"] for r in rows)  # ascending RTL level


def test_no_point_within_budget_when_the_smallest_point_is_larger():
    rows = budget_comparison(_records())
    for method in ("multi_imp", "dense"):
        for r in _by(rows, method).values():
            assert r["verdict"] == "no point within budget"
            assert r["other_sparsity"] is None and r["other_parameters"] is None and r["other_value"] is None
            assert r["intervals"] is False


def test_rtl_argmax_is_not_compared_with_rtl_but_other_argmax_rows_are():
    records = [*_records(), _row("random+argmax", 0.9, 0.5, 9_000)]
    methods = {r["method"] for r in budget_comparison(records)}
    assert methods == {"dense", "single_imp", "multi_imp", "random+argmax"}
    # the same holds the other way round: RTL's argmax rows setting the budget are not compared with plain RTL
    assert {r["method"] for r in budget_comparison(records, method="rtl+argmax")} == methods


def test_single_seed_records_compare_means_and_say_so():
    records = [_row("rtl", 0.5, 0.80, 10_000, half=None), _row("rtl", 0.8, 0.70, 5_000, half=None),
               _row("rtl", 0.9, 0.60, 3_000, half=None),
               _row("single_imp", 0.5, 0.75, 10_000, half=None), _row("single_imp", 0.8, 0.72, 5_000, half=None),
               _row("single_imp", 0.9, 0.60, 3_000, half=None)]
    rows = _by(budget_comparison(records), "single_imp")
    assert [rows[lv]["verdict"] for lv in (0.5, 0.8, 0.9)] == ["ahead", "behind", "tie"]
    assert all(r["intervals"] is False and r["value_low"] is None and r["other_low"] is None for r in rows.values())


def test_an_interval_on_one_side_only_falls_back_to_means():
    rows = _by(budget_comparison(_records(half=None)), "single_imp")
    assert rows[0.75]["verdict"] == "ahead" and rows[0.75]["intervals"] is False  # 0.865 > 0.86, no overlap test


def test_lower_is_better_picks_the_lowest_point_and_flips_the_verdict():
    higher = _by(budget_comparison(_records()), "single_imp")
    lower = _by(budget_comparison(_records(), higher_is_better=False), "single_imp")
    assert higher[0.9]["other_parameters"] == lower[0.9]["other_parameters"] == 8_000  # the only point that fits
    assert (higher[0.9]["verdict"], lower[0.9]["verdict"]) == ("ahead", "behind")
    assert lower[0.5]["other_parameters"] == 8_000  # 0.70 is the best of all when lower is better
    assert lower[0.5]["verdict"] == "behind"


def test_per_seed_rows_become_an_interval_and_routing_rows_are_left_out():
    records = [_row("rtl", 0.5, v, 10_000, half=None, seed=s) for s, v in enumerate((0.80, 0.81, 0.82))]
    records += [_row("single_imp", 0.5, v, 9_000, half=None, seed=s) for s, v in enumerate((0.70, 0.71, 0.72))]
    records.append(_row("rtl", 0.5, 0.10, 10_000, half=None, routing="calibrated"))  # deployment, not oracle
    (row,) = budget_comparison(records)
    assert row["value"] == pytest.approx(0.81) and row["value_low"] < 0.81 < row["value_high"]
    assert row["verdict"] == "ahead" and row["intervals"] is True


def test_sub_group_rows_are_left_out():
    records = [_row("rtl", 0.5, 0.80, 10_000, image="mean"), _row("rtl", 0.5, 0.10, 10_000, image="coffee"),
               _row("single_imp", 0.5, 0.60, 9_000, image="mean"), _row("single_imp", 0.5, 0.99, 9_000, image="coffee")]
    (row,) = budget_comparison(records)
    assert (row["value"], row["other_value"], row["verdict"]) == (0.80, 0.60, "ahead")


def test_bad_inputs_are_refused_with_a_message_that_names_them():
    with pytest.raises(ValueError, match="'rtl' has no record"):
        budget_comparison([_row("single_imp", 0.5, 0.9, 100)])
    without = [{k: v for k, v in r.items() if k != "parameters" or r["method"] != "multi_imp"} for r in _records()]
    with pytest.raises(ValueError, match="parameters.*multi_imp at 0.9"):
        budget_comparison(without)
    with pytest.raises(ValueError, match="no numeric metric"):
        budget_comparison([{"method": "rtl", "sparsity": 0.5}])


def test_the_frontier_drops_points_beaten_by_fewer_weights():
    front = pareto_frontier(_records(), "single_imp")
    assert [r["parameters"] for r in front] == [8_000, 15_000, 25_000]  # 20k (0.84) loses to 15k (0.86)
    assert [r["parameters"] for r in pareto_frontier(_records(), "single_imp", higher_is_better=False)] == [8_000]
    assert pareto_frontier(_records(), "absent") == []


def test_the_markdown_table_reads_budgets_and_counts_verdicts():
    rows = budget_comparison(_records())
    text = budget_markdown(rows, METRIC)
    assert "stores no more weights than RTL" in text
    assert "| 50% | 30,000 | single IMP at 50% (25,000) | 0.850 ± 0.010 | 0.900 ± 0.010 | behind |" in text
    assert "- single IMP: ahead at 1 of 3 budgets, behind at 1, intervals overlap at 1\n" in text
    assert ("- multiple IMP: ahead at 0 of 3 budgets, behind at 0, intervals overlap at 0, "
            "no point within budget at 3") in text
    assert "RTL, argmax" not in text
    assert budget_markdown([], METRIC) == ""


def test_the_markdown_marks_verdicts_from_single_seed_means():
    records = [_row("rtl", 0.5, 0.80, 10_000, half=None), _row("single_imp", 0.5, 0.80, 10_000, half=None)]
    text = budget_markdown(budget_comparison(records), METRIC)
    assert "| 0.800 | 0.800 | tie (means, no interval) |" in text
    assert "tie at 1 (some verdicts from single-seed means)" in text


def test_the_figure_is_a_png_and_nothing_is_drawn_without_the_metric(tmp_path):
    path = plot_pareto(_records(), tmp_path / "pareto.png", title="equal storage")
    assert path == tmp_path / "pareto.png"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG
    assert plot_pareto(_records(half=None), tmp_path / "lower.png", higher_is_better=False).exists()
    assert plot_pareto(_records(), tmp_path / "none.png", metric="psnr") is None
    assert plot_pareto([{"method": "rtl", "sparsity": 0.5, "parameters": 10}], tmp_path / "empty.png") is None
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "empty.png").exists()
