"""In-memory labelled image sets: the one shape every image experiment's data takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError
from .labelled import LabelledDataset, Splits


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset's files are not where the user said; the message says what is missing and where to get it."""


@dataclass(frozen=True)
class ImageDataset(LabelledDataset):
    """Images ``(N, C, H, W)`` as float32: what the image loaders (digits, CIFAR) produce."""

    def __post_init__(self) -> None:
        if self.inputs.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(self.inputs.shape)}")
        if not self.inputs.is_floating_point():
            raise ValueError(f"images must be floating point; got {self.inputs.dtype}")
        super().__post_init__()

    @property
    def images(self) -> torch.Tensor:
        return self.inputs


def normalize_splits(splits: Splits) -> Splits:
    """Standardize each channel with the *training* mean and std (the test set never leaks in)."""
    mean = splits.train.inputs.mean(dim=(0, 2, 3), keepdim=True)
    std = splits.train.inputs.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Splits(*(ImageDataset((d.inputs - mean) / std, d.labels, d.class_names)
                         for d in (splits.train, splits.test)))
