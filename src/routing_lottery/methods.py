"""The five methods compared everywhere, as training recipes plus honest parameter accounting.

- ``dense``: no pruning.  ``single_imp``: one mask for all data.  ``multi_imp``: K independent
  models, one per context.  ``rtl``: K masks over one shared θ, retrained jointly.  ``random``:
  K random masks with RTL's per-tensor counts, retrained jointly (separates specialization from
  mere sparsity).

``parameters`` counts kept prunable weights (the paper's convention: single IMP at 25 % keeps
94K of 125,832). RTL counts the union of its masks (shared weights once); multiple IMP sums K
models. Dense, unprunable parameters (normalization, squeeze-excite, head) are reported apart
as ``dense_parameters`` (K copies for multiple IMP). ``storage_bytes`` is what a compact file
needs: 4 bytes per stored float plus one bit per prunable weight per mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .masks import Mask, MaskSet, count
from .training import SILENT, OptimizerConfig, ProgressSink, Stream, rewound, train

BYTES_PER_WEIGHT = 4


@dataclass(frozen=True)
class Accounting:
    parameters: int
    dense_parameters: int
    storage_bytes: int


def dense_parameter_count(model: nn.Module, prunable: Sequence[str]) -> int:
    """Parameters outside the prunable tensors (kept dense by every method)."""
    names = set(prunable)
    return sum(p.numel() for n, p in model.named_parameters() if n not in names)


def account(method: str, model: nn.Module, prunable: Sequence[str], masks: MaskSet | Mask | None) -> Accounting:
    """Parameters and storage of ``method`` given its mask(s) (``None`` for dense)."""
    total = sum(dict(model.named_parameters())[n].numel() for n in prunable)
    dense = dense_parameter_count(model, prunable)
    if method == "dense" or masks is None:
        return Accounting(total, dense, BYTES_PER_WEIGHT * (total + dense))
    if method == "single_imp":
        assert isinstance(masks, dict)
        kept = count(masks)
        return Accounting(kept, dense, BYTES_PER_WEIGHT * (kept + dense) + _bits(total))
    assert isinstance(masks, MaskSet)
    k = masks.num_contexts
    if method == "multi_imp":
        kept = sum(masks.counts())
        return Accounting(kept, k * dense, BYTES_PER_WEIGHT * (kept + k * dense) + k * _bits(total))
    if method in ("rtl", "random"):
        kept = masks.union_count()
        return Accounting(kept, dense, BYTES_PER_WEIGHT * (kept + dense) + k * _bits(total))
    raise ValueError(f"unknown method {method!r}")


def _bits(n: int) -> int:
    return (n + 7) // 8


def train_single(model: nn.Module, init_state: dict[str, torch.Tensor], mask: Mask | None, stream: Stream,
                 epochs: int, optimizer: OptimizerConfig, seed: int, progress: ProgressSink = SILENT) -> None:
    """Dense (``mask=None``) or single-mask training from the rewound initialization."""
    model.load_state_dict(rewound(init_state, mask))
    train(model, mask, stream, epochs, optimizer, seed, progress)
