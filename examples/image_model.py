"""Only your model: a small CNN of your own on the library's built-in digits dataset.

The data stays the library's (``data: {name: digits, image_size: 8}`` -- scikit-learn's 1,797
bundled 8x8 handwritten digits, stratified and standardized, one context per digit); only
``model.name`` points at your code. A factory takes ``num_outputs`` (K, one output per context)
and ``input_shape`` ((C, H, W) here) plus whatever options the config gives it, and returns any
``nn.Module``. Every conv and linear weight is masked by default; biases stay dense.

Run from the repository root::

    python -m examples.image_model
    rtl run examples/image_model.yaml --out runs/image_model
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

CONFIG = Path(__file__).with_name("image_model.yaml")


def small_cnn(num_outputs: int, input_shape: Sequence[int], channels: int = 16) -> nn.Module:
    """Three 3x3 convs (``channels``, ``channels``, 2 x ``channels``) with two max-pools, average pool, linear head."""
    if len(input_shape) != 3:
        raise ValueError(f"small_cnn takes images (C, H, W); the data's rows have shape {tuple(input_shape)}")
    if channels < 1:
        raise ValueError(f"model.options.channels must be >= 1; got {channels}")
    c = channels
    return nn.Sequential(
        nn.Conv2d(input_shape[0], c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_outputs),
    )


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repository root importable, as `python -m` does
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.common import main

    main(CONFIG)
