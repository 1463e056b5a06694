"""Magnitude pruning as small pure functions: weights + current mask -> new mask.

Nothing here trains or rewinds; the IMP loop in ``training`` calls these. Keeping them pure makes
the invariants (exact counts, nesting) testable on hand-made tensors.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.weight_norm import WeightNorm as HookWeightNorm  # the older weight_norm, as a forward pre-hook

from .masks import Mask, count

Scope = Literal["global", "layerwise"]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


TensorFilter = Callable[[str, torch.Tensor], bool]
"""``select(name, parameter) -> bool``: a user's rule for which tensors get masks."""

# nn.MultiheadAttention keeps its query/key/value projections as parameters of its own (one packed
# ``in_proj_weight``, or ``q/k/v_proj_weight`` when the dimensions differ), not as Linear modules:
# without naming them, three quarters of an attention block's weights would silently stay dense.
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def default_prunable_names(model: nn.Module) -> list[str]:
    """Every conv and linear weight plus attention projections, unless the model declares its own.

    A model may declare its tensors with a ``prunable_names()`` method (the paper's GhostNet keeps
    its squeeze-excite convs and classifier dense). Biases, normalization and embeddings stay dense.
    """
    declared = getattr(model, "prunable_names", None)
    if callable(declared):
        return list(declared())
    names = []
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, PRUNABLE_TYPES):
            names.append(f"{prefix}weight")
        elif isinstance(mod, nn.MultiheadAttention):
            names += [f"{prefix}{w}" for w in _ATTENTION_WEIGHTS if getattr(mod, w, None) is not None]
    return names


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Tied weights: every other name of a parameter that ``named_parameters()`` lists once -> that name.

    ``dec.weight = enc.weight`` makes one tensor with two names; ``named_parameters()`` keeps the
    first, so a mask over the second is a mask over the first (masked once, pruned once).
    """
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def weight_norm_directions(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Weight-normed layers: the computed weight's name -> (its direction v's parameter name, the norm's dim).

    ``weight_norm`` computes w = g * v / ||v|| from two parameters (``parametrizations.weight.
    original0/1``, or ``weight_g/weight_v`` with the older hook). A zero in v is a zero in w, so a
    ticket masks v; ||v|| is taken over the slices along dim (-1: the whole tensor), and a slice
    whose every v is pruned would divide zero by zero -- ``WeightStructure`` keeps one weight in each.
    """
    weight_norm_type = getattr(parametrizations, "_WeightNorm", None)  # private in torch: looked up, not assumed
    out = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        chains = getattr(mod, "parametrizations", None)
        for attr in (list(chains.keys()) if isinstance(chains, nn.ModuleDict) else []):
            chain = chains[attr]
            if weight_norm_type is not None and len(chain) == 1 and isinstance(chain[0], weight_norm_type):
                out[f"{prefix}{attr}"] = (f"{prefix}parametrizations.{attr}.original1", int(chain[0].dim))
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, HookWeightNorm):
                out[f"{prefix}{hook.name}"] = (f"{prefix}{hook.name}_v", int(hook.dim))
    return out


def _unresolvable(model: nn.Module, name: str, params: Mapping[str, torch.Tensor]) -> str:
    """Why a tensor named for masking is no parameter of the model, and what to do instead."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    chains = getattr(module, "parametrizations", None)
    if isinstance(chains, nn.ModuleDict) and attr in chains:
        kinds = [type(p).__name__ for p in chains[attr]]
        return (f"{name!r} is computed by a parametrization ({', '.join(kinds)}) from "
                f"{module_name + '.' if module_name else ''}parametrizations.{attr}.original*: a mask on its "
                "original tensor would not zero the weights it computes (only weight_norm's direction v is "
                "masked for it). Remove it before making tickets (torch.nn.utils.parametrize."
                f"remove_parametrizations(module, {attr!r})), or leave the layer dense with pruning.exclude: "
                f"[{name!r}]")
    listed = list(params)
    return (f"{name!r} is not among the model's parameters (a buffer, or an attribute computed in forward?): "
            f"choose the masked tensors with pruning.include patterns over its parameter names "
            f"({listed[:8]}{' ...' if len(listed) > 8 else ''}), or leave it dense with pruning.exclude: [{name!r}]")


def prunable_names(
    model: nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    select: TensorFilter | None = None,
) -> list[str]:
    """Names of the tensors a ticket masks, in the model's parameter order.

    ``include``: glob patterns over parameter names (``"encoder.*.weight"``) that replace the
    default choice (``default_prunable_names``); ``exclude``: patterns removed afterwards;
    ``select(name, tensor)``: a last filter. A pattern that matches nothing is an error, because a
    typo would otherwise leave the tensors it meant dense without a word.

    A tensor answers to each of its names: a tied weight to every module's name for it (masked
    once, under the name ``named_parameters()`` gives), a weight-normed layer's ``weight`` to its
    direction v (``weight_norm_directions``), which is what gets the mask.
    """
    params = dict(model.named_parameters())
    canonical = {**{n: n for n in params}, **parameter_aliases(model),
                 **{w: v for w, (v, _) in weight_norm_directions(model).items()}}
    spellings: dict[str, list[str]] = {}
    for spelling, name in canonical.items():
        spellings.setdefault(name, []).append(spelling)

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(s, p) for s in spellings.get(name, [name]) for p in patterns)

    excluded: list[str] = []  # default names that are no parameter but that exclude leaves dense anyway
    if include:
        unmatched = [p for p in include if not any(fnmatch.fnmatchcase(s, p) for s in canonical)]
        if unmatched:
            raise ValueError(f"pruning.include patterns {unmatched} match no parameter of the model "
                             f"(its parameters: {list(params)[:8]}{' ...' if len(params) > 8 else ''})")
        names = [n for n in params if matches(n, include)]
    else:
        declared = default_prunable_names(model)
        unknown = [n for n in declared if n not in canonical]
        excluded = [n for n in unknown if any(fnmatch.fnmatchcase(n, p) for p in exclude)]
        missing = [n for n in unknown if n not in excluded]
        if missing:
            raise ValueError(f"cannot mask {missing}: " + "; ".join(_unresolvable(model, n, params) for n in missing))
        names = [canonical[n] for n in declared if n in canonical]
    unmatched = [p for p in exclude if not any(matches(n, [p]) for n in names)
                 and not any(fnmatch.fnmatchcase(n, p) for n in excluded)]
    if unmatched:
        raise ValueError(f"pruning.exclude patterns {unmatched} match none of the masked tensors {names[:8]}")
    names = [n for n in names if not matches(n, exclude)]
    if select is not None:
        names = [n for n in names if select(n, params[n])]
    if not names:
        raise ValueError("no tensor to mask: the model has no conv, linear or attention weights and no "
                         "prunable_names(), or the include/exclude patterns and filter left none")
    order = {n: i for i, n in enumerate(params)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def describe_prunable(model: nn.Module, names: Sequence[str], notes: Mapping[str, str] | None = None) -> str:
    """What a run masks, one line per tensor (``notes``: what else a tensor is, e.g. tied), then the
    totals: printed before every run."""
    params = dict(model.named_parameters())
    masked = sum(params[n].numel() for n in names)
    total = sum(p.numel() for p in params.values())
    notes = notes or {}
    lines = [f"  {n} {tuple(params[n].shape)} {params[n].numel():,}" + (f" ({notes[n]})" if n in notes else "")
             for n in names]
    lines.append(f"masked: {len(names)} tensors, {masked:,} of {total:,} parameters "
                 f"({masked / max(total, 1):.1%}); the rest stays dense and shared")
    return "\n".join(lines)


def validate_sparsity(value: float, what: str = "sparsity") -> float:
    """Raise ``ValueError`` unless ``value`` is in [0, 1)."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0.0 <= float(value) < 1.0):
        raise ValueError(f"{what} must be in [0, 1); got {value!r}")
    return float(value)


def validate_step(step: int | float) -> int | float:
    """A pruning step as its one form: a count (``int`` >= 1) or a fraction of survivors (``float`` in (0, 1)).

    NumPy scalars mean what Python's do: ``np.int64(100)`` is a count, not a fraction.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise ValueError(f"pruning.step must be a count (int) or a fraction (float); got {step!r}")
    step = int(step) if isinstance(step, numbers.Integral) else float(step)
    if isinstance(step, float) and not 0 < step < 1:
        raise ValueError(f"pruning.step as a fraction must be in (0, 1); got {step}")
    if isinstance(step, int) and step < 1:
        raise ValueError(f"pruning.step as a count must be >= 1; got {step}")
    return step


def target_count(total: int, sparsity: float) -> int:
    """Weights to keep so that exactly ``round(sparsity * total)`` are pruned."""
    return total - round(validate_sparsity(sparsity) * total)


def magnitude_prune(
    weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], num_to_prune: int, scope: Scope = "global",
    protect: Mapping[str, torch.Tensor] | None = None,
) -> Mask:
    """Prune the ``num_to_prune`` lowest-magnitude surviving weights; return the new (nested) mask.

    ``global`` ranks all prunable tensors together (the default: layers that matter less lose
    more); ``layerwise`` removes the same fraction of each tensor's survivors. Ties break by
    position so the result is deterministic. ``protect``: survivors that must stay (a floor, see
    ``floor_positions``); the others are ranked as if the protected ones were not there.
    """
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise'; got {scope!r}")
    alive = count(mask)
    if not 0 <= num_to_prune <= alive:
        raise ValueError(f"cannot prune {num_to_prune} weights: {alive} survive")
    diverged = [n for n, m in mask.items() if not torch.isfinite(weights[n].detach()[m]).all()]
    if diverged:  # inf/NaN survivors cannot be ranked by magnitude: training diverged
        raise ValueError(f"surviving weights of {diverged} are not finite (training diverged?); "
                         "lower the learning rate")
    prunable = mask if not protect else {n: m & ~protect[n] if n in protect else m for n, m in mask.items()}
    if num_to_prune > count(prunable):
        raise ValueError(f"cannot prune {num_to_prune} weights: {count(prunable)} survivors are not protected "
                         "by a floor (pruning.min_keep_per_tensor, or one weight per weight-normed row)")
    new_mask = {n: m.clone() for n, m in mask.items()}
    if num_to_prune == 0:
        return new_mask
    if scope == "global":
        _prune_lowest(weights, new_mask, list(mask), num_to_prune, prunable)
    elif scope == "layerwise":
        for name, n in _split_by_survivors(prunable, num_to_prune).items():
            _prune_lowest(weights, new_mask, [name], n, prunable)
    return new_mask


def _prune_lowest(weights: Mapping[str, torch.Tensor], mask: Mask, names: list[str], n: int,
                  prunable: Mapping[str, torch.Tensor]) -> None:
    if n == 0:
        return
    scores = torch.cat([
        torch.where(prunable[name], weights[name].detach().abs().float(), torch.tensor(math.inf)).reshape(-1)
        for name in names
    ])
    order = torch.argsort(scores, stable=True)[:n]
    flat = torch.cat([mask[name].reshape(-1) for name in names])
    flat[order] = False
    offset = 0
    for name in names:
        numel = mask[name].numel()
        mask[name] = flat[offset:offset + numel].reshape(mask[name].shape)
        offset += numel


def _split_by_survivors(mask: Mapping[str, torch.Tensor], n: int) -> dict[str, int]:
    """Share ``n`` over tensors in proportion to their survivors (largest remainder, exact total)."""
    alive = {name: int(m.sum()) for name, m in mask.items()}
    total = sum(alive.values())
    exact = {name: n * a / total for name, a in alive.items()}
    share = {name: math.floor(v) for name, v in exact.items()}
    leftover = n - sum(share.values())
    for name in sorted(exact, key=lambda k: (share[k] - exact[k], list(exact).index(k)))[:leftover]:
        share[name] += 1
    return share


def _slices(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as rows, one per slice along ``dim`` (-1: the whole tensor is one slice)."""
    return t.reshape(1, -1) if dim < 0 else t.movedim(dim, 0).reshape(t.shape[dim], -1)


def _unslice(rows: torch.Tensor, shape: Sequence[int], dim: int) -> torch.Tensor:
    """The inverse of ``_slices``: rows back to a tensor of ``shape``."""
    if dim < 0:
        return rows.reshape(shape)
    moved = [shape[dim], *(s for i, s in enumerate(shape) if i != dim)]
    return rows.reshape(moved).movedim(0, dim)


def floor_positions(weight: torch.Tensor, mask: torch.Tensor, keep: int = 0,
                    per_slice: int | None = None) -> torch.Tensor:
    """The survivors a floor keeps: the largest of each slice along ``per_slice`` (a weight-normed
    tensor's norm dim), then the largest others until ``keep`` are kept. Ties break by position."""
    score = torch.where(mask, weight.detach().abs().float(), torch.tensor(-1.0, device=mask.device))
    protected = torch.zeros_like(mask)
    if per_slice is not None:
        rows = _slices(score, per_slice)
        best = rows.argmax(dim=1)  # the first of equal maxima
        hit = rows.gather(1, best[:, None]).squeeze(1) >= 0
        chosen = torch.zeros_like(rows, dtype=torch.bool)
        chosen[torch.arange(len(rows), device=rows.device)[hit], best[hit]] = True
        protected = _unslice(chosen, mask.shape, per_slice)
    extra = min(keep, int(mask.sum())) - int(protected.sum())
    if extra > 0:
        ranked = torch.argsort(torch.where(protected, -2.0, score).reshape(-1), descending=True, stable=True)
        flat = protected.reshape(-1).clone()
        flat[ranked[:extra]] = True
        protected = flat.reshape(mask.shape)
    return protected


def emptied(mask: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """What a mask prunes away whole: tensors with no weight left, and per tensor of two or more
    dimensions ``(emptied, total)`` output rows (dim 0: a unit or channel whose output is then its
    bias alone, a constant)."""
    tensors = [n for n, m in mask.items() if not bool(m.any())]
    rows = {}
    for n, m in mask.items():
        if m.dim() >= 2 and n not in tensors:
            dead = int((~m.reshape(m.shape[0], -1).any(dim=1)).sum())
            if dead:
                rows[n] = (dead, m.shape[0])
    return tensors, rows


def pruning_schedule(total: int, levels: Sequence[float], step: int | float) -> list[int]:
    """Cumulative pruned counts after each IMP round, ending exactly at the highest level.

    ``step`` is a count of weights per round (the paper: 4,096) or, when a float in (0, 1), the
    fraction of survivors pruned per round (classic IMP: 0.2). Every requested level is a round
    boundary, so one nested extraction yields a ticket at each level.
    """
    if not levels:
        raise ValueError("at least one sparsity level is needed")
    milestones = sorted({round(validate_sparsity(s) * total) for s in levels})
    step = validate_step(step)
    pruned, rounds = 0, []
    for milestone in milestones:
        while pruned < milestone:
            amount = step if isinstance(step, int) else max(1, round(step * (total - pruned)))
            pruned = min(pruned + amount, milestone)
            rounds.append(pruned)
    return rounds


def random_mask_like(mask: Mapping[str, torch.Tensor], generator: torch.Generator) -> Mask:
    """A random mask with the same number of kept weights in every tensor (the random-ticket control)."""
    out = {}
    for name, m in mask.items():
        kept = int(m.sum())
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=generator)[:kept]] = True
        out[name] = flat.reshape(m.shape)
    return out


class WeightStructure:
    """The paper's granularity: every weight of the masked tensors is its own unit.

    The interface the IMP loop and the random control use for any granularity (see
    ``channels.ChannelStructure`` for whole channels): the masked tensors, how many units they
    hold, the all-ones mask, counts, pruning and a random mask with the same counts.

    Floors, kept by every round and by the random control: ``min_keep`` (a fraction of each
    tensor's weights, ``pruning.min_keep_per_tensor``) and ``per_slice`` (tensor -> dim: one weight
    in every slice of a weight-normed direction v, whose norm would otherwise be 0).
    """

    granularity = "weight"

    def __init__(self, params: Mapping[str, torch.Tensor], min_keep: float = 0.0,
                 per_slice: Mapping[str, int] | None = None, notes: Mapping[str, str] | None = None) -> None:
        self.names = list(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.total = sum(math.prod(s) for s in self.shapes.values())
        self.min_keep = min_keep
        self.per_slice = {n: d for n, d in (per_slice or {}).items() if n in self.shapes}
        self.notes = dict(notes or {})

    def floor(self, name: str) -> int:
        """How many weights of tensor ``name`` every ticket keeps."""
        numel = math.prod(self.shapes[name])
        keep = math.ceil(self.min_keep * numel)
        if name in self.per_slice:
            d = self.per_slice[name]
            keep = max(keep, 1 if d < 0 else self.shapes[name][d])
        return keep

    def ones(self) -> Mask:
        return {n: torch.ones(s, dtype=torch.bool) for n, s in self.shapes.items()}

    def count(self, mask: Mapping[str, torch.Tensor]) -> int:
        return count(mask)

    def prune(self, weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], num_to_prune: int,
              scope: Scope = "global") -> Mask:
        protect = {n: floor_positions(weights[n], mask[n], math.ceil(self.min_keep * mask[n].numel()),
                                      self.per_slice.get(n))
                   for n in mask if self.floor(n)}
        return magnitude_prune(weights, mask, num_to_prune, scope, protect=protect or None)

    def random_like(self, mask: Mapping[str, torch.Tensor], generator: torch.Generator) -> Mask:
        out = random_mask_like(mask, generator)
        for n, d in self.per_slice.items():  # the same counts, and one weight in every slice
            out[n] = _random_with_one_per_slice(mask[n], d, generator)
        return out

    def describe(self, model: nn.Module) -> str:
        text = describe_prunable(model, self.names, self.notes)
        if self.min_keep:
            text += f"\nevery ticket keeps at least {self.min_keep:.1%} of each tensor (pruning.min_keep_per_tensor)"
        return text


def _random_with_one_per_slice(mask: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random mask with ``mask``'s count and at least one kept weight in each slice along ``dim``."""
    rows = _slices(torch.zeros(mask.shape, dtype=torch.bool), dim)
    picks = torch.randint(rows.shape[1], (len(rows),), generator=generator)
    rows[torch.arange(len(rows)), picks] = True
    flat = _unslice(rows, mask.shape, dim).reshape(-1).clone()
    rest = (~flat).nonzero(as_tuple=True)[0]
    flat[rest[torch.randperm(len(rest), generator=generator)[: int(mask.sum()) - int(flat.sum())]]] = True
    return flat.reshape(mask.shape)


def levels_reached(schedule: Sequence[int], total: int, levels: Sequence[float]) -> dict[float, int]:
    """Map each requested sparsity level to the index of the round that reaches it."""
    index = {pruned: r for r, pruned in enumerate(schedule)}
    return {float(s): index[round(s * total)] for s in levels if round(s * total) in index}


__all__ = [
    "PRUNABLE_TYPES", "Scope", "TensorFilter", "default_prunable_names", "prunable_names", "describe_prunable", "validate_sparsity", "target_count", "magnitude_prune",
    "pruning_schedule", "random_mask_like", "levels_reached", "validate_step", "WeightStructure", "parameter_aliases",
    "weight_norm_directions", "floor_positions", "emptied",
]
