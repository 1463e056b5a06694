import json
import os

import pytest
import torch
from torch import nn

from routing_lottery import io as rio
from routing_lottery.io import (
    CheckpointError, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, directory_bytes,
    load_tickets, model_fingerprint, read_json, save_tickets, torch_load,
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


def test_weights_file_unparsable_even_with_matching_hash(saved):
    directory, _, _ = saved
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00not json header"
    (directory / "tickets.safetensors").write_bytes(garbage)
    index = json.loads((directory / "tickets.json").read_text())
    index["weights_sha256"] = __import__("hashlib").sha256(garbage).hexdigest()
    (directory / "tickets.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tickets(directory, _model())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: text.replace('"version": 1', '"version": 2'), "version 2"),
        (lambda text: text.replace("routing-lottery/tickets", "something/else"), "not a ticket checkpoint"),
        (lambda text: text.replace('"weights_sha256": "', '"weights_sha256": "0'), "truncated or corrupt"),
        (lambda text: text.replace('"dtype": "float32"', '"dtype": "float16"', 1), "fingerprint"),
    ],
)
def test_edited_index_is_reported(saved, edit, message):
    directory, _, _ = saved
    path = directory / "tickets.json"
    edited = edit(path.read_text())
    assert edited != path.read_text()
    path.write_text(edited)
    fresh = _model(seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_tickets(directory, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # model untouched


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
