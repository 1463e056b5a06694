"""The experiment runner and the command line on a tiny digits config: records, resume, errors."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from routing_lottery.cli import app, packaged_config
from routing_lottery.config import load_config
from routing_lottery.run import RunDirectory, build_tasks, make_runner
from routing_lottery.io import load_tickets
from routing_lottery.masks import sparsity

TINY = {"data": {"train_per_class": 12, "test_per_class": 6, "image_size": 8, "calibration": 0.0},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.3, 0.6], "step": 0.4},  # rounds to 30 %, 58 %, 60 %
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}}


def tiny_config(**changes):
    return load_config(packaged_config("digits"), "smoke", {**TINY, **changes})


class Interrupt(Exception):
    pass


class KillAfter:
    """A progress sink that stops the run after ``steps`` training steps, like a kill would."""

    def __init__(self, steps):
        self.left = steps

    def advance(self, steps, status):
        self.left -= steps
        if self.left <= 0:
            raise Interrupt(status)


def test_detector_stream_is_balanced_and_uses_its_own_logit():
    task = build_tasks(tiny_config())[0]
    stream = task.detector_stream(3)
    batches = stream.epoch(torch.Generator().manual_seed(0))
    targets = torch.cat([t for _, t in batches])
    assert targets.sum() == 12 and (targets == 0).sum() == 12
    logits = torch.zeros(4, 10)
    logits[:, 3] = 10.0
    assert stream.loss(logits, torch.ones(4)) < 1e-3 < stream.loss(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="outside 0..9"):
        task.detector_stream(10)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run of every method, shared by the tests that read or reproduce it."""
    path = tmp_path_factory.mktemp("straight")
    return path, make_runner(tiny_config(), path).run_all()


@pytest.mark.slow
def test_run_writes_every_method_and_level(finished_run, tmp_path):
    config = tiny_config()
    run_path, records = finished_run
    keys = {(r["method"], r["sparsity"]) for r in records}
    routed = ("multi_imp", "rtl", "random")
    assert keys == ({("dense", 0.0)} | {(m, s) for m in ("single_imp", *routed) for s in (0.3, 0.6)}
                    | {(f"{m}+argmax", s) for m in routed for s in (0.3, 0.6)})  # routed detectors as one classifier
    assert {r["seed"] for r in records} == {config.seed}
    for r in records:
        assert {"experiment", "balanced_accuracy", "precision", "recall", "parameters", "storage_bytes"} <= r.keys()
        assert 0 <= r["balanced_accuracy"] <= 1
        per_context = [r[f"balanced_accuracy_context_{k}"] for k in range(10)]  # each subnetwork on its own context
        assert r["balanced_accuracy"] == pytest.approx(sum(per_context) / 10)
    by = {(r["method"], r["sparsity"]): r for r in records}
    total = by[("dense", 0.0)]["parameters"]
    assert by[("single_imp", 0.3)]["parameters"] == round(0.7 * total)
    assert by[("multi_imp", 0.6)]["parameters"] == 10 * round(0.4 * total)
    assert round(0.4 * total) <= by[("rtl", 0.6)]["parameters"] <= 10 * round(0.4 * total)
    order = ["dense", "single_imp", "multi_imp", "multi_imp+argmax", "rtl", "rtl+argmax", "random", "random+argmax"]
    assert json.loads((run_path / "results.json").read_text()) == sorted(
        records, key=lambda r: (r["sparsity"], order.index(r["method"])))
    assert (run_path / "results.md").read_text().count("| RTL |") == 2
    assert (run_path / "results.md").read_text().count("| RTL, argmax |") == 2
    assert "_context_" not in (run_path / "results.md").read_text()  # per-context breakdowns: JSON and CSV only
    assert "balanced_accuracy_context_9" in (run_path / "results.csv").read_text().splitlines()[0]
    environment = json.loads((run_path / "environment.json").read_text())
    assert environment["torch"] == torch.__version__ and environment["threads"] == torch.get_num_threads()
    # the RTL checkpoint loads back into a fresh model with masks at the target sparsity
    experiment = make_runner(config, tmp_path / "other")
    masks, meta = load_tickets(run_path / "checkpoints" / "rtl_0.6000", experiment.model)
    assert meta["sparsity"] == 0.6 and masks.num_contexts == 10
    assert all(abs(sparsity(masks[k]) - 0.6) < 1e-4 for k in range(10))
    params = dict(experiment.model.named_parameters())
    union = masks.union()
    assert all(torch.all(params[n][~union[n]] == 0) for n in masks.tensor_names)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 85])  # inside stage 1 (IMP), inside stage 2 (RTL joint retraining at 30 %)
def test_a_killed_run_resumes_to_the_same_result(finished_run, tmp_path, kill_after):
    config = tiny_config()
    run_path, reference = finished_run
    with pytest.raises(Interrupt):
        make_runner(config, tmp_path / "killed", progress=KillAfter(kill_after)).run_all()
    resumed = make_runner(config, tmp_path / "killed").run_all()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]
    assert strip(resumed) == strip(reference)
    straight, killed = RunDirectory(run_path), RunDirectory(tmp_path / "killed")
    for stream in ("single", "context_00", "context_09"):
        a, b = straight.load_round(stream, 1), killed.load_round(stream, 1)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_different_config_in_the_same_directory_is_refused(tmp_path):
    make_runner(tiny_config(methods=["dense"]), tmp_path).run_all()
    with pytest.raises(ValueError, match=r"different data or settings \(seed: 0 -> 1; data_fingerprint"):
        make_runner(tiny_config(methods=["dense"], seed=1), tmp_path).run_all()


@pytest.mark.slow
def test_a_truncated_round_file_is_named_and_redone(tmp_path):
    config = tiny_config(methods=["single_imp"])
    reference = make_runner(config, tmp_path).run_all()
    path = tmp_path / "imp" / "single" / "round_000.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    for record in (tmp_path / "records").glob("*.json"):
        record.unlink()
    log = []
    again = make_runner(config, tmp_path, log=log.append).run_all()
    assert any("imp/single/round_000.safetensors is corrupt" in m for m in log)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]
    assert strip(again) == strip(reference)


def test_cli_run_prints_the_table_and_reports_bad_input(tmp_path):
    runner = CliRunner()
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({**json.loads(json.dumps(TINY)), "name": "tiny", "methods": ["dense"]}))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and (tmp_path / "run" / "results.csv").exists()
    report = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert report.exit_code == 0 and "dense" in report.output

    missing = runner.invoke(app, ["run", "cifar10", "--out", str(tmp_path / "c"), "--data", str(tmp_path)])
    assert missing.exit_code == 2 and "cs.toronto.edu" in "".join(missing.output.split())
    bad = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "b"), "--set", "pruning.sparsities=[1.5]"])
    assert bad.exit_code == 2 and "[0, 1)" in "".join(bad.output.split()).replace(",", ", ")


@pytest.mark.slow
def test_diagnose_writes_matrices_figures_and_report(finished_run):
    run_path, _ = finished_run
    result = CliRunner().invoke(app, ["diagnose", str(run_path), "--no-layer-heatmaps"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_path / "diagnostics" / "summary.json").read_text())
    assert summary["levels"] == [0.3, 0.6]
    assert "not applicable" in summary["verdict"]  # two levels are too few for the collapse rule
    level_dir = run_path / "diagnostics" / "rtl_0.6000"
    assert (level_dir / "jaccard_all.png").stat().st_size > 1000
    matrix = [line.split(",") for line in (level_dir / "jaccard_all.csv").read_text().splitlines()]
    assert len(matrix) == 11 and matrix[0][1:] == list(summary["context_names"])  # header + one row per context
    assert all(float(matrix[i][i]) == 1.0 for i in range(1, 11))
    report = (run_path / "report.md").read_text()
    assert "| RTL |" in report and "rtl_0.6000/jaccard_all.png" in report
    # digits are all equally similar in WordNet (or WordNet is absent): the report says why, not a number
    assert "Not measured:" in report


def test_diagnose_on_a_run_without_tickets_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["diagnose", str(tmp_path)])
    assert result.exit_code == 2 and "no RTL checkpoints" in " ".join(result.output.split())


@pytest.mark.slow
def test_sweep_warns_from_masks_before_evaluating(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "digits", "--scale", "smoke", "--out", str(out), "--levels",
                                      "0.2,0.36,0.49,0.59,0.67,0.74", "--set", "pruning.step=0.2", "--methods",
                                      "single_imp,rtl", "--set", "data.train_per_class=12", "--set",
                                      "data.test_per_class=6"])
    assert result.exit_code == 0, result.output
    assert result.output.index("similarity score by sparsity") < result.output.index("rtl at 20% sparsity")
    summary = json.loads((out / "diagnostics" / "summary.json").read_text())
    assert summary["levels"] == [0.2, 0.36, 0.49, 0.59, 0.67, 0.74]
    assert len(summary["metric"]["values"]) == 6 and summary["collapse"]["rule"]
    per_context = summary["metric"]["per_context"]  # each detector's curve, drawn beside the macro mean
    assert list(per_context) == summary["context_names"] and all(len(v) == 6 for v in per_context.values())
    mean_curve = [sum(v[i] for v in per_context.values()) / 10 for i in range(6)]
    assert mean_curve == pytest.approx(summary["metric"]["values"])
    assert (out / "diagnostics" / "collapse_sweep.png").stat().st_size > 1000
    # the sweep's own sections: RTL against the single mask at equal storage, and the collapse study
    report = (out / "report.md").read_text()
    assert "## Equal storage" in report and "## Collapse study" in report and (out / "pareto.png").exists()
    budgets = json.loads((out / "pareto.json").read_text())
    assert [b["sparsity"] for b in budgets] == [0.2, 0.36, 0.49, 0.59, 0.67, 0.74]
    assert all(b["other_parameters"] is None or b["other_parameters"] <= b["budget"] for b in budgets)
    study = json.loads((out / "study.json").read_text())
    assert len(study["runs"]) == 1 and set(study["runs"][0]["signals"]) == {"score", "slope", "deep", "layers", "union"}
    assert study["runs"][0]["signals"]["score"]["fired"] == summary["collapse"]["level"]  # the same rule as diagnose
    # rtl study gathers sweeps (here one) into one table per signal and experiment
    result = CliRunner().invoke(app, ["study", str(out), "--out", str(tmp_path / "study")])
    assert result.exit_code == 0, result.output
    assert "| score | digits | 1 |" in (tmp_path / "study" / "study.md").read_text()


@pytest.mark.slow
def test_diagnose_aligns_masks_with_wordnet_for_named_contexts(tmp_path):
    """CIFAR-10 names are not equidistant in WordNet: every level gets a Mantel test and the sweep figures."""
    from routing_lottery.contexts.names import CIFAR10_CLASSES
    from routing_lottery.diagnose import DiagnoseSettings, diagnose_run
    from routing_lottery.diagnostics.semantic import wordnet_available
    from routing_lottery.io import save_tickets
    from routing_lottery.masks import MaskSet

    if not wordnet_available():
        pytest.skip("WordNet 3.0 is not installed (apt-get install wordnet-base wordnet-sense-index)")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.Linear(32, 10))
    params = dict(net.named_parameters())
    names = [n for n in params if n.endswith("weight")]
    levels = [0.2, 0.4, 0.6, 0.8]
    records = []
    for level in levels:
        tickets = [{n: torch.rand_like(params[n]) > level for n in names} for _ in range(10)]
        save_tickets(tmp_path / "checkpoints" / f"rtl_{level:.4f}", net, MaskSet.from_tickets(tickets, CIFAR10_CLASSES),
                     {"sparsity": level})
        records.append({"experiment": "t", "method": "rtl", "sparsity": level, "balanced_accuracy": 0.9 - level / 2})
    (tmp_path / "results.json").write_text(json.dumps(records))
    summary = diagnose_run(tmp_path, DiagnoseSettings(permutations=99, layer_heatmaps=False))
    assert summary["semantic_note"] == ""
    for entry in summary["per_level"].values():
        assert -1 <= entry["alignment_all"]["rho"] <= 1 and 0 < entry["alignment_all"]["p_value"] <= 1
    assert (tmp_path / "diagnostics" / "alignment_vs_sparsity.png").stat().st_size > 1000
    assert summary["metric"]["drop_level"] == 0.4  # 0.9 - level/2 falls by 0.1 per level, for good
    assert "Semantic alignment" in (tmp_path / "report.md").read_text()


def _record_stamps(path):
    return {p.name: p.stat().st_mtime_ns for p in (path / "records").glob("*.json")}


@pytest.mark.slow
def test_adding_a_level_reuses_stage_one_and_finished_records(tmp_path, monkeypatch):
    import routing_lottery.tickets as tickets_module

    config = tiny_config(methods=["single_imp", "rtl"], pruning={"sparsities": [0.3], "step": 0.4})
    make_runner(config, tmp_path).run_all()
    rounds = {p: p.stat().st_mtime_ns for p in (tmp_path / "imp").rglob("*.safetensors")}
    records = _record_stamps(tmp_path)
    resumes = []
    real = tickets_module.extract_ticket
    monkeypatch.setattr(tickets_module, "extract_ticket",
                        lambda *a, **k: resumes.append(k["resume"][0]) or real(*a, **k))
    wider = make_runner(config.replace(pruning={"sparsities": [0.3, 0.6]}), tmp_path).run_all()
    assert resumes == [0] * 11  # single + 10 contexts each continued after their one round on disk
    assert all(p.stat().st_mtime_ns == t for p, t in rounds.items())  # no round rewritten
    assert all(_record_stamps(tmp_path)[name] == t for name, t in records.items())  # 30 % records reused
    assert {(r["method"], r["sparsity"]) for r in wider} == {(m, s) for m in ("single_imp", "rtl", "rtl+argmax") for s in (0.3, 0.6)}


@pytest.mark.slow
def test_a_level_inserted_below_recomputes_what_it_changes(tmp_path):
    config = tiny_config(methods=["rtl"], pruning={"sparsities": [0.6], "step": 0.4})  # rounds: 40 %, 60 %
    first = make_runner(config, tmp_path)
    first.run_all()
    stamps = _record_stamps(tmp_path)
    second = make_runner(config.replace(pruning={"sparsities": [0.3, 0.6]}), tmp_path)  # rounds: 30, 58, 60 %
    records = second.run_all()
    old, new = first.tickets.schedule, second.tickets.schedule
    assert old[0] != new[0] and len(new) == 3
    assert _record_stamps(tmp_path)["rtl_0.6000.json"] != stamps["rtl_0.6000.json"]  # its rounds changed
    directory = RunDirectory(tmp_path)
    assert directory.load_round("context_00", 0, pruned=new[0]) is not None  # round 0 redone for 30 %
    assert directory.load_round("context_00", 0, pruned=old[0]) is None
    assert {r["sparsity"] for r in records} == {0.3, 0.6}


@pytest.mark.slow
def test_device_and_threads_do_not_change_a_runs_identity(tmp_path):
    config = tiny_config(methods=["dense"], device="cpu", threads=1)
    make_runner(config, tmp_path).run_all()
    stamps = _record_stamps(tmp_path)
    make_runner(config.replace(device="auto", threads=2), tmp_path).run_all()  # another device: resumes
    torch.set_num_threads(1)
    assert _record_stamps(tmp_path) == stamps


def test_a_user_task_on_other_data_is_refused_in_the_same_directory(tmp_path):
    config = tiny_config(methods=["dense"])
    task = build_tasks(config)[0]
    make_runner(config, tmp_path, tasks=task).run_all()
    from dataclasses import replace

    other = replace(task, train_set=task.train_set.subset(torch.arange(len(task.train_set) - 1)))
    with pytest.raises(ValueError, match="data_fingerprint"):
        make_runner(config, tmp_path, tasks=other)


def test_check_task_passes_the_built_in_classification_task_and_lists_a_broken_ones_faults():
    from routing_lottery.experiments import TaskContractError, check_task

    task = build_tasks(tiny_config())[0]
    check_task(task)

    class Broken:
        context_names = ["a", "a"]
        shared_epoch_factor = 0

        def data_fingerprint(self):
            return str(torch.rand(1).item())

        def build_model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(3, 2)

        def build_shared_model(self, model):
            return model

        def context_stream(self, k):
            return task.context_stream(0)

        def shared_stream(self):
            return task.shared_stream()

        def score_shared(self, predict, label, outputs=None):
            return [{"acc": float("nan")}]

        def score_routed(self, predict, label, outputs=None):
            return []

    with pytest.raises(TaskContractError) as err:
        check_task(Broken())
    text = str(err.value)
    for fault in ("context_names must be distinct", "shared_epoch_factor", "data_fingerprint() differs",
                  "reseeds the global generator", "model(inputs) raised", "context_stream(2) must raise",
                  "not NaN", "non-empty list"):
        assert fault in text, fault


class KillAt:
    """A progress sink that stops the run at the ``nth`` progress report whose status starts with ``prefix``."""

    def __init__(self, prefix, nth=1):
        self.prefix, self.left = prefix, nth

    def advance(self, steps, status):
        if status.startswith(self.prefix):
            self.left -= 1
            if self.left == 0:
                raise Interrupt(status)


# Wall-clock figures (the only ones a resume may change) and a record's checksum, which covers them.
TIMED = {"train_seconds", "relative_cost", "sha256"}


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    return [_untimed(v) for v in value] if isinstance(value, list) else value


def _contents(path):
    """What a run's file says: tensors and metadata of safetensors (whose header order varies between
    processes), JSON without timings, other files as bytes (tables that print timings are left out)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}
    if path.suffix == ".json":
        return _untimed(json.loads(path.read_text()))
    return path.read_bytes()


def _files(root):
    skip = {"environment.json", "results.md", "results.csv", "deployment.md"}
    return {p.relative_to(root).as_posix(): _contents(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip and not p.name.startswith(".lock")}


@pytest.fixture(scope="module")
def three_epoch_run(tmp_path_factory):
    """Three retraining epochs of three batches each, so that a kill can land between and inside epochs."""
    config = tiny_config(methods=["rtl"], training={**TINY["training"], "epochs": 3, "batch_size": 8})
    path = tmp_path_factory.mktemp("three_epochs")
    return config, path, make_runner(config, path).run_all()


# RTL's first retraining: the first report of epoch 2 comes right after the epoch-1 checkpoint
# (between epochs, one batch of epoch 2 lost); the third comes in the middle of epoch 3.
@pytest.mark.slow
@pytest.mark.parametrize("prefix, nth", [("joint epoch 2/3", 1), ("joint epoch 3/3", 2)])
def test_a_run_killed_during_joint_retraining_resumes_to_identical_figures_and_files(
        three_epoch_run, tmp_path, prefix, nth):
    config, straight, reference = three_epoch_run
    with pytest.raises(Interrupt):
        make_runner(config, tmp_path, progress=KillAt(prefix, nth)).run_all()
    assert list((tmp_path / "train").glob("rtl_*.pt")), "the kill must land after a retraining checkpoint"
    resumed = make_runner(config, tmp_path).run_all()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]
    assert strip(resumed) == strip(reference)
    want, got = _files(straight), _files(tmp_path)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
