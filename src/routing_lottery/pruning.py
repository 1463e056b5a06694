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
    """
    params = dict(model.named_parameters())
    if include:
        unmatched = [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in params)]
        if unmatched:
            raise ValueError(f"pruning.include patterns {unmatched} match no parameter of the model "
                             f"(its parameters: {list(params)[:8]}{' ...' if len(params) > 8 else ''})")
        names = [n for n in params if any(fnmatch.fnmatchcase(n, p) for p in include)]
    else:
        names = default_prunable_names(model)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"prunable tensor names not found among the model's parameters: {unknown}")
    unmatched = [p for p in exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"pruning.exclude patterns {unmatched} match none of the masked tensors {names[:8]}")
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if select is not None:
        names = [n for n in names if select(n, params[n])]
    if not names:
        raise ValueError("no tensor to mask: the model has no conv, linear or attention weights and no "
                         "prunable_names(), or the include/exclude patterns and filter left none")
    order = {n: i for i, n in enumerate(params)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def describe_prunable(model: nn.Module, names: Sequence[str]) -> str:
    """What a run masks, one line per tensor, then the totals: printed before every run."""
    params = dict(model.named_parameters())
    masked = sum(params[n].numel() for n in names)
    total = sum(p.numel() for p in params.values())
    lines = [f"  {n} {tuple(params[n].shape)} {params[n].numel():,}" for n in names]
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
    weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], num_to_prune: int, scope: Scope = "global"
) -> Mask:
    """Prune the ``num_to_prune`` lowest-magnitude surviving weights; return the new (nested) mask.

    ``global`` ranks all prunable tensors together (the default: layers that matter less lose
    more); ``layerwise`` removes the same fraction of each tensor's survivors. Ties break by
    position so the result is deterministic.
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
    new_mask = {n: m.clone() for n, m in mask.items()}
    if num_to_prune == 0:
        return new_mask
    if scope == "global":
        _prune_lowest(weights, new_mask, list(mask), num_to_prune)
    elif scope == "layerwise":
        for name, n in _split_by_survivors(mask, num_to_prune).items():
            _prune_lowest(weights, new_mask, [name], n)
    return new_mask


def _prune_lowest(weights: Mapping[str, torch.Tensor], mask: Mask, names: list[str], n: int) -> None:
    if n == 0:
        return
    scores = torch.cat([
        torch.where(mask[name], weights[name].detach().abs().float(), torch.tensor(math.inf)).reshape(-1)
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
    """

    granularity = "weight"

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.names = list(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.total = sum(math.prod(s) for s in self.shapes.values())

    def ones(self) -> Mask:
        return {n: torch.ones(s, dtype=torch.bool) for n, s in self.shapes.items()}

    def count(self, mask: Mapping[str, torch.Tensor]) -> int:
        return count(mask)

    def prune(self, weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], num_to_prune: int,
              scope: Scope = "global") -> Mask:
        return magnitude_prune(weights, mask, num_to_prune, scope)

    def random_like(self, mask: Mapping[str, torch.Tensor], generator: torch.Generator) -> Mask:
        return random_mask_like(mask, generator)

    def describe(self, model: nn.Module) -> str:
        return describe_prunable(model, self.names)


def levels_reached(schedule: Sequence[int], total: int, levels: Sequence[float]) -> dict[float, int]:
    """Map each requested sparsity level to the index of the round that reaches it."""
    index = {pruned: r for r, pruned in enumerate(schedule)}
    return {float(s): index[round(s * total)] for s in levels if round(s * total) in index}


__all__ = [
    "PRUNABLE_TYPES", "Scope", "TensorFilter", "default_prunable_names", "prunable_names", "describe_prunable", "validate_sparsity", "target_count", "magnitude_prune",
    "pruning_schedule", "random_mask_like", "levels_reached", "validate_step", "WeightStructure",
]
