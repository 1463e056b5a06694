"""Joint retraining of per-domain masks on a causal LM, its equal-steps baseline and the whole-set checkpoint
(issue 25, items 4 and 7), on a tiny random Llama built from a config (seconds, no weights)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from routing_lottery.errors import CheckpointError  # noqa: E402
from routing_lottery.io import INDEX_FILE, WEIGHTS_FILE  # noqa: E402
from routing_lottery.lm.retraining import (  # noqa: E402
    SHARED,
    causal_lm_loss,
    equal_steps,
    finetune_shared,
    load_domain_set,
    retrain_domains,
    save_domain_set,
)
from lm_toy import linear_weights, random_masks, tiny_llama  # noqa: E402
from routing_lottery.masks import MaskSet  # noqa: E402
from routing_lottery.routed import masked_forward  # noqa: E402

DOMAINS = ["count", "repeat", "pairs"]
VOCAB = 64


def domain_masks(model: torch.nn.Module, k: int = 3, density: float = 0.5, seed: int = 1) -> MaskSet:
    return random_masks(model, DOMAINS[:k], density, seed)


def toy_sequences(n: int = 8, length: int = 16) -> dict[str, torch.Tensor]:
    """Learnable domains: counting up, a period-3 pattern, and repeated pairs, each from random starts."""
    g = torch.Generator().manual_seed(3)
    start = torch.randint(3, VOCAB, (n, 1), generator=g)
    position = torch.arange(length)
    count = 3 + (start - 3 + position) % (VOCAB - 3)
    repeat = 3 + (start + (position % 3) * 7) % (VOCAB - 3)
    pairs = 3 + (start + position // 2 * 5) % (VOCAB - 3)
    return {"count": count, "repeat": repeat, "pairs": pairs}


def masked_loss(model: torch.nn.Module, mask: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(causal_lm_loss(masked_forward(model, {n: m.float() for n, m in mask.items()}, ids), ids))


SETTINGS = {"batch_size": 4, "lr": 3e-3, "seed": 0}


def test_causal_lm_loss_is_transformers_shifted_loss() -> None:
    model = tiny_llama()
    ids = toy_sequences()["count"][:3]
    with torch.no_grad():
        out = model(ids, labels=ids)
    torch.testing.assert_close(causal_lm_loss(out, ids), out.loss)
    torch.testing.assert_close(causal_lm_loss(out.logits, ids), out.loss)  # a raw logits tensor
    with pytest.raises(ValueError, match="do not match logits"):
        causal_lm_loss(out.logits, ids[:, :-1])
    with pytest.raises(TypeError, match=r"\.logits"):
        causal_lm_loss(out.logits[0], ids)


def test_weights_outside_the_union_are_exactly_zero_and_kept_ones_trained() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    before = {n: w.detach().clone() for n, w in linear_weights(model).items()}
    union = masks.union()
    assert all(bool((before[n][~u] != 0).any()) for n, u in union.items())  # pretrained values there to zero
    retrain_domains(model, masks, toy_sequences(), steps_per_domain=3, **SETTINGS)
    after = linear_weights(model)
    for n, u in union.items():
        assert torch.count_nonzero(after[n][~u]) == 0, n
        assert bool((after[n][u] != before[n][u]).any()), f"{n}: no kept weight trained"
        for k in range(len(masks)):  # each domain's subnetwork view: zero outside its own mask
            view = after[n] * masks[k][n]
            assert torch.count_nonzero(view[~masks[k][n]]) == 0


def test_a_weight_moves_only_on_the_turn_of_a_domain_that_keeps_it() -> None:
    """Snapshots at every forward: step i is domain i % K's; it moves nothing outside that domain's mask
    (no other domain's momentum or weight decay, no dense parameter), and a weight only it keeps does move."""
    model = tiny_llama()
    masks = domain_masks(model)
    params = dict(model.named_parameters())
    dense_before = {n: p.detach().clone() for n, p in params.items() if n not in masks.stacked}
    snapshots: list[dict[str, torch.Tensor]] = []
    hook = model.register_forward_pre_hook(
        lambda module, args: snapshots.append({n: params[n].detach().clone() for n in masks.tensor_names}))
    try:
        retrain_domains(model, masks, toy_sequences(), steps_per_domain=3, optimizer="adam", weight_decay=0.01,
                        **SETTINGS)
    finally:
        hook.remove()
    snapshots.append({n: params[n].detach().clone() for n in masks.tensor_names})
    assert len(snapshots) == 3 * len(masks) + 1
    others = {k: {n: masks.stacked[n][[j for j in range(len(masks)) if j != k]].any(0) for n in masks.tensor_names}
              for k in range(len(masks))}
    for i in range(len(snapshots) - 1):  # step i runs between the forwards that took snapshots i and i + 1
        k = i % len(masks)
        moved_alone = 0
        for n in masks.tensor_names:
            moved = snapshots[i + 1][n] != snapshots[i][n]
            assert not bool((moved & ~masks[k][n]).any()), f"step {i} (domain {DOMAINS[k]}) moved {n} outside its mask"
            moved_alone += int((moved & ~others[k][n]).sum())
        assert moved_alone > 0, f"step {i}: domain {DOMAINS[k]} moved none of the weights only it keeps"
    for n, value in dense_before.items():  # embeddings, norms, lm_head: frozen
        assert torch.equal(params[n], value), n


def pretrained_toy() -> torch.nn.Module:
    """The tiny Llama trained densely on the pooled toy domains: a random one's frozen embeddings and head
    leave its logits too flat for any masked weights to fit (dense, its loss stops near 3.6 of 4.2)."""
    model = tiny_llama()
    pooled = torch.cat(list(toy_sequences().values()))
    g = torch.Generator().manual_seed(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        ids = pooled[torch.randperm(len(pooled), generator=g)[:8]]
        loss = causal_lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_retraining_lowers_each_domains_training_loss() -> None:
    model = pretrained_toy()
    masks = domain_masks(model)
    data = toy_sequences()
    before = {d: masked_loss(model, masks[d], data[d]) for d in DOMAINS}  # pruning raised them
    done = retrain_domains(model, masks, data, steps_per_domain=15, **{**SETTINGS, "lr": 1e-2})
    after = {d: masked_loss(model, masks[d], data[d]) for d in DOMAINS}
    for d in DOMAINS:
        assert after[d] < 0.5 * before[d], (d, before[d], after[d])
        assert done.losses[d][-1] < done.losses[d][0]


def test_shared_baseline_takes_the_same_number_of_steps() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    data = toy_sequences()
    own = retrain_domains(copy.deepcopy(model), masks, data, steps_per_domain=4, **SETTINGS)
    shared_mask = masks[0]
    pooled = torch.cat(list(data.values()))
    shared = finetune_shared(copy.deepcopy(model), shared_mask, pooled, steps=equal_steps(len(masks), 4), **SETTINGS)
    assert own.steps == {d: 4 for d in DOMAINS}
    assert shared.steps == {SHARED: 12}
    assert own.total_steps == shared.total_steps == equal_steps(3, 4) == 12
    assert [len(v) for v in own.losses.values()] == [4, 4, 4]


def test_optimizer_state_is_kept_at_each_masks_positions_only() -> None:
    """Adam's two moments per position of each domain's mask, and nothing for the frozen dense parameters:
    the state grows with K x density, not K dense copies of the model."""
    model = tiny_llama()
    masks = domain_masks(model, density=0.3)
    done = retrain_domains(model, masks, toy_sequences(), steps_per_domain=1, **SETTINGS)
    assert done.state_numel == {d: 2 * c for d, c in zip(DOMAINS, masks.counts())}
    assert sum(done.state_numel.values()) < 2 * masks.size()


def test_same_seed_gives_bit_identical_weights() -> None:
    model, masks, data = tiny_llama(), domain_masks(tiny_llama()), toy_sequences()
    runs = [retrain_domains(copy.deepcopy(model), masks, data, steps_per_domain=3, **{**SETTINGS, "seed": s}).model
            for s in (5, 5, 6)]
    first, again, other = (r.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the seed draws the batches


def test_mode_and_trainable_flags_are_restored() -> None:
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    retrain_domains(model, domain_masks(model), toy_sequences(), steps_per_domain=1, **SETTINGS)
    assert not model.training
    assert not model.model.norm.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad


def test_bad_inputs_get_one_clear_error() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    data = toy_sequences()
    with pytest.raises(ValueError, match=r"sequences are given for domains .*'count'.* masks' domains"):
        retrain_domains(model, masks, {**data, "poetry": data["count"]}, steps_per_domain=1, **SETTINGS)
    with pytest.raises(ValueError, match="'repeat' has 3 sequences, fewer than batch_size 4"):
        retrain_domains(model, masks, {**data, "repeat": data["repeat"][:3]}, steps_per_domain=1, **SETTINGS)
    with pytest.raises(TypeError, match="'count' must be a .* tensor of token ids"):
        retrain_domains(model, masks, {**data, "count": data["count"].float()}, steps_per_domain=1, **SETTINGS)
    with pytest.raises(ValueError, match="steps_per_domain must be a positive int; got 0"):
        retrain_domains(model, masks, data, steps_per_domain=0, **SETTINGS)


def _payload_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    data = path.read_bytes()
    return len(data) - 8 - struct.unpack("<Q", data[:8])[0]


def _expected_payload(model: torch.nn.Module, masks: MaskSet) -> int:
    """The shared weights once (masked tensors at the union only, every other tensor once) + K bits per position."""
    state = model.state_dict()
    # a tied lm_head is the embedding: one storage, stored once
    unique = {(t.data_ptr(), t.shape): t for n, t in state.items() if n not in masks.stacked}
    dense = sum(t.numel() * t.element_size() for t in unique.values())
    shared = 4 * masks.union_count()
    bits = sum(len(masks) * ((torch.Size(s).numel() + 7) // 8) for s in masks.shapes.values())
    return dense + shared + bits


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip_stores_weights_once_and_k_bits(tmp_path: Path, tied: bool) -> None:
    model = tiny_llama(tied=tied, vocab=1024)  # an embedding large enough that a second copy shows
    masks = domain_masks(model)
    retrain_domains(model, masks, toy_sequences(), steps_per_domain=2, **SETTINGS)
    path = save_domain_set(model, masks, tmp_path / "set")

    loaded = tiny_llama(tied=tied, vocab=1024, seed=1)  # other initial weights, all overwritten
    back = load_domain_set(path, loaded)
    assert back.context_names == masks.context_names
    assert all(torch.equal(back.stacked[n], masks.stacked[n]) for n in masks.tensor_names)
    original, restored = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(original[k], restored[k]) for k in original)

    payload = _payload_bytes(path / WEIGHTS_FILE)
    header = (path / INDEX_FILE).stat().st_size + (path / WEIGHTS_FILE).stat().st_size - payload
    assert payload == _expected_payload(model, masks)
    assert header < 600 * len(original) + 4096  # names, shapes, dtypes and checksums: a few hundred bytes a tensor
    assert json.loads((path / INDEX_FILE).read_text())["context_names"] == DOMAINS


def test_corrupt_or_mismatched_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    path = save_domain_set(model, masks, tmp_path / "set")
    with pytest.raises(CheckpointError, match="other"):
        load_domain_set(tmp_path / "other", tiny_llama())
    with pytest.raises(CheckpointError, match="different model"):
        load_domain_set(path, tiny_llama(vocab=128))
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    fresh = tiny_llama(seed=2)
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE} is truncated or corrupt"):
        load_domain_set(path, fresh)
    assert all(torch.equal(untouched[k], v) for k, v in fresh.state_dict().items())  # refused before loading
