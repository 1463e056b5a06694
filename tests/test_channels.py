"""Channel tickets: coupled groups traced once, masks that are whole channels, slicing that equals masking."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from routing_lottery import AdaptiveTickets, OptimizerConfig, PruningConfig, RTLConfig, TrainingConfig, tensor_stream
from routing_lottery.channels import ChannelStructure, channel_view, slice_model
from routing_lottery.errors import ConfigError
from routing_lottery.export import PROGRAM_FILE, export_context
from routing_lottery.masks import MaskSet, is_nested
from routing_lottery.models.ghostnet import GhostNetTruncated
from routing_lottery.pruning import prunable_names


class Residual(nn.Module):
    """conv-BN-ReLU, a depthwise conv, a residual addition, a concatenation, a flatten and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.branch = nn.Conv2d(8, 6, 1)
        self.other = nn.Conv2d(8, 4, 1)
        self.mix = nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = F.relu(h + self.depthwise(h))  # residual: the depthwise conv's channels are the stem's
        h = F.relu(self.mix(torch.cat([self.branch(h), self.other(h)], dim=1)))
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1))


class ConcatThenPool(nn.Module):
    """A concatenation read only through pooling and a flatten: torch-pruning's channel mapping gets lost."""

    def __init__(self) -> None:
        super().__init__()
        self.branch, self.other = nn.Conv2d(2, 6, 1), nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(10 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.branch(x), self.other(x)], dim=1)
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1))


def _traced(model: nn.Module, x: torch.Tensor) -> ChannelStructure:
    return ChannelStructure.trace(model, x, prunable_names(model))


def _masked_copy(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n in mask:
                p.mul_(mask[n].to(p.dtype))
    return out


def test_groups_follow_the_couplings_and_leave_the_output_dense():
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(4, 2, 8, 8)
    s = _traced(model, x)
    assert [g.name for g in s.groups] == ["stem.0.weight", "branch.weight", "other.weight", "mix.weight"]
    assert [g.channels for g in s.groups] == [8, 6, 4, 5]
    assert s.total == 23
    assert {sl.tensor for sl in s.groups[3].slices} == {"mix.weight", "mix.bias", "head.weight"}  # through the flatten
    stem = {sl.tensor for sl in s.groups[0].slices}
    # the stem's channels own its BN, the depthwise conv and its BN, and the inputs of both 1x1 convs
    assert {"stem.0.bias", "stem.1.weight", "stem.1.bias", "depthwise.0.weight", "depthwise.1.weight",
            "branch.weight", "other.weight"} <= stem
    assert "head.weight" in s.skipped and "output" in s.skipped["head.weight"]
    assert "depthwise.0.weight" not in s.skipped  # a depthwise conv joins its input's group, it roots none
    # concatenated channels are mapped to their slice of the reader's input
    other = next(sl for sl in s.groups[2].slices if sl.tensor == "mix.weight")
    assert other.dim == 1 and other.index.tolist() == [6, 7, 8, 9]


def test_a_coupling_the_graph_gets_wrong_is_left_dense():
    with pytest.raises(ValueError, match="past the size of other.weight"):
        _traced(ConcatThenPool().eval(), torch.randn(3, 2, 8, 8))


def test_expand_and_channels_round_trip_and_masks_are_whole_channels():
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(4, 2, 8, 8)
    s = _traced(model, x)
    keep = {g.name: torch.rand(g.channels, generator=torch.Generator().manual_seed(i)) > 0.4
            for i, g in enumerate(s.groups)}
    for g in s.groups:
        keep[g.name][0] = True
    mask = s.expand(keep)
    back = s.channels(mask)
    assert all(torch.equal(back[n], keep[n]) for n in keep)
    assert s.count(mask) == sum(int(k.sum()) for k in keep.values())
    dropped = (~keep["stem.0.weight"]).nonzero().flatten()
    assert not mask["stem.0.weight"][dropped].any() and not mask["stem.1.bias"][dropped].any()
    assert not mask["branch.weight"][:, dropped].any()  # the reader's input columns go with the channel
    with pytest.raises(ValueError, match="bool tensor of 8 channels"):
        s.expand({**keep, "stem.0.weight": torch.ones(7, dtype=torch.bool)})


def test_slicing_a_channel_ticket_equals_masking_it():
    torch.manual_seed(1)
    model, x = Residual().eval(), torch.randn(5, 2, 8, 8)
    s = _traced(model, x)
    mask = s.prune(dict(model.named_parameters()), s.ones(), 11, "layerwise")
    masked = _masked_copy(model, mask)
    sliced = slice_model(masked, s, s.channels(mask), x)
    with torch.no_grad():
        assert torch.allclose(sliced(x), masked(x), atol=1e-6)
    kept = s.channels(mask)["stem.0.weight"].sum()
    assert sliced.stem[0].out_channels == kept and sliced.depthwise[0].groups == kept
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())


def test_prune_removes_exact_counts_nested_and_keeps_a_channel_per_group():
    torch.manual_seed(2)
    model, x = Residual().eval(), torch.randn(4, 2, 8, 8)
    s = _traced(model, x)
    weights = dict(model.named_parameters())
    mask = s.ones()
    previous = mask
    for n in (5, 5, 4):
        mask = s.prune(weights, mask, n, "global")
        assert s.count(previous) - s.count(mask) == n
        assert is_nested(mask, previous)
        previous = mask
    assert all(k.sum() >= 1 for k in s.channels(mask).values())
    with pytest.raises(ValueError, match="each of the 4 groups keeps one"):
        s.prune(weights, mask, s.count(mask), "global")


def test_the_weakest_filters_go_first():
    torch.manual_seed(3)
    model, x = Residual().eval(), torch.randn(4, 2, 8, 8)
    s = _traced(model, x)
    with torch.no_grad():
        model.branch.weight.fill_(1.0)
        model.branch.weight[2].fill_(0.01)
        model.branch.weight[4].fill_(0.02)
    mask = s.prune(dict(model.named_parameters()), s.ones(), 2, "layerwise")
    # layerwise shares 2 removals over removable channels 7, 5, 3, 4 (each group keeps one): the largest
    # remainders, 2·7/19 and 2·5/19, give one to the stem's group and one to branch's
    removed = {g: (~k).nonzero().flatten().tolist() for g, k in s.channels(mask).items()}
    assert [len(v) for v in removed.values()] == [1, 1, 0, 0]
    assert removed["branch.weight"] == [2]  # the weakest filter of its group
    only_branch = ChannelStructure([g for g in s.groups if g.name == "branch.weight"], s.shapes)
    two = only_branch.prune(dict(model.named_parameters()), only_branch.ones(), 2, "global")
    assert (~only_branch.channels(two)["branch.weight"]).nonzero().flatten().tolist() == [2, 4]


def test_random_control_keeps_each_groups_count():
    torch.manual_seed(4)
    model, x = Residual().eval(), torch.randn(4, 2, 8, 8)
    s = _traced(model, x)
    mask = s.prune(dict(model.named_parameters()), s.ones(), 8, "layerwise")
    random = s.random_like(mask, torch.Generator().manual_seed(0))
    assert {n: int(k.sum()) for n, k in s.channels(random).items()} == {n: int(k.sum()) for n, k in s.channels(mask).items()}
    assert all(torch.equal(s.expand(s.channels(random))[n], random[n]) for n in random)


def test_ghost_modules_couple_a_channel_with_its_ghost():
    """The primary conv's output j and its depthwise ghost at init + j are one unit (width 0.25: 4 stem channels)."""
    torch.manual_seed(0)
    model, x = GhostNetTruncated(num_classes=10, in_channels=1, width=0.25).eval(), torch.rand(8, 1, 8, 8)
    s = _traced(model, x)
    assert not s.skipped  # every group slices exactly (checked by the trace itself)
    stem = next(g for g in s.groups if g.name == "stem.0.weight")
    assert model.stem[0].out_channels == 4 and stem.channels == 2
    mask = s.prune(dict(model.named_parameters()), s.ones(), s.total // 2, "layerwise")
    masked = _masked_copy(model, mask)
    sliced = slice_model(masked, s, s.channels(mask), x)
    with torch.no_grad():
        assert torch.allclose(sliced(x), masked(x), atol=1e-6)


def test_layers_that_mix_channels_are_left_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    s = _traced(model, torch.randn(3, 6))
    assert [g.name for g in s.groups] == ["3.weight"]
    assert "LayerNorm" in s.skipped["0.weight"]
    with pytest.raises(ValueError, match="no prunable channel group"):
        ChannelStructure.trace(nn.Sequential(nn.Linear(6, 2)), torch.randn(3, 6), ["0.weight"])


def test_channel_view_gives_jaccard_over_channels():
    stacked = torch.zeros(2, 4, 3, dtype=torch.bool)
    stacked[0, :2] = True  # context 0 keeps channels 0, 1
    stacked[1, 1:3] = True  # context 1 keeps channels 1, 2
    masks = MaskSet({"conv.weight": stacked}, ["a", "b"])
    view = channel_view(masks, {"conv": ["conv.weight", 0]})
    assert view.stacked["conv"].tolist() == [[True, True, False, False], [False, True, True, False]]
    assert view.jaccard_matrix()[0, 1].item() == pytest.approx(1 / 3)


def _streams() -> dict[str, object]:
    out = {}
    for k, name in enumerate(["left", "right"]):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(32, 2, 8, 8, generator=g) + k
        out[name] = tensor_stream(name, x, torch.randint(0, 3, (32,), generator=g), F.cross_entropy, batch_size=16)
    return out


@pytest.mark.slow
def test_adaptive_tickets_at_channel_granularity_fit_route_and_export(tmp_path):
    torch.manual_seed(5)
    model = Residual()
    config = RTLConfig(seed=0, pruning=PruningConfig(sparsities=(0.25, 0.5), step=0.3, granularity="channel",
                                                     scope="layerwise"),
                       training=TrainingConfig(imp_epochs=1, epochs=1, optimizer=OptimizerConfig(lr=1e-2)))
    rtl = AdaptiveTickets(model, config)
    streams = _streams()
    levels = rtl.extract(streams)
    s = rtl.structure
    assert isinstance(s, ChannelStructure) and rtl.total == 23
    for level, masks in levels.items():
        for k in range(2):
            assert s.count(masks[k]) == 23 - round(level * 23)  # levels count channels, exactly
    assert is_nested(levels[0.5][0], levels[0.25][0])
    routed = rtl.retrain(streams, levels[0.5], level=0.5)
    params = dict(model.named_parameters())
    union = levels[0.5].union()
    assert all((params[n][~union[n].to(params[n].device)] == 0).all() for n in union)  # pruned: exactly zero
    x = torch.randn(6, 2, 8, 8)
    index = export_context(routed, "right", tmp_path, x[:2], verify=x, channels=s)
    assert index["granularity"] == "channel" and index["verification"]["equal"]
    assert index["parameters"] < index["dense_parameters"]
    program = torch.export.load(str(tmp_path / PROGRAM_FILE)).module()
    with torch.no_grad():
        assert torch.allclose(program(x), routed(x, "right"), atol=1e-5)
    saved = rtl.save(tmp_path / "tickets")
    metadata = json.loads((saved / "tickets.json").read_text())["metadata"]
    assert metadata["recipe"]["pruning"]["granularity"] == "channel"
    assert set(metadata["channel_groups"]) == {g.name for g in s.groups}


def test_weight_tickets_are_refused_as_channel_exports(tmp_path):
    torch.manual_seed(6)
    model = Residual()
    s = _traced(model.eval(), torch.randn(2, 2, 8, 8))
    weights = {n: torch.rand(s.shapes[n]) > 0.5 for n in s.names}
    from routing_lottery.routed import RoutedModel

    routed = RoutedModel(model, MaskSet.from_tickets([weights, weights], ["a", "b"]))
    with pytest.raises(ValueError, match="not whole channels"):
        export_context(routed, "a", tmp_path, torch.randn(2, 2, 8, 8), channels=s)


def test_granularity_is_validated_and_the_default_keeps_old_identities():
    with pytest.raises(ConfigError, match="granularity"):
        PruningConfig(granularity="filter")
    assert "granularity" not in RTLConfig().to_dict()["pruning"]
    assert RTLConfig(pruning=PruningConfig(granularity="channel")).to_dict()["pruning"]["granularity"] == "channel"


@pytest.mark.slow
def test_a_channel_run_exports_from_its_directory(tmp_path):
    """rtl export on a run made with channel tickets: the groups are traced again and must match its masks."""
    from routing_lottery.cli import packaged_config
    from routing_lottery.config import load_config
    from routing_lottery.diagnose import load_level_masks
    from routing_lottery.run.deploy import export_run
    from routing_lottery.run import make_runner

    tiny = {"data": {"train_per_class": 10, "test_per_class": 4, "image_size": 8, "calibration": 0.0},
            "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.25,
                                                               "granularity": "channel"},
            "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}, "methods": ["rtl"],
            "deploy": {"routers": []}, "threads": 1}
    make_runner(load_config(packaged_config("digits"), "smoke", tiny), tmp_path).run_all()
    assert "Granularity: **channel**" in (tmp_path / "results.md").read_text()
    masks, metadata = load_level_masks(tmp_path)  # diagnostics read channels, not weights
    assert set(masks[0.5].tensor_names) == set(metadata["channel_groups"])
    index = export_run(tmp_path, "three", out=tmp_path / "export")
    assert index["granularity"] == "channel" and index["verification"]["equal"]
    assert index["parameters"] < index["dense_parameters"]
