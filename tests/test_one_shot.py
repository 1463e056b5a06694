"""One-shot tickets through the front door (issue 25): a score ranks the pretrained weights once per
context from its calibration batches, and the masks are ordinary tickets (retraining, saving)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from routing_lottery import AdaptiveTickets, PruningConfig, RTLConfig, tensor_stream
from routing_lottery.errors import ConfigError
from routing_lottery.recipe import TrainingConfig
from routing_lottery.scores import needs_activations
from routing_lottery.training import OptimizerConfig


def two_feature_contexts(rows: int = 32) -> dict:
    """Context "low" lights input features 0-3 only, "high" features 4-7 only."""
    g = torch.Generator().manual_seed(0)
    low, high = torch.zeros(rows, 8), torch.zeros(rows, 8)
    low[:, :4] = torch.randn(rows, 4, generator=g)
    high[:, 4:] = torch.randn(rows, 4, generator=g)
    return {name: tensor_stream(name, x, torch.randint(0, 2, (rows,), generator=g), F.cross_entropy, batch_size=16)
            for name, x in (("low", low), ("high", high))}


def pretrained() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def recipe(**pruning) -> RTLConfig:
    return RTLConfig(pruning=PruningConfig(**{"sparsities": (0.5,), **pruning}),
                     training=TrainingConfig(epochs=2, optimizer=OptimizerConfig(lr=1e-2)))


def test_wanda_masks_follow_each_context_s_active_inputs():
    masks = AdaptiveTickets(pretrained(), recipe(score="wanda")).extract(two_feature_contexts())[0.5]
    low, high = masks["low"]["0.weight"], masks["high"]["0.weight"]
    assert low[:, :4].all() and not low[:, 4:].any()  # per row, the 4 of 8 inputs this context uses
    assert high[:, 4:].all() and not high[:, :4].any()
    for mask in (masks["low"], masks["high"]):  # exact counts per output row, every masked tensor
        assert all(int(m.sum(1).min()) == int(m.sum(1).max()) == m.shape[1] // 2 for m in mask.values())


def test_magnitude_one_shot_needs_no_data_and_gives_every_context_the_same_mask():
    masks = AdaptiveTickets(pretrained(), recipe(score="magnitude")).extract(two_feature_contexts())[0.5]
    assert all(torch.equal(masks["low"][n], masks["high"][n]) for n in masks.tensor_names)


def weights_only(weights, activations):
    """A user's score of the weights alone (|W| squared), declared as such."""
    assert activations is None
    return {name: w.detach().float() ** 2 for name, w in weights.items()}


weights_only.needs_activations = False


def data_score(weights, activations):
    """A user's score that reads the calibration norms, declaring nothing: it is given them."""
    return {name: w.detach().abs().float() * activations[name][None, :] for name, w in weights.items()}


def test_a_score_declares_whether_it_needs_calibration_data(monkeypatch):
    import routing_lottery.tickets as tickets

    assert not needs_activations("magnitude") and needs_activations("wanda") and needs_activations(data_score)
    data_masks = AdaptiveTickets(pretrained(), recipe(score=data_score)).extract(two_feature_contexts())[0.5]
    assert not torch.equal(data_masks["low"]["0.weight"], data_masks["high"]["0.weight"])  # it saw each context's data
    monkeypatch.setattr(tickets, "input_norms", lambda *args, **kwargs: pytest.fail("no forward pass was needed"))
    masks = AdaptiveTickets(pretrained(), recipe(score=weights_only)).extract(two_feature_contexts())[0.5]
    assert all(torch.equal(masks["low"][n], masks["high"][n]) for n in masks.tensor_names)


def test_two_four_masks_keep_two_of_every_four_and_retrain_to_exact_zeros():
    rtl = AdaptiveTickets(pretrained(), recipe(score="wanda", n_m=(2, 4)))
    streams = two_feature_contexts()
    masks = rtl.extract(streams)[0.5]
    for k in range(masks.num_contexts):
        groups = masks[k]["0.weight"].reshape(8, 2, 4)
        assert (groups.sum(-1) == 2).all()
    routed = rtl.retrain(streams, masks)
    weights = dict(rtl.model.named_parameters())
    outside = ~masks.union()["0.weight"]
    assert outside.any() and (weights["0.weight"][outside] == 0).all()
    assert routed(torch.zeros(3, 8), ["low", "high", "low"]).shape == (3, 2)


@pytest.mark.parametrize("pruning, message", [
    ({"n_m": (2, 4)}, "set pruning.score"),
    ({"score": "wanda", "n_m": (2, 4), "sparsities": (0.75,)}, r"must be \[0.5\]"),
    ({"score": "wanda", "n_m": (4, 2)}, "0 < N <= M"),
    ({"score": "wanda", "granularity": "channel"}, "channel tickets are found by IMP"),
    ({"score": "wanda", "score_group": "column"}, "row, tensor or global"),
])
def test_one_shot_settings_are_checked(pruning, message):
    with pytest.raises(ConfigError, match=message):
        recipe(**pruning)


def test_an_unknown_score_is_named_before_anything_runs():
    rtl = AdaptiveTickets(pretrained(), recipe(score="sparsegpt"))
    with pytest.raises(ConfigError, match="unknown score 'sparsegpt'"):
        rtl.extract(two_feature_contexts())


def test_recipes_without_one_shot_settings_keep_their_identity():
    pruning = RTLConfig().to_dict()["pruning"]
    assert not {"score", "score_group", "n_m"} & set(pruning)
    assert recipe(score="wanda", n_m=(2, 4)).to_dict()["pruning"]["n_m"] == [2, 4]
