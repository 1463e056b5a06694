"""Exported single-context subnetworks: exact weights, a standalone loader, a torch.export program, clear errors."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from routing_lottery.cli import app, packaged_config
from routing_lottery.config import load_config
from routing_lottery.errors import CheckpointError
from routing_lottery.export import (INDEX_FILE, LOADER_FILE, PROGRAM_FILE, WEIGHTS_FILE, export_context,
                                    load_compact_state, load_program)
from routing_lottery.run.deploy import export_run
from routing_lottery.masks import MaskSet
from routing_lottery.pruning import random_mask_like
from routing_lottery.routed import RoutedModel
from routing_lottery.run import make_runner
from toy import toy_model


def _routed():
    model = toy_model()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    base = {n: torch.rand(params[n].shape, generator=g) > 0.7 for n in ("0.weight", "2.weight")}
    masks = MaskSet.from_tickets([random_mask_like(base, g) for _ in range(3)], ["a", "b", "c"])
    return RoutedModel(model, masks)


def test_the_compact_weights_rebuild_the_subnetwork_exactly(tmp_path):
    routed = _routed()
    x = torch.randn(9, 4)
    index = export_context(routed, "b", tmp_path, x[:2], verify=x)
    state = load_compact_state(str(tmp_path / WEIGHTS_FILE))
    expected = routed.standalone("b").state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)  # bit for bit, pruned weights exactly zero
    assert index["verification"]["equal"] and index["verification"]["max_abs_diff"] == 0.0
    assert index["kept_weights"] == sum(int(m.sum()) for m in routed.mask("b").values())
    files = {f["file"]: f for f in json.loads((tmp_path / INDEX_FILE).read_text())["files"]}
    assert files[WEIGHTS_FILE]["bytes"] == (tmp_path / WEIGHTS_FILE).stat().st_size
    assert index["compact_ratio"] < 1.0  # ~30 % density: values + 1 bit per weight beat 4 bytes per weight
    # the program runs any batch size with torch alone
    program = load_program(tmp_path / PROGRAM_FILE).module()
    with torch.no_grad():
        assert program(torch.randn(13, 4)).shape == (13, 3)  # exported with 2 rows, runs 13
        assert torch.allclose(program(x[:5]), routed(x[:5], "b"), atol=1e-6)


@pytest.mark.slow
def test_the_loader_and_the_program_run_without_this_library(tmp_path):
    routed = _routed()
    x = torch.randn(4, 4)
    export_context(routed, 0, tmp_path, x)
    expected = routed(x, 0)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, runpy, torch
sys.modules["routing_lottery"] = None  # importing this library now fails
loader = runpy.run_path({str(tmp_path / LOADER_FILE)!r})
state = loader["load_compact_state"]({str(tmp_path / WEIGHTS_FILE)!r})
net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
net.load_state_dict(state)
x, expected = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "expected.pt")!r})
program = loader["load_program"]({str(tmp_path / PROGRAM_FILE)!r}).module()
with torch.no_grad():
    assert torch.allclose(net(x), expected, atol=1e-6) and torch.allclose(program(x), expected, atol=1e-6)
path = {str(tmp_path / PROGRAM_FILE)!r}
data = bytearray(open(path, "rb").read())
data[len(data) // 2] ^= 1  # one bit: torch.export.load alone would not notice
open(path, "wb").write(bytes(data))
try:
    loader["load_program"](path)
except loader["CheckpointError"] as err:
    assert "model.pt2" in str(err), err
else:
    raise AssertionError("a flipped bit in model.pt2 was loaded")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def _rerecord(folder, name):
    """Record ``name``'s current size and sha256 in export.json, as an editor covering their tracks would."""
    index = json.loads((folder / INDEX_FILE).read_text())
    data = (folder / name).read_bytes()
    entry = next(f for f in index["files"] if f["file"] == name)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / INDEX_FILE).write_text(json.dumps(index))


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    export_context(_routed(), "c", tmp_path, torch.randn(3, 4))
    path = tmp_path / WEIGHTS_FILE
    original = path.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0xFF  # one flipped byte in the stored values
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is truncated, corrupt or was edited"):
        load_compact_state(str(path))
    _rerecord(tmp_path, WEIGHTS_FILE)  # export.json agrees now: the file's own digest still refuses it
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_compact_state(str(path))
    path.write_bytes(bytes(data[: len(data) // 2]))
    _rerecord(tmp_path, WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_compact_state(str(path))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))
    _rerecord(tmp_path, WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="not a routing-lottery compact export"):
        load_compact_state(str(path))
    with pytest.raises(ValueError, match="unknown context"):
        export_context(_routed(), "nope", tmp_path / "x", torch.randn(2, 4))


@pytest.mark.parametrize("edit", [(b"[16, 4]", b"[4, 16]"), (b'"shapes"', b'"shapez"'), (b'"0.weight', b'"1.weight')])
def test_the_weights_digest_covers_names_shapes_and_metadata(tmp_path, edit):
    """The old digest covered the values only: a transposed shape loaded silently, a renamed key gave KeyError."""
    routed = _routed()
    export_context(routed, "a", tmp_path, torch.randn(3, 4))
    path = tmp_path / WEIGHTS_FILE
    data = path.read_bytes()
    assert data.count(edit[0]) == 1
    path.write_bytes(data.replace(*edit))  # same length: the header still parses
    _rerecord(tmp_path, WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: checksum mismatch"):
        load_compact_state(path)


def test_the_program_and_export_json_are_verified(tmp_path):
    routed = _routed()
    x = torch.randn(5, 4)
    export_context(routed, "a", tmp_path, x)
    program, index = tmp_path / PROGRAM_FILE, tmp_path / INDEX_FILE
    original = program.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    program.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt2 is truncated, corrupt or was edited"):
        load_program(program)
    program.write_bytes(original)
    with torch.no_grad():
        assert torch.equal(load_program(program).module()(x), routed(x, "a"))
    text = index.read_text()
    for bad, problem in [("{", "is not valid JSON"), ("[]", "not a routing-lottery export index"),
                         (text.replace('"files": [', '"files": [7, '), "must list each file"),
                         (text + " " * (1 << 20), "larger than"),
                         (text.replace("routing-lottery-compact/2", "routing-lottery-compact/1"), "export again"),
                         # these two spoil model.pt2's entry only
                         (text.replace(hashlib.sha256(original).hexdigest(), "0" * 64), "model.pt2 is truncated"),
                         (text.replace('"file": "model.pt2"', '"file": "model.pt3"'), "does not list model.pt2")]:
        index.write_text(bad)
        with pytest.raises(CheckpointError, match=problem):
            load_program(program)
        if "model.pt2" not in problem:
            with pytest.raises(CheckpointError, match=r"export\.json"):
                load_compact_state(tmp_path / WEIGHTS_FILE)
    index.unlink()
    with pytest.raises(CheckpointError, match=r"export\.json cannot be read"):
        load_compact_state(tmp_path / WEIGHTS_FILE)


def test_an_output_path_that_a_link_leads_elsewhere_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / WEIGHTS_FILE).symlink_to(outside / "victim")
    with pytest.raises(CheckpointError, match=r"weights\.safetensors resolves to .*outside the export directory"):
        export_context(_routed(), "a", tmp_path / "out", torch.randn(3, 4))
    assert not list(outside.iterdir())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    config = load_config(packaged_config("digits"), "smoke", {
        "data": {"train_per_class": 8, "test_per_class": 4, "image_size": 8, "calibration": 0.0},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.5},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}, "methods": ["rtl"], "deploy": {"routers": []}})
    run = tmp_path_factory.mktemp("finished") / "run"
    make_runner(config, run).run_all()
    return run


@pytest.mark.slow
def test_rtl_export_on_a_finished_run(finished_run):
    result = CliRunner().invoke(app, ["export", str(finished_run), "--context", "seven"])
    assert result.exit_code == 0, result.output
    index = json.loads((finished_run / "export" / "seven_0.5000" / INDEX_FILE).read_text())
    assert index["context"] == "seven" and index["sparsity"] == 0.5 and index["verification"]["equal"]
    assert abs(index["density"] - 0.5) < 0.01
    result = CliRunner().invoke(app, ["export", str(finished_run), "--context", "seven", "--sparsity", "0.9"])
    assert result.exit_code == 2 and "no RTL checkpoint at sparsity 0.9" in " ".join(result.output.split())


@pytest.mark.slow
def test_a_negative_context_is_an_index_out_of_range_not_a_name(finished_run):
    with pytest.raises(ValueError, match=r"context id -1 is outside 0\.\.9"):
        export_run(finished_run, "-1")
    with pytest.raises(ValueError, match="unknown context 'eleven'"):
        export_run(finished_run, "eleven")


def _rename_contexts(run, names):
    """Give the run's RTL checkpoints other context names, index checksum and all (as a data set's class names would)."""
    from routing_lottery.io import _index_sha256

    for index_path in run.glob("checkpoints/rtl_*/tickets.json"):
        index = json.loads(index_path.read_text())
        index["context_names"][: len(names)] = names
        index["index_sha256"] = _index_sha256(index)
        index_path.write_text(json.dumps(index))


@pytest.mark.slow
def test_context_names_from_data_never_lead_outside_the_run(finished_run, tmp_path):
    """Class names `../../../x` and an absolute path once put export files above the run and at that path."""
    root = tmp_path / "a" / "b" / "c"
    run = root / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("export"))
    absolute = str(tmp_path / "abs" / "x")
    _rename_contexts(run, ["../../../x", absolute, "sweet/pepper"])  # context 3 stays "three"
    for k in range(3):
        assert export_run(run, str(k))["verification"]["equal"]
    folders = sorted(p.name for p in (run / "export").iterdir())
    assert len(folders) == 3 and {"_x@0_0.5000", "sweet_pepper@2_0.5000"} < set(folders)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,80}", f) for f in folders), folders
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "export" in p.parts}
    assert len(written) == 3 * 4 and all(p.parts[:5] == ("a", "b", "c", "run", "export") for p in written), written
    assert not (tmp_path / "abs").exists()
    # a link already in the run directory (an unpacked run may bring one) is not followed out of it
    (run / "export" / "three_0.5000").symlink_to(tmp_path)
    with pytest.raises(CheckpointError, match="outside the run directory"):
        export_run(run, "three")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_kernels_are_chosen_per_layer_and_the_prepared_module_computes_the_same(tmp_path):
    routed = _routed()
    x = torch.randn(32, 4)
    index = export_context(routed, "a", tmp_path, x[:2], verify=x, kernels=True)
    layers = {c["layer"]: c for c in index["kernels"]["layers"]}
    assert set(layers) == {"0", "2"} and all(c["kernel"] in ("dense", "csr", "bsr") for c in layers.values())
    assert index["kernels"]["speedup"] > 0 and index["kernels"]["batch"] == 32
    prepared = torch.load(tmp_path / "prepared.pt", weights_only=False)
    with torch.no_grad():
        assert torch.allclose(prepared(x), routed(x, "a"), atol=1e-5)
