"""Exported single-context subnetworks: exact weights, a standalone loader, a torch.export program, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from routing_lottery.cli import app, packaged_config
from routing_lottery.config import load_config
from routing_lottery.export import INDEX_FILE, LOADER_FILE, PROGRAM_FILE, WEIGHTS_FILE, export_context, load_compact_state
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
    program = torch.export.load(str(tmp_path / PROGRAM_FILE)).module()
    with torch.no_grad():
        assert program(torch.randn(13, 4)).shape == (13, 3)  # exported with 2 rows, runs 13
        assert torch.allclose(program(x[:5]), routed(x[:5], "b"), atol=1e-6)


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
program = torch.export.load({str(tmp_path / PROGRAM_FILE)!r}).module()
with torch.no_grad():
    assert torch.allclose(net(x), expected, atol=1e-6) and torch.allclose(program(x), expected, atol=1e-6)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    export_context(_routed(), "c", tmp_path, torch.randn(3, 4))
    path = tmp_path / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the stored values
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_compact_state(str(path))
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_compact_state(str(path))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a routing-lottery compact export"):
        load_compact_state(str(path))
    with pytest.raises(ValueError, match="unknown context"):
        export_context(_routed(), "nope", tmp_path / "x", torch.randn(2, 4))


def test_rtl_export_on_a_finished_run(tmp_path):
    config = load_config(packaged_config("digits"), "smoke", {
        "data": {"train_per_class": 8, "test_per_class": 4, "image_size": 8, "calibration": 0.0},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.5},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}, "methods": ["rtl"], "deploy": {"routers": []}})
    make_runner(config, tmp_path / "run").run_all()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--context", "seven"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "run" / "export" / "seven_0.5000" / INDEX_FILE).read_text())
    assert index["context"] == "seven" and index["sparsity"] == 0.5 and index["verification"]["equal"]
    assert abs(index["density"] - 0.5) < 0.01
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--context", "seven", "--sparsity", "0.9"])
    assert result.exit_code == 2 and "no RTL checkpoint at sparsity 0.9" in " ".join(result.output.split())


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
