"""The front door: AdaptiveTickets on a hand-made model and streams, resumable, with its recipe on disk."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import routing_lottery.tickets as tickets_module
from routing_lottery import (
    AdaptiveTickets, OptimizerConfig, PruningConfig, RTLConfig, TrainingConfig, tensor_stream,
)
from routing_lottery.io import CheckpointError
from routing_lottery.masks import sparsity

CONFIG = RTLConfig(seed=3, pruning=PruningConfig(sparsities=(0.5, 0.7), step=0.3),
                   training=TrainingConfig(imp_epochs=2, epochs=2, optimizer=OptimizerConfig(lr=1e-2)))


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def streams(shift: float = 0.0) -> dict[str, object]:
    out = {}
    for k, name in enumerate(["north", "south", "east"]):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(40, 4, generator=g) + shift
        out[name] = tensor_stream(name, x, x @ torch.randn(4, 2, generator=g), F.mse_loss, batch_size=16)
    return out


def test_fit_routes_by_name_with_exact_zeros_outside_each_mask():
    rtl = AdaptiveTickets(model(), CONFIG)
    routed = rtl.fit(streams()).routed
    assert rtl.level == 0.7 and rtl.masks.context_names == ["north", "south", "east"]
    assert all(abs(sparsity(rtl.masks[k]) - 0.7) < 0.02 for k in range(3))
    params = dict(rtl.model.named_parameters())
    union = rtl.masks.union()
    assert all(torch.all(params[n][~union[n]] == 0) for n in rtl.prunable)
    x = torch.randn(5, 4)
    names = ["south", "north", "south", "east", "north"]
    mixed = routed(x, names)
    for row, name in enumerate(names):  # each row equals its subnetwork alone
        assert torch.allclose(mixed[row], routed(x[row:row + 1], name)[0], atol=1e-6)
    assert torch.equal(routed(x, names), routed(x, torch.tensor([1, 0, 1, 2, 0])))
    with pytest.raises(ValueError, match="unknown context 'west'"):
        routed(x, ["west"] * 5)
    with pytest.raises(ValueError, match="integers or names"):
        routed(x, torch.tensor([0.0, 1.7, 1.0, 0.0, 2.0]))


def test_save_and_load_carry_the_recipe(tmp_path):
    rtl = AdaptiveTickets(model(), CONFIG)
    routed = rtl.fit(streams()).routed
    rtl.save(tmp_path / "tickets", {"note": "demo"})
    back = AdaptiveTickets.load(tmp_path / "tickets", model(seed=9))
    assert back.config == CONFIG and back.level == 0.7 and back.metadata["note"] == "demo"
    assert back.metadata["masked"] == ["0.weight", "2.weight"]
    assert all(torch.equal(back.masks.stacked[n], rtl.masks.stacked[n]) for n in rtl.prunable)
    x = torch.randn(7, 4)
    assert torch.equal(back.routed(x, "east"), routed(x, "east"))
    with pytest.raises(CheckpointError, match="different model"):
        AdaptiveTickets.load(tmp_path / "tickets", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


def test_a_run_directory_resumes_without_redoing_rounds_and_refuses_other_data(tmp_path, monkeypatch):
    first = AdaptiveTickets(model(), CONFIG, out=tmp_path / "run")
    masks = first.extract(streams())
    calls = []
    real = tickets_module.extract_ticket
    monkeypatch.setattr(tickets_module, "extract_ticket", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = AdaptiveTickets(model(), CONFIG, out=tmp_path / "run")
    resumed = again.extract(streams())
    assert calls == []  # every round was on disk
    assert all(torch.equal(resumed[lv].stacked[n], masks[lv].stacked[n]) for lv in masks for n in first.prunable)
    assert all(torch.equal(again.theta0[k], first.theta0[k]) for k in first.theta0)
    with pytest.raises(ValueError, match="theta0"):  # another initialization is another run
        AdaptiveTickets(model(seed=5), CONFIG, out=tmp_path / "run").extract(streams())
    with pytest.raises(ValueError, match="data_fingerprint"):
        AdaptiveTickets(model(), CONFIG, out=tmp_path / "run").extract(streams(shift=1.0))
    other = RTLConfig(seed=4, pruning=CONFIG.pruning, training=CONFIG.training)
    with pytest.raises(ValueError, match="seed: 3 -> 4"):
        AdaptiveTickets(model(), other, out=tmp_path / "run").extract(streams())


def test_a_higher_level_reuses_every_round_on_disk(tmp_path, monkeypatch):
    low = RTLConfig(seed=3, pruning=PruningConfig(sparsities=(0.5,), step=0.3), training=CONFIG.training)
    before = AdaptiveTickets(model(), low, out=tmp_path).extract(streams())
    resumes = []
    real = tickets_module.extract_ticket
    monkeypatch.setattr(tickets_module, "extract_ticket",
                        lambda *a, **k: resumes.append(k["resume"][0]) or real(*a, **k))
    after = AdaptiveTickets(model(), CONFIG, out=tmp_path).extract(streams())  # adds 70 %
    rounds_at_half = len(AdaptiveTickets(model(), low).schedule)
    assert resumes == [rounds_at_half - 1] * 3  # each context continued after its last round on disk
    assert all(torch.equal(after[0.5].stacked[n], before[0.5].stacked[n]) for n in before[0.5].tensor_names)


def test_include_exclude_and_filter_choose_the_masked_tensors():
    net = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    default = AdaptiveTickets(net, CONFIG).prunable
    assert default == ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    only_attention = RTLConfig(pruning=PruningConfig(include=("self_attn.*weight",), exclude=("*out_proj*",)))
    assert AdaptiveTickets(net, only_attention).prunable == ["self_attn.in_proj_weight"]
    assert AdaptiveTickets(net, select=lambda name, t: t.shape[0] == 16).prunable == ["linear1.weight"]
    with pytest.raises(ValueError, match=r"include patterns \['encoder\.\*'\] match no parameter"):
        AdaptiveTickets(net, RTLConfig(pruning=PruningConfig(include=("encoder.*",))))
