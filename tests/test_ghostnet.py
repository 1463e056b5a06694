import pytest
import torch
from torch import nn

from routing_lottery.models.ghostnet import GhostNetTruncated, make_divisible

# (in, mid, out, dw kernel, stride, has SE) of the nine bottlenecks at width 1.0, from the paper.
PAPER_TABLE = [
    (16, 16, 16, 3, 1, False),
    (16, 48, 24, 3, 2, False),
    (24, 72, 24, 3, 1, False),
    (24, 72, 40, 5, 2, True),
    (40, 120, 40, 5, 1, True),
    (40, 240, 80, 3, 2, False),
    (80, 200, 80, 3, 1, False),
    (80, 184, 80, 3, 1, False),
    (80, 184, 80, 3, 1, False),
]


def _prunable_count(model: GhostNetTruncated) -> int:
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in model.prunable_names())


@pytest.fixture(scope="module")
def full() -> GhostNetTruncated:
    torch.manual_seed(0)
    return GhostNetTruncated(num_classes=10)


def test_prunable_count_matches_paper(full):
    n = _prunable_count(full)
    assert n == 125_832
    # The paper's kept-weight counts at 25 / 50 / 75 % sparsity.
    assert [round(n * keep / 1000) for keep in (0.75, 0.5, 0.25)] == [94, 63, 31]


def test_layout_matches_paper_table(full):
    assert tuple(full.stem[0].weight.shape) == (16, 3, 3, 3)
    assert full.stem[0].stride == (2, 2)
    assert len(full.blocks) == len(PAPER_TABLE)
    for block, (cin, mid, cout, k, stride, has_se) in zip(full.blocks, PAPER_TABLE):
        assert block.ghost1.primary_conv[0].in_channels == cin
        assert block.ghost1.out_ch == mid
        assert block.ghost2.out_ch == cout
        assert (block.conv_dw is not None) == (stride > 1)
        if block.conv_dw is not None:
            conv = block.conv_dw[0]
            assert conv.kernel_size == (k, k) and conv.stride == (stride, stride) and conv.groups == mid
        assert (block.se is not None) == has_se
        assert isinstance(block.shortcut, nn.Identity) == (cin == cout and stride == 1)
    # SE reduce width is make_divisible(mid * 0.25, 4): 72 -> 20, 120 -> 32.
    assert full.blocks[3].se.conv_reduce.out_channels == 20
    assert full.blocks[4].se.conv_reduce.out_channels == 32
    assert tuple(full.conv_last[0].weight.shape) == (184, 80, 1, 1)
    assert tuple(full.conv_head.weight.shape) == (128, 184, 1, 1)
    assert full.conv_head.bias is not None
    assert full.classifier.in_features == 128 and full.classifier.out_features == 10


def test_prunable_names_select_exactly_the_non_se_conv_weights(full):
    names = full.prunable_names()
    params = dict(full.named_parameters())
    assert len(names) == len(set(names))
    assert all(name in params for name in names)
    # Same order as named_parameters(), so masks line up with the parameter list.
    assert names == [n for n in params if n in set(names)]
    assert "stem.0.weight" in names
    assert "conv_head.weight" in names
    assert "conv_last.0.weight" in names
    assert "blocks.1.shortcut.0.0.weight" in names  # shortcut depthwise conv
    assert "blocks.1.conv_dw.0.weight" in names

    se_params = {n for n in params if ".se." in n}
    assert se_params >= {"blocks.3.se.conv_reduce.weight", "blocks.4.se.conv_expand.weight"}
    assert not se_params & set(names)
    assert not any(n.endswith(".bias") for n in names)
    assert not any(n.startswith("classifier") for n in names)
    bn_params = {
        f"{m}.{p}"
        for m, mod in full.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for p, _ in mod.named_parameters()
    }
    assert bn_params and not bn_params & set(names)
    # Everything prunable is a conv kernel; every non-SE conv kernel is prunable.
    assert all(params[n].dim() == 4 for n in names)
    conv_weights = {
        f"{m}.weight" for m, mod in full.named_modules() if isinstance(mod, nn.Conv2d) and ".se." not in f"{m}."
    }
    assert set(names) == conv_weights


@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8), (1, 16)])
def test_output_shape_small_width(in_channels, size):
    torch.manual_seed(0)
    model = GhostNetTruncated(num_classes=7, in_channels=in_channels, width=0.5)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_half_width_is_smaller_and_names_resolve(full):
    half = GhostNetTruncated(num_classes=10, in_channels=3, width=0.5)
    params = dict(half.named_parameters())
    assert all(name in params for name in half.prunable_names())
    assert half.prunable_names() == full.prunable_names()  # same topology, thinner tensors
    assert 0 < _prunable_count(half) < _prunable_count(full)
    assert tuple(half.stem[0].weight.shape) == (8, 3, 3, 3)
    assert tuple(half.conv_head.weight.shape) == (64, 92, 1, 1)


def test_every_prunable_weight_gets_gradient():
    torch.manual_seed(0)
    model = GhostNetTruncated(num_classes=5, in_channels=1, width=0.5)
    model(torch.randn(4, 1, 16, 16)).square().sum().backward()
    params = dict(model.named_parameters())
    dead = [n for n in model.prunable_names() if params[n].grad is None or not params[n].grad.abs().sum() > 0]
    assert dead == []


def test_deterministic_under_manual_seed():
    def build(seed: int) -> GhostNetTruncated:
        torch.manual_seed(seed)
        return GhostNetTruncated(num_classes=4, in_channels=1, width=0.25).eval()

    a, b, c = build(1), build(1), build(2)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a(x), a(x))


def test_make_divisible_rule():
    assert make_divisible(16) == 16
    assert make_divisible(18) == 20  # rounds half up to the next multiple of 4
    assert make_divisible(30) == 32
    assert make_divisible(1) == 4  # never below the divisor
    assert make_divisible(46) == 48
    assert make_divisible(42) == 44


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 3, "in_channels": 0}, {"num_classes": 3, "width": 0.0}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        GhostNetTruncated(**kwargs)
