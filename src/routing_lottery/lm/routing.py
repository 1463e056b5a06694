"""Route a prompt to a domain's mask when nobody names its domain (issue 25, item 6).

``MaskedCausalLM(input_ids, domains)`` needs a domain per row; at deployment a prompt comes
without one. Two routers choose it, at opposite ends of cost:

``fit_prompt_router`` -- learned, 0 forward passes
    The core's ``LearnedRouter`` (standardise, PCA, logistic regression) on cheap features of the
    prompt: the mean of its input token embeddings (``prompt_features``), one embedding lookup,
    no transformer block. It knows only what the tokens are, not how they read together, and
    must be fitted on labelled sequences of every domain.
``PerplexityRouter`` / ``lowest_perplexity_domains`` -- K forward passes
    Each row goes to the mask under which the prompt itself is least surprising (lowest mean
    next-token NLL). No training, no labels; it asks every mask the question the experiment
    scores them on.

Both return domain indices in the order of the routed model's ``domain_names`` (a ``MaskSet``'s
``context_names``), so ``routed(input_ids, domains=chosen)`` serves the choice, and
``routing_lottery.router.routing_accuracy(chosen, true)`` scores it against the true domains.

Example
-------
>>> router = fit_prompt_router(model, {"code": code_ids, "mail": mail_ids}, routed.domain_names)  # doctest: +SKIP
>>> chosen = router.route((input_ids, attention_mask))                                          # doctest: +SKIP
>>> save_router(router, "router/"); router = load_prompt_router("router/", model)                # doctest: +SKIP
>>> chosen = lowest_perplexity_domains(routed, input_ids, attention_mask)                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from ..router import LearnedRouter, load_router
from ..routed import Inputs, as_tuple
from .serving import MaskedCausalLM

FEATURE_CHUNK_ELEMENTS = 2**24
"""At most this many embedding values (64 MiB in float32) are looked up at once by
``prompt_features``: fitting on a few thousand 512-token sequences of a 576-wide model would
otherwise hold gigabytes of per-token embeddings only to average them."""


# -- checking prompts ------------------------------------------------------------------------------
def _check_prompts(input_ids: Any, attention_mask: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention as bool)``, both (rows, tokens); a ``ValueError`` naming the problem."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        found = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{what}: input_ids must be a (rows, tokens) integer tensor; got {found}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"{what}: input_ids must hold integer token ids; got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"{what}: input_ids is empty (shape {tuple(input_ids.shape)}); give at least one row "
                         "of at least one token")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        found = (f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
                 else type(attention_mask).__name__)
        raise ValueError(f"{what}: attention_mask must have input_ids' shape {tuple(input_ids.shape)}; got {found}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"{what}: attention_mask must hold 0 (padding) and 1 (token) only")
    attention = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    empty = (~attention.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what}: rows {empty[:10]} have no unpadded token (attention_mask all 0)")
    return input_ids, attention


def _prompt_parts(x: Inputs, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A router's ``x``: token ids, or ``(token ids, attention_mask)``."""
    parts = as_tuple(x)
    if len(parts) not in (1, 2):
        raise ValueError(f"{what}: x must be input_ids or (input_ids, attention_mask); got {len(parts)} tensors")
    return parts[0], parts[1] if len(parts) == 2 else None


# -- features: mean input embedding ----------------------------------------------------------------
def _width(embedding: nn.Module) -> int:
    """Values per token embedding (``nn.Embedding.embedding_dim``, else the weight's last dimension)."""
    width = getattr(embedding, "embedding_dim", None)
    if isinstance(width, int):
        return width
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) else 1


def _embedding(model: nn.Module) -> nn.Module:
    # Embeddings are never masked (masked_linears refuses them), so a routed model's are the dense ones.
    if isinstance(model, MaskedCausalLM):
        model = model.model
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Module):
        raise TypeError(f"model must be a transformers causal LM (or a MaskedCausalLM) whose get_input_embeddings() "
                        f"returns the token embedding module; got {type(model).__name__}")
    return embedding


@torch.no_grad()
def prompt_features(model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, hidden) float32: each prompt's mean input token embedding over its unpadded tokens.

    Cheap features of a prompt for a learned router: one embedding lookup, no transformer block,
    so routing adds almost nothing to the routed forward that follows. Padding (``attention_mask``
    0, left or right) is left out of the mean, so a prompt's features do not depend on the batch
    it was padded into. The embedding module is called (not its weight indexed), so models that
    scale their embeddings inside it are followed.

    Parameters
    ----------
    model : a ``transformers`` causal LM, or a ``MaskedCausalLM`` around one.
    input_ids : (rows, tokens) integer token ids, at least one of each.
    attention_mask : (rows, tokens) 0/1, 1 for a token; every row needs one. None: no padding.
    """
    embedding = _embedding(model)
    input_ids, attention = _check_prompts(input_ids, attention_mask, "prompt_features")
    rows, tokens = input_ids.shape
    chunk = max(1, FEATURE_CHUNK_ELEMENTS // (tokens * _width(embedding)))
    means = []
    for start in range(0, rows, chunk):
        ids, keep = input_ids[start:start + chunk], attention[start:start + chunk]
        vectors = embedding(ids).float()
        weights = keep.to(vectors.device, torch.float32).unsqueeze(-1)
        means.append((vectors * weights).sum(dim=1) / weights.sum(dim=1))
    return torch.cat(means)


class PromptFeatures:
    """``features=`` for ``LearnedRouter``: ``x`` (ids, or ``(ids, attention_mask)``) -> ``prompt_features``.

    A class rather than a closure so that ``LearnedRouter.save`` records a name that finds it
    again (``routing_lottery.lm.routing.PromptFeatures``) and ``load`` can check it. The model is
    not saved with the router: it is the large thing the router serves, present at load anyway,
    so the features are recomputed from it (``load_prompt_router(directory, model)``).
    """

    def __init__(self, model: nn.Module) -> None:
        _embedding(model)  # refuse a model without token embeddings now, not at the first prompt
        self.model = model

    def __call__(self, x: Inputs) -> torch.Tensor:
        input_ids, attention_mask = _prompt_parts(x, "PromptFeatures")
        return prompt_features(self.model, input_ids, attention_mask)

    @property
    def width(self) -> int:
        """Features per row: the model's embedding width."""
        return _width(_embedding(self.model))


# -- the learned router ----------------------------------------------------------------------------
def _check_domains(sequences_by_domain: Any, domain_names: Any) -> list[str]:
    if isinstance(domain_names, str) or not isinstance(domain_names, Sequence):
        raise TypeError(f"domain_names must be a sequence of domain names (routed.domain_names); got "
                        f"{type(domain_names).__name__}")
    names = list(domain_names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"domain_names must name at least 2 distinct domains; got {names}")
    if not isinstance(sequences_by_domain, Mapping):
        raise TypeError("sequences_by_domain must be a mapping {domain name: (n, tokens) token ids}; got "
                        f"{type(sequences_by_domain).__name__}")
    if not sequences_by_domain:
        raise ValueError("sequences_by_domain is empty; give (n, tokens) token ids for every domain")
    unknown = [d for d in sequences_by_domain if d not in names]
    if unknown:
        raise ValueError(f"sequences_by_domain names unknown domains {unknown}; the domains are {names}")
    missing = [d for d in names if d not in sequences_by_domain]
    if missing:
        raise ValueError(f"domains {missing} have no sequences: a learned router needs examples of every domain")
    return names


def fit_prompt_router(model: nn.Module, sequences_by_domain: Mapping[str, Inputs], domain_names: Sequence[str],
                      max_components: int = 64, seed: int = 0) -> LearnedRouter:
    """A ``LearnedRouter`` from the mean input embedding of a prompt to its domain's index.

    Parameters
    ----------
    model : the causal LM the masks prune (or a ``MaskedCausalLM`` around it); only its input
        embedding is used.
    sequences_by_domain : ``{domain name: (n, tokens) token ids}`` (``TextDomains.sequences``), or
        ``(ids, attention_mask)`` pairs for padded prompts; lengths may differ between domains.
    domain_names : the routed model's ``domain_names``: index k of the router is ``domain_names[k]``.
    max_components, seed : as ``LearnedRouter.fit`` (PCA size; the same seed, the same router).

    Returns
    -------
    LearnedRouter
        Its ``features`` is ``PromptFeatures(model)``, so ``router.route((input_ids, attention_mask))``
        gives (rows,) domain indices. It is fitted on features computed once per domain (so domains
        may have different sequence lengths), then bound to the model; ``save_router`` and
        ``load_prompt_router`` keep it.
    """
    names = _check_domains(sequences_by_domain, domain_names)
    columns, labels = [], []
    for k, name in enumerate(names):
        input_ids, attention_mask = _prompt_parts(sequences_by_domain[name], f"sequences of domain {name!r}")
        features = prompt_features(model, input_ids, attention_mask)
        columns.append(features)
        labels.append(torch.full((features.shape[0],), k, dtype=torch.long))
    # Fitted on the features themselves (flatten_features is the identity on (N, F)), then rebound:
    # the linear model is the same, and its features are now computed from prompts.
    fitted = LearnedRouter.fit(torch.cat(columns).cpu(), torch.cat(labels), len(names),
                               max_components=max_components, seed=seed)
    return LearnedRouter(**fitted.tensors, features=PromptFeatures(model))


def load_prompt_router(directory: str | Path, model: nn.Module) -> LearnedRouter:
    """The router ``save_router(fit_prompt_router(...), directory)`` wrote, its features computed from ``model``.

    ``CheckpointError`` naming the directory when it holds no router, another kind of router, one
    fitted on other features, or one fitted on another embedding width than ``model``'s.
    """
    features = PromptFeatures(model)
    router = load_router(directory, features=features)
    if router is None:
        raise CheckpointError(f"{directory} does not exist: no router was saved there")
    if not isinstance(router, LearnedRouter):
        raise CheckpointError(f"{directory} holds a {type(router).__name__}, not the LearnedRouter that "
                              "fit_prompt_router makes")
    if router.num_features != features.width:
        raise CheckpointError(f"{directory}: the router was fitted on {router.num_features} features per prompt, but "
                              f"the model's embeddings are {features.width} wide: it belongs to another model")
    return router


# -- the perplexity router -------------------------------------------------------------------------
def _targets(attention: torch.Tensor) -> torch.Tensor:
    """(rows, tokens - 1) bool: which next tokens are scored -- a token and its predecessor both unpadded."""
    return attention[:, 1:] & attention[:, :-1]


@torch.no_grad()
def domain_nll(routed: MaskedCausalLM, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, K) float32: each row's mean next-token NLL on its own prompt under each domain's mask.

    Column k is one forward of the whole batch with every row routed to domain k; a token counts
    when it and the token before it are unpadded. With padding, position ids follow the unpadded
    tokens (as ``generate`` sets them), so a left-padded prompt scores as it would alone.
    ``exp`` of a column's token-weighted mean is the perplexity under that mask; taking each row's
    entry at a router's choice gives the perplexity under that router.
    """
    if not isinstance(routed, MaskedCausalLM):
        raise TypeError("routed must be a MaskedCausalLM (one mask per domain over the model); "
                        f"got {type(routed).__name__}")
    if routed.model.training:  # the wrapper holds no dropout of its own; the model it wraps decides
        raise RuntimeError("domain_nll needs the model in evaluation mode (routed.eval()): dropout would make the "
                           "perplexities, and so the choice, random")
    input_ids, attention = _check_prompts(input_ids, attention_mask, "domain_nll")
    targets = _targets(attention)
    counts = targets.sum(dim=1)
    short = (counts == 0).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"domain_nll: rows {short[:10]} have fewer than 2 unpadded tokens; the "
                         "perplexity of a prompt needs at least one token predicted from another")
    extra: dict[str, torch.Tensor] = {}
    if attention_mask is not None:
        extra["attention_mask"] = attention.long()
        # As generate sets them. Rotary models (Llama) see only relative positions and would not
        # care; a model with absolute positions (GPT-2) would score a left-padded prompt differently.
        extra["position_ids"] = (attention.long().cumsum(dim=1) - 1).clamp(min=0)
    columns = []
    for k in range(routed.num_domains):
        logits = routed(input_ids, domains=k, use_cache=False, **extra).logits[:, :-1]
        nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")
        del logits  # (rows, tokens, vocabulary): the largest tensor here, one domain at a time
        columns.append((nll * targets).sum(dim=1) / counts)
    return torch.stack(columns, dim=1)


def lowest_perplexity_domains(routed: MaskedCausalLM, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows,) int64: for each prompt, the domain whose mask gives it the lowest mean next-token NLL.

    Cost: K forwards of the whole batch (one per domain, ``domain_nll``), then the routed forward
    that serves the choice -- K + 1 times a dense forward, where the learned router adds nothing.
    What it buys: no labels, no training, and on the prompt itself it is the best any router can
    do by the measure the experiment reports, since it asks every mask that exact question; only
    an oracle that also saw the continuation could do better on it. Its perplexity on the prompt
    is therefore optimistic (chosen on the tokens it is scored on); on a continuation it is a
    fair, oracle-free router. Ties go to the lowest domain index.
    """
    return domain_nll(routed, input_ids, attention_mask).argmin(dim=1).to(torch.long)


class PerplexityRouter:
    """The ``lowest_perplexity_domains`` choice as a router: ``router(routed, x)`` with ``x`` the token ids
    or ``(input_ids, attention_mask)``.

    Stateless, so ``save_router`` writes only its import path and ``load_router`` builds it anew.
    ``passes`` is K, known after the first call (as ``DetectorRouter``'s).
    """

    name = "perplexity"

    def __init__(self) -> None:
        self._num_domains: int | None = None

    @property
    def passes(self) -> int:
        if self._num_domains is None:
            raise AttributeError("PerplexityRouter.passes is K, the number of domains: known after the first call")
        return self._num_domains

    def __call__(self, routed: MaskedCausalLM, x: Inputs) -> torch.Tensor:
        input_ids, attention_mask = _prompt_parts(x, "PerplexityRouter")
        chosen = lowest_perplexity_domains(routed, input_ids, attention_mask)
        self._num_domains = routed.num_domains
        return chosen
