"""One-shot pruning scores: what ranks the weights of a pretrained model, and the keep-masks they give.

IMP ranks weights by magnitude after training; one-shot pruning of a pretrained model (Wanda, Sun
et al. 2023) ranks them once, from a little calibration data, with no training. Both are a score per
weight (higher = keep) followed by a cut, so a score is a small pure function in a registry, and the
cut (``one_shot_mask``) is shared by all of them. The masks are ordinary ``Mask`` dicts: one-shot and
IMP tickets share ``MaskSet``, accounting, checkpoints and diagnostics.

Three pieces, each usable alone in a user's own loop:

- ``SCORES``: ``score(weights, activations) -> {name: score}``; built in: ``"magnitude"`` (|W|) and
  ``"wanda"`` (|W_ij| * ||X_j||_2). A user's own is registered (``@SCORES.register("mine")``) or named
  by import path (``"package.module:score"``).
- ``input_norms``: the per-input-feature activation norms Wanda needs, from calibration batches,
  of the dense model or of one context's subnetwork.
- ``one_shot_mask``: exact unstructured sparsity per row, per tensor or globally, or N:M (2:4).

Scores that rewrite the weights per mask (SparseGPT's update) do not fit here on purpose: RTL keeps
one weight tensor under K masks, and such a score would need K copies of it.

>>> import torch
>>> w = {"fc.weight": torch.tensor([[1.0, -4.0, 2.0, 3.0]])}
>>> norms = {"fc.weight": torch.tensor([10.0, 0.1, 1.0, 1.0])}
>>> one_shot_mask(SCORES.get("wanda")(w, norms), 0.5)["fc.weight"].tolist()
[[True, False, False, True]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .masks import Mask
from .pruning import target_count, validate_sparsity
from .registry import Registry
from .routed import masked_forward

ScoreFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None], dict[str, torch.Tensor]]
"""``score(weights, activations) -> {name: score}``: one score per weight, of the weight's shape;
higher means keep. ``activations`` is whatever the score needs from calibration data (Wanda: the
``input_norms`` of each tensor), ``None`` for scores of the weights alone."""

Granularity = Literal["row", "tensor", "global"]
GRANULARITIES: tuple[str, ...] = ("row", "tensor", "global")

SCORES: Registry[ScoreFn] = Registry("score", setting="pruning.score")
"""Registered one-shot scores by name; ``SCORES.get("package.module:attribute")`` finds a user's own."""


# -- the scores ------------------------------------------------------------------------------
@SCORES.register("magnitude")
def magnitude(weights: Mapping[str, torch.Tensor], activations: Mapping[str, torch.Tensor] | None = None
              ) -> dict[str, torch.Tensor]:
    """|W|: the score of IMP's pruning step, here for a one-shot cut (``activations`` is ignored).

    The baseline every one-shot score is compared with: it needs no data, so a per-context mask
    from it is the same for every context.
    """
    return {name: w.detach().abs().float() for name, w in weights.items()}


magnitude.needs_activations = False  # type: ignore[attr-defined]


def needs_activations(score: str | ScoreFn) -> bool:
    """Whether ``score`` reads calibration activations, so that its caller must run the model over data first.

    A score says it does not by the attribute ``needs_activations = False`` (``magnitude`` does); any
    other score, a user's included, is given them: a forward pass too many costs time, one too few a
    wrong mask.
    """
    return bool(getattr(resolve_score(score), "needs_activations", True))


@SCORES.register("wanda")
def wanda(weights: Mapping[str, torch.Tensor], activations: Mapping[str, torch.Tensor] | None
          ) -> dict[str, torch.Tensor]:
    """Wanda's score |W_ij| * ||X_j||_2 (Sun et al. 2023, "A simple and effective pruning approach for LLMs").

    ``activations[name]`` is the (in_features,) L2 norm of each input feature j over the calibration
    tokens (``input_norms``). A weight matters in proportion to the input it multiplies: a small
    weight on an outlier feature can outweigh a large one on a quiet feature, which magnitude alone
    misses. The paper compares scores within each output row (``one_shot_mask``'s default
    ``granularity="row"``). Scaling the norms (the reference code averages squared norms over
    samples) changes no row's order, so the mask is the same.
    """
    if activations is None:
        raise ValueError("the 'wanda' score needs activations: the input norms of each masked Linear over "
                         "calibration data (scores.input_norms(model, names, batches)); got None")
    out = {}
    for name, w in weights.items():
        if w.dim() != 2:
            raise ValueError(f"the 'wanda' score is for (out_features, in_features) Linear weights; {name!r} "
                             f"has shape {tuple(w.shape)}")
        if name not in activations:
            raise ValueError(f"the 'wanda' score has no input norms for {name!r}: activations hold "
                             f"{_listed(activations)}; collect them with input_norms(model, names, batches) "
                             "over the same tensor names")
        norm = activations[name]
        if not isinstance(norm, torch.Tensor) or tuple(norm.shape) != (w.shape[1],):
            shape = tuple(norm.shape) if isinstance(norm, torch.Tensor) else type(norm).__name__
            raise ValueError(f"the 'wanda' score needs input norms of shape ({w.shape[1]},) for {name!r} "
                             f"(its in_features), got {shape}")
        if not bool(torch.isfinite(norm).all()):
            raise ValueError(f"the input norms of {name!r} are not finite (activations overflowed or are NaN)")
        out[name] = w.detach().abs().float() * norm.detach().to(device=w.device, dtype=torch.float32)[None, :]
    return out


def resolve_score(score: str | ScoreFn) -> ScoreFn:
    """A score function from its registered name, an import path ``package.module:attribute``, or itself."""
    if isinstance(score, str):
        return SCORES.get(score)
    if not callable(score):
        raise TypeError(f"score must be a registered name ({SCORES.names()}), an import path "
                        f"'package.module:attribute' or a callable; got {type(score).__name__}")
    return score


def compute_scores(score: str | ScoreFn, weights: Mapping[str, torch.Tensor],
                   activations: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``score(weights, activations)``, checked: one tensor per weight, of its shape.

    A user's score that drops a tensor or returns another shape would otherwise surface later as
    a mask that does not fit the model; here the error names the score and the tensor.
    """
    fn = resolve_score(score)
    label = score if isinstance(score, str) else getattr(fn, "__name__", type(fn).__name__)
    out = fn(weights, activations)
    if not isinstance(out, Mapping):
        raise TypeError(f"score {label!r} must return a dict name -> tensor; got {type(out).__name__}")
    missing, extra = sorted(set(weights) - set(out)), sorted(set(out) - set(weights))
    if missing or extra:
        raise ValueError(f"score {label!r} must score exactly the given tensors: missing {missing}, unexpected {extra}")
    for name, s in out.items():
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(weights[name].shape):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"score {label!r} gave {name!r} a score of shape {got}; expected the weight's "
                             f"{tuple(weights[name].shape)}")
    return dict(out)


# -- calibration statistics ------------------------------------------------------------------
Forward = Callable[[Any, Any], Any]
"""``forward(model, batch)``: how one calibration batch runs through the model."""


def input_norms(model: nn.Module, names: Sequence[str], batches: Iterable[Any], forward: Forward | None = None,
                *, mask: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The L2 norm of each input feature of the Linear layers whose weights are ``names``, over all calibration tokens.

    Parameters
    ----------
    model
        Any ``nn.Module``; every ``names`` entry must be the ``weight`` of an ``nn.Linear`` in it
        (``"model.layers.0.self_attn.q_proj.weight"``). Conv layers and transformers' ``Conv1D``
        (GPT-2, weights stored transposed) are refused: their "input feature" is another thing.
    batches
        An iterable of calibration inputs: a tensor of token ids (``model(x)``), a dict of keyword
        inputs (``model(**x)``) or a tuple (``model(*x)``). Every position that passes through a
        layer counts as a token, padding included: calibrate on unpadded fixed-length sequences.
    forward
        ``forward(model, batch)`` when a batch needs something else (``model(input_ids=b, use_cache=False)``).
        With a ``mask`` it is handed a stand-in that runs the subnetwork when called and answers
        attribute look-ups as the model does; call it, not the model's own methods (``generate``
        would run the dense model).
    mask
        One context's mask (``masks[k]``, bool or float, over some of the model's parameters): the
        statistics are then those of that subnetwork, run as ``w * m`` through
        ``routed.masked_forward``. Wanda as published scores with the *dense* model's activations
        (``mask=None``); a mask gives the variant where each pruning step sees the activations of
        what is left, or a context's statistics under an existing ticket.

    Returns
    -------
    dict[str, torch.Tensor]
        ``{name: (in_features,) float64 tensor}`` on the weight's device: sqrt(sum over tokens of x_j^2),
        accumulated in float64 so that many tokens of a low-precision model lose nothing. A layer called
        several times per forward (a shared module) counts every call.

    Notes
    -----
    Hooks are removed, gradients stay off and every module's train/eval mode is restored even when
    a batch raises; the model runs in eval mode (no dropout) while collecting.
    """
    linears = _linears(model, names)
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
            for name, lin in linears.items()}
    seen = dict.fromkeys(linears, 0)
    call = _caller(model, mask)
    run = forward or _default_forward
    batches_run = 0
    with torch.no_grad(), _eval_mode(model), _hooks(linears, sums, seen):
        for batch in batches:
            run(call, batch)
            batches_run += 1
    if batches_run == 0:
        raise ValueError("input_norms needs at least one calibration batch; batches was empty")
    silent = [name for name, n in seen.items() if n == 0]
    if silent:
        # Zero norms would score every weight of those rows 0 and prune them by position: say so instead.
        raise ValueError(f"input_norms: the forward never reached the Linear layers of {_listed(silent)}; "
                         "check that forward(model, batch) runs the whole model")
    return {name: s.sqrt() for name, s in sums.items()}


def _linears(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Linear]:
    """name -> its ``nn.Linear``, with an error naming any name that is not a Linear's weight."""
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of parameter names, not one string ({names!r}); "
                        f"use [{names!r}]")
    if not names:
        raise ValueError("input_norms needs at least one parameter name (e.g. 'fc.weight'); names was empty")
    out = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if attr != "weight" or not isinstance(module, nn.Linear):
            what = "no module" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"input_norms covers the weights of nn.Linear layers; {name!r} names {what}'s "
                             f"{attr!r}. Name Linear weights like 'layers.0.fc.weight'")
        out[name] = module
    return out


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards each module's own mode back (a frozen BatchNorm stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def _hooks(linears: Mapping[str, nn.Linear], sums: Mapping[str, torch.Tensor], seen: dict[str, int]
           ) -> Iterator[None]:
    """Forward hooks adding each input feature's sum of squares into ``sums``; removed on any exit."""
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["input"]
            sums[name].add_(x.detach().reshape(-1, x.shape[-1]).to(torch.float64).pow(2).sum(dim=0)
                            .to(sums[name].device))
            seen[name] += 1
        return hook

    try:
        for name, lin in linears.items():
            handles.append(lin.register_forward_hook(hook_for(name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Masked:
    """The model as ``forward`` sees it under a mask: calling it runs ``masked_forward``; any attribute
    (``config``, ``device``) is the model's own."""

    def __init__(self, model: nn.Module, fmask: Mapping[str, torch.Tensor]) -> None:
        self._model, self._fmask = model, fmask

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return masked_forward(self._model, self._fmask, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._model, attr)


def _caller(model: nn.Module, mask: Mapping[str, torch.Tensor] | None) -> Any:
    """The model, or its masked stand-in, with the mask checked against the model's parameters."""
    if mask is None:
        return model
    params = dict(model.named_parameters())
    fmask = {}
    for name, m in mask.items():
        if name not in params:
            raise ValueError(f"mask names {name!r}, which is not a parameter of the model "
                             f"(its parameters: {_listed(params)})")
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(params[name].shape):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask for {name!r} has shape {got}; the parameter has {tuple(params[name].shape)}")
        fmask[name] = m.to(device=params[name].device, dtype=params[name].dtype)
    return _Masked(model, fmask)


def _default_forward(model: Any, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


# -- the cut ---------------------------------------------------------------------------------
def one_shot_mask(scores: Mapping[str, torch.Tensor], sparsity: float | None, *, granularity: Granularity = "row",
                  n_m: tuple[int, int] | None = None) -> Mask:
    """The keep-mask that prunes the lowest scores: exactly ``round(sparsity * n)`` of each group of n.

    Parameters
    ----------
    scores
        ``{name: score}`` from a score function (higher = keep).
    sparsity
        Fraction pruned, in [0, 1). With ``n_m`` it may be ``None`` (the pattern fixes it at
        1 - N/M), and anything else must equal 1 - N/M.
    granularity
        Where the count is exact: ``"row"`` in every output row (dim 0 of a tensor of two or more
        dimensions; Wanda's comparison group, so no row loses more than its share), ``"tensor"`` in
        every tensor, ``"global"`` over all tensors together (layers that score lower lose more).
    n_m
        ``(N, M)``, e.g. ``(2, 4)``: in every group of M consecutive weights along the input
        dimension of each row of a 2-D weight, keep exactly the N highest scores (the pattern
        sparse tensor cores run: with (2, 4), ``torch.sparse.to_sparse_semi_structured`` can later
        turn the masked weight into a fast CUDA tensor). ``in_features`` must be a multiple of M.

    Notes
    -----
    Ties keep the lower index first (row-major within a tensor, tensors in the given order), so the
    same scores always give the same mask. NaN scores are refused; +inf is kept first and -inf
    pruned first, so a score can force a weight either way.
    """
    _check_scores(scores)
    if n_m is not None:
        n, m = _check_n_m(n_m, sparsity)
        if granularity != "row":
            raise ValueError(f"N:M masks are per row by construction; granularity must be 'row', got {granularity!r}")
        return {name: _n_m_mask(name, s, n, m) for name, s in scores.items()}
    if sparsity is None:
        raise ValueError("sparsity is required (a fraction in [0, 1)) unless n_m gives an N:M pattern")
    sparsity = validate_sparsity(sparsity)
    if granularity == "row":
        return {name: _row_mask(name, s, sparsity) for name, s in scores.items()}
    if granularity == "tensor":
        return {name: _keep_top(s.reshape(1, -1), target_count(s.numel(), sparsity)).reshape(s.shape)
                for name, s in scores.items()}
    if granularity == "global":
        return _global_mask(scores, sparsity)
    raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"scores must be a non-empty dict name -> tensor; got {_listed(scores)}")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"the score of {name!r} must be a tensor; got {type(s).__name__}")
        if s.is_complex() or s.dtype == torch.bool:
            raise TypeError(f"the score of {name!r} must be real numbers; got dtype {s.dtype}")
        if bool(torch.isnan(s).any()):
            raise ValueError(f"the score of {name!r} has NaN entries, which cannot be ranked")


def _check_n_m(n_m: tuple[int, int], sparsity: float | None) -> tuple[int, int]:
    if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in n_m)):
        raise ValueError(f"n_m must be a pair of integers (N, M) such as (2, 4); got {n_m!r}")
    n, m = n_m
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"n_m = {tuple(n_m)}: an N:M pattern keeps N of every M weights, so 0 <= N <= M and M >= 1")
    if sparsity is not None and not math.isclose(validate_sparsity(sparsity), 1 - n / m, abs_tol=1e-9):
        raise ValueError(f"sparsity {sparsity!r} contradicts the {n}:{m} pattern, which prunes {1 - n / m:g}; "
                         "give sparsity=None or that value")
    return n, m


def _keep_top(rows: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` highest entries of each row (last dim); ties: lower index first."""
    order = torch.argsort(rows, dim=-1, descending=True, stable=True)[..., :keep]
    out = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    return out.scatter_(-1, order, True)


def _row_mask(name: str, s: torch.Tensor, sparsity: float) -> torch.Tensor:
    if s.dim() < 2:
        raise ValueError(f"granularity 'row' needs tensors of two or more dimensions (output rows first); "
                         f"{name!r} has shape {tuple(s.shape)}: use granularity='tensor' or 'global'")
    rows = s.reshape(s.shape[0], -1)
    return _keep_top(rows, target_count(rows.shape[1], sparsity)).reshape(s.shape)


def _n_m_mask(name: str, s: torch.Tensor, n: int, m: int) -> torch.Tensor:
    if s.dim() != 2:
        raise ValueError(f"N:M masks are for 2-D (out_features, in_features) weights; {name!r} has shape {tuple(s.shape)}")
    if s.shape[1] % m:
        raise ValueError(f"{name!r} has in_features {s.shape[1]}, not a multiple of M = {m}: it cannot be cut into "
                         f"groups of {m}; leave it dense or choose another M")
    groups = s.reshape(s.shape[0], s.shape[1] // m, m)
    return _keep_top(groups, n).reshape(s.shape)


def _global_mask(scores: Mapping[str, torch.Tensor], sparsity: float) -> Mask:
    dtype = scores[next(iter(scores))].dtype
    for s in scores.values():
        dtype = torch.promote_types(dtype, s.dtype)
    flat = torch.cat([s.reshape(-1).to(dtype) for s in scores.values()])
    kept = _keep_top(flat, target_count(flat.numel(), sparsity))
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = kept[offset:offset + s.numel()].reshape(s.shape).to(s.device)
        offset += s.numel()
    return out


def _listed(items: Any, limit: int = 8) -> str:
    """The first few names of ``items`` for an error message."""
    if not isinstance(items, (Mapping, Sequence)) or isinstance(items, str):
        return repr(items)[:80]
    names = list(items)
    return str(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")
