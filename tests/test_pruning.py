import pytest
import torch

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
