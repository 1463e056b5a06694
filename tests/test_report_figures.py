"""results.png: the primary metric per method against sparsity and stored weights, from a run and from hand-made records."""

import pytest

from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.diagnose import primary_metric
from routing_lottery.report import aggregate_rows, plot_results, primary_metric_key, write_results
from routing_lottery.run import make_runner

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


def _row(method, sparsity, **metrics):
    return {"experiment": "x", "method": method, "sparsity": sparsity, **metrics}


def _classification():
    rows = [_row("dense", 0.0, balanced_accuracy=0.9, precision=0.8, balanced_accuracy_context_0=0.9, parameters=1000)]
    for level in (0.5, 0.8):
        rows += [_row("single_imp", level, balanced_accuracy=0.85 - level / 10, precision=0.8, parameters=int(1000 * (1 - level))),
                 _row("rtl", level, balanced_accuracy=0.88 - level / 10, precision=0.8, parameters=int(1500 * (1 - level)))]
    return rows


def _inr():
    rows = []
    for method, level in (("dense", 0.0), ("single_imp", 0.5), ("rtl", 0.5)):
        rows += [_row(method, level, image=name, psnr=20.0 + i, parameters=500) for i, name in enumerate(("coffee", "camera"))]
        rows.append(_row(method, level, image="mean", psnr=20.5, parameters=500, images=2))
    return rows


def _speech():
    return [_row(m, lv, environment=env, si_snri=3.0 + lv, si_snr_input=1.0, clips=4, parameters=100)
            for m, lv in (("dense", 0.0), ("rtl", 0.5)) for env in ("all", "street", "cafe")]


@pytest.mark.parametrize("records, metric", [(_classification(), "balanced_accuracy"), (_inr(), "psnr"), (_speech(), "si_snri")])
def test_the_drawn_metric_is_the_tables_first_and_diagnoses(records, metric):
    assert primary_metric_key(aggregate_rows(records)) == metric == primary_metric(records)


def test_only_aggregate_rows_are_drawn():
    assert {r["image"] for r in aggregate_rows(_inr())} == {"mean"}
    assert {r["environment"] for r in aggregate_rows(_speech())} == {"all"}
    single_image = [r for r in _inr() if r["image"] == "coffee"]  # one INR image: no mean rows, keep its rows
    assert aggregate_rows(single_image) == single_image
    assert aggregate_rows(_classification()) == _classification()


@pytest.mark.parametrize("records", [_classification(), _inr(), _speech()], ids=["classification", "inr", "speech"])
def test_plot_results_writes_a_png(records, tmp_path):
    path = plot_results(records, tmp_path / "results.png", title="Results: x")
    assert path == tmp_path / "results.png" and _is_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.png"]  # written atomically: no temporary left


def test_plot_results_with_one_method_one_level_or_no_metric(tmp_path):
    assert _is_png(plot_results([_row("rtl", 0.5, balanced_accuracy=0.7, parameters=10)], tmp_path / "one.png"))
    assert _is_png(plot_results([_row("dense", 0.0, psnr=30.0)], tmp_path / "dense.png"))  # no parameters: one panel
    assert plot_results([_row("rtl", 0.5, image="a", note="n/a")], tmp_path / "none.png") is None
    assert plot_results([_row("rtl", 0.5, psnr=float("nan"))], tmp_path / "nan.png") is None
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "nan.png").exists()


def test_results_md_links_the_figure_only_when_there_is_one(tmp_path):
    (tmp_path / "a").mkdir()
    write_results(tmp_path / "a", _inr(), columns=["image", "psnr", "parameters"])
    assert "![results](results.png)" in (tmp_path / "a" / "results.md").read_text()
    (tmp_path / "b").mkdir()
    write_results(tmp_path / "b", [_row("rtl", 0.5, note="n/a")])
    assert "results.png" not in (tmp_path / "b" / "results.md").read_text()
    assert not (tmp_path / "b" / "results.png").exists()


@pytest.mark.slow
def test_a_tiny_run_writes_its_figure(tmp_path):
    config = load_config(packaged_config("digits"), "smoke", {
        "methods": ["dense", "rtl"], "data": {"train_per_class": 12, "test_per_class": 6, "image_size": 8},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.5},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}})
    make_runner(config, tmp_path).run_all()
    assert _is_png(tmp_path / "results.png")
    assert "![results](results.png)" in (tmp_path / "results.md").read_text()
