"""Routing prompts to a domain's mask without a given domain (issue 25, item 6), on a tiny random Llama.

References are computed here independently: features as a hand-written mean over the embedding
matrix's rows, per-domain NLLs by ``masked_forward`` (the core's functional masked call) on an
untouched copy of the model, one prompt at a time and without padding.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from routing_lottery.errors import CheckpointError  # noqa: E402
from routing_lottery.lm.routing import (  # noqa: E402
    PerplexityRouter,
    PromptFeatures,
    domain_nll,
    fit_prompt_router,
    load_prompt_router,
    lowest_perplexity_domains,
    prompt_features,
)
from routing_lottery.lm.serving import MaskedCausalLM  # noqa: E402
from routing_lottery.masks import MaskSet  # noqa: E402
from routing_lottery.routed import masked_forward  # noqa: E402
from routing_lottery.router import LearnedRouter, load_router, routing_accuracy, save_router  # noqa: E402

DOMAINS = ["code", "mail", "speech"]
TOKEN_RANGES = {"code": (3, 23), "mail": (23, 43), "speech": (43, 64)}
"""Disjoint token ids per domain: what a mean-embedding router must be able to separate."""


def tiny_llama(hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def domain_masks(model: torch.nn.Module, density: float = 0.5, seed: int = 1, same: bool = False) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    weights = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    stacked = {}
    for n, p in weights.items():
        one = torch.rand(1 if same else len(DOMAINS), *p.shape, generator=g) < density
        stacked[n] = one.expand(len(DOMAINS), *p.shape).clone()
    return MaskSet(stacked, DOMAINS)


def domain_prompts(rows: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {d: torch.randint(lo, hi, (rows, tokens), generator=g) for d, (lo, hi) in TOKEN_RANGES.items()}


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        attention[i, width - len(p):] = 1
    return ids, attention


def ragged_prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 64, (n,), generator=g) for n in (10, 7, 10, 4, 9, 2)]


# -- features ----------------------------------------------------------------------------------------
def test_features_are_the_mean_embedding_of_unpadded_tokens() -> None:
    model = tiny_llama()
    prompts = ragged_prompts()
    ids, attention = left_pad(prompts)
    table = model.get_input_embeddings().weight.detach()
    expected = torch.stack([table[p].mean(dim=0) for p in prompts])
    padded = prompt_features(model, ids, attention)
    torch.testing.assert_close(padded, expected)
    for i, p in enumerate(prompts):  # alone and unpadded: the same features as in the padded batch
        torch.testing.assert_close(prompt_features(model, p.unsqueeze(0))[0], padded[i])
    routed = MaskedCausalLM(copy.deepcopy(model), domain_masks(model))
    torch.testing.assert_close(prompt_features(routed, ids, attention), padded)  # embeddings are never masked


# -- the learned router ------------------------------------------------------------------------------
def test_learned_router_separates_disjoint_token_domains_and_round_trips(tmp_path) -> None:
    model = tiny_llama()
    train = domain_prompts(rows=30, tokens=16, seed=4)
    router = fit_prompt_router(model, train, DOMAINS)
    assert isinstance(router, LearnedRouter) and router.num_contexts == len(DOMAINS)
    held_out = domain_prompts(rows=10, tokens=16, seed=5)
    ids = torch.cat([held_out[d] for d in DOMAINS])
    true = torch.arange(len(DOMAINS)).repeat_interleave(10)
    chosen = router.route(ids)
    assert routing_accuracy(chosen, true) == 1.0
    # Left-padded into a wider batch, each prompt goes to the same domain.
    padded_ids = torch.cat([torch.zeros(len(ids), 5, dtype=torch.long), ids], dim=1)
    attention = (torch.arange(padded_ids.shape[1]) >= 5).long().expand_as(padded_ids)
    assert torch.equal(router.route((padded_ids, attention)), chosen)

    save_router(router, tmp_path / "router")
    for loaded in (load_prompt_router(tmp_path / "router", model),
                   load_router(tmp_path / "router", features=PromptFeatures(model))):
        assert isinstance(loaded, LearnedRouter)
        assert torch.equal(loaded.route(ids), chosen)
        torch.testing.assert_close(loaded.logits(ids), router.logits(ids), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="fitted on 32 features per prompt.*16 wide"):
        load_prompt_router(tmp_path / "router", tiny_llama(hidden=16))
    with pytest.raises(CheckpointError, match="no router was saved"):
        load_prompt_router(tmp_path / "nothing", model)


# -- the perplexity router -----------------------------------------------------------------------
def reference_nll(model: torch.nn.Module, masks: MaskSet, prompt: torch.Tensor) -> torch.Tensor:
    """(K,) mean next-token NLL of one unpadded prompt under each domain's mask, one masked forward each."""
    values = []
    with torch.no_grad():
        for k in range(len(masks)):
            floats = {n: m.float() for n, m in masks[k].items()}
            logits = masked_forward(model, floats, input_ids=prompt.unsqueeze(0)).logits[0, :-1]
            logp = torch.log_softmax(logits, dim=-1)
            values.append(-logp[torch.arange(len(prompt) - 1), prompt[1:]].mean())
    return torch.stack(values)


@pytest.mark.parametrize("padded", [False, True])
def test_perplexity_router_picks_the_argmin_of_per_domain_nlls(padded: bool) -> None:
    model = tiny_llama()
    masks = domain_masks(model)
    reference_model = copy.deepcopy(model)
    routed = MaskedCausalLM(model, masks)
    if padded:  # prompts of 2 to 10 tokens, left-padded into one batch
        prompts = ragged_prompts()
        ids, attention = left_pad(prompts)
    else:
        ids, attention = torch.randint(3, 64, (6, 8), generator=torch.Generator().manual_seed(6)), None
        prompts = list(ids)
    expected = torch.stack([reference_nll(reference_model, masks, p) for p in prompts])
    torch.testing.assert_close(domain_nll(routed, ids, attention), expected, rtol=1e-5, atol=1e-5)
    chosen = lowest_perplexity_domains(routed, ids, attention)
    assert chosen.dtype == torch.long
    assert torch.equal(chosen, expected.argmin(dim=1))
    assert len(set(chosen.tolist())) > 1  # the masks disagree, so the check above is not a constant
    router = PerplexityRouter()
    assert torch.equal(router(routed, ids if attention is None else (ids, attention)), chosen)
    assert router.passes == len(DOMAINS)


def test_perplexity_router_breaks_ties_to_the_lowest_domain(tmp_path) -> None:
    model = tiny_llama()
    routed = MaskedCausalLM(model, domain_masks(model, same=True))
    ids = torch.randint(3, 64, (5, 8), generator=torch.Generator().manual_seed(6))
    nll = domain_nll(routed, ids)
    assert torch.equal(nll[:, 0], nll[:, 1]) and torch.equal(nll[:, 0], nll[:, 2])
    assert lowest_perplexity_domains(routed, ids).tolist() == [0] * 5
    save_router(PerplexityRouter(), tmp_path / "router")  # stateless: saved by its import path
    assert isinstance(load_router(tmp_path / "router"), PerplexityRouter)


# -- clear errors ---------------------------------------------------------------------------------
def test_clear_errors() -> None:
    model = tiny_llama()
    routed = MaskedCausalLM(copy.deepcopy(model), domain_masks(model))
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="input_ids is empty"):
        prompt_features(model, ids[:0])
    with pytest.raises(ValueError, match="input_ids is empty"):
        lowest_perplexity_domains(routed, ids[:, :0])
    with pytest.raises(ValueError, match="sequences_by_domain is empty"):
        fit_prompt_router(model, {}, DOMAINS)
    with pytest.raises(ValueError, match=r"unknown domains \['poetry'\]"):
        fit_prompt_router(model, {**domain_prompts(4, 6, seed=8), "poetry": ids}, DOMAINS)
    with pytest.raises(ValueError, match=r"domains \['speech'\] have no sequences"):
        fit_prompt_router(model, {d: t for d, t in domain_prompts(4, 6, seed=8).items() if d != "speech"}, DOMAINS)
    with pytest.raises(ValueError, match="fewer than 2 unpadded tokens"):
        lowest_perplexity_domains(routed, ids[:, :1])
    one_token = torch.ones_like(ids)
    one_token[1, :5] = 0  # row 1 keeps a single token after padding
    with pytest.raises(ValueError, match=r"rows \[1\] have fewer than 2"):
        lowest_perplexity_domains(routed, ids, one_token)
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(3, 6\); got shape \(3, 5\)"):
        prompt_features(model, ids, torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        lowest_perplexity_domains(routed, ids, torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rows \[0\] have no unpadded token"):
        prompt_features(model, ids, torch.tensor([[0] * 6, [1] * 6, [1] * 6]))
    with pytest.raises(TypeError, match="must be a MaskedCausalLM"):
        lowest_perplexity_domains(model, ids)
    with pytest.raises(TypeError, match="get_input_embeddings"):
        prompt_features(torch.nn.Linear(2, 2), ids)
    routed.model.train()
    with pytest.raises(RuntimeError, match="evaluation mode"):
        lowest_perplexity_domains(routed, ids)
