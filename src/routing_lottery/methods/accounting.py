"""Honest parameter and storage accounting, one rule per way of keeping weights.

``parameters`` counts kept prunable weights (the paper's convention: single IMP at 25 % keeps
94K of 125,832). Shared masks (RTL, random control) count their union once; independent models
(multiple IMP) sum K models. Dense, unprunable parameters (normalization, squeeze-excite, head)
are reported apart as ``dense_parameters`` (K copies for independent models). ``storage_bytes``
is what a compact file needs: 4 bytes per stored float plus one bit per prunable weight per mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..masks import Mask, MaskSet, count

BYTES_PER_WEIGHT = 4


@dataclass(frozen=True)
class Accounting:
    parameters: int
    dense_parameters: int
    storage_bytes: int


def _totals(model: nn.Module, prunable: Sequence[str]) -> tuple[int, int]:
    """(prunable weights, parameters outside the prunable tensors, kept dense by every method)."""
    names = set(prunable)
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in prunable), sum(p.numel() for n, p in params.items() if n not in names)


def _bits(n: int) -> int:
    return (n + 7) // 8


def dense_accounting(model: nn.Module, prunable: Sequence[str]) -> Accounting:
    total, dense = _totals(model, prunable)
    return Accounting(total, dense, BYTES_PER_WEIGHT * (total + dense))


def single_mask_accounting(model: nn.Module, prunable: Sequence[str], mask: Mask) -> Accounting:
    total, dense = _totals(model, prunable)
    kept = count(mask)
    return Accounting(kept, dense, BYTES_PER_WEIGHT * (kept + dense) + _bits(total))


def independent_accounting(model: nn.Module, prunable: Sequence[str], masks: MaskSet) -> Accounting:
    """K separate models, model k keeping mask k (and its own copy of the dense rest)."""
    total, dense = _totals(model, prunable)
    k, kept = masks.num_contexts, sum(masks.counts())
    return Accounting(kept, k * dense, BYTES_PER_WEIGHT * (kept + k * dense) + k * _bits(total))


def shared_accounting(model: nn.Module, prunable: Sequence[str], masks: MaskSet) -> Accounting:
    """K masks over one shared tensor: the union's weights once, the dense rest once, K bits per weight."""
    total, dense = _totals(model, prunable)
    kept = masks.union_count()
    return Accounting(kept, dense, BYTES_PER_WEIGHT * (kept + dense) + masks.num_contexts * _bits(total))
