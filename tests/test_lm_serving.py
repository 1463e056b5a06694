"""Serving a causal LM with one mask per domain (issue 25, items 5 and 7), on a tiny random Llama.

The reference for every row is the model run alone on that row's domain: ``masked_forward`` (the
core's functional masked call) on an untouched copy of the model, over the rows of that domain.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from routing_lottery.lm.export import REPORT_NAME, export_domain  # noqa: E402
from routing_lottery.lm.serving import (  # noqa: E402
    DESIGNS,
    SPLIT_TOLERANCE,
    MaskedCausalLM,
    RoutedLinear,
    dense_bytes,
)
from lm_toy import random_masks, tiny_llama  # noqa: E402
from routing_lottery.masks import MaskSet  # noqa: E402
from routing_lottery.routed import masked_forward  # noqa: E402

DOMAINS = ["code", "mail", "speech"]


def domain_masks(model: torch.nn.Module, k: int = 3, density: float = 0.5, seed: int = 1) -> MaskSet:
    return random_masks(model, (DOMAINS + ["extra"])[:k], density, seed)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Six prompts of 10 tokens, two of them left-padded (as generate wants)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 64, (6, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    attention[4, :2] = 0
    ids[attention == 0] = 0
    return ids, attention


def routed_setup(design: str = "grouped"):
    """A tiny Llama wrapped with three domains' masks, an untouched copy for reference, and a padded batch."""
    model = tiny_llama()
    masks = domain_masks(model)
    reference = copy.deepcopy(model)
    ids, attention = padded_batch()
    return model, masks, reference, ids, attention, MaskedCausalLM(model, masks, design=design)


ROWS = [0, 1, 2, 2, 1, 0]


def per_domain_logits(model: torch.nn.Module, masks: MaskSet, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*ids.shape, model.config.vocab_size)
    with torch.no_grad():
        for k in range(len(masks)):
            rows = [i for i, d in enumerate(ROWS) if d == k]
            floats = {n: m.float() for n, m in masks[k].items()}
            out[rows] = masked_forward(model, floats, input_ids=ids[rows], attention_mask=attention[rows]).logits
    return out


@pytest.mark.parametrize("use_cache", [False, True])  # rows sorted by domain, or gathered in place
@pytest.mark.parametrize("design", DESIGNS)
def test_mixed_batch_logits_equal_per_domain_forwards(design: str, use_cache: bool) -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    reference = copy.deepcopy(model)
    ids, attention = padded_batch()
    routed = MaskedCausalLM(model, masks, design=design)
    with torch.no_grad():
        out = routed(ids, [DOMAINS[d] for d in ROWS], attention_mask=attention, use_cache=use_cache)
    got = out.logits
    assert (out.past_key_values is not None) == use_cache
    want = per_domain_logits(reference, masks, ids, attention)
    if design == "grouped":
        assert torch.equal(got, want)  # same arithmetic as running the domain alone
    else:
        torch.testing.assert_close(got, want, **SPLIT_TOLERANCE)
    # and the domains really differ, so routing the wrong mask would be caught
    dense = reference(input_ids=ids, attention_mask=attention).logits
    assert (want - dense).abs().max() > 1e-3


def test_a_mixed_batch_with_gradients_gives_the_same_logits_and_masked_gradients() -> None:
    """Outside no_grad (a loss to train or probe with), the routed forward records a graph: same logits,
    and each weight's gradient is zero wherever no domain present in the batch keeps it."""
    model = tiny_llama()
    masks = domain_masks(model, k=2)
    ids, attention = padded_batch()
    rows = [DOMAINS[0]] * 3 + [DOMAINS[1]] * 3  # already sorted: the in-place path
    routed = MaskedCausalLM(model, masks)
    with torch.no_grad():
        want = routed(ids, rows, attention_mask=attention).logits
    got = routed(ids, rows, attention_mask=attention).logits
    assert torch.equal(got, want)
    got.sum().backward()
    for name, union in masks.union().items():
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0
        assert torch.equal(grad[~union], torch.zeros_like(grad[~union]))


def test_a_shuffled_batch_returns_the_heads_own_logits_without_a_reordered_copy() -> None:
    """Rows run sorted by domain and go back to the caller's order at the head's input, so the logits
    (the largest tensor of the call) are the head's output itself, never copied to reorder them."""
    model, masks, reference, ids, attention, routed = routed_setup()
    produced = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: produced.append(out))
    vocab_sized = []

    class LogOps(TorchDispatchMode):  # every op that makes a tensor of the logits' size
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.shape[-1:] == (model.config.vocab_size,):
                vocab_sized.append(func.__name__)
            return result

    with torch.no_grad(), LogOps():
        out = routed(ids, [DOMAINS[d] for d in ROWS], attention_mask=attention, output_hidden_states=True)
    assert out.logits.data_ptr() == produced[0].data_ptr()
    assert not [name for name in vocab_sized if "index" in name], vocab_sized  # no reordered copy, even for a moment
    assert torch.equal(out.logits, per_domain_logits(reference, masks, ids, attention))
    # the rest of the output is in the caller's order too: the last hidden state gives the logits
    assert torch.equal(model.get_output_embeddings()(out.hidden_states[-1]), out.logits)


def test_a_loss_inside_the_model_pairs_each_rows_labels_with_its_logits() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    ids, attention = padded_batch()
    routed = MaskedCausalLM(model, masks)
    labels = ids.masked_fill(attention == 0, -100)
    with torch.no_grad():
        out = routed(ids, [DOMAINS[d] for d in ROWS], attention_mask=attention, labels=labels)
    shifted = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    want = torch.nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)


def test_tuple_outputs_come_back_in_the_callers_order() -> None:
    model, masks, reference, ids, attention, routed = routed_setup()
    with torch.no_grad():
        logits = routed(ids, [DOMAINS[d] for d in ROWS], attention_mask=attention, return_dict=False)[0]
    assert torch.equal(logits, per_domain_logits(reference, masks, ids, attention))


def test_masked_weights_reuse_one_scratch_buffer_the_size_of_the_largest_weight() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    routed = MaskedCausalLM(model, masks)
    ids, attention = padded_batch()
    with torch.no_grad():
        routed(ids, [DOMAINS[d] for d in ROWS], attention_mask=attention)
    buffers = routed._route.scratch._buffers
    largest = max(m.weight.numel() for m in routed.routed_linears().values())
    assert {b.dtype for b in buffers.values()} == {torch.float32, torch.int32}
    assert buffers[(torch.float32, torch.device("cpu"))].numel() == -(-largest // 8) * 8


@pytest.mark.parametrize("design", DESIGNS)
def test_linears_with_bias_route_exactly(design: str) -> None:
    model = tiny_llama(bias=True)
    masks = domain_masks(model)
    reference = copy.deepcopy(model)
    ids, attention = padded_batch()
    with torch.no_grad():
        got = MaskedCausalLM(model, masks, design=design)(ids, ROWS, attention_mask=attention).logits
    want = per_domain_logits(reference, masks, ids, attention)
    torch.testing.assert_close(got, want, **({"rtol": 0, "atol": 0} if design == "grouped" else SPLIT_TOLERANCE))


def test_one_domain_for_all_rows_and_ids_or_names_agree() -> None:
    model, masks, reference, ids, attention, routed = routed_setup()
    with torch.no_grad():
        by_name = routed(ids, "mail", attention_mask=attention).logits
        by_id = routed(ids, torch.tensor([1] * 6), attention_mask=attention).logits
        want = masked_forward(reference, {n: m.float() for n, m in masks[1].items()},
                              input_ids=ids, attention_mask=attention).logits
    assert torch.equal(by_name, want) and torch.equal(by_id, want)


@pytest.mark.parametrize("design", DESIGNS)
def test_greedy_generate_of_a_mixed_batch_equals_per_domain_generate(design: str) -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    reference = copy.deepcopy(model)
    ids, attention = padded_batch()
    routed = MaskedCausalLM(model, masks, design=design)
    settings = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    got = routed.generate(ids, ROWS, attention_mask=attention, **settings)
    # with a dict result the rows are not reordered: each routed layer gathers its domain's rows
    in_place = routed.generate(ids, ROWS, attention_mask=attention, return_dict_in_generate=True, **settings)
    assert torch.equal(in_place.sequences, got)
    for k in range(len(masks)):
        rows = [i for i, d in enumerate(ROWS) if d == k]
        alone = copy.deepcopy(reference)
        with torch.no_grad():
            for name, p in alone.named_parameters():
                if name in masks[k]:
                    p.mul_(masks[k][name])
        want = alone.generate(input_ids=ids[rows], attention_mask=attention[rows], **settings)
        assert torch.equal(got[rows], want), f"domain {DOMAINS[k]} decoded differently in the mixed batch"
    assert got.shape == (6, 16)


def test_beam_search_repeats_domains_with_the_rows() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    ids, attention = padded_batch()
    routed = MaskedCausalLM(model, masks)
    settings = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    mixed = routed.generate(ids, ROWS, attention_mask=attention, **settings)
    for k in range(len(masks)):
        rows = [i for i, d in enumerate(ROWS) if d == k]
        alone = routed.generate(ids[rows], k, attention_mask=attention[rows], **settings)
        assert torch.equal(mixed[rows], alone)


def test_grouped_wrapper_holds_one_copy_of_the_weights_and_k_bits() -> None:
    model = tiny_llama()
    dense = dense_bytes(model)
    pointers = {p.data_ptr() for p in model.parameters()}
    masks = domain_masks(model, k=4)
    maskable = masks.size()
    routed = MaskedCausalLM(model, masks, design="grouped")
    assert routed.state_bytes() < 1.25 * dense
    assert routed.state_bytes() <= dense + 4 * maskable // 8 + 14 * 8  # K bits a weight (+ byte padding)
    assert {p.data_ptr() for p in routed.parameters()} == pointers  # the same weights, not copies
    assert len(routed.routed_linears()) == 14


def test_split_wrapper_holds_one_bit_and_the_remainder_positions() -> None:
    """No dense per-domain tensor: the intersection's bits plus int32 positions of each remainder."""
    model = tiny_llama()
    dense = dense_bytes(model)
    masks = domain_masks(model, k=4)
    shared = {n: m.all(dim=0) for n, m in masks.stacked.items()}
    remainder = sum(int((m & ~shared[n]).sum()) for n, m in masks.stacked.items())
    rows = sum(m.shape[1] + 1 for m in masks.stacked.values())
    routed = MaskedCausalLM(model, masks, design="split")
    expected = dense + sum((m[0].numel() + 7) // 8 for m in masks.stacked.values()) + 4 * remainder
    expected += 4 * 4 * rows + 8 * 5 * 14  # CSR row pointers per domain, offsets per layer
    assert routed.state_bytes() == expected


def test_wrapper_keeps_state_dict_keys_and_unwrap_restores_the_model() -> None:
    model = tiny_llama()
    keys = list(model.state_dict())
    routed = MaskedCausalLM(model, domain_masks(model))
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, RoutedLinear) for m in routed.routed_linears().values())
    plain = routed.unwrap()
    assert not any(isinstance(m, RoutedLinear) for m in plain.modules())
    with pytest.raises(RuntimeError, match="outside MaskedCausalLM"):
        MaskedCausalLM(tiny_llama(), domain_masks(tiny_llama())).model(input_ids=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("design", DESIGNS)
def test_domain_mask_round_trips_through_the_bits(design: str) -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    routed = MaskedCausalLM(model, masks, design=design)
    for k in range(len(masks)):
        got = routed.domain_mask(k)
        assert all(torch.equal(got[n], masks[k][n]) for n in masks.tensor_names)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_without_the_library_with_equal_logits_and_exact_zeros(tmp_path, tied: bool) -> None:
    model = tiny_llama(tied=tied)
    masks = domain_masks(model)
    routed = MaskedCausalLM(model, masks)
    ids, _ = padded_batch()
    result = export_domain(routed, None, "speech", tmp_path / "speech", input_ids=ids)
    assert result.max_abs_logit_diff == 0.0 and result.pruned_exactly_zero and result.tied_embeddings == tied
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "speech").eval()
    weights = dict(loaded.named_parameters(remove_duplicate=False))
    for name, m in masks[2].items():
        assert torch.equal(weights[name][~m], torch.zeros(int((~m).sum())))
        assert not (weights[name][~m].signbit()).any()  # +0.0, not -0.0
        assert torch.equal(weights[name][m], dict(model.named_parameters())[name][m])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, routed(ids, "speech").logits)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    record = json.loads((tmp_path / "speech" / REPORT_NAME).read_text())
    assert record["domain"] == "speech" and record["max_abs_logit_diff"] == 0.0 and record["pruned_exactly_zero"]


def test_export_from_a_plain_model_and_saves_the_tokenizer(tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(64)}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0")))
    model = tiny_llama()
    masks = domain_masks(model)
    result = export_domain(model, masks, 0, tmp_path / "code", tokenizer=fast)
    assert result.max_abs_logit_diff == 0.0 and result.domain == "code"
    assert (tmp_path / "code" / "tokenizer.json").exists()
    assert (tmp_path / "code" / "model.safetensors").exists()
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())  # the plain model is untouched


def test_clear_errors() -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    routed = MaskedCausalLM(copy.deepcopy(model), masks)
    ids, _ = padded_batch()
    with pytest.raises(ValueError, match="unknown context 'news'"):
        routed(ids, "news")
    with pytest.raises(ValueError, match="7 domains for a batch of 6"):
        routed(ids, [0] * 7)
    with pytest.raises(ValueError, match="outside 0..2"):
        routed(ids, [0, 1, 2, 3, 0, 0])
    norm = {"model.layers.0.input_layernorm.weight": torch.ones(2, 32, dtype=torch.bool)}
    with pytest.raises(ValueError, match="input_layernorm.weight' is not the weight of an nn.Linear"):
        MaskedCausalLM(copy.deepcopy(model), MaskSet(norm))
    with pytest.raises(ValueError, match="no such parameter"):
        MaskedCausalLM(copy.deepcopy(model), MaskSet({"model.layers.0.mlp.nope.weight": torch.ones(2, 3, dtype=torch.bool)}))
    wrong = {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 32, 64, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"has shape \(32, 64\) but the weight has shape \(64, 32\)"):
        MaskedCausalLM(copy.deepcopy(model), MaskSet(wrong))
    tied = tiny_llama(tied=True)
    with pytest.raises(ValueError, match="tied weights stay dense"):
        MaskedCausalLM(tied, MaskSet({"lm_head.weight": torch.ones(2, 64, 32, dtype=torch.bool)}))
    with pytest.raises(ValueError, match="design must be one of"):
        MaskedCausalLM(copy.deepcopy(model), masks, design="vmap")
    with pytest.raises(TypeError, match="MaskSet"):
        MaskedCausalLM(copy.deepcopy(model), masks[0])
