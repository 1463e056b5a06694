"""Your data and your model: scikit-learn's wine table (178 rows, 13 features, 3 cultivars) and an MLP.

Shows the two things a researcher writes to bring a table to RTL:

- a **loader** ``load_wine(data_config, seed) -> (train, test)`` of ``LabelledDataset``: here a
  stratified split drawn from the seed, standardized with the *training* split's statistics
  (``data.options.test_fraction`` sets the split);
- a **model factory** ``mlp(num_outputs, input_shape, hidden=64)`` returning a module with one
  output per context.

``tabular.yaml`` names both by import path. One context per cultivar: each gets its own mask over
the MLP's shared weights.

Run from the repository root::

    python -m examples.tabular_mlp            # front door: each cultivar's subnetwork
    rtl run examples/tabular.yaml --out runs/tabular   # dense, single/multiple IMP, RTL, random
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routing_lottery.experiments import LabelledDataset

CONFIG = Path(__file__).with_name("tabular.yaml")


def load_wine(data: Any, seed: int) -> tuple[LabelledDataset, LabelledDataset]:
    """Wine as standardized float rows (N, 13): a stratified split drawn from ``seed`` (no download)."""
    from sklearn.datasets import load_wine as sklearn_wine

    test_fraction = float(data.options.get("test_fraction", 0.25))
    if not 0 < test_fraction < 1:
        raise ValueError(f"data.options.test_fraction must be in (0, 1); got {test_fraction}")
    bunch = sklearn_wine()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(len(bunch.target_names)):
        members = (y == c).nonzero(as_tuple=True)[0]
        is_test[members[torch.randperm(len(members), generator=gen)[: round(test_fraction * len(members))]]] = True
    mean, std = x[~is_test].mean(dim=0), x[~is_test].std(dim=0).clamp_min(1e-6)  # training statistics only
    x = (x - mean) / std
    names = tuple(str(n) for n in bunch.target_names)
    return LabelledDataset(x[~is_test], y[~is_test], names), LabelledDataset(x[is_test], y[is_test], names)


def mlp(num_outputs: int, input_shape: Sequence[int], hidden: int = 64) -> nn.Module:
    """Two hidden ReLU layers of ``hidden`` units; every Linear weight is masked by default, biases stay dense."""
    if hidden < 1:
        raise ValueError(f"model.options.hidden must be >= 1; got {hidden}")
    features = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable, as `python -m` does
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.common import main

    main(CONFIG)
