"""Your data and your model: a small transformer over token sequences, attention masked per context.

The data: scikit-learn's handwritten digits read as sequences of 8 row tokens of 8 pixels each
(``load_digit_rows``: the library's stratified, standardized digits split, reshaped to (N, 8, 8)).
Any (N, tokens, features) tensor works the same way; for token ids, swap the Linear embedding for
an ``nn.Embedding``.

The model (``transformer``): each token embedded by a Linear over its features, a learned
positional embedding, ``depth`` pre-LayerNorm blocks of ``nn.MultiheadAttention`` + an MLP, mean
pooling and a linear head with one output per context. By default every Linear weight *and the
attention projections* get masks -- ``nn.MultiheadAttention`` keeps its query/key/value weights in
one packed parameter, ``in_proj_weight``, not in Linear modules, and the library masks it by name.
LayerNorms, biases and the positional embedding stay dense and shared (``rtl.describe()`` and every
``rtl run`` print the list; ``pruning.include`` / ``exclude`` patterns change it).

Run from the repository root::

    python -m examples.transformer
    rtl run examples/transformer.yaml --out runs/transformer
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routing_lottery.data.digits import load_digits_splits
from routing_lottery.experiments import LabelledDataset

CONFIG = Path(__file__).with_name("transformer.yaml")


def load_digit_rows(data: Any, seed: int) -> tuple[LabelledDataset, LabelledDataset]:
    """Digits as (N, 8, 8) sequences: 8 row tokens of 8 standardized pixels, the split drawn from ``seed``."""
    splits = load_digits_splits(seed=seed, image_size=8)
    return tuple(LabelledDataset(d.inputs[:, 0], d.labels, d.class_names)  # (N, 1, 8, 8) -> (N, 8, 8)
                 for d in (splits.train, splits.test))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SequenceTransformer(nn.Module):
    """(batch, tokens, features) -> (batch, num_outputs)."""

    def __init__(self, num_outputs: int, tokens: int, features: int, dim: int, heads: int, depth: int,
                 mlp_ratio: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def transformer(num_outputs: int, input_shape: Sequence[int], dim: int = 32, heads: int = 4, depth: int = 2,
                mlp_ratio: int = 2) -> nn.Module:
    """A small transformer classifier over inputs of shape (tokens, features)."""
    if len(input_shape) != 2:
        raise ValueError(f"transformer takes sequences (tokens, features); the data's rows have shape "
                         f"{tuple(input_shape)}")
    if dim < 1 or heads < 1 or dim % heads:
        raise ValueError(f"model.options.dim must be a positive multiple of heads; got dim={dim}, heads={heads}")
    if depth < 1 or mlp_ratio < 1:
        raise ValueError(f"model.options.depth and mlp_ratio must be >= 1; got {depth}, {mlp_ratio}")
    return SequenceTransformer(num_outputs, input_shape[0], input_shape[1], dim, heads, depth, mlp_ratio)


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable, as `python -m` does
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.common import main

    main(CONFIG)
