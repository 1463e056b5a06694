"""Routers on toys whose right answer is known by construction."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import routing_lottery.router as router_module
from routing_lottery.calibration import Thresholds, decide
from routing_lottery.errors import CheckpointError, DataError
from routing_lottery.masks import MaskSet
from routing_lottery.metrics import BinaryCounts
from routing_lottery.routed import RoutedModel
from routing_lottery.router import (
    STRATEGIES,
    DetectorRouter,
    EntropyRouter,
    LearnedRouter,
    inject_errors,
    plot_confusion,
    routing_accuracy,
    softmax_entropy,
)

K = 3


# -- toys -----------------------------------------------------------------------------------------
def detector_toy() -> RoutedModel:
    """One-vs-rest detectors: subnetwork k keeps only the path x_k -> h_k -> output k, so its output
    k is 4 * relu(x_k), large exactly on context-k inputs (x = 2 e_k + noise)."""
    net = nn.Sequential(nn.Linear(K, K, bias=False), nn.ReLU(), nn.Linear(K, K, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(K))
        net[2].weight.copy_(4 * torch.eye(K))
    diagonal = [torch.zeros(K, K, dtype=torch.bool).index_put_((torch.tensor([k]), torch.tensor([k])), torch.tensor(True))
                for k in range(K)]
    masks = MaskSet.from_tickets([{"0.weight": torch.ones(K, K, dtype=torch.bool), "2.weight": d} for d in diagonal])
    return RoutedModel(net, masks)


def detector_inputs(per_context: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    contexts = torch.arange(K).repeat_interleave(per_context)
    x = 0.2 * torch.randn(len(contexts), K, generator=g) + 2 * nn.functional.one_hot(contexts, K).float()
    order = torch.randperm(len(contexts), generator=g)  # mixed batches
    return x[order], contexts[order]


class EntropyNet(nn.Module):
    """Binary classifier over 6 features; context k's evidence lives in features 2k, 2k+1."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2 * K, 2 * K, bias=False)
        self.out = nn.Linear(2 * K, 2, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.eye(2 * K))
            pair = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
            self.out.weight.copy_(pair.repeat(1, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class TwoInputNet(EntropyNet):
    """The same function, fed as two per-row tensors (multi-input models route too)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([a, b], dim=1))


def entropy_masks() -> MaskSet:
    """Mask k keeps features 2k, 2k+1 and their two output columns: peaked softmax on context k's
    inputs, near-flat on the others' (their features there are noise)."""
    tickets = []
    for k in range(K):
        keep = torch.zeros(2 * K, dtype=torch.bool)
        keep[2 * k:2 * k + 2] = True
        tickets.append({"hidden.weight": torch.diag(keep), "out.weight": keep.expand(2, 2 * K).clone()})
    return MaskSet.from_tickets(tickets)


def entropy_inputs(per_context: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    contexts = torch.arange(K).repeat_interleave(per_context)
    label = torch.randint(0, 2, (len(contexts),), generator=g)
    x = 0.2 * torch.randn(len(contexts), 2 * K, generator=g)
    rows = torch.arange(len(contexts))
    x[rows, 2 * contexts + label] += 3.0
    x[rows, 2 * contexts + 1 - label] += 0.5
    order = torch.randperm(len(contexts), generator=g)
    return x[order], contexts[order]


def blobs(per_context: int, k: int = K, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, dim, generator=torch.Generator().manual_seed(123))
    contexts = torch.arange(k).repeat_interleave(per_context)
    return centers[contexts] + torch.randn(len(contexts), dim, generator=g), contexts


def thresholds(values: list[float]) -> Thresholds:
    n = len(values)
    return Thresholds(thresholds=torch.tensor(values), objective="f1", target_precision=None, delta=None,
                      met=(True,) * n, messages=("",) * n, counts=(BinaryCounts(0, 0, 0, 0),) * n)


# -- detectors ------------------------------------------------------------------------------------
def test_detector_router_recovers_contexts_and_reports_k_passes():
    routed = detector_toy()
    x, true = detector_inputs()
    router = DetectorRouter()
    with pytest.raises(AttributeError, match="known after the first call"):
        router.passes
    chosen = router(routed, x)
    assert chosen.dtype == torch.long and chosen.shape == true.shape
    assert routing_accuracy(chosen, true) == 1.0
    assert router.passes == K and router.name == "detectors"


def test_detector_router_with_thresholds_uses_calibrated_margins():
    routed = detector_toy()
    x = torch.tensor([[2.0, 1.5, 0.0]])  # raw detector logits 8 and 6: context 0 wins on logits
    assert DetectorRouter()(routed, x).tolist() == [0]
    t = thresholds([6.0, 1.0, 1.0])  # margins 2 and 5: context 1 is the most confident calibrated detector
    assert DetectorRouter(thresholds=t)(routed, x).tolist() == [1]
    # the same decisions as calibration.decide's "most_confident" rule on the raw scores
    xs, _ = detector_inputs(seed=3)
    xs = torch.cat([xs, x])
    raw = DetectorRouter().scores(routed, xs)
    assert torch.equal(DetectorRouter(thresholds=t)(routed, xs), decide(raw, t, "most_confident").routed)
    with pytest.raises(ValueError, match="thresholds are for 2 detectors"):
        DetectorRouter(thresholds=thresholds([0.0, 0.0]))(routed, x)


def test_detector_router_chooses_from_logits_scored_already_as_it_would_by_running_them():
    routed = detector_toy()
    xs, _ = detector_inputs(seed=5)
    logits = torch.stack([routed(xs, k)[:, k] for k in range(routed.num_contexts)], dim=1)
    t = thresholds([6.0, 1.0, 1.0])
    for router in (DetectorRouter(), DetectorRouter(thresholds=t)):
        assert torch.equal(router.choose_from_logits(logits), router(routed, xs))
    assert DetectorRouter(thresholds=t).choose_from_logits(torch.tensor([[8.0, 6.0, 0.0]])).tolist() == [1]
    # a custom confidence needs the whole outputs: no shortcut
    assert DetectorRouter(confidence=lambda k, out: out[:, k]).choose_from_logits(logits) is None
    with pytest.raises(ValueError, match=r"\(N, K\) detector logits"):
        DetectorRouter(thresholds=t).choose_from_logits(logits[:, :2])


def test_detector_router_needs_k_detector_outputs_or_a_confidence():
    routed = RoutedModel(EntropyNet(), entropy_masks())  # 2 outputs, K = 3 contexts
    x, true = entropy_inputs()
    with pytest.raises(ValueError, match=r"outputs must be \(N, >= K\).*confidence="):
        DetectorRouter()(routed, x)
    # any per-row confidence works: negative entropy of each subnetwork is the K-pass cousin of EntropyRouter
    chosen = DetectorRouter(confidence=lambda k, out: -softmax_entropy(out))(routed, x)
    assert routing_accuracy(chosen, true) >= 0.95
    with pytest.raises(ValueError, match="one score per row"):
        DetectorRouter(confidence=lambda k, out: out)(routed, x)


# -- entropy --------------------------------------------------------------------------------------
def test_entropy_router_picks_the_mask_that_makes_the_output_confident():
    routed = RoutedModel(EntropyNet(), entropy_masks())
    x, true = entropy_inputs()
    router = EntropyRouter()
    chosen = router(routed, x)
    assert chosen.dtype == torch.long
    assert routing_accuracy(chosen, true) >= 0.95
    assert router.passes == 2 and router.name == "entropy"
    # per example: a mixed batch routes each row as it would alone, in any chunking
    alone = torch.cat([router(routed, x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(chosen, alone)
    assert torch.equal(EntropyRouter(chunk_size=7)(routed, x), chosen)


def test_entropy_gradient_is_d_entropy_d_alpha_of_the_superposed_masks():
    routed = RoutedModel(EntropyNet(), entropy_masks())
    x, _ = entropy_inputs(per_context=2)
    got = EntropyRouter().gradients(routed, x)
    params = dict(routed.model.named_parameters())
    for i in range(len(x)):
        alpha = torch.full((K,), 1.0 / K, requires_grad=True)
        weights = {n: params[n].detach() * sum(alpha[k] * routed.mask(k)[n] for k in range(K))
                   for n in routed.masks.tensor_names}
        out = torch.func.functional_call(routed.model, weights, (x[i:i + 1],))
        (expected,) = torch.autograd.grad(softmax_entropy(out).sum(), alpha)
        assert torch.allclose(got[i], expected, atol=1e-6)


def test_entropy_router_falls_back_to_a_loop_without_batching_rule(monkeypatch):
    routed = RoutedModel(EntropyNet(), entropy_masks())
    x, _ = entropy_inputs()
    expected = EntropyRouter().gradients(routed, x)

    def no_rule(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for aten::something")

    monkeypatch.setattr(router_module, "vmap", no_rule)
    router = EntropyRouter()
    assert torch.allclose(router.gradients(routed, x), expected, atol=1e-6)
    assert not router._vmappable


def test_entropy_router_needs_evaluation_mode_and_takes_tuples():
    routed = RoutedModel(EntropyNet(), entropy_masks())
    x, true = entropy_inputs()
    routed.train()
    with pytest.raises(RuntimeError, match="evaluation mode"):
        EntropyRouter()(routed, x)
    routed.eval()
    two = RoutedModel(TwoInputNet(), entropy_masks())
    pair = (x[:, :2], x[:, 2:])
    assert torch.equal(EntropyRouter()(two, pair), EntropyRouter()(routed, x))
    two.router = EntropyRouter()
    with torch.no_grad():  # routing under no_grad: torch.func.grad ignores it for alpha
        assert torch.equal(two(pair), two(pair, EntropyRouter()(two, pair)))


# -- learned --------------------------------------------------------------------------------------
def test_learned_router_separates_blobs_deterministically_and_matches_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, c = blobs(50)
    router = LearnedRouter.fit(x, c, K, max_components=4, seed=1)
    test_x, test_c = blobs(50, seed=9)
    assert routing_accuracy(router(None, test_x), test_c) >= 0.95
    assert router.passes == 0 and router.name == "learned" and router.num_contexts == K
    again = LearnedRouter.fit(x, c, K, max_components=4, seed=1)
    assert all(torch.equal(router.tensors[n], again.tensors[n]) for n in router.tensors)
    pipeline = make_pipeline(StandardScaler(), PCA(n_components=4, random_state=1), LogisticRegression(max_iter=1000))
    pipeline.fit(x.double().numpy(), c.numpy())
    expected = pipeline.decision_function(test_x.double().numpy())
    assert np.allclose(router.logits(test_x).numpy(), expected, atol=1e-8)


def test_learned_router_with_two_contexts_has_two_logits_and_sklearn_probabilities():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, c = blobs(30, k=2)
    router = LearnedRouter.fit(x, c, 2)
    logits = router.logits(x)
    assert logits.shape == (60, 2)
    pipeline = make_pipeline(StandardScaler(), PCA(n_components=8, random_state=0), LogisticRegression(max_iter=1000))
    pipeline.fit(x.double().numpy(), c.numpy())
    assert np.allclose(torch.softmax(logits, 1).numpy(), pipeline.predict_proba(x.double().numpy()), atol=1e-8)


def test_learned_router_save_load_round_trip_and_corruption(tmp_path):
    x, c = blobs(20)
    router = LearnedRouter.fit(x, c, K)
    router.save(tmp_path / "r")
    loaded = LearnedRouter.load(tmp_path / "r")
    assert torch.equal(loaded.logits(x), router.logits(x))
    index = json.loads((tmp_path / "r" / "router.json").read_text())
    assert index["features"] == "routing_lottery.router.flatten_features" and index["num_contexts"] == K

    weights = tmp_path / "r" / "router.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="router.safetensors is truncated or corrupt"):
        LearnedRouter.load(tmp_path / "r")

    with pytest.raises(CheckpointError, match="router.json is missing"):
        LearnedRouter.load(tmp_path / "nowhere")


def _rewrite(directory, tensors=None, **index_fields):
    """Rewrite a saved router with a consistent checksum, so only the intended problem remains."""
    import hashlib

    index_path, weights_path = directory / "router.json", directory / "router.safetensors"
    if tensors is not None:
        blob = safetensors.torch.save(tensors)
        weights_path.write_bytes(blob)
        index_fields.setdefault("weights_sha256", hashlib.sha256(blob).hexdigest())
    index = json.loads(index_path.read_text())
    index.update(index_fields)
    index_path.write_text(json.dumps(index))


def test_learned_router_load_refuses_wrong_version_shapes_and_features(tmp_path):
    x, c = blobs(20)
    router = LearnedRouter.fit(x, c, K)
    router.save(tmp_path / "v")
    _rewrite(tmp_path / "v", version=2)
    with pytest.raises(CheckpointError, match="router.json has version 2"):
        LearnedRouter.load(tmp_path / "v")

    router.save(tmp_path / "s")
    wrong = dict(router.tensors, coef=router.tensors["coef"][:, :-1].contiguous())
    _rewrite(tmp_path / "s", wrong)
    with pytest.raises(CheckpointError, match=r"router.safetensors is corrupt.*coef must be"):
        LearnedRouter.load(tmp_path / "s")

    router.save(tmp_path / "f")
    with pytest.raises(CheckpointError, match="fitted on features"):
        LearnedRouter.load(tmp_path / "f", features=lambda t: t.reshape(len(t), -1).float())


def test_learned_router_validates_its_training_contexts():
    x, c = blobs(10)
    with pytest.raises(DataError, match="integer ids"):
        LearnedRouter.fit(x, c.float(), K)
    with pytest.raises(DataError, match="one id per input row"):
        LearnedRouter.fit(x, c[:-1], K)
    with pytest.raises(DataError, match=r"contexts \[2\] have none"):
        LearnedRouter.fit(x[c < 2], c[c < 2], K)
    with pytest.raises(DataError, match=r"in 0\.\.2"):
        LearnedRouter.fit(x, c + 1, K)
    with pytest.raises(ValueError, match="num_contexts must be an integer >= 2"):
        LearnedRouter.fit(x, torch.zeros_like(c), 1)


# -- the routed model without an oracle -----------------------------------------------------------
def test_routed_model_routes_itself_with_a_router():
    routed = detector_toy()
    x, true = detector_inputs()
    with pytest.raises(ValueError, match=r"pass one context per row.*routed\.router = LearnedRouter\.fit"):
        routed(x)
    for router in (DetectorRouter(), LearnedRouter.fit(x, true, K)):
        routed.router = router
        assert torch.equal(routed(x), routed(x, router(routed, x)))
        assert torch.equal(routed(x), routed(x, true))  # a clear toy: every row reaches its own subnetwork
    built = RoutedModel(routed.model, routed.masks, router=DetectorRouter())
    assert torch.equal(built(x), routed(x, true))
    assert set(STRATEGIES) == {DetectorRouter.name, EntropyRouter.name, LearnedRouter.name}


# -- routing errors and scores --------------------------------------------------------------------
def test_inject_errors_changes_exactly_the_requested_rows():
    contexts = torch.arange(40) % 4
    same = inject_errors(contexts, 0.0, 4, torch.Generator().manual_seed(0))
    assert torch.equal(same, contexts) and same is not contexts
    for fraction in (0.1, 0.25, 0.5):
        noisy = inject_errors(contexts, fraction, 4, torch.Generator().manual_seed(5))
        changed = noisy != contexts
        assert int(changed.sum()) == round(fraction * 40)  # a changed row never keeps its context
        assert int(noisy.min()) >= 0 and int(noisy.max()) < 4
        assert torch.equal(noisy, inject_errors(contexts, fraction, 4, torch.Generator().manual_seed(5)))
    assert (inject_errors(contexts, 1.0, 4, torch.Generator().manual_seed(1)) != contexts).all()
    # wrong contexts are spread over all the others, not shifted to one
    many = torch.zeros(2000, dtype=torch.long)
    assert set(inject_errors(many, 1.0, 4, torch.Generator().manual_seed(2)).tolist()) == {1, 2, 3}
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\]"):
            inject_errors(contexts, bad, 4, torch.Generator())
    with pytest.raises(ValueError, match="num_contexts"):
        inject_errors(torch.zeros(3, dtype=torch.long), 0.5, 1, torch.Generator())


def test_routing_accuracy_and_confusion_figure(tmp_path):
    chosen, true = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])
    assert routing_accuracy(chosen, true) == 0.75
    with pytest.raises(ValueError, match="one length"):
        routing_accuracy(chosen, true[:3])
    path = plot_confusion(chosen, true, ["a", "b", "c"], tmp_path / "fig" / "confusion.png", "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"in 0\.\.1 for 2 names"):
        plot_confusion(chosen, true, ["a", "b"], tmp_path / "bad.png")
    panels = plot_confusion({"detectors": chosen, "learned": true}, true, ["a", "b", "c"], tmp_path / "two.png")
    assert panels.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"in 0\.\.2 for 3 names"):  # every panel is checked
        plot_confusion({"ok": chosen, "bad": torch.tensor([0, 1, 2, 3])}, true, ["a", "b", "c"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_entropy_router_on_a_convolutional_network_with_batchnorm_stays_vmapped():
    """GhostNet (convolutions, BatchNorm in evaluation mode): the vmapped path, one choice per example."""
    from routing_lottery.models.ghostnet import GhostNetTruncated
    from routing_lottery.pruning import prunable_names

    torch.manual_seed(0)
    net = GhostNetTruncated(num_classes=4, in_channels=1, width=0.25)
    params = dict(net.named_parameters())
    masks = MaskSet.from_tickets([{n: torch.rand_like(params[n]) > 0.5 for n in prunable_names(net)} for _ in range(4)])
    routed = RoutedModel(net, masks)
    x = torch.randn(6, 1, 16, 16)
    router = EntropyRouter(chunk_size=4)
    chosen = router(routed, x)
    assert router._vmappable
    assert torch.equal(chosen, torch.cat([router(routed, x[i:i + 1]) for i in range(len(x))]))
    stats = {n: b.clone() for n, b in net.named_buffers()}
    routed.router = router
    routed(x)
    assert all(torch.equal(stats[n], b) for n, b in net.named_buffers())  # routing moved no BatchNorm statistic
