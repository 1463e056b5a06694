"""A toy model and toy data streams: core tests run in milliseconds on hand-checkable tensors."""

from __future__ import annotations

import torch
from torch import nn

from routing_lottery.training import Stream


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def toy_stream(context: int, n: int = 32, batch: int = 8, name: str | None = None) -> Stream:
    """Regression data that differs per context, so contexts want different weights."""
    g = torch.Generator().manual_seed(100 + context)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 3, generator=g)
    y = x @ w

    def epoch(gen: torch.Generator):
        order = torch.randperm(n, generator=gen)
        return [(x[order[i:i + batch]], y[order[i:i + batch]]) for i in range(0, n, batch)]

    return Stream(name or f"ctx{context}", epoch, nn.functional.mse_loss, (n + batch - 1) // batch)
