import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routing_lottery.masks import count, is_nested, ones_like
from routing_lottery.pruning import (
    magnitude_prune, prunable_names, pruning_schedule, random_mask_like, validate_sparsity,
)
from toy import toy_model


def test_global_prune_removes_lowest_magnitudes_across_tensors():
    w = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[-0.05, 2.0], [0.2, 4.0]])}
    m = magnitude_prune(w, ones_like(w), 3)
    assert m["a"].tolist() == [False, True, True]
    assert m["b"].tolist() == [[False, True], [False, True]]
    # already-pruned positions are never chosen again, even when their weight is small
    m2 = magnitude_prune(w, m, 1)
    assert count(m2) == count(m) - 1 and is_nested(m2, m)
    assert m2["a"].tolist() == [False, True, False]


def test_layerwise_prunes_each_tensor_in_proportion():
    w = {"a": torch.arange(1.0, 11.0), "b": torch.arange(100.0, 110.0)}
    m = magnitude_prune(w, ones_like(w), 10, scope="layerwise")
    assert int(m["a"].sum()) == 5 and int(m["b"].sum()) == 5
    glob = magnitude_prune(w, ones_like(w), 10, scope="global")
    assert int(glob["a"].sum()) == 0 and int(glob["b"].sum()) == 10


def test_prune_rejects_bad_counts_and_scope():
    w = {"a": torch.ones(4)}
    with pytest.raises(ValueError, match="cannot prune 5"):
        magnitude_prune(w, ones_like(w), 5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(w, ones_like(w), 1, scope="bogus")


def test_schedule_hits_every_level_exactly():
    total = 1000
    rounds = pruning_schedule(total, [0.25, 0.5, 0.75], 0.2)
    assert rounds[-1] == 750
    assert {250, 500, 750} <= set(rounds)
    assert all(b > a for a, b in zip(rounds, rounds[1:]))
    counts = pruning_schedule(125_832, [0.75], 4096)
    assert counts[-1] == round(0.75 * 125_832)
    assert all(b - a == 4096 for a, b in zip(counts[:-2], counts[1:-1]))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5"])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        validate_sparsity(bad)


def test_random_mask_keeps_per_tensor_counts():
    w = {"a": torch.randn(50), "b": torch.randn(8, 8)}
    m = magnitude_prune(w, ones_like(w), 60)
    r = random_mask_like(m, torch.Generator().manual_seed(0))
    assert {n: int(v.sum()) for n, v in r.items()} == {n: int(v.sum()) for n, v in m.items()}
    assert not all(torch.equal(r[n], m[n]) for n in m)


def test_default_prunable_names_are_conv_and_linear_weights():
    assert prunable_names(toy_model()) == ["0.weight", "2.weight"]


def test_attention_projections_are_masked_packed_or_separate():
    from torch import nn

    from routing_lottery.pruning import prunable_names

    packed = nn.MultiheadAttention(8, 2)
    assert prunable_names(packed) == ["in_proj_weight", "out_proj.weight"]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)  # other key/value widths: three projections
    assert prunable_names(separate) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_protected_survivors_stay_and_the_count_stays_exact():
    from routing_lottery.pruning import floor_positions

    w = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[-0.05, 2.0], [0.2, 4.0]])}
    keep = {"a": torch.tensor([True, False, False]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    m = magnitude_prune(w, ones_like(w), 3, protect=keep)
    assert m["a"].tolist() == [True, True, False] and count(m) == 4  # 0.1 is kept, the next lowest go
    layerwise = magnitude_prune(w, ones_like(w), 4, scope="layerwise", protect=keep)
    assert layerwise["a"][0] and count(layerwise) == 3
    with pytest.raises(ValueError, match="not protected by a floor"):
        magnitude_prune(w, ones_like(w), 7, protect=keep)
    rows = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.05, 0.01]])
    alive = torch.tensor([[True, True, False], [True, True, True]])
    assert floor_positions(rows, alive, per_slice=0).tolist() == [[False, True, False], [True, False, False]]
    assert floor_positions(rows, alive, keep=3, per_slice=0).tolist() == [[True, True, False], [True, False, False]]
    assert floor_positions(rows, alive, per_slice=-1).tolist() == [[False, False, False], [True, False, False]]


def test_tied_and_weight_normed_weights_answer_to_every_name():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
                              torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 2)))
    net[2].weight = net[0].weight
    assert prunable_names(net) == ["0.weight", "3.parametrizations.weight.original1"]
    assert prunable_names(net, include=["2.weight"]) == ["0.weight"]  # the alias selects the tensor
    assert prunable_names(net, exclude=["2.*"]) == ["3.parametrizations.weight.original1"]
    assert prunable_names(net, include=["3.weight"]) == ["3.parametrizations.weight.original1"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rows=st.integers(1, 5), cols=st.integers(1, 6), keep=st.floats(0.0, 0.5), seed=st.integers(0, 2**16),
       scope=st.sampled_from(["global", "layerwise"]), dim=st.sampled_from([0, 1, -1]))
def test_floors_hold_through_nested_rounds_with_exact_counts(rows, cols, keep, seed, scope, dim):
    """Every round of a weight-normed direction (one weight per slice) and a min_keep floor: counts exact,
    masks nested, every slice and the floor kept, down to the last prunable weight."""
    from routing_lottery.pruning import WeightStructure

    g = torch.Generator().manual_seed(seed)
    weights = {"v": torch.randn(rows, cols, generator=g), "w": torch.randn(3, 4, generator=g) * 10}
    structure = WeightStructure(weights, keep, {"v": dim})
    floor = sum(structure.floor(n) for n in weights)
    mask = structure.ones()
    while count(mask) > floor:
        n = int(torch.randint(1, count(mask) - floor + 1, (1,), generator=g))
        new = structure.prune(weights, mask, n, scope)
        assert count(new) == count(mask) - n and is_nested(new, mask)
        slices = new["v"].reshape(1, -1) if dim < 0 else new["v"].movedim(dim, 0).reshape(new["v"].shape[dim], -1)
        assert bool(slices.any(dim=1).all())
        assert all(int(new[t].sum()) >= math.ceil(keep * weights[t].numel()) for t in weights)
        mask = new
