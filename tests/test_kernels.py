"""Tests of kernels.prepare: every sparse form computes the dense function, and the decisions are honest.

Timings are never asserted (the machine is shared); where a test needs a sparse layer it forces the
kernel with ``force=``, which skips measurement.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from routing_lottery import kernels
from routing_lottery.kernels import KernelChoice, SparseConv2d, SparseLinear, choices_markdown, prepare
from routing_lottery.masks import MaskSet
from routing_lottery.pruning import random_mask_like
from routing_lottery.routed import RoutedModel
from toy import toy_model


def prune_(model: nn.Module, sparsity: float = 0.75, seed: int = 0) -> nn.Module:
    """Zero about ``sparsity`` of every Linear/Conv2d weight, at random positions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=gen) >= sparsity).to(m.weight.dtype))
    return model


class SmallNet(nn.Module):
    """One of each layer configuration the sparse forms must reproduce; every weight matrix is
    divisible by 4x4 blocks, so BSR applies everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)  # matrix (8, 36)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # (8, 72)
        self.grouped = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4)  # (16, 72)
        self.pointwise = nn.Conv2d(16, 8, 1)  # (8, 16)
        self.fc = nn.Linear(8 * 4 * 4, 16)  # (16, 128)
        self.out = nn.Linear(16, 4, bias=False)  # (4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = self.pointwise(torch.relu(self.grouped(self.depthwise(x))))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    return prune_(SmallNet().eval(), 0.75, seed)  # type: ignore[return-value]


def x_of(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_same_function(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), atol=1e-5, rtol=1e-4)


# -- every sparse form is the dense function ------------------------------------------------------
@pytest.mark.parametrize("kernel", ["csr", "bsr"])
def test_forced_kernel_matches_dense_at_other_batch_sizes(kernel: str) -> None:
    net = small_net()
    prepared, choices = prepare(net, x_of(4), force=kernel)
    assert [c.layer for c in choices] == ["conv", "depthwise", "grouped", "pointwise", "fc", "out"]
    assert all(c.kernel == kernel for c in choices), choices_markdown(choices)
    assert all(c.dense_seconds is None and c.chosen_seconds is None for c in choices)  # forced: not timed
    assert isinstance(prepared.conv, SparseConv2d) and isinstance(prepared.fc, SparseLinear)
    for batch in (1, 3, 9):
        assert_same_function(prepared, net, x_of(batch, seed=batch))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, for the dense conv
@pytest.mark.parametrize("kernel", ["csr", "bsr"])
@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 8, 4, padding="same"),  # asymmetric "same" padding
    nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular", stride=(2, 1)),
    nn.Conv2d(4, 8, (1, 3), padding=(0, 1), dilation=(1, 2)),
    nn.Conv2d(4, 4, 3, groups=4, padding=2, stride=3),
], ids=["same-even", "reflect", "circular-stride21", "rect-dilation", "depthwise-stride3"])
def test_conv_configurations(kernel: str, layer: nn.Conv2d) -> None:
    torch.manual_seed(0)
    net = prune_(nn.Sequential(layer))
    prepared, choices = prepare(net, x_of(2), force=kernel, blocks=((4, 2), (2, 1), (4, 4)))
    assert choices[0].kernel == kernel
    assert_same_function(prepared, net, x_of(5))
    assert_same_function(prepared, net, x_of(1)[0])  # an unbatched (C, H, W) input, as nn.Conv2d takes


def test_linear_on_three_dim_input_and_float64() -> None:
    torch.manual_seed(0)
    net = prune_(nn.Sequential(nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 4))).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    prepared, choices = prepare(net, x, force="csr")
    assert [c.kernel for c in choices] == ["csr", "csr"]
    assert_same_function(prepared, net, torch.randn(2, 7, 12, dtype=torch.float64))
    assert_same_function(prepared, net, torch.randn(12, dtype=torch.float64))


def test_measured_choices_keep_the_function_and_follow_their_own_timings() -> None:
    net = small_net()
    prepared, choices = prepare(net, x_of(8), repeats=3, margin=1.05)
    assert len(choices) == 6
    assert_same_function(prepared, net, x_of(3))
    for c in choices:
        assert c.dense_seconds is not None and c.chosen_seconds is not None
        if c.kernel == "dense":
            assert c.speedup == 1.0
        else:  # replaced only where the sparse form measured faster by the margin
            assert c.dense_seconds >= 1.05 * c.chosen_seconds
        assert (c.block is not None) == (c.kernel == "bsr")


def test_standalone_subnetwork_of_a_routed_model() -> None:
    model = toy_model()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    quarter = {n: torch.rand(params[n].shape, generator=gen) > 0.75 for n in ["0.weight", "2.weight"]}
    routed = RoutedModel(model, MaskSet.from_tickets([random_mask_like(quarter, gen) for _ in range(2)])).eval()
    prepared, choices = prepare(routed.standalone(1), torch.randn(8, 4), force="csr")
    assert [c.kernel for c in choices] == ["csr", "csr"]
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), routed(x, 1), atol=1e-5, rtol=1e-4)


def test_tuple_inputs_and_dense_only_kernels() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(y)

    net = prune_(TwoInputs())
    inputs = (torch.randn(2, 6), torch.randn(2, 3))
    prepared, choices = prepare(net, inputs, force="csr")
    assert [c.kernel for c in choices] == ["csr", "csr"]
    assert_same_function(prepared, net, torch.randn(7, 6), torch.randn(7, 3))
    _, choices = prepare(net, inputs, kernels=("dense",))
    assert all(c.kernel == "dense" and c.dense_seconds is None for c in choices)


def test_all_zero_weight() -> None:
    net = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight.zero_()
    prepared, choices = prepare(net, torch.randn(2, 8), force="csr")
    assert choices[0].density == 0.0 and choices[0].kernel == "csr"
    assert_same_function(prepared, net, torch.randn(3, 8))
    assert "∞" in choices_markdown(choices)


# -- what stays dense -----------------------------------------------------------------------------
def test_unpruned_layer_stays_dense_and_is_not_timed() -> None:
    def no_timing() -> float:
        raise AssertionError("an unpruned layer was timed")

    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prepared, choices = prepare(net, torch.randn(4, 8), timer=no_timing)
    assert [type(m) for m in prepared] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(c.kernel == "dense" and c.density == 1.0 and c.dense_seconds is None for c in choices)
    assert all("nothing pruned" in c.note for c in choices)


def test_bsr_only_where_a_block_divides_the_matrix() -> None:
    torch.manual_seed(0)
    net = prune_(nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 8)))  # matrices (5, 7) and (8, 5)
    prepared, choices = prepare(net, torch.randn(2, 7), force="bsr", blocks=((4, 4), (2, 2), (8, 1), (1, 1)))
    first, second = choices
    assert first.kernel == "bsr" and first.block == (1, 1)
    # (8, 1) divides (8, 5) but MKL takes square blocks only: the first square block that divides is used
    assert second.kernel == "bsr" and second.block == (1, 1)
    assert_same_function(prepared, net, torch.randn(6, 7))

    prepared, choices = prepare(net, torch.randn(2, 7), force="bsr", blocks=((4, 4), (2, 2), (8, 1)))
    first, second = choices
    assert first.kernel == "dense" and first.block is None and "divides" in first.note
    assert type(prepared[0]) is nn.Linear
    assert second.kernel == "dense" and "square" in second.note
    assert_same_function(prepared, net, torch.randn(6, 7))


def test_dtype_without_sparse_matmul_stays_dense() -> None:
    torch.manual_seed(0)
    net = prune_(nn.Sequential(nn.Linear(8, 4))).to(torch.bfloat16)
    prepared, choices = prepare(net, torch.randn(2, 8, dtype=torch.bfloat16), force="csr")
    assert choices[0].kernel == "dense" and "dtype" in choices[0].note
    assert type(prepared[0]) is nn.Linear


def test_layer_not_reached_is_left_dense() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = prune_(Skips())
    prepared, choices = prepare(net, torch.randn(2, 4), force="csr")
    assert {c.layer: c.kernel for c in choices} == {"used": "csr", "unused": "dense"}
    assert "not reached" in choices[1].note and type(prepared.unused) is nn.Linear


def test_a_layer_used_twice_is_replaced_everywhere() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    net = prune_(nn.Sequential(shared, nn.Tanh(), shared))
    prepared, choices = prepare(net, torch.randn(3, 6), force="csr")
    assert len(choices) == 1 and isinstance(prepared[0], SparseLinear) and prepared[0] is prepared[2]
    assert_same_function(prepared, net, torch.randn(5, 6))


def test_overridden_forward_is_left_alone() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    net = prune_(nn.Sequential(Scaled(4, 4)))
    prepared, choices = prepare(net, torch.randn(2, 4), force="csr")
    assert choices == [] and type(prepared[0]) is Scaled


# -- the input module, threads, persistence --------------------------------------------------------
def test_input_module_is_unchanged() -> None:
    net = small_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    classes = [type(m) for m in net.modules()]
    prepare(net, x_of(4), force="csr")
    prepare(net, x_of(4), repeats=1)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in net.modules()] == classes and net.training


def test_threads_are_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        net = prune_(nn.Sequential(nn.Linear(8, 8)))
        net.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
        prepare(net, torch.randn(2, 8), threads=1, repeats=1)
        assert seen == [1]  # the capture pass ran under the requested count
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_prepared_module_saves_loads_and_deep_copies() -> None:
    net = small_net()
    for kernel in ("csr", "bsr"):
        prepared, _ = prepare(net, x_of(2), force=kernel)
        buffer = io.BytesIO()
        torch.save(prepared, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert_same_function(loaded, net, x_of(3))
        clone = copy.deepcopy(prepared)
        assert clone.fc.weight is not prepared.fc.weight
        assert_same_function(clone, net, x_of(3))


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, argument", [
    ({"kernels": ()}, "kernels"),
    ({"kernels": ("csr", "coo")}, "kernels"),
    ({"kernels": "csr"}, "kernels"),
    ({"margin": 0.9}, "margin"),
    ({"margin": float("nan")}, "margin"),
    ({"repeats": 0}, "repeats"),
    ({"repeats": 2.5}, "repeats"),
    ({"threads": 0}, "threads"),
    ({"blocks": ((4, 0),)}, "blocks"),
    ({"blocks": ((4,),)}, "blocks"),
    ({"blocks": ()}, "blocks"),
    ({"force": "coo"}, "force"),
])
def test_bad_arguments_are_named(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        prepare(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)  # type: ignore[arg-type]


def test_bad_module_and_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="module"):
        prepare("not a module", torch.randn(1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example_inputs"):
        prepare(nn.Linear(2, 2), [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="choices"):
        choices_markdown(["not a choice"])  # type: ignore[list-item]


# -- reporting ------------------------------------------------------------------------------------
def test_markdown_shows_the_limit_beside_the_speedup() -> None:
    choice = KernelChoice("fc", "linear", 0.1, "csr", None, 3e-3, 1e-3)
    assert choice.speedup == pytest.approx(3.0) and choice.limit == pytest.approx(10.0)
    table = choices_markdown([choice, KernelChoice("c", "conv2d", 0.25, "bsr", (4, 4), 2e-3, 1e-3)])
    header, rule, *rows = table.strip().splitlines()
    assert "limit 1/density" in header and "speedup" in header
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    column = header.strip("|").split("|")
    limit_at = [h.strip() for h in column].index("limit 1/density")
    assert [c[limit_at] for c in cells] == ["10.00x", "4.00x"]
    assert cells[0][7] == "3.00x" and cells[1][4] == "4x4"
    json.dumps([choice.to_dict()])  # JSON-ready
    assert choice.to_dict()["limit"] == pytest.approx(10.0)


def test_markdown_of_prepare_output() -> None:
    _, choices = prepare(small_net(), x_of(2), force="csr")
    table = choices_markdown(choices)
    for c in choices:
        assert f"| {c.layer} |" in table and f"{1 / c.density:.2f}x" in table


# -- the decision rule, on a fake clock -------------------------------------------------------------
class FakeClock:
    """A clock that moves only when a layer runs, by the cost the test gives that layer: timings
    become deterministic, so the rule itself is what is tested."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


Cost = float | Callable[[int], float]  # seconds per call, or a function of the layer's call count


def costed_net(clock: FakeClock, dense_cost: Cost, sparse_cost: Cost, monkeypatch: pytest.MonkeyPatch,
               whole_penalty: float = 0.0) -> nn.Module:
    """Two pruned Linears whose dense forwards cost ``dense_cost`` on ``clock`` and sparse forwards
    ``sparse_cost``; the network pays ``whole_penalty`` more per forward when any of its layers is
    sparse (what layers timed alone cannot see)."""
    def tick(module: nn.Module, spec: Cost) -> None:
        module.calls = getattr(module, "calls", 0) + 1  # each copy of a layer counts its own calls
        clock.tick(spec(module.calls) if callable(spec) else spec)

    net = prune_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    for layer in (net[0], net[2]):  # hooks travel with prepare's deep copies
        layer.register_forward_hook(lambda m, a, o: tick(m, dense_cost))
    net.register_forward_hook(lambda m, a, o: clock.tick(
        whole_penalty if any(isinstance(x, SparseLinear) for x in m.modules()) else 0.0))
    original = SparseLinear.forward

    def sparse_forward(self: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        tick(self, sparse_cost)
        return original(self, x)

    monkeypatch.setattr(SparseLinear, "forward", sparse_forward)
    return net


def prepare_on(clock: FakeClock, net: nn.Module, **kwargs: object) -> tuple[nn.Module, list[KernelChoice]]:
    prepared, choices = prepare(net, torch.randn(4, 8), timer=clock, repeats=20, **kwargs)  # type: ignore[arg-type]
    assert_same_function(prepared, net, torch.randn(3, 8))
    return prepared, choices


def test_sparse_only_marginally_faster_stays_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    prepared, choices = prepare_on(clock, costed_net(clock, 1.0, 0.95, monkeypatch), kernels=("csr",))
    assert [c.kernel for c in choices] == ["dense", "dense"]  # 1.05x is noise on a shared machine, not speed
    assert all(type(m) is nn.Linear for m in (prepared[0], prepared[2]))
    assert all("1.05x on medians" in c.note and "left dense" in c.note for c in choices), choices_markdown(choices)


def test_sparse_clearly_faster_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    prepared, choices = prepare_on(clock, costed_net(clock, 1.0, 0.5, monkeypatch))
    assert [c.kernel for c in choices] == ["csr", "csr"]  # all forms cost alike: the first, csr, is kept
    assert all(isinstance(m, SparseLinear) for m in (prepared[0], prepared[2]))
    assert all(c.speedup == pytest.approx(2.0) for c in choices)
    assert all(kernels.WHOLE_MODULE_NOTE in c.note and ": kept" in c.note for c in choices)


@pytest.mark.parametrize("dense_cost, sparse_cost", [
    # sparse alternates between fast and slow: only its best samples look good
    (1.0, lambda calls: 0.4 if calls % 2 else 2.0),
    # every other dense sample hit by a load spike: dense's median looks slow, yet back to back and
    # at its best dense is within 11 % of sparse (the busy machine of the issue)
    (lambda calls: 3.0 if calls % 2 else 1.0, 0.9),
], ids=["sparse-alternating", "dense-load-spikes"])
def test_noise_keeps_dense(monkeypatch: pytest.MonkeyPatch, dense_cost: Cost, sparse_cost: Cost) -> None:
    clock = FakeClock()
    prepared, choices = prepare_on(clock, costed_net(clock, dense_cost, sparse_cost, monkeypatch), kernels=("csr",))
    assert [c.kernel for c in choices] == ["dense", "dense"], choices_markdown(choices)
    assert all(type(m) is nn.Linear for m in (prepared[0], prepared[2]))


def test_whole_module_slower_than_dense_puts_every_layer_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    net = costed_net(clock, 1.0, 0.5, monkeypatch, whole_penalty=5.0)  # layers 2x faster alone, the whole 3x slower
    prepared, choices = prepare_on(clock, net, kernels=("csr",))
    assert [c.kernel for c in choices] == ["dense", "dense"]
    assert not any(isinstance(m, SparseLinear) for m in prepared.modules())
    assert all(kernels.WHOLE_MODULE_NOTE in c.note and "every layer left dense" in c.note for c in choices)
    assert all(c.speedup == 1.0 and c.block is None for c in choices)
    assert all("2.00x on medians" in c.note for c in choices)  # each layer's own measurement is still told


def test_bad_timer_and_module_margin_are_named() -> None:
    with pytest.raises(ValueError, match="timer"):
        prepare(nn.Linear(2, 2), torch.randn(1, 2), timer=3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module_margin"):
        prepare(nn.Linear(2, 2), torch.randn(1, 2), module_margin=0.5)
