"""Corruption is detected and repaired on resume; bad input is one clear error; runs cannot interleave."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routing_lottery import AdaptiveTickets, tensor_stream
from routing_lottery.cli import app
from routing_lottery.errors import ConfigError, DataError, RunLockedError
from routing_lottery.io import load_masks
from routing_lottery.recipe import PruningConfig
from routing_lottery.run import RunDirectory, make_runner
from routing_lottery.training import OptimizerConfig, extract_ticket
from test_experiment import tiny_config
from toy import toy_model, toy_stream

RTL_ONLY = {"methods": ["rtl"], "pruning": {"sparsities": [0.6], "step": 0.4}}


def strip(records):
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in records]


def flip_byte(path, offset_from_end=20):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    path = tmp_path_factory.mktemp("finished")
    return path, make_runner(tiny_config(**RTL_ONLY), path).run_all()


def resume(source, tmp_path, damage):
    """Copy a finished run, damage it, resume it; return the records and the log."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(source, target)
    damage(target)
    log: list[str] = []
    records = make_runner(tiny_config(**RTL_ONLY), target, log=log.append).run_all()
    return target, records, log


@pytest.mark.slow
def test_a_corrupt_ticket_checkpoint_is_rebuilt(finished, tmp_path):
    source, reference = finished
    run, records, log = resume(source, tmp_path, lambda p: flip_byte(p / "checkpoints" / "rtl_0.6000" / "tickets.safetensors"))
    assert any("rtl at 60%" in m and "recomputing" in m for m in log)
    load_masks(run / "checkpoints" / "rtl_0.6000")  # passes its checksums again
    assert strip(records) == strip(reference)


@pytest.mark.slow
def test_a_flipped_bit_in_a_round_file_is_detected_and_the_round_redone(finished, tmp_path):
    source, reference = finished
    path = "imp/context_03/round_000.safetensors"
    run, records, log = resume(source, tmp_path, lambda p: (flip_byte(p / path), (p / "records" / "rtl_0.6000.json").unlink()))
    assert any(path in m and "corrupt" in m for m in log)
    assert strip(records) == strip(reference)
    original = RunDirectory(source).load_round("context_03", 0)
    redone = RunDirectory(run).load_round("context_03", 0)
    assert all(torch.equal(original[n], redone[n]) for n in original)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["theta0.safetensors", "records/rtl_0.6000.json"])
def test_corrupt_theta0_or_record_is_recomputed(finished, tmp_path, victim):
    source, reference = finished

    def damage(p):
        if victim.endswith(".json"):
            saved = json.loads((p / victim).read_text())
            saved["rows"][0]["balanced_accuracy"] = 1.0  # a plausible, wrong number
            (p / victim).write_text(json.dumps(saved))
        else:  # θ₀ is read when something is trained again
            flip_byte(p / victim, 5)
            (p / "records" / "rtl_0.6000.json").unlink()

    run, records, log = resume(source, tmp_path, damage)
    assert any(victim in m and "corrupt" in m for m in log)
    assert strip(records) == strip(reference)


def test_a_corrupt_training_state_is_discarded(tmp_path):
    directory = RunDirectory(tmp_path)
    directory.save_training("rtl_0.6000", [1, 2], {"epoch": 0, "model": {"w": torch.ones(3)}, "optimizers": []})
    flip_byte(directory.train_state_file("rtl_0.6000"), 10)
    log = []
    directory.log = log.append
    assert directory.load_training("rtl_0.6000", [1, 2]) is None
    assert log and "corrupt" in log[0] and not directory.train_state_file("rtl_0.6000").exists()


def test_a_second_process_on_the_directory_is_refused_naming_the_holder(tmp_path):
    first, second = RunDirectory(tmp_path), RunDirectory(tmp_path)
    with first.locked():
        with pytest.raises(RunLockedError, match=r"in use by pid \d+ on "):
            second.claim({"version": 2})
    second.claim({"version": 2})  # free again


def test_late_settings_fail_before_anything_is_written(tmp_path):
    for changes in ({"training": {"optimizer": {"lr": -0.1}}}, {"threads": 0},
                    {"training": {"negative_ratio": float("nan")}}, {"training": {"negative_ratio": float("inf")}},
                    {"model": {"options": {"width": 0.0}}}, {"device": "cuda:7"}, {"device": "tpu-please"}):
        with pytest.raises(ValueError):
            make_runner(tiny_config(**changes), tmp_path / "run")
        assert not (tmp_path / "run").exists(), changes


def test_numpy_integer_step_is_a_count():
    assert PruningConfig(step=np.int64(100)).step == 100 and isinstance(PruningConfig(step=np.int64(100)).step, int)


def test_imp_on_an_empty_stream_is_refused():
    empty = toy_stream(0)
    empty = type(empty)("empty", lambda gen: [], empty.loss, 0)
    model = toy_model()
    params = dict(model.named_parameters())
    with pytest.raises(DataError, match="'empty' has no training batches"):
        extract_ticket(model, {k: v.clone() for k, v in model.state_dict().items()}, ["0.weight"], empty, [10], 1,
                       OptimizerConfig(), 0)
    assert params["0.weight"].requires_grad


def test_one_context_is_refused_for_classification_and_warned_for_the_front_door():
    from dataclasses import replace

    from routing_lottery.run import build_tasks

    task = build_tasks(tiny_config())[0]
    with pytest.raises(DataError, match="at least 2 contexts"):
        replace(task, context_of_class=[0] * 10, context_names=["all digits"])
    x = torch.randn(16, 4)
    with pytest.warns(UserWarning, match="one context"):
        AdaptiveTickets(toy_model(), None).extract({"only": tensor_stream("only", x, x[:, :3], torch.nn.functional.mse_loss, 8)})


CLI_CASES = {
    "invalid YAML": ("name: [unclosed\n", [], "is not valid YAML"),
    "empty file": ("", [], "is empty"),
    "not a mapping": ("- a\n- b\n", [], "expected a mapping"),
    "--set typo": (None, ["--set", "training.epochs=[4"], "--set training.epochs=[4: the value is not valid YAML"),
    "--set cuda": (None, ["--set", "device=cuda"], "CUDA is not available"),
    "--set inf ratio": (None, ["--set", "training.negative_ratio=.inf"], "--set (over"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_prints_one_line_per_mistake_and_a_traceback_only_with_debug(tmp_path, case):
    text, extra, expected = CLI_CASES[case]
    config = tmp_path / "config.yaml"
    if text is None:
        from routing_lottery.cli import packaged_config

        config.write_text(packaged_config("digits").read_text())
    else:
        config.write_text(text)
    args = ["run", str(config), "--scale", "smoke", "--out", str(tmp_path / "out"), *extra] if text is None else \
        ["run", str(config), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert expected in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()
    debug = CliRunner().invoke(app, ["--debug", *args])
    assert debug.exception is not None and not isinstance(debug.exception, SystemExit)


def test_cli_out_naming_a_file_and_bad_results_files(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["demo", "--scale", "smoke", "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file, not a run directory" in " ".join(result.output.split())
    for content in ('[{"method": "rtl", "spars', '{"not": "a list"}', "[1, 2]"):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "results.json").write_text(content)
        result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
        assert result.exit_code == 2 and "results.json" in result.output and "Traceback" not in result.output


def test_set_can_repair_an_invalid_config_file(tmp_path):
    from routing_lottery.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntraining: {epochs: 0}\n")
    assert load_config(path, overrides={"training": {"epochs": 4}}).training.epochs == 4
    with pytest.raises(ConfigError, match="c.yaml with --set"):
        load_config(path, overrides={"seed": 1})


def test_routing_refuses_a_model_switched_to_training_behind_its_back():
    from routing_lottery.masks import MaskSet
    from routing_lottery.routed import RoutedModel

    net = toy_model()
    masks = MaskSet.from_tickets([{"0.weight": torch.ones(16, 4, dtype=torch.bool)}] * 2)
    routed = RoutedModel(net, masks)
    net.train()
    with pytest.raises(RuntimeError, match="call routed.train"):
        routed(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))


def test_the_front_door_holds_the_lock_while_it_extracts(tmp_path):
    import routing_lottery.tickets as tickets_module

    seen = []
    real = tickets_module.extract_ticket

    def probe(*args, **kwargs):
        with pytest.raises(RunLockedError):
            RunDirectory(tmp_path).claim({})
        seen.append(True)
        return real(*args, **kwargs)

    x = torch.randn(16, 4)
    streams = {n: tensor_stream(n, x, x[:, :3], torch.nn.functional.mse_loss, 8) for n in ("a", "b")}
    tickets_module.extract_ticket, saved = probe, tickets_module.extract_ticket
    try:
        AdaptiveTickets(toy_model(), None, out=tmp_path).extract(streams)
    finally:
        tickets_module.extract_ticket = saved
    assert seen


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_finished_run_with_a_damaged_identity_resumes_from_its_copy(finished, tmp_path, damage):
    """Issue 23 (10): one flipped bit in identity.json made a finished run unresumable, and deleting it was
    blamed on an older routing-lottery; its checksummed copy proves the run is this one."""
    source, reference = finished

    def hurt(p):
        if damage == "flip":
            flip_byte(p / "identity.json", 60)
        else:
            (p / "identity.json").unlink()

    run, records, log = resume(source, tmp_path, hurt)
    assert any(m.startswith("identity.json was ") and "rewritten from identity.copy.json" in m for m in log), log
    assert (run / "identity.json").read_bytes() == (source / "identity.json").read_bytes()
    assert strip(records) == strip(reference)


@pytest.mark.slow
def test_a_finished_run_without_any_identity_is_refused_naming_identity_json(finished, tmp_path):
    source, _ = finished

    def hurt(p):
        flip_byte(p / "identity.json", 60)
        (p / "identity.copy.json").unlink()

    with pytest.raises(ConfigError, match=r"identity.json is corrupt .*and its copy identity.copy.json is missing: "
                                          r".*choose another output directory, or delete"):
        resume(source, tmp_path, hurt)
