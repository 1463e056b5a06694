"""The timing rule shared by kernels.prepare and RoutedModel, and RoutedModel's choice of its mixed-batch path.

Every test runs on a fake clock that moves only when a measured variant runs, by the cost the test
gives it: the decisions are deterministic, so the rule itself is tested, never this machine's load.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from routing_lottery import timing
from routing_lottery.masks import MaskSet
from routing_lottery.routed import PATH_MARGIN, RoutedModel
from toy import toy_model


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def costing(self, cost: float | Callable[[int], float], fn: Callable[..., object] = lambda *a: None
                ) -> Callable[..., object]:
        """``fn`` that advances the clock by ``cost`` (or ``cost(call number)``) per call."""
        calls = [0]

        def run(*args: object, **kwargs: object) -> object:
            calls[0] += 1
            self.now += cost(calls[0]) if callable(cost) else cost
            return fn(*args, **kwargs)
        return run


# -- the rule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("candidate, faster", [
    (0.5, True),  # clearly faster
    (0.95, False),  # marginally faster: noise on a shared machine, not speed
    (1.0, False),  # a tie keeps the baseline
    (lambda n: 0.4 if n % 2 else 2.0, False),  # alternating: only its best samples look good
], ids=["clear", "marginal", "tie", "alternating"])
def test_compare_keeps_the_baseline_unless_the_candidate_is_clearly_faster(candidate, faster) -> None:
    clock = FakeClock()
    verdict = timing.compare(clock.costing(1.0), clock.costing(candidate), margin=1.15, repeats=10, timer=clock)
    assert verdict.faster is faster, verdict.describe()
    assert verdict.rounds == 10


def test_load_spikes_on_the_baseline_do_not_make_the_candidate_look_faster() -> None:
    clock = FakeClock()
    spiky = clock.costing(lambda n: 3.0 if n % 2 else 1.0)  # every other baseline sample hit by load
    verdict = timing.compare(spiky, clock.costing(0.9), margin=1.15, repeats=10, timer=clock)
    assert verdict.median_ratio > 2  # the medians alone would be fooled
    assert verdict.paired_ratio == pytest.approx(1 / 0.9) and verdict.best_ratio == pytest.approx(1 / 0.9)
    assert not verdict.faster


def test_samples_are_interleaved_in_alternating_order() -> None:
    clock, order = FakeClock(), []
    variants = {name: clock.costing(1.0, lambda name=name: order.append(name)) for name in ("a", "b")}
    samples = timing.sample(variants, 4, timer=clock, warmup=1)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then rounds
    assert samples == {"a": [1.0] * 4, "b": [1.0] * 4}


def test_judge_refuses_what_it_cannot_judge() -> None:
    with pytest.raises(ValueError, match="same non-zero number"):
        timing.judge([1.0], [1.0, 2.0], 1.1)
    with pytest.raises(ValueError, match="margin"):
        timing.judge([1.0], [1.0], 0.9)


# -- RoutedModel: which mixed-batch path ------------------------------------------------------------
def routed_on(clock: FakeClock, loop_cost: float | Callable[[int], float], vmap_cost: float | Callable[[int], float],
              **kwargs: object) -> tuple[RoutedModel, dict[str, int]]:
    """A toy routed model whose loop and vmapped paths cost what the test says on ``clock``; the
    count of each path's calls comes back beside it."""
    model = toy_model()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = MaskSet.from_tickets([{n: torch.rand(params[n].shape, generator=g) > 0.5 for n in ("0.weight", "2.weight")}
                                  for _ in range(3)])
    routed = RoutedModel(model, masks, timer=clock, **kwargs)  # type: ignore[arg-type]
    calls = {"loop": 0, "vmap": 0}

    def counted(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: object) -> torch.Tensor:
            calls[name] += 1
            return fn(*args)
        return run

    routed._looped = counted("loop", clock.costing(loop_cost, routed._looped))  # type: ignore[method-assign]
    routed._vmapped = counted("vmap", clock.costing(vmap_cost, routed._vmapped))  # type: ignore[method-assign]
    return routed, calls


def mixed(rows: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 4), torch.arange(rows) % 3


@pytest.mark.parametrize("vmap_cost, path", [
    (0.5, "vmap"),  # clearly faster than the loop
    (1 / (PATH_MARGIN - 0.02), "loop"),  # faster, but under the margin
    (lambda n: 0.3 if n % 2 else 3.0, "loop"),  # noise
    (2.0, "loop"),  # slower, as on a small ViT
], ids=["vmap-clearly-faster", "vmap-marginally-faster", "noisy", "vmap-slower"])
def test_auto_takes_the_path_measured_clearly_faster_once_per_bucket(vmap_cost, path) -> None:
    clock = FakeClock()
    routed, calls = routed_on(clock, 1.0, vmap_cost)
    x, context = mixed()
    with torch.no_grad():
        out = routed(x, context)
        (decision,) = routed.path_decisions.values()
        assert decision.path == path, decision.describe()
        measured = dict(calls)
        reads = clock.reads
        again = routed(x, context)  # same bucket: the decision is reused, not measured again
    assert clock.reads == reads
    assert calls[path] == measured[path] + 1 and sum(calls.values()) == sum(measured.values()) + 1
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)


def test_a_new_batch_shape_bucket_is_measured_anew() -> None:
    clock = FakeClock()
    routed, _ = routed_on(clock, 1.0, 0.5)
    with torch.no_grad():
        routed(*mixed(9))
        routed(*mixed(10))  # 9 and 10 rows, largest group 3 and 4: different buckets
        routed(*mixed(12))  # 12 rows and 4 per group share the bucket of 10
    assert len(routed.path_decisions) == 2


def test_forced_paths_never_measure() -> None:
    class Unreadable(FakeClock):
        def __call__(self) -> float:
            raise AssertionError("a forced path was timed")

    for forced in ("vmap", "loop"):
        routed, calls = routed_on(Unreadable(), 1.0, 1.0, mixed_path=forced)
        with torch.no_grad():
            routed(*mixed())
        assert calls == {"loop": int(forced == "loop"), "vmap": int(forced == "vmap")}
        assert routed.path_decisions == {}


def test_auto_only_measures_where_vmap_may_run() -> None:
    clock = FakeClock()
    routed, calls = routed_on(clock, 1.0, 0.5, vmap_below=1)  # groups never small enough to vmap
    with torch.no_grad():
        routed(*mixed())
    assert calls == {"loop": 1, "vmap": 0} and clock.reads == 0


def test_auto_falls_back_to_the_loop_when_vmap_cannot_batch_the_model() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.head = nn.GRU(1, 6, batch_first=True), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(x)[0][:, -1])

    torch.manual_seed(0)
    net = Recurrent().eval()
    masks = MaskSet.from_tickets([{"head.weight": torch.rand(2, 6) > 0.5} for _ in range(2)])
    routed = RoutedModel(net, masks)
    x, context = torch.randn(6, 5, 1), torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        out = routed(x, context)
        (decision,) = routed.path_decisions.values()
        assert decision.path == "loop" and decision.verdict is None and "cannot run" in decision.describe()
        for k in range(2):
            assert torch.equal(out[context == k], routed.subnetwork(x[context == k], k))
