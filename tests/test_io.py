import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

from routing_lottery import io as rio
from routing_lottery.io import (
    CheckpointError, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, directory_bytes,
    load_masks, load_tickets, model_fingerprint, read_json, save_tickets, torch_load,
)
from routing_lottery.masks import MaskSet

K = 3
MASKED = ("0.weight", "4.weight")


def _model(width: int = 10, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, width))
    model.train()
    model(torch.randn(8, 2, 10, 10))  # move the BN running stats away from their defaults
    return model.eval()


def _masks(model: nn.Module, seed: int = 1) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    stacked = {n: torch.rand((K, *params[n].shape), generator=g) < 0.1 for n in MASKED}
    return MaskSet(stacked, ["a", "b", "c"])


@pytest.fixture()
def saved(tmp_path):
    model, masks = _model(), _masks(_model())
    directory = save_tickets(tmp_path / "ckpt", model, masks, {"sparsity": 0.7})
    return directory, model, masks


def test_round_trip_restores_masks_union_weights_and_buffers(saved):
    directory, model, masks = saved
    fresh = _model(seed=123)
    loaded, metadata = load_tickets(directory, fresh)
    assert metadata == {"sparsity": 0.7}
    assert loaded.context_names == ["a", "b", "c"]
    assert loaded.tensor_names == list(MASKED)
    for n in MASKED:
        assert torch.equal(loaded.stacked[n], masks.stacked[n])
    want, got = model.state_dict(), fresh.state_dict()
    for n, union in masks.union().items():
        assert torch.equal(got[n][union], want[n][union])
        assert (got[n][~union] == 0).all()
        assert union.any() and not union.all()  # both branches above were exercised
    for key in want:
        if key not in MASKED:
            assert torch.equal(got[key], want[key]), key
    assert got["1.running_mean"].abs().sum() > 0 and int(got["1.num_batches_tracked"]) == 1


def test_stored_size_is_union_plus_k_bits_plus_dense(saved):
    directory, model, masks = saved
    state = model.state_dict()
    bound = sum(4 * int(u.sum()) + K * ((u.numel() + 7) // 8) for u in masks.union().values())
    bound += sum(t.numel() * t.element_size() for k, t in state.items() if k not in MASKED)
    index_bytes = (directory / "tickets.json").stat().st_size
    weights_bytes = (directory / "tickets.safetensors").stat().st_size
    total = directory_bytes(directory)
    assert total == index_bytes + weights_bytes
    assert bound <= weights_bytes and total <= bound + 4096
    # The union keeps ~27% of the masked weights, so storing them densely would break the bound.
    dense = sum(t.numel() * t.element_size() for t in state.values())
    assert dense > bound + 4096


def test_truncated_weights_file_is_reported(saved):
    directory, _, _ = saved
    path = directory / "tickets.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated|corrupt") as err:
        load_tickets(directory, _model())
    assert "tickets.safetensors" in str(err.value)


def _write_index(directory, index):
    """Write ``index`` as a consistent writer would: re-signed when it carries an index checksum.

    The canonical form is spelled out here rather than imported, so the tests pin the format.
    """
    if "index_sha256" in index:
        body = {k: v for k, v in index.items() if k != "index_sha256"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")
        index = {**index, "index_sha256": hashlib.sha256(canonical).hexdigest()}
    (directory / "tickets.json").write_text(json.dumps(index, indent=2))


def _rewrite(directory, tensors=None, edit=None):
    """Replace stored tensors and/or edit the index, keeping every recorded hash consistent."""
    index = json.loads((directory / "tickets.json").read_text())
    if tensors is not None:
        blob = safetensors.torch.load((directory / "tickets.safetensors").read_bytes())
        blob.update(tensors)
        data = safetensors.torch.save(blob)
        (directory / "tickets.safetensors").write_bytes(data)
        index["weights_sha256"] = hashlib.sha256(data).hexdigest()
    if edit is not None:
        edit(index)
    _write_index(directory, index)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_file_unparsable_even_with_matching_hash(saved):
    directory, _, _ = saved
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00not json header"
    (directory / "tickets.safetensors").write_bytes(garbage)
    index = json.loads((directory / "tickets.json").read_text())
    index["weights_sha256"] = hashlib.sha256(garbage).hexdigest()
    _write_index(directory, index)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tickets(directory, _model())


def _set(path, value):
    def edit(index):
        node = index
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(["version"], 4), "version 4"),
        (_set(["format"], "something/else"), "not a ticket checkpoint"),
        (_set(["weights_sha256"], "0" * 64), "truncated or corrupt"),
        (_set(["state", "0.bias", "dtype"], "float16"), "fingerprint"),
    ],
)
def test_edited_index_is_reported(saved, edit, message):
    directory, _, _ = saved
    _rewrite(directory, edit=edit)
    fresh = _model(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(CheckpointError, match=message):
        load_tickets(directory, fresh)
    assert _unchanged(fresh, before)


def test_truncated_index_is_reported(saved):
    directory, _, _ = saved
    path = directory / "tickets.json"
    path.write_text(path.read_text()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="tickets.json is not valid JSON"):
        load_tickets(directory, _model())


# -- issue 12, item 7: validate everything, then load ------------------------------------------
def test_wrong_shaped_stored_tensor_leaves_the_model_untouched(saved):
    """Every hash consistent, one dense tensor the wrong shape: today load_state_dict copies the
    rest of the state before it fails, with a RuntimeError."""
    directory, _, _ = saved
    _rewrite(directory, tensors={"state/1.running_mean": torch.zeros(9)})
    fresh = _model(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"tickets\.safetensors.*1\.running_mean"):
        load_tickets(directory, fresh)
    assert _unchanged(fresh, before)


def _product_overflows(index):
    # 2**32 * 2**32 wraps to 0 in int64: with 0 stored bytes the old reader reshaped to it.
    index["tensors"]["0.weight"] = [2**32, 2**32]
    index["state"]["0.weight"]["shape"] = [2**32, 2**32]
    signature = {k: (v["shape"], v["dtype"]) for k, v in index["state"].items()}
    index["fingerprint"] = rio._fingerprint(signature)


@pytest.mark.parametrize(
    "tensors, edit, raw, culprit",
    [
        pytest.param({"masks/0.weight": torch.tensor(7, dtype=torch.uint8)}, None, None, "tickets.safetensors",
                     id="0-d packed mask"),
        pytest.param(None, _set(["tensors", "0.weight", 0], float("inf")), None, "tickets.json", id="Infinity dim"),
        pytest.param(None, _set(["tensors", "0.weight", 0], -8), None, "tickets.json", id="negative dim"),
        pytest.param(None, _set(["tensors", "0.weight", 3], 3.0), None, "tickets.json", id="float dim"),
        pytest.param({"masks/0.weight": torch.zeros(K, 0, dtype=torch.uint8)}, _product_overflows, None,
                     "tickets.json", id="dims whose product overflows"),
        pytest.param(None, _set(["context_names"], {"a": 1, "b": 2, "c": 3}), None, "tickets.json",
                     id="object for array"),
        pytest.param(None, _set(["context_names"], [0, 1, 2]), None, "tickets.json", id="numbers for names"),
        pytest.param(None, _set(["version"], True), None, "tickets.json", id="bool version"),
        pytest.param(None, _set(["state"], [1, 2]), None, "tickets.json", id="array for object"),
        pytest.param(None, None, "[" * 100_000 + "]" * 100_000, "tickets.json", id="deeply nested"),
        pytest.param(None, _set(["metadata", "deep"], json.loads("[" * 70 + "]" * 70)), None, "tickets.json",
                     id="nested beyond the limit"),
    ],
)
@pytest.mark.parametrize("loader", ["load_tickets", "load_masks"])
def test_malformed_checkpoint_raises_checkpoint_error_naming_the_file(saved, tensors, edit, raw, culprit, loader):
    directory, _, _ = saved
    if raw is not None:
        (directory / "tickets.json").write_text(raw)
    else:
        _rewrite(directory, tensors=tensors, edit=edit)
    fresh = _model(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(CheckpointError, match=culprit.replace(".", r"\.")):
        load_tickets(directory, fresh) if loader == "load_tickets" else load_masks(directory)
    assert _unchanged(fresh, before)


def test_huge_index_is_refused_before_parsing(saved, monkeypatch):
    directory, _, _ = saved
    monkeypatch.setattr(rio, "MAX_INDEX_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"tickets\.json is larger than 1000 bytes"):
        load_masks(directory)


def test_metadata_that_could_not_be_read_back_is_refused_at_save(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="nests deeper"):
        save_tickets(tmp_path / "ckpt", model, _masks(model), {"deep": json.loads("[" * 70 + "]" * 70)})
    assert not (tmp_path / "ckpt").exists()


def test_masked_zero_d_parameter_round_trips(tmp_path):
    model = nn.Linear(3, 2)
    model.register_parameter("scale", nn.Parameter(torch.tensor(2.5)))
    masks = MaskSet({"scale": torch.tensor([True, False]), "weight": torch.ones(2, 2, 3, dtype=torch.bool)})
    save_tickets(tmp_path / "ckpt", model, masks)
    fresh = nn.Linear(3, 2)
    fresh.register_parameter("scale", nn.Parameter(torch.tensor(0.0)))
    loaded, _ = load_tickets(tmp_path / "ckpt", fresh)
    assert loaded.shapes == {"scale": (), "weight": (2, 3)}
    assert float(fresh.scale.detach()) == 2.5 and torch.equal(fresh.weight, model.weight)


# -- issue 12, item 5: the index protects itself -----------------------------------------------
def test_edited_context_names_are_detected(saved):
    directory, _, _ = saved
    path = directory / "tickets.json"
    path.write_text(path.read_text().replace('"b"', '"x"'))
    with pytest.raises(CheckpointError, match=r"tickets\.json was edited or is corrupt.*index_sha256"):
        load_tickets(directory, _model())
    with pytest.raises(CheckpointError, match="index_sha256"):
        load_masks(directory)


def test_version_flipped_to_1_does_not_skip_a_present_checksum(saved):
    directory, _, _ = saved
    path = directory / "tickets.json"
    path.write_text(path.read_text().replace('"version": 2', '"version": 1').replace('"b"', '"x"'))
    with pytest.raises(CheckpointError, match="index_sha256"):
        load_tickets(directory, _model())


def test_index_format_version_2_with_checksum(saved):
    directory, _, _ = saved
    index = json.loads((directory / "tickets.json").read_text())
    assert index["version"] == 2
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")
    assert index["index_sha256"] == hashlib.sha256(canonical).hexdigest()


def test_version_1_checkpoint_without_index_checksum_still_loads(saved):
    directory, model, masks = saved
    index = json.loads((directory / "tickets.json").read_text())
    index.pop("index_sha256", None)
    index["version"] = 1
    (directory / "tickets.json").write_text(json.dumps(index, indent=2))
    fresh = _model(seed=5)
    loaded, metadata = load_tickets(directory, fresh)
    assert loaded.context_names == ["a", "b", "c"] and metadata == {"sparsity": 0.7}
    assert torch.equal(fresh.state_dict()["4.bias"], model.state_dict()["4.bias"])


@pytest.mark.parametrize("missing", ["tickets.json", "tickets.safetensors", None])
def test_missing_files_are_reported(saved, missing):
    directory, _, _ = saved
    if missing is None:
        directory = directory.parent / "nowhere"
    else:
        (directory / missing).unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_tickets(directory, _model())
    assert str(directory) in str(err.value)


def test_different_model_is_reported(saved):
    directory, _, _ = saved
    other = _model(width=7)
    assert model_fingerprint(other) != model_fingerprint(_model())
    with pytest.raises(CheckpointError, match="different model") as err:
        load_tickets(directory, other)
    assert "4.weight" in str(err.value) and "4.bias" in str(err.value)


def test_fingerprint_ignores_values_but_not_dtype():
    assert model_fingerprint(_model(seed=0)) == model_fingerprint(_model(seed=9))
    assert model_fingerprint(_model()) != model_fingerprint(_model().double())


def test_mask_on_missing_tensor_is_rejected_at_save(tmp_path):
    model = _model()
    masks = MaskSet({"9.weight": torch.ones(K, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="9.weight"):
        save_tickets(tmp_path / "ckpt", model, masks)
    wrong_shape = MaskSet({"0.weight": torch.ones(K, 3, dtype=torch.bool), "4.weight": torch.ones(K, 10, 512, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        save_tickets(tmp_path / "ckpt", model, wrong_shape)
    assert not (tmp_path / "ckpt").exists()


def test_unserialisable_metadata_leaves_the_old_checkpoint(saved):
    directory, model, masks = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(TypeError):
        save_tickets(directory, model, _masks(model, seed=2), {"bad": object()})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "old")
    assert path.read_text() == "old"

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(rio.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(path, b"new")
    assert path.read_text() == "old"
    assert _listing(path.parent) == ["f.txt"]


def test_atomic_torch_save_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(path, {"epoch": 1, "w": torch.arange(3)})
    with pytest.raises(Exception):
        atomic_torch_save(path, {"epoch": 2, "w": torch.zeros(1000), "f": lambda: None})
    assert _listing(tmp_path) == ["state.pt"]
    loaded = torch_load(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.arange(3))


def test_atomic_json_round_trip_and_unserialisable_leaves_nothing(tmp_path):
    path = tmp_path / "a" / "b" / "r.json"
    atomic_write_json(path, {"x": [1, 2.5, "s"]})
    assert read_json(path) == {"x": [1, 2.5, "s"]}
    assert path.read_text().startswith("{\n  ")  # indented
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert read_json(path) == {"x": [1, 2.5, "s"]}
    assert _listing(path.parent) == ["r.json"]


def test_read_json_names_a_corrupt_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"x": [1, 2')
    with pytest.raises(CheckpointError, match="r.json"):
        read_json(path)


def test_torch_load_optimizer_state_and_corrupt_file(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "train.pt"
    atomic_torch_save(path, {"epoch": 0, "model": model.state_dict(), "optimizers": [opt.state_dict()]})
    saved = torch_load(path)
    fresh = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(saved["optimizers"][0])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="train.pt.*truncated or corrupt"):
        torch_load(path)


def test_torch_load_detects_a_flipped_bit(tmp_path):
    path = tmp_path / "train.pt"
    weights = torch.arange(64, dtype=torch.float32)
    atomic_torch_save(path, {"epoch": 3, "w": weights})
    data = bytearray(path.read_bytes())
    assert data.startswith(b"RTLSHA256 ") and data[74:75] == b"\n"
    at = bytes(data).find(weights.numpy().tobytes())
    assert at > 0
    data[at + 4 * 10] ^= 0x01  # 10.0 becomes a nearby float: torch.load alone reads it happily
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"train\.pt is truncated or corrupt.*sha256"):
        torch_load(path)


def _write_with_header(path, obj):
    import io as _io

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    body = buffer.getvalue()
    path.write_bytes(b"RTLSHA256 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def test_torch_checkpoints_pack_their_tensors_and_give_them_back_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"epoch": 1, "model": {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(7)},
             "optimizers": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(6, generator=g)}},
                             "param_groups": [{"lr": 1e-3, "params": [0]}]}, {"state": {}, "param_groups": []}],
             "masks": (torch.rand(2, 2, generator=g) < 0.5, torch.zeros(0)), "name": "x"}
    path = tmp_path / "train.pt"
    atomic_torch_save(path, state)
    raw = torch.load(_body(path), weights_only=True)
    assert len(raw["blobs"]) == 3  # float32, int64, bool: one flat tensor each, not one per tensor
    loaded = torch_load(path)
    assert loaded["epoch"] == 1 and loaded["name"] == "x" and isinstance(loaded["masks"], tuple)
    for got, want in [(loaded["model"]["w"], state["model"]["w"]), (loaded["model"]["n"], state["model"]["n"]),
                      (loaded["optimizers"][0]["state"][0]["exp_avg"], state["optimizers"][0]["state"][0]["exp_avg"]),
                      (loaded["optimizers"][0]["state"][0]["step"], state["optimizers"][0]["state"][0]["step"]),
                      (loaded["masks"][0], state["masks"][0]), (loaded["masks"][1], state["masks"][1])]:
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert loaded["optimizers"][1] == {"state": {}, "param_groups": []}
    # a file written before packing (plain torch.save behind the header) still loads
    _write_with_header(tmp_path / "old.pt", {"epoch": 2, "w": torch.ones(2)})
    assert torch.equal(torch_load(tmp_path / "old.pt")["w"], torch.ones(2))


def _body(path):
    import io as _io

    return _io.BytesIO(path.read_bytes()[75:])


def test_torch_load_refuses_packed_references_outside_their_tensors(tmp_path):
    for skeleton, blobs, why in [(("__rtl_tensor__", 0, 2, (3,)), [torch.zeros(4)], "runs past its blob"),
                                 (("__rtl_tensor__", 1, 0, (1,)), [torch.zeros(4)], "bad tensor reference"),
                                 (("__rtl_tensor__", 0, -1, (1,)), [torch.zeros(4)], "bad tensor reference"),
                                 ({"a": 1}, [torch.zeros(2, 2)], "not a list of 1-D tensors")]:
        path = tmp_path / "hostile.pt"
        _write_with_header(path, {"__rtl_packed__": 1, "skeleton": skeleton, "blobs": blobs})
        with pytest.raises(CheckpointError, match=f"hostile.pt is truncated or corrupt.*{why}"):
            torch_load(path)


def test_torch_load_refuses_a_file_without_checksum_header(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"epoch": 0}, path)
    with pytest.raises(CheckpointError, match=r"plain\.pt has no RTLSHA256 checksum header"):
        torch_load(path)
    with pytest.raises(FileNotFoundError):
        torch_load(tmp_path / "absent.pt")


# -- issue 12, item 9: permissions and litter --------------------------------------------------
def _process_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(rio, "_UMASK", umask, raising=False)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {})
    atomic_torch_save(tmp_path / "c.pt", {})
    for name in ("a.txt", "b.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_umask_is_read_at_import_without_changing_it():
    script = (
        "import os, tempfile, pathlib, stat; os.umask(0o027)\n"
        "from routing_lottery import io\n"
        "assert os.umask(0o027) == 0o027, 'import changed the umask'\n"
        "d = pathlib.Path(tempfile.mkdtemp()); io.atomic_write_text(d / 'f', 'x')\n"
        "print(oct(stat.S_IMODE((d / 'f').stat().st_mode)))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == oct(0o640)
    assert rio._UMASK == _process_umask()


def test_remove_stale_temp_files_removes_only_writer_litter(tmp_path):
    ckpt = tmp_path / "checkpoints" / "rtl_0.5"
    # A writer killed mid-write: the context manager is entered and never left.
    killed = rio._atomic_file(ckpt / "tickets.safetensors", "wb")
    killed.__enter__().write(b"half")
    litter = sorted(p for p in ckpt.iterdir())
    assert len(litter) == 1 and litter[0].name.startswith(".tickets.safetensors.rtl-")
    stale = [tmp_path / ".identity.json.rtl-ab_3x9q1.tmp",
             tmp_path / "imp" / "s" / ".round_001.safetensors.rtl-k2m0z8q_.tmp"]
    keep = [tmp_path / "a.json", tmp_path / ".a.json.tmp", tmp_path / "a.json.rtl-abcdefgh.tmp",
            tmp_path / ".a.json.rtl-ABCDEFGH.tmp", tmp_path / ".a.json.rtl-abcdefg.tmp", tmp_path / ".lock"]
    for p in stale + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / ".dir.rtl-abcdefgh.tmp").mkdir()  # a directory with the pattern's name is not litter
    outside = tmp_path.parent / f"{tmp_path.name}-target"
    outside.mkdir()
    (outside / ".f.rtl-abcdefgh.tmp").write_bytes(b"x")
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)  # not followed
    (tmp_path / ".l.rtl-abcdefgh.tmp").symlink_to(outside / ".f.rtl-abcdefgh.tmp")  # a link, not a file: kept

    removed = rio.remove_stale_temp_files(tmp_path)

    assert sorted(removed) == sorted(stale + litter)
    assert not any(p.exists() for p in stale + litter)
    assert all(p.exists() for p in keep)
    assert (tmp_path / ".dir.rtl-abcdefgh.tmp").is_dir() and (outside / ".f.rtl-abcdefgh.tmp").exists()
    assert (tmp_path / ".l.rtl-abcdefgh.tmp").is_symlink()
    assert rio.remove_stale_temp_files(tmp_path) == []
    assert rio.remove_stale_temp_files(tmp_path / "absent") == []


def test_remove_stale_temp_files_spares_a_users_files_named_like_temp_files(tmp_path):
    """Issue 23 (21): only the library's own ``.NAME.rtl-XXXXXXXX.tmp`` is litter; before the marker, a user's
    ``.notes.20240101.tmp`` fitted the pattern and was deleted on resume."""
    users = [tmp_path / name for name in ("notes.tmp", ".x.tmp", ".notes.20240101.tmp", ".draft.abcdefgh.tmp",
                                          ".identity.json.k2m0z8q_.tmp", "records/.mine.ab_3x9q1.tmp")]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("my own words")
    assert rio.remove_stale_temp_files(tmp_path) == []
    assert all(p.read_text() == "my own words" for p in users)


def test_remove_stale_temp_files_spares_another_users_file(tmp_path, monkeypatch):
    litter = tmp_path / ".a.json.rtl-abcdefgh.tmp"
    litter.write_bytes(b"x")
    monkeypatch.setattr(os, "geteuid", lambda: litter.stat().st_uid + 1)  # as if another user had made it
    assert rio.remove_stale_temp_files(tmp_path) == [] and litter.exists()
    monkeypatch.undo()
    assert rio.remove_stale_temp_files(tmp_path) == [litter]


def test_tied_tensors_are_stored_once_and_come_back_tied_in_value(tmp_path):
    """A key that names the same tensor as another (a tied lm_head) is stored once, as an alias (version 3)."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10, bias=False))
    model[2].weight = model[0].weight  # tied: the state dict names it twice
    masks = MaskSet({"1.weight": torch.rand(2, 4, 4) < 0.5}, ["a", "b"])
    save_tickets(tmp_path, model, masks)
    stored = safetensors.torch.load((tmp_path / "tickets.safetensors").read_bytes())
    index = json.loads((tmp_path / "tickets.json").read_text())
    assert "state/2.weight" not in stored and index["aliases"] == {"2.weight": "0.weight"} and index["version"] == 3
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10, bias=False))
    load_tickets(tmp_path, fresh)
    assert torch.equal(fresh[2].weight, model[0].weight) and torch.equal(fresh[0].weight, model[0].weight)
