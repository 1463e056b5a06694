"""The worked examples in examples/: their configs through the command line, their tasks against the
contract, the transformer's attention masks, and the front door on the tabular example."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from routing_lottery import AdaptiveTickets, OptimizerConfig, PruningConfig, RTLConfig, TrainingConfig
from routing_lottery.experiments import check_task, load_config
from routing_lottery.cli import app
from routing_lottery.io import load_tickets
from routing_lottery.pruning import prunable_names
from routing_lottery.run import build_tasks

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples package lives at the repository root, beside src/
    sys.path.insert(0, str(ROOT))

from examples.common import main  # noqa: E402

EXAMPLES = {"tabular": 3, "transformer": 10, "image_model": 10}  # config -> contexts (classes)
METHODS = ("dense", "single_imp", "multi_imp", "rtl", "random")


def config_of(example, scale="smoke"):
    return load_config(ROOT / "examples" / f"{example}.yaml", scale)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Each example's smoke scale through ``rtl run``, from the repository root as a user would; run once."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for example in EXAMPLES:
            out = tmp_path_factory.mktemp(example)
            result = CliRunner().invoke(app, ["run", f"examples/{example}.yaml", "--scale", "smoke", "--out", str(out)])
            runs[example] = (result, out)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_cli_smoke_run_records_every_method_and_level(smoke_runs, example):
    result, out = smoke_runs[example]
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    levels = config_of(example).pruning.sparsities
    routed = ("multi_imp", "rtl", "random")  # also scored as one K-way classifier (argmax of their detectors)
    assert {(r["method"], r["sparsity"]) for r in records} == (
        {("dense", 0.0)} | {(m, s) for m in METHODS if m != "dense" for s in levels}
        | {(f"{m}+argmax", s) for m in routed for s in levels})
    by = {(r["method"], r["sparsity"]): r for r in records}
    total = by[("dense", 0.0)]["parameters"]
    for s in levels:
        one_mask = round((1 - s) * total)
        assert one_mask <= by[("rtl", s)]["parameters"] <= EXAMPLES[example] * one_mask
        assert 0 <= by[("rtl", s)]["balanced_accuracy"] <= 1


@pytest.mark.slow
def test_rtl_script_finds_the_example_code_from_the_repository_root(tmp_path):
    """The installed ``rtl`` script as a user runs it: no PYTHONPATH, import paths found from the working directory."""
    script = Path(sys.executable).with_name("rtl")
    if not script.is_file():
        pytest.skip(f"no rtl script beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(script), "run", "examples/tabular.yaml", "--scale", "smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 1 + 7 * len(config_of("tabular").pruning.sparsities)  # 4 methods + 3 argmax rows per level


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_task_meets_the_contract(example):
    task = build_tasks(config_of(example))[0]
    check_task(task)
    assert task.num_contexts == EXAMPLES[example]


@pytest.mark.slow
def test_transformer_masks_every_attention_projection(smoke_runs):
    config = config_of("transformer")
    task = build_tasks(config)[0]
    model = task.build_model()
    depth = config.model.options["depth"]
    names = prunable_names(model)
    for b in range(depth):
        assert {f"blocks.{b}.attn.in_proj_weight", f"blocks.{b}.attn.out_proj.weight"} <= set(names)
    assert not any("norm" in n or n.endswith("bias") or n == "position" for n in names)

    # the RTL checkpoint of the smoke run: exact zeros in the packed projections wherever no ticket keeps a weight
    _, out = smoke_runs["transformer"]
    level = max(config.pruning.sparsities)
    fresh = task.build_model()
    masks, _ = load_tickets(out / "checkpoints" / f"rtl_{level:.4f}", fresh)
    params, union = dict(fresh.named_parameters()), masks.union()
    for b in range(depth):
        name = f"blocks.{b}.attn.in_proj_weight"
        assert name in masks.tensor_names
        assert (~union[name]).any()  # some weights are pruned by every ticket ...
        assert torch.all(params[name].detach()[~union[name]] == 0)  # ... and those are exactly zero
        for k in range(masks.num_contexts):  # each ticket prunes about half of the tensor (layerwise scope)
            assert masks.stacked[name][k].float().mean().item() == pytest.approx(1 - level, abs=0.02)


def test_front_door_on_the_tabular_example(tmp_path):
    task = build_tasks(config_of("tabular"))[0]
    names = list(task.context_names)
    torch.manual_seed(0)
    model = task.build_model()
    recipe = RTLConfig(seed=0, pruning=PruningConfig(sparsities=(0.5,), step=0.3, scope="layerwise"),
                       training=TrainingConfig(imp_epochs=1, epochs=2, optimizer=OptimizerConfig(lr=3e-3)))
    rtl = AdaptiveTickets(model, recipe)
    assert "1.weight" in rtl.describe()
    routed = rtl.fit({name: task.context_stream(k) for k, name in enumerate(names)}).routed

    x, labels = task.test_set.inputs, task.test_set.labels
    contexts = [names[c] for c in labels]  # a mixed batch, every row routed by its context's name
    assert len(set(contexts)) == len(names)
    with torch.no_grad():
        out = routed(x, contexts)
        for k, name in enumerate(names):
            torch.testing.assert_close(out[labels == k], routed(x[labels == k], name))
    assert routed.masks.counts() == [round(0.5 * rtl.total)] * len(names)

    rtl.save(tmp_path / "tickets")
    torch.manual_seed(1)  # a fresh model with other weights: everything comes from the checkpoint
    loaded = AdaptiveTickets.load(tmp_path / "tickets", task.build_model())
    assert loaded.config == recipe and loaded.masks.context_names == names
    with torch.no_grad():
        assert torch.equal(loaded.routed(x, contexts), out)


def test_script_entry_point_prints_each_context_and_saves(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    scores = main(ROOT / "examples" / "tabular.yaml", ["--smoke", "--out", str(tmp_path / "tickets")])
    printed = capsys.readouterr().out
    assert list(scores) == ["class_0", "class_1", "class_2"] and all(0 <= v <= 1 for v in scores.values())
    assert "masked: 3 tensors" in printed and "class_2" in printed
    assert (tmp_path / "tickets").is_dir()


# -- your own training loop (issue 24): the examples run, and every step stays inside its mask ----------
def test_own_loop_adamw_example(capsys):
    from examples.own_loop_adamw import main as run

    scores = run(["--epochs", "4"])
    assert list(scores) == ["zero_to_two", "three_to_five", "six_to_nine"] and min(scores.values()) > 0.8
    assert "weights outside every mask that are not zero: 0" in capsys.readouterr().out


@pytest.mark.slow
def test_own_loop_hf_trainer_example(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from examples.own_loop_hf_trainer import main as run

    assert min(run([]).values()) > 0.7
    assert "weights outside every mask that are not zero: 0" in capsys.readouterr().out

