"""Scoring a language model's subnetworks: next-token loss per sequence, perplexity, masks applied in place.

A domain's subnetwork is the pretrained model with its mask multiplied into the covered weights.
Scoring many sequences under one mask is cheapest with the mask applied once, in place, and the
weights put back afterwards (:func:`applied_mask`), rather than multiplied into every forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["applied_mask", "perplexity", "sequence_nll"]


@contextmanager
def applied_mask(model: nn.Module, mask: Mapping[str, torch.Tensor] | None,
                 weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` with ``weights[n] * mask[n]`` in each masked parameter ``n``; ``weights`` put back on exit.

    ``weights`` are the values to restore (the shared tensor, e.g. the pretrained weights): kept by
    the caller once, so applying K masks in turn costs no copy of the model per mask. ``None``
    applies nothing (the dense model).
    """
    if mask is None:
        yield model
        return
    parameters = dict(model.named_parameters())
    unknown = sorted(set(mask) - set(parameters))
    if unknown:
        raise KeyError(f"the mask names {unknown[:3]}, which are not parameters of the model")
    with torch.no_grad():
        try:
            for name, keep in mask.items():
                parameters[name].copy_(weights[name] * keep.to(weights[name].dtype))
            yield model
        finally:
            for name in mask:
                parameters[name].copy_(weights[name])


def sequence_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 batch_size: int = 2) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each row of ``input_ids`` (padded positions excluded).

    Returns a float64 tensor of one value per row; a row needs at least two real tokens.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (rows, tokens) with at least 2 tokens, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    out = []
    with torch.no_grad():
        for ids, attention in zip(input_ids.split(batch_size), attention_mask.split(batch_size)):
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            counted = attention[:, 1:].to(nll.dtype) * attention[:, :-1].to(nll.dtype)
            out.append((nll * counted).sum(1).double() / counted.sum(1).clamp(min=1).double())
    return torch.cat(out)


def perplexity(model: nn.Module, sequences: torch.Tensor, batch_size: int = 2) -> float:
    """exp of the mean next-token NLL over every token of ``sequences`` (rows of equal length, no padding)."""
    return math.exp(float(sequence_nll(model, sequences, batch_size=batch_size).mean()))
