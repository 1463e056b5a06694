"""Deployment without an oracle, wired into runs: calibration split, thresholds, routers, routing errors."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routing_lottery import AdaptiveTickets, LearnedRouter, PruningConfig, RTLConfig
from routing_lottery.calibration import Thresholds, fit_thresholds
from routing_lottery.cli import app, packaged_config
from routing_lottery.config import load_config
from routing_lottery.data.labelled import LabelledDataset, stratified_holdout
from routing_lottery.data.regions import RegionImage
from routing_lottery.errors import CheckpointError, ConfigError
from routing_lottery.masks import MaskSet
from routing_lottery.router import inject_errors
from routing_lottery.run import build_tasks, make_runner
from routing_lottery.methods import deployment as deploy
from routing_lottery.tasks.inr import InrTask

TINY = {"data": {"train_per_class": 12, "test_per_class": 6, "image_size": 8, "calibration": 0.25},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.5},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32},
        "methods": ["single_imp", "multi_imp", "rtl"]}


def tiny_config(**changes):
    return load_config(packaged_config("digits"), "smoke", {**TINY, **changes})


# -- the calibration split ------------------------------------------------------------------------
def test_holdout_is_stratified_disjoint_and_keeps_every_class():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 1)
    data = LabelledDataset(torch.arange(15.0)[:, None], labels, ("a", "b", "c"))
    kept, held = stratified_holdout(data, 0.2, seed=0)
    assert torch.bincount(held.labels, minlength=3).tolist() == [2, 1, 0]  # a single example is never held out
    assert set(kept.inputs[:, 0].tolist()).isdisjoint(held.inputs[:, 0].tolist())
    assert len(kept) + len(held) == 15 and set(kept.labels.tolist()) == {0, 1, 2}
    assert torch.equal(stratified_holdout(data, 0.2, seed=0)[1].inputs, held.inputs)
    assert len(stratified_holdout(data, 0.0, seed=0)[1]) == 0


def test_the_calibration_split_is_neither_trained_on_nor_tested_on():
    task = build_tasks(tiny_config())[0]
    cal, _ = task.context_examples("calibration")
    rows = {tuple(r.flatten().tolist()) for r in cal}
    for split in ("train", "test"):
        inputs, _ = task.context_examples(split)
        assert rows.isdisjoint(tuple(r.flatten().tolist()) for r in inputs)
    assert len(cal) == 10 * 3  # 25 % of 12 per class
    with pytest.raises(ValueError, match="data.calibration"):
        build_tasks(tiny_config(data={**TINY["data"], "calibration": 0.0}))[0].context_examples("calibration")


def test_thresholds_are_fitted_on_calibration_scores_only(monkeypatch):
    task = build_tasks(tiny_config(deploy={"calibration": "f1"}))[0]
    seen = []
    real = deploy.fit_thresholds

    def spy(scores, contexts, *args, **kwargs):
        seen.append((torch.as_tensor(scores).shape[0], torch.as_tensor(contexts).clone()))
        return real(scores, contexts, *args, **kwargs)

    monkeypatch.setattr(deploy, "fit_thresholds", spy)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    thresholds, _, _ = deploy.fit_run_thresholds(tiny_config(deploy={"calibration": "f1"}), task,
                                                 lambda k, x: model(x))
    (n, contexts), = seen
    assert n == len(task.context_examples("calibration")[1]) != len(task.context_examples("test")[1])
    assert torch.equal(contexts, task.context_examples("calibration")[1])
    assert thresholds.num_contexts == 10


def test_deploy_settings_are_validated_before_anything_runs():
    for bad in ({"routers": ["oracle"]}, {"error_rates": [0.0]}, {"calibration": "accuracy"},
                {"target_precision": 1.5}, {"delta": 1.0}, {"rule": "vote"}):
        with pytest.raises(ConfigError, match="deploy"):
            tiny_config(deploy=bad)
    with pytest.raises(ConfigError, match="data.calibration"):
        tiny_config(data={**TINY["data"], "calibration": 1.0})


# -- thresholds and router travel with the tickets ------------------------------------------------
def test_thresholds_and_router_round_trip_with_the_tickets(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    tickets = AdaptiveTickets(model, RTLConfig(pruning=PruningConfig(sparsities=(0.5,))))
    masks = MaskSet.from_tickets([{n: (torch.rand(p.shape) > 0.5) for n, p in model.named_parameters()
                                   if n in tickets.prunable} for _ in range(3)], ["a", "b", "c"])
    tickets.masks, tickets.level = masks, 0.5
    scores, contexts = torch.randn(60, 3), torch.arange(60) % 3
    scores[torch.arange(60), contexts] += 2
    tickets.thresholds = fit_thresholds(scores, contexts, "precision", target_precision=0.7)
    x = torch.randn(90, 4) + 3 * torch.nn.functional.one_hot(torch.arange(90) % 3, 4).float()
    tickets.router = LearnedRouter.fit(x, torch.arange(90) % 3, 3, seed=0)
    tickets.save(tmp_path / "t")
    loaded = AdaptiveTickets.load(tmp_path / "t", model)
    assert loaded.thresholds == tickets.thresholds
    assert torch.equal(loaded.router.logits(x), tickets.router.logits(x))
    routed = loaded.routed
    assert torch.equal(routed(x), routed(x, tickets.router.route(x)))  # no context: the saved router chooses

    index = json.loads((tmp_path / "t" / "tickets.json").read_text())
    assert Thresholds.from_dict(index["metadata"]["thresholds"]) == tickets.thresholds


# -- routing errors -----------------------------------------------------------------------------
def _inr_task() -> InrTask:
    h, w = 6, 9
    regions = np.zeros((h, w), dtype=np.int64)
    regions[: h // 2, w // 3:] = 1
    regions[h // 2:, w // 3:] = 2
    pixels = np.random.default_rng(0).random((h, w, 3)).astype(np.float32)
    return InrTask(RegionImage("toy", pixels, regions, ("left", "top right", "bottom right")), eval_batch_size=7)


def test_zero_routing_errors_equal_oracle_routing_exactly_and_errors_cost():
    task = _inr_task()
    _, true = task.context_examples("test")
    centers = torch.stack([task.targets[task.region_ids == k].mean(0) for k in range(3)])

    def predict(k, x):  # region k's best constant colour, plus a little of the input so batches matter
        return centers[k] + 1e-3 * x[:, :1]

    oracle = task.score_routed(predict)
    zero = task.score_routed(predict, chosen=inject_errors(true, 0.0, 3, torch.Generator().manual_seed(0)))
    assert zero == oracle
    worse = [task.score_routed(predict, chosen=inject_errors(true, f, 3, torch.Generator().manual_seed(0)))[0]["psnr"]
             for f in (0.25, 0.5, 1.0)]
    assert oracle[0]["psnr"] > worse[0] and worse[-1] < worse[0]


@pytest.mark.slow
def test_a_run_records_deployment_rows_beside_the_oracle_and_calibrate_refits(tmp_path):
    config = tiny_config(deploy={"calibration": "precision", "target_precision": 0.6, "routers": ["detectors", "learned"]})
    records = make_runner(config, tmp_path).run_all()
    assert all("routing" not in r for r in records)  # the results table holds oracle rows only
    rows = json.loads((tmp_path / "deployment.json").read_text())
    kinds = {(r["method"], r["routing"]) for r in rows}
    assert kinds == {("rtl", "calibrated"), ("rtl", "detectors"), ("rtl", "learned"), ("multi_imp", "learned")}
    assert not any(r["routing"] == "errors" for r in rows)  # the context is the label: no error injection
    learned = {r["method"]: r for r in rows if r["routing"] == "learned"}
    assert learned["rtl"]["balanced_accuracy"] == learned["multi_imp"]["balanced_accuracy"]  # same router
    assert all(0 <= r["routing_accuracy"] <= 1 for r in rows if "routing_accuracy" in r)
    assert (tmp_path / "routing" / "rtl_0.5000.png").stat().st_size > 1000
    assert (tmp_path / "calibration" / "rtl_0.5000.png").stat().st_size > 1000
    assert "calibrated" in (tmp_path / "deployment.md").read_text()
    saved = AdaptiveTickets.load(tmp_path / "checkpoints" / "rtl_0.5000", make_runner(config, tmp_path).model)
    assert saved.thresholds is not None and saved.thresholds.objective == "precision"
    assert saved.router is not None

    result = CliRunner().invoke(app, ["calibrate", str(tmp_path), "--objective", "balanced_accuracy"])
    assert result.exit_code == 0, result.output
    refit = AdaptiveTickets.load(tmp_path / "checkpoints" / "rtl_0.5000", make_runner(config, tmp_path).model)
    assert refit.thresholds.objective == "balanced_accuracy"
    assert torch.equal(refit.masks.stacked[refit.masks.tensor_names[0]], saved.masks.stacked[saved.masks.tensor_names[0]])
    table = json.loads((tmp_path / "calibration.json").read_text())
    assert [r["routing"] for r in table] == ["logit 0", "calibrated"]
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path), "--objective", "recall"])
    assert result.exit_code != 0 and "deploy.calibration" in result.output


@pytest.mark.slow
def test_calibrate_refuses_a_run_without_a_calibration_split(tmp_path):
    config = tiny_config(data={**TINY["data"], "calibration": 0.0}, methods=["rtl"])
    make_runner(config, tmp_path).run_all()
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path)])
    assert result.exit_code != 0 and "data.calibration" in result.output


def test_a_corrupt_saved_router_is_a_checkpoint_error(tmp_path):
    x = torch.randn(30, 4)
    router = LearnedRouter.fit(x, torch.arange(30) % 3, 3, seed=0)
    router.save(tmp_path)
    blob = bytearray((tmp_path / "router.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "router.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="router.safetensors"):
        LearnedRouter.load(tmp_path)


def _router_files(run_dir, level="0.7500"):
    router = run_dir / "checkpoints" / f"rtl_{level}" / "router"
    return {p.name: p.read_bytes() for p in sorted(router.iterdir())}


@pytest.mark.slow
def test_a_corrupt_router_is_refused_by_export_and_calibrate_and_refitted_identically_on_resume(tmp_path):
    # Two levels, the last one's router broken: calibrate must refuse before rewriting the first.
    config = tiny_config(methods=["rtl"], deploy={"routers": ["learned"]},
                         pruning={"sparsities": [0.5, 0.75], "step": 0.5})
    run_dir = tmp_path / "run"
    make_runner(config, run_dir).run_all()
    router_dir = run_dir / "checkpoints" / "rtl_0.7500" / "router"
    original = _router_files(run_dir)
    results = (run_dir / "results.json").read_bytes(), (run_dir / "deployment.json").read_bytes()
    tickets = {p: p.read_bytes() for p in sorted((run_dir / "checkpoints").glob("rtl_*/tickets.json"))}
    assert len(tickets) == 2

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def flip_a_bit(path):
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x10
        path.write_bytes(bytes(blob))

    for name, corrupt in (("router.json", truncate), ("router.safetensors", flip_a_bit)):
        corrupt(router_dir / name)
        # another objective than the run's: a level calibrated before the bad router would change
        for command in (["export", str(run_dir), "--context", "0"],
                        ["calibrate", str(run_dir), "--objective", "balanced_accuracy"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code != 0, result.output
            message = " ".join(result.output.split())  # the console wraps long lines
            assert f"rtl_0.7500/router/{name}" in message and "rtl run" in message, message  # the file, the remedy
        assert not (run_dir / "export").exists()
        assert {p: p.read_bytes() for p in tickets} == tickets  # calibrate rewrote no level

        lines: list[str] = []
        make_runner(config, run_dir, log=lines.append).run_all()  # resume: the level is reused, the router refitted
        repaired = [line for line in lines if name in line]
        assert len(repaired) == 1 and "refitted" in repaired[0] and "\n" not in repaired[0], lines
        assert not any(line.startswith("rtl at") for line in lines)  # no level retrained
        assert _router_files(run_dir) == original  # the very same router, byte for byte
        assert ((run_dir / "results.json").read_bytes(), (run_dir / "deployment.json").read_bytes()) == results
        saved = AdaptiveTickets.load(run_dir / "checkpoints" / "rtl_0.7500", make_runner(config, run_dir).model)
        assert isinstance(saved.router, LearnedRouter)

    lines = []
    make_runner(config, run_dir, log=lines.append).run_all()  # an intact router is left alone, silently
    assert not any("router" in line for line in lines), lines


@pytest.mark.slow
def test_changing_deploy_settings_keeps_the_run_and_recomputes_only_routed_records(tmp_path):
    config = tiny_config(methods=["single_imp", "rtl"], deploy={"routers": ["detectors"]})
    make_runner(config, tmp_path).run_all()
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")}
    rounds = {p: p.stat().st_mtime_ns for p in (tmp_path / "imp").rglob("*.safetensors")}
    make_runner(config.replace(deploy={"routers": ["learned"]}), tmp_path).run_all()  # not another run: resumes
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "records").glob("*.json")}
    assert all(p.stat().st_mtime_ns == t for p, t in rounds.items())
    changed = {name for name in stamps if after[name] != stamps[name]}
    assert changed and all(name.startswith("rtl") for name in changed)
    rows = json.loads((tmp_path / "deployment.json").read_text())
    assert {r["routing"] for r in rows} == {"calibrated", "learned"}


def test_routing_in_batches_equals_routing_at_once_for_tuple_inputs():
    x = (torch.randn(40, 3), torch.randn(40, 2))
    contexts = torch.arange(40) % 2
    x[0][contexts == 1] += 4
    router = LearnedRouter.fit(x, contexts, 2, seed=0)
    chosen = deploy._choose(router, None, x, torch.device("cpu"), batch=7)
    assert torch.equal(chosen, router.route(x)) and (chosen == contexts).float().mean() >= 0.95


def test_the_argmax_classifier_row_equals_a_hand_computation():
    """Three detectors on six test rows; the most confident detector's context is the answer."""
    from types import SimpleNamespace

    from routing_lottery.tasks.classification import ClassificationTask

    names = ("a", "b", "c")
    train = LabelledDataset(torch.zeros(6, 2), torch.tensor([0, 0, 1, 1, 2, 2]), names)
    test = LabelledDataset(torch.arange(6, dtype=torch.float32).repeat(2, 1).T, torch.tensor([0, 0, 1, 1, 2, 2]), names)
    task = ClassificationTask(train, test, context_of_class=[0, 1, 2], context_names=names)
    # detector k's logit per test row (rows 0..5); every detector fires on most rows (logit > 0), so the
    # detector metrics and the argmax answer differ
    logits = torch.tensor([[3.0, 1.0, 2.0],  # true a -> a
                           [1.0, 2.0, 0.5],  # true a -> b
                           [0.5, 4.0, 1.0],  # true b -> b
                           [2.0, 1.0, 3.0],  # true b -> c
                           [1.0, 0.5, 5.0],  # true c -> c
                           [1.0, 0.2, 3.0]])  # true c -> c

    def predict(k, x):  # subnetwork k: its own output k carries detector k's logit; the others are noise
        out = torch.full((len(x), 3), -9.0)
        out[:, k] = logits[x[:, 0].long(), k]
        return out

    [row] = deploy.argmax_rows(SimpleNamespace(task=task), "rtl", predict)
    assert row["method"] == "rtl+argmax"
    # predictions a, b, b, c, c, c: per class (tp, fp, fn, tn) a (1,0,1,4), b (1,1,1,3), c (2,1,0,3)
    recall = [1 / 2, 1 / 2, 2 / 2]
    precision = [1 / 1, 1 / 2, 2 / 3]
    specificity = [4 / 4, 3 / 4, 3 / 4]
    assert row["recall"] == pytest.approx(sum(recall) / 3)
    assert row["precision"] == pytest.approx(sum(precision) / 3)
    assert row["balanced_accuracy"] == pytest.approx(sum((r + s) / 2 for r, s in zip(recall, specificity)) / 3)
    # a task whose context is not the label gets no such row
    assert deploy.argmax_rows(SimpleNamespace(task=SimpleNamespace(context_is_label=False)), "rtl", predict) == []



def test_detector_scores_are_computed_once_per_predict_and_split_inside_reusing_scores():
    task = build_tasks(tiny_config())[0]
    calls = []

    def predict(k, x):
        calls.append(k)
        return torch.zeros(len(x), task.num_contexts) + k

    first = task.detector_scores(predict, "test")
    assert len(calls) == task.num_contexts  # one pass per detector over one evaluation batch
    with task.reusing_scores():
        inside = [task.detector_scores(predict, "test") for _ in range(3)]
        task.detector_scores(predict, "calibration")
        assert len(calls) == 3 * task.num_contexts  # test once, calibration once
        other = task.detector_scores(lambda k, x: predict(k, x) + 1, "test")  # another predict: its own scores
    task.detector_scores(predict, "test")
    assert len(calls) == 5 * task.num_contexts  # nothing kept after the block
    assert all(torch.equal(s, first) for s in inside) and torch.equal(other, first + 1)
