"""The embedded default: scikit-learn's bundled 8×8 handwritten digits (1,797 real images, no download)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from .labelled import Splits
from .images import ImageDataset, normalize_splits

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_splits(test_fraction: float = 0.2, seed: int = 0, image_size: int = 16) -> Splits:
    """A stratified train/test split of the digits, upsampled (bilinear) to ``image_size`` and standardized.

    The 8×8 originals are upsampled because the GhostNet stem and its four stride-2 stages need
    room: at 8 pixels the last stages would see a single pixel.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8; got {image_size}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = (labels == c).nonzero(as_tuple=True)[0]
        members = members[torch.randperm(len(members), generator=gen)]
        test_mask[members[: round(test_fraction * len(members))]] = True
    full = ImageDataset(images, labels, DIGIT_NAMES)
    return normalize_splits(Splits(full.subset(~test_mask), full.subset(test_mask)))
