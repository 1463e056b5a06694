import pytest
import torch

from routing_lottery.masks import MaskSet, jaccard, pack_bits, unpack_bits, is_nested, validate_mask


def _set(*rows):
    return MaskSet({"w": torch.tensor(rows, dtype=torch.bool)}, [f"c{i}" for i in range(len(rows))])


def test_jaccard_identical_disjoint_nested():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    inner = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    assert jaccard(inner, a) == pytest.approx(0.5)
    assert is_nested(inner={"w": inner}, outer={"w": a})
    assert not is_nested(inner={"w": a}, outer={"w": inner})


def test_jaccard_matrix_matches_pairwise():
    s = _set([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 0])
    j = s.jaccard_matrix()
    assert j.shape == (3, 3)
    assert torch.allclose(j.diagonal(), torch.ones(3))
    assert j[0, 1].item() == pytest.approx(2 / 4)
    assert j[0, 2].item() == 0.0
    assert torch.allclose(j, j.T)


def test_jaccard_matrix_per_tensor_and_global():
    s = MaskSet({
        "a": torch.tensor([[1, 1], [1, 1]], dtype=torch.bool),
        "b": torch.tensor([[1, 0], [0, 1]], dtype=torch.bool),
    })
    assert s.jaccard_matrix("a")[0, 1] == 1.0
    assert s.jaccard_matrix("b")[0, 1] == 0.0
    assert s.jaccard_matrix()[0, 1].item() == pytest.approx(2 / 4)
    with pytest.raises(KeyError):
        s.jaccard_matrix("nope")


def test_union_and_counts():
    s = _set([1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1])
    assert s.counts() == [2, 2, 1]
    assert s.union_count() == 4
    assert s.size() == 6


def test_pack_round_trip_odd_sizes():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (3, 5), (2, 3, 3, 3)]:
        m = torch.rand(shape, generator=g) > 0.5
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
        assert torch.equal(unpack_bits(packed, shape), m)
    s = _set([1, 0, 1], [0, 1, 1])
    back = MaskSet.from_packed(s.packed(), s.shapes, s.context_names)
    assert torch.equal(back.stacked["w"], s.stacked["w"])
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (4,))


def test_bad_inputs_are_named():
    s = _set([1, 0], [0, 1])
    with pytest.raises(ValueError, match="context id 2 is outside 0..1"):
        s[2]
    with pytest.raises(ValueError, match="shape"):
        validate_mask({"w": torch.ones(3, dtype=torch.bool)}, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="missing"):
        validate_mask({}, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="dtype"):
        MaskSet({"w": torch.ones(2, 3)})


# -- issue 12, items 7 and 10: packed masks from a file fail with ValueError, never another type --
def test_pack_round_trip_zero_d_and_zero_size():
    for shape in [(), (0,), (3, 0, 2), (0, 0)]:
        m = torch.ones(shape, dtype=torch.bool)
        assert torch.equal(unpack_bits(pack_bits(m), shape), m)
        s = MaskSet({"w": torch.stack([m, ~m])}, ["a", "b"])
        back = MaskSet.from_packed(s.packed(), s.shapes, s.context_names)
        assert back.shapes == {"w": shape} and torch.equal(back.stacked["w"], s.stacked["w"])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((float("inf"),), "non-negative integers"),
        ((-8,), "non-negative integers"),
        ((2.0, 2), "non-negative integers"),
        ((True,), "non-negative integers"),
        ("ab", "list of non-negative integers"),
        (5, "list of non-negative integers"),
        ((2**32, 2**32), "too large"),
        ((0, 2**40, 2**40), "too large"),
    ],
)
def test_unpack_bits_rejects_malformed_shapes_with_value_error(shape, message):
    with pytest.raises(ValueError, match=message):
        unpack_bits(torch.zeros(0, dtype=torch.uint8), shape)


@pytest.mark.parametrize(
    "packed, message",
    [
        (torch.tensor(7, dtype=torch.uint8), "uint8 tensor"),           # 0-d: iterating it was a TypeError
        (torch.zeros(2, 1, dtype=torch.float32), "uint8 tensor"),      # was cast silently
        (torch.zeros(0, 1, dtype=torch.uint8), "K >= 1"),              # was a torch.stack RuntimeError
        (torch.zeros(2, 2, dtype=torch.uint8), "has 2 bytes per context; a tensor of shape \\(4,\\) needs 1"),
        ([b"\x00"], "uint8 tensor"),
    ],
)
def test_from_packed_rejects_malformed_packed_masks_with_value_error(packed, message):
    with pytest.raises(ValueError, match=message):
        MaskSet.from_packed({"w": packed}, {"w": (4,)}, ["a", "b"])


def test_from_packed_needs_a_mask_for_every_recorded_shape():
    s = _set([1, 0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="shapes recorded for"):
        MaskSet.from_packed(s.packed(), {**s.shapes, "v": (2,)}, s.context_names)
    with pytest.raises(ValueError, match="2 context names for 1 masks"):
        MaskSet.from_packed({"w": s.packed()["w"][:1]}, s.shapes, s.context_names)


def test_unpack_bits_rejects_non_uint8_and_non_flat_input():
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(torch.zeros(1, dtype=torch.int64), (4,))
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(torch.zeros(1, 1, dtype=torch.uint8), (4,))
