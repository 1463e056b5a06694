"""One-shot scores (issue 25): Wanda against hand computations, calibration norms, exact and N:M cuts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from routing_lottery.masks import MaskSet
from routing_lottery.registry import RegistryError
from routing_lottery.scores import (
    SCORES, compute_scores, input_norms, magnitude, one_shot_mask, resolve_score, wanda,
)

W = torch.tensor([[1.0, -4.0, 2.0, 3.0],
                  [4.0, 1.0, -1.0, 0.5]])
NORMS = torch.tensor([10.0, 0.1, 1.0, 1.0])  # feature 0 loud, feature 1 nearly silent


def kept(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


# -- the scores ------------------------------------------------------------------------------
def test_wanda_keeps_weights_on_loud_features_where_magnitude_keeps_large_weights():
    w, acts = {"fc.weight": W}, {"fc.weight": NORMS}
    # row 0: |W|*||X|| = [10, 0.4, 2, 3]; row 1: [40, 0.1, 1, 0.5]
    torch.testing.assert_close(wanda(w, acts)["fc.weight"], torch.tensor([[10.0, 0.4, 2.0, 3.0], [40.0, 0.1, 1.0, 0.5]]))
    assert kept(one_shot_mask(wanda(w, acts), 0.5)["fc.weight"]) == [[0, 3], [0, 2]]
    assert kept(one_shot_mask(magnitude(w), 0.5)["fc.weight"]) == [[1, 3], [0, 1]]


def test_wanda_names_the_tensor_whose_norms_are_missing_or_misshapen():
    w = {"fc.weight": W}
    with pytest.raises(ValueError, match="needs activations.*input_norms"):
        wanda(w, None)
    with pytest.raises(ValueError, match="no input norms for 'fc.weight'"):
        wanda(w, {"other.weight": NORMS})
    with pytest.raises(ValueError, match=r"shape \(4,\) for 'fc.weight'.*got \(3,\)"):
        wanda(w, {"fc.weight": NORMS[:3]})
    with pytest.raises(ValueError, match="'fc.weight' are not finite"):
        wanda(w, {"fc.weight": torch.tensor([1.0, math.nan, 1.0, 1.0])})
    with pytest.raises(ValueError, match=r"'conv.weight' has shape \(2, 4, 3\)"):
        wanda({"conv.weight": torch.ones(2, 4, 3)}, {"conv.weight": NORMS})


def inverse_magnitude(weights, activations):
    """A user's score, named by import path in the test below."""
    return {n: -w.abs() for n, w in weights.items()}


def test_scores_by_name_by_import_path_and_registered_by_users():
    assert SCORES.get("magnitude") is magnitude and SCORES.get("wanda") is wanda
    assert resolve_score("routing_lottery.scores:wanda") is wanda
    user = resolve_score("test_scores:inverse_magnitude")
    assert kept(one_shot_mask(compute_scores(user, {"w": W}), 0.5)["w"]) == [[0, 2], [1, 3]]  # row 1: a tie, lower index
    SCORES.register("test-inverse-magnitude")(inverse_magnitude)
    assert "test-inverse-magnitude" in SCORES.names()
    assert compute_scores("test-inverse-magnitude", {"w": W})["w"].tolist() == (-W.abs()).tolist()
    with pytest.raises(RegistryError, match="unknown score 'no-such-score'.*magnitude"):
        resolve_score("no-such-score")
    with pytest.raises(TypeError, match="score must be a registered name"):
        resolve_score(3)


def test_compute_scores_names_a_user_score_that_returns_the_wrong_shape_or_tensors():
    def truncated(weights, activations):
        return {n: w.abs()[:, :2] for n, w in weights.items()}

    def forgetful(weights, activations):
        return {}

    with pytest.raises(ValueError, match=r"'truncated' gave 'w' a score of shape \(2, 2\); expected .*\(2, 4\)"):
        compute_scores(truncated, {"w": W})
    with pytest.raises(ValueError, match=r"'forgetful' must score exactly the given tensors: missing \['w'\]"):
        compute_scores(forgetful, {"w": W})


# -- calibration norms -----------------------------------------------------------------------
def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


# Two batches of (batch, seq, features) tokens; feature norms over all 3 tokens: sqrt(1+0+4), 2, sqrt(4+1+0)
BATCHES = [torch.tensor([[[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]]]), torch.tensor([[[2.0, 0.0, 0.0]]])]


def test_input_norms_are_feature_norms_over_all_tokens_of_all_batches():
    model = tiny_mlp()
    norms = input_norms(model, ["0.weight", "2.weight"], BATCHES)
    assert norms["0.weight"].dtype == torch.float64
    assert norms["0.weight"].tolist() == pytest.approx([math.sqrt(5), 2.0, math.sqrt(5)])
    with torch.no_grad():  # the hidden layer's input, computed token by token
        hidden = [torch.relu(model[0](t)) for b in BATCHES for t in b.reshape(-1, 3)]
    expected = [math.sqrt(sum(float(h[j]) ** 2 for h in hidden)) for j in range(4)]
    assert norms["2.weight"].tolist() == pytest.approx(expected, rel=1e-6)


def test_input_norms_take_tuples_dicts_and_a_forward_of_the_users():
    model = tiny_mlp()
    names = ["0.weight"]
    expected = input_norms(model, names, BATCHES)["0.weight"]
    assert torch.equal(input_norms(model, names, [(b,) for b in BATCHES])["0.weight"], expected)
    assert torch.equal(input_norms(model, names, [{"input": b} for b in BATCHES])["0.weight"], expected)
    pairs = [(b, torch.zeros(1)) for b in BATCHES]  # (inputs, targets), as a training stream holds them
    assert torch.equal(input_norms(model, names, pairs, forward=lambda m, b: m(b[0]))["0.weight"], expected)


def test_input_norms_run_in_eval_mode_without_gradients_and_restore_each_modules_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a module the user froze in eval stays so
    model[2].train()
    seen = []

    def forward(m, batch):
        seen.append((m.training, m[1].training, torch.is_grad_enabled()))
        return m(batch)

    first = input_norms(model, ["2.weight"], BATCHES, forward)
    again = input_norms(model, ["2.weight"], BATCHES, forward)
    assert torch.equal(first["2.weight"], again["2.weight"])  # no dropout drawn
    assert set(seen) == {(False, False, False)}
    assert model.training and not model[1].training and model[2].training


def test_hooks_are_removed_and_modes_restored_when_a_batch_raises():
    model = tiny_mlp().train()

    def batches():
        yield BATCHES[0]
        raise RuntimeError("calibration source failed")

    with pytest.raises(RuntimeError, match="calibration source failed"):
        input_norms(model, ["0.weight", "2.weight"], batches())
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    assert model.training and model[0].training
    # and after a normal run too
    input_norms(model, ["0.weight"], BATCHES)
    assert not model[0]._forward_hooks


def test_masked_statistics_are_those_of_the_subnetwork():
    model = tiny_mlp()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 0.25, 0.0]))
    mask = {"0.weight": torch.ones(4, 3, dtype=torch.bool)}
    mask["0.weight"][0] = False  # hidden unit 0 loses every input: its output is relu(0.5) on every token
    dense = input_norms(model, ["0.weight", "2.weight"], BATCHES)
    masked = input_norms(model, ["0.weight", "2.weight"], BATCHES, mask=mask)
    assert torch.equal(masked["0.weight"], dense["0.weight"])  # the first layer's input is the data itself
    assert masked["2.weight"][0].item() == pytest.approx(math.sqrt(3) * 0.5)  # 3 tokens
    assert masked["2.weight"][0].item() != pytest.approx(dense["2.weight"][0].item())
    assert torch.equal(masked["2.weight"][1:], dense["2.weight"][1:])
    assert torch.equal(model[0].weight[0] != 0, torch.ones(3, dtype=torch.bool))  # the weights are untouched


def test_input_norms_errors_name_the_problem():
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="'1.weight' names a Conv1d's 'weight'"):
        input_norms(model, ["1.weight"], BATCHES)
    with pytest.raises(ValueError, match="'0.bias' names a Linear's 'bias'"):
        input_norms(model, ["0.bias"], BATCHES)
    with pytest.raises(ValueError, match="'9.weight' names no module"):
        input_norms(model, ["9.weight"], BATCHES)
    with pytest.raises(TypeError, match="not one string"):
        input_norms(model, "0.weight", BATCHES)
    with pytest.raises(ValueError, match="batches was empty"):
        input_norms(model, ["0.weight"], [])
    with pytest.raises(ValueError, match=r"never reached the Linear layers of \['0.weight'\]"):
        input_norms(model, ["0.weight"], BATCHES, forward=lambda m, b: None)
    with pytest.raises(ValueError, match="mask for '0.weight' has shape"):
        input_norms(model, ["0.weight"], BATCHES, mask={"0.weight": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="mask names 'fc.weight', which is not a parameter"):
        input_norms(model, ["0.weight"], BATCHES, mask={"fc.weight": torch.ones(4, 3)})


def test_wanda_from_calibration_to_a_mask_set():
    model = tiny_mlp()
    names = ["0.weight", "2.weight"]
    weights = {n: p for n, p in model.named_parameters() if n in names}
    masks = [one_shot_mask(compute_scores("wanda", weights, input_norms(model, names, [b])), 0.5)
             for b in BATCHES]
    tickets = MaskSet.from_tickets(masks, ["a", "b"])
    assert tickets.counts() == [4 * 1 + 2 * 2] * 2  # per row: 3 - round(1.5), 4 - round(2.0)
    assert not torch.equal(tickets[0]["0.weight"], tickets[1]["0.weight"])  # each batch its own mask


# -- the cut ---------------------------------------------------------------------------------
def test_exact_counts_per_row_per_tensor_and_globally():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(5, 7, generator=gen), "b": torch.randn(3, generator=gen) + 10}
    rows = one_shot_mask({"a": scores["a"]}, 0.4)["a"]  # each row: 7 - round(2.8) = 4
    assert rows.sum(dim=1).tolist() == [4] * 5
    for r in range(5):  # and they are that row's highest
        assert scores["a"][r][rows[r]].min() > scores["a"][r][~rows[r]].max()
    per_tensor = one_shot_mask(scores, 0.4, granularity="tensor")
    assert int(per_tensor["a"].sum()) == 21 and int(per_tensor["b"].sum()) == 2  # 35 - 14, 3 - round(1.2)
    glob = one_shot_mask(scores, 0.4, granularity="global")  # 38 - round(15.2) = 23, "b" scores highest
    assert int(glob["a"].sum()) + int(glob["b"].sum()) == 23 and bool(glob["b"].all())
    assert one_shot_mask(scores, 0.0, granularity="global")["a"].all()


def test_ties_keep_the_lower_index_first():
    flat = {"w": torch.ones(2, 6)}
    assert kept(one_shot_mask(flat, 0.5)["w"]) == [[0, 1, 2], [0, 1, 2]]
    assert one_shot_mask(flat, 0.5, granularity="tensor")["w"].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert kept(one_shot_mask({"w": torch.ones(2, 8)}, None, n_m=(2, 4))["w"]) == [[0, 1, 4, 5]] * 2
    forced = {"w": torch.tensor([[math.inf, 0.0, -math.inf, 0.0]])}  # a score can force a weight either way
    assert kept(one_shot_mask(forced, 0.75)["w"]) == [[0]]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), m=st.sampled_from([2, 4, 8]), n_frac=st.floats(0, 1),
       seed=st.integers(0, 2**16), coarse=st.booleans())
def test_n_m_masks_keep_exactly_n_of_every_m_and_the_highest(rows, groups, m, n_frac, seed, coarse):
    n = round(n_frac * m)
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, groups * m, generator=gen)
    if coarse:  # many ties
        s = s.round()
    mask = one_shot_mask({"w": s}, None, n_m=(n, m))["w"]
    by_group = mask.reshape(rows, groups, m)
    assert (by_group.sum(dim=-1) == n).all()
    s_groups = s.reshape(rows, groups, m)
    for r in range(rows):
        for g in range(groups):
            keep, score = by_group[r, g], s_groups[r, g]
            if 0 < n < m:
                assert score[keep].min() >= score[~keep].max()


def test_cut_errors_name_the_argument():
    s = {"w": torch.randn(2, 6)}
    with pytest.raises(ValueError, match=r"in_features 6, not a multiple of M = 4"):
        one_shot_mask(s, None, n_m=(2, 4))
    with pytest.raises(ValueError, match=r"0 <= N <= M"):
        one_shot_mask(s, None, n_m=(3, 2))
    with pytest.raises(ValueError, match="pair of integers"):
        one_shot_mask(s, None, n_m=(2.0, 4))
    with pytest.raises(ValueError, match="contradicts the 1:2 pattern"):
        one_shot_mask(s, 0.7, n_m=(1, 2))
    assert one_shot_mask(s, 0.5, n_m=(1, 2))["w"].sum().item() == 6
    with pytest.raises(ValueError, match="granularity must be 'row'"):
        one_shot_mask(s, None, n_m=(1, 2), granularity="global")
    with pytest.raises(ValueError, match=r"N:M masks are for 2-D .* 'c' has shape \(2, 2, 2\)"):
        one_shot_mask({"c": torch.ones(2, 2, 2)}, None, n_m=(1, 2))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            one_shot_mask(s, bad)
    with pytest.raises(ValueError, match="sparsity is required"):
        one_shot_mask(s, None)
    with pytest.raises(ValueError, match="granularity must be one of"):
        one_shot_mask(s, 0.5, granularity="layer")
    with pytest.raises(ValueError, match=r"'b' has shape \(3,\): use granularity='tensor'"):
        one_shot_mask({"b": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="score of 'w' has NaN"):
        one_shot_mask({"w": torch.tensor([[1.0, math.nan]])}, 0.5)
    with pytest.raises(ValueError, match="non-empty dict"):
        one_shot_mask({}, 0.5)
    with pytest.raises(TypeError, match="score of 'w' must be a tensor"):
        one_shot_mask({"w": [1.0, 2.0]}, 0.5)
