import pytest
import torch

from routing_lottery.masks import MaskSet
from routing_lottery.pruning import random_mask_like
from routing_lottery.routed import RoutedModel, masked_forward
from toy import toy_model


def _masks(model, k=3):
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    half = {n: torch.rand(params[n].shape, generator=g) > 0.5 for n in ["0.weight", "2.weight"]}
    return MaskSet.from_tickets([random_mask_like(half, g) for _ in range(k)])


def test_mixed_batch_equals_per_context_forwards():
    model = toy_model()
    masks = _masks(model)
    routed = RoutedModel(model, masks).eval()
    x = torch.randn(10, 4)
    ctx = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0])
    out = routed(x, ctx)
    for k in range(3):
        rows = ctx == k
        expected = masked_forward(model, masks[k], x[rows])
        assert torch.allclose(out[rows], expected, atol=1e-6)
    # distinct masks really give distinct functions
    assert not torch.allclose(routed(x, 0), routed(x, 1))


def test_masked_forward_masks_a_tied_weight_under_every_name():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.Linear(4, 4, bias=False)
            self.dec = torch.nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight  # one tensor, two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.relu(self.enc(x)))

    model, x = Tied(), torch.randn(3, 4)
    mask = {"enc.weight": torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5}
    w = model.enc.weight.detach() * mask["enc.weight"]
    expected = torch.relu(x @ w.T) @ w.T  # both uses see the masked tensor
    assert torch.allclose(masked_forward(model, mask, x), expected, atol=1e-6)


def test_masked_forward_equals_forward_with_zeroed_weights():
    model = toy_model()
    masks = _masks(model)
    x = torch.randn(5, 4)
    ref = toy_model()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in masks.tensor_names:
                p.mul_(masks[1][n])
    assert torch.allclose(masked_forward(model, masks[1], x), ref(x), atol=1e-6)


def test_unknown_context_and_bad_shapes_are_errors():
    model = toy_model()
    routed = RoutedModel(model, _masks(model))
    with pytest.raises(ValueError, match="context id 3 is outside 0..2"):
        routed(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"one id per input row: expected shape \(2,\) .* got shape \(3,\)"):
        routed(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    bad = MaskSet({"0.weight": torch.ones(2, 3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        RoutedModel(model, bad)
    with pytest.raises(ValueError, match="does not have"):
        RoutedModel(model, MaskSet({"nope.weight": torch.ones(2, 3, dtype=torch.bool)}))


def test_batched_evaluation_routing_matches_per_context_forwards():
    """Evaluation mode runs all contexts in one vmapped call; it must equal running each group alone."""
    from routing_lottery.models.ghostnet import GhostNetTruncated
    from routing_lottery.pruning import prunable_names

    torch.manual_seed(0)
    net = GhostNetTruncated(num_classes=4, in_channels=1, width=0.25).eval()
    params = dict(net.named_parameters())
    masks = MaskSet.from_tickets([{n: torch.rand_like(params[n]) > 0.5 for n in prunable_names(net)} for _ in range(4)])
    routed = RoutedModel(net, masks, mixed_path="vmap").eval()
    x = torch.randn(40, 1, 16, 16)
    context = torch.arange(40) % 4
    with torch.no_grad():
        mixed = routed(x, context)
        looped = RoutedModel(net, masks, vmap_below=0).eval()(x, context)  # large-group path: one group at a time
        for k in range(4):
            assert torch.allclose(mixed[context == k], routed(x[context == k], k), atol=1e-5)
            assert torch.allclose(looped[context == k], routed(x[context == k], k), atol=1e-5)


def test_standalone_subnetwork_is_a_plain_copy_with_the_mask_baked_in():
    model = toy_model()
    masks = _masks(model)
    routed = RoutedModel(model, masks).eval()
    x = torch.randn(6, 4)
    alone = routed.standalone(2)
    assert torch.equal(alone(x), routed(x, 2))
    params = dict(alone.named_parameters())
    for name in masks.tensor_names:
        assert torch.all(params[name][~masks[2][name]] == 0)  # pruned positions exactly zero
    shared_before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in alone.parameters():
            p.add_(1.0)
    assert all(torch.equal(p, shared_before[n]) for n, p in model.named_parameters())  # nothing shared
    with pytest.raises(ValueError, match="outside 0..2"):
        routed.standalone(3)


def test_mixed_batch_through_attention_is_vmapped_without_fallback_warnings():
    import warnings

    from torch import nn

    from routing_lottery.pruning import prunable_names

    torch.manual_seed(0)
    net = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
    params = dict(net.named_parameters())
    names = prunable_names(net)
    masks = MaskSet.from_tickets([{n: torch.rand_like(params[n]) > 0.5 for n in names} for _ in range(3)])
    routed = RoutedModel(net, masks, mixed_path="vmap").eval()
    x, context = torch.randn(9, 5, 8), torch.tensor([0, 1, 2] * 3)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # vmap's slow-fallback warning would fail here
        out = routed(x, context)
        for row in range(9):
            torch.testing.assert_close(out[row], routed(x[row:row + 1], int(context[row]))[0], atol=1e-5, rtol=1e-5)


def test_a_model_vmap_cannot_batch_falls_back_to_one_group_at_a_time():
    from torch import nn

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.head = nn.GRU(1, 6, batch_first=True), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    torch.manual_seed(0)
    net = Recurrent().eval()
    params = dict(net.named_parameters())
    names = ["gru.weight_hh_l0", "head.weight"]
    masks = MaskSet.from_tickets([{n: torch.rand_like(params[n]) > 0.5 for n in names} for _ in range(2)])
    routed = RoutedModel(net, masks).eval()
    x, context = torch.randn(6, 5, 1), torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        out = routed(x, context)  # aten::gru has no batching rule: vmap fails, the groups run one by one
        for row in range(6):
            torch.testing.assert_close(out[row], routed(x[row:row + 1], int(context[row]))[0])


def test_routed_inference_leaves_batchnorm_statistics_alone():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()  # as joint retraining leaves it
    masks = MaskSet.from_tickets([{n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()
                                   if n.endswith("weight") and p.dim() == 2}] * 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    routed = RoutedModel(net, masks)
    routed(torch.randn(8, 3) * 5 + 3, torch.tensor([0, 1] * 4))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not routed.training and not net.training


def test_inference_weights_are_materialized_once_bit_for_bit_and_dropped_when_weights_change():
    model = toy_model()
    masks = _masks(model)
    routed = RoutedModel(model, masks)
    params = dict(model.named_parameters())
    with torch.no_grad():
        first = routed.masked_weights()
        assert routed.masked_weights() is first  # kept between calls
        for n, stacked in masks.stacked.items():
            assert torch.equal(first[n], params[n] * stacked.float())  # exactly w * m, per context
        x = torch.randn(6, 4)
        assert torch.equal(routed(x, 1), masked_forward(model, routed.mask(1), x))
    # a training step through the routed model changes the weights: the next inference sees the new ones
    routed.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    routed(torch.randn(8, 4), 0).pow(2).mean().backward()
    optimizer.step()
    routed.eval()
    with torch.no_grad():
        after = routed.masked_weights()
        assert after is not first
        assert all(torch.equal(after[n], params[n] * s.float()) for n, s in masks.stacked.items())
        model[0].weight.mul_(2.0)  # an in-place change outside any training step
        assert torch.equal(routed.masked_weights()["0.weight"], params["0.weight"] * masks.stacked["0.weight"].float())
    # with autograd on, weights are multiplied in afresh (gradients must reach w)
    assert routed.masked_weights()["0.weight"].requires_grad
    uncached = RoutedModel(model, masks, materialize=False)
    with torch.no_grad():
        assert uncached.masked_weights() is not uncached.masked_weights()  # materialize=False: no copy kept


def test_the_batched_path_folds_batchnorm_and_equals_per_context_forwards():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(8, 2, 4, 4) * 3 + 1)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    half = {n: torch.rand(params[n].shape, generator=g) > 0.5 for n in ("0.weight", "4.weight")}
    routed = RoutedModel(model, MaskSet.from_tickets([random_mask_like(half, g) for _ in range(3)]), mixed_path="vmap")
    x = torch.randn(12, 2, 4, 4)
    context = torch.tensor([0, 1, 2] * 4)
    with torch.no_grad():
        mixed = routed(x, context)
        assert routed._batched is not None  # the vmapped path ran on the folded copy
        assert not any(isinstance(m, nn.BatchNorm2d) for m in routed._batched[1].modules())
        expected = torch.stack([routed(x[i:i + 1], int(context[i]))[0] for i in range(12)])
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
        assert set(routed.state_dict()) == {f"model.{k}" for k in model.state_dict()}  # the copy is not a submodule
        model[1].running_mean.add_(1.0)  # new statistics: the folded copy is remade
        again = routed(x, context)
        expected = torch.stack([routed(x[i:i + 1], int(context[i]))[0] for i in range(12)])
        torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)


def test_the_weight_cache_never_serves_stale_or_unkeyable_weights():
    from torch import nn

    model = toy_model()
    masks = _masks(model)
    routed = RoutedModel(model, masks)
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = routed(x, 1)
        model[0].weight.data.mul_(3.0)  # bypasses the version counter (as fused optimizers may)
        routed.refresh()
        assert torch.equal(routed(x, 1), masked_forward(model, routed.mask(1), x))
        assert not torch.equal(routed(x, 1), before)
    with torch.enable_grad():  # a call with autograd on drops the copies: training may follow
        routed(x, 0)
        assert routed._weights is None
    with torch.inference_mode():  # inference tensors have no version counter: computed afresh, no error
        fresh = RoutedModel(toy_model(), _masks(toy_model()))
        out = fresh(torch.randn(3, 4), torch.tensor([0, 1, 2]))
        assert out.shape == (3, 3)
    # a BatchNorm whose weight is masked is not folded (its mask would be dropped)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(2)
    half = {n: torch.rand(params[n].shape, generator=g) > 0.5 for n in ("0.weight", "1.weight", "3.weight")}
    masked_bn = RoutedModel(net, MaskSet.from_tickets([random_mask_like(half, g) for _ in range(3)]), mixed_path="vmap")
    xs, ctx = torch.randn(9, 4), torch.tensor([0, 1, 2] * 3)
    with torch.no_grad():
        mixed = masked_bn(xs, ctx)
        assert isinstance(masked_bn._batched[1][1], nn.BatchNorm1d)
        rows = torch.stack([masked_bn(xs[i:i + 1], int(ctx[i]))[0] for i in range(9)])
    torch.testing.assert_close(mixed, rows, atol=1e-5, rtol=1e-5)


# -- the two mixed-batch paths: exactness and clear shape errors -----------------------------------
class _TinyAttention(torch.nn.Module):
    """nn.MultiheadAttention and a head: the model whose vmapped outputs differed from per-context forwards."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = torch.nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def _attention_routed(seed: int, **kwargs) -> RoutedModel:
    torch.manual_seed(seed)
    net = _TinyAttention().eval()
    params = dict(net.named_parameters())
    names = ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    g = torch.Generator().manual_seed(seed)
    masks = MaskSet.from_tickets([{n: torch.rand(params[n].shape, generator=g) > 0.5 for n in names} for _ in range(3)])
    return RoutedModel(net, masks, **kwargs)


@pytest.mark.parametrize("seed", range(5))
def test_loop_path_is_bitwise_and_vmap_path_within_its_stated_tolerance_on_attention(seed):
    from routing_lottery.routed import VMAP_TOLERANCE

    loop = _attention_routed(seed, mixed_path="loop")
    vmapped = _attention_routed(seed, mixed_path="vmap")
    g = torch.Generator().manual_seed(100 + seed)
    x = 3 * torch.randn(12, 5, 16, generator=g)
    context = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 1, 2])
    with torch.no_grad():
        looped, batched = loop(x, context), vmapped(x, context)
        for k in range(3):
            rows = context == k
            alone = loop.subnetwork(x[rows], k)  # the per-context forward
            assert torch.equal(looped[rows], alone)  # bit for bit
            torch.testing.assert_close(batched[rows], alone, **VMAP_TOLERANCE)


def test_mixed_path_is_a_documented_checked_knob():
    from routing_lottery.routed import MIXED_PATHS

    routed = _attention_routed(0)
    assert routed.mixed_path == "auto" and MIXED_PATHS == ("auto", "vmap", "loop")
    routed.mixed_path = "loop"
    with pytest.raises(ValueError, match=r"mixed_path must be one of \('auto', 'vmap', 'loop'\), got 'fast'"):
        routed.mixed_path = "fast"
    with pytest.raises(ValueError, match="mixed_path"):
        _attention_routed(0, mixed_path="batched")
    for word in ('"auto"', '"vmap"', '"loop"', "VMAP_TOLERANCE", "bit for bit"):
        assert word in RoutedModel.__doc__


@pytest.mark.parametrize("mixed_path", ["auto", "vmap", "loop"])
def test_a_wrong_feature_dimension_in_a_mixed_batch_names_the_layer_and_both_shapes(mixed_path):
    model = toy_model()
    routed = RoutedModel(model, _masks(model), mixed_path=mixed_path)
    with torch.no_grad(), pytest.raises(ValueError, match=r"inputs of shape \(6, 5\) do not fit the model: .*"
                                                          r"layer '0' \(Linear\) expects a last dimension of "
                                                          r"in_features=4, got shape \(2, 5\)"):
        routed(torch.randn(6, 5), torch.tensor([0, 1, 2] * 2))
    attention = _attention_routed(0, mixed_path=mixed_path)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(6, 5, 7\).*layer 'attn' \(MultiheadAttention\) "
                                                          r"expects a last dimension of embed_dim=16"):
        attention(torch.randn(6, 5, 7), torch.tensor([0, 1, 2] * 2))


def test_conv_channels_and_row_counts_are_checked_up_front():
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    params = dict(net.named_parameters())
    masks = MaskSet.from_tickets([{n: torch.rand_like(params[n]) > 0.5 for n in ("0.weight", "2.weight")}] * 2)
    routed = RoutedModel(net, masks)
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) expects \(N, 2, \*, \*\) .*"
                                                          r"got shape \(2, 3, 4, 4\)"):
        routed(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1]))

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    two = TwoInputs().eval()
    masks = MaskSet.from_tickets([{"a.weight": torch.rand(3, 4) > 0.5}] * 2)
    with pytest.raises(ValueError, match=r"same number of rows .* got shapes \(4, 4\), \(3, 2\)"):
        RoutedModel(two, masks)((torch.randn(4, 4), torch.randn(3, 2)), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="inputs must be tensors"):
        RoutedModel(two, masks)((torch.randn(4, 4), [1.0, 2.0]), torch.tensor([0, 1, 0, 1]))


def test_errors_that_are_not_about_the_input_are_left_as_they_are():
    from torch import nn

    class FailsOnLargeBatches(nn.Module):  # a model's own error that running one group alone does not hit
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[0] > 4:
                raise RuntimeError("the model's own complaint")
            return self.fc(x)

    net = FailsOnLargeBatches().eval()
    routed = RoutedModel(net, MaskSet.from_tickets([{"fc.weight": torch.rand(3, 4) > 0.5}] * 2), mixed_path="loop")
    with torch.no_grad(), pytest.raises(RuntimeError, match="the model's own complaint"):
        routed(torch.randn(12, 4), torch.tensor([1] * 10 + [0] * 2))  # context 0's rows run fine alone
