"""A tiny Llama-style ``transformers`` model built from a config (no weights, milliseconds) and random
per-domain masks over its block Linear weights: what the LM test files share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers

from routing_lottery.masks import MaskSet


def tiny_llama(tied: bool = False, bias: bool = False, vocab: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}


def random_masks(model: torch.nn.Module, names: Sequence[str], density: float = 0.5, seed: int = 1) -> MaskSet:
    """Independent random masks, one per name: each domain keeps weights no other keeps (little overlap),
    and some weights no domain keeps."""
    g = torch.Generator().manual_seed(seed)
    stacked = {n: torch.rand(len(names), *p.shape, generator=g) < density for n, p in linear_weights(model).items()}
    return MaskSet(stacked, list(names))
