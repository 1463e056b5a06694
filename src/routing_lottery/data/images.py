"""In-memory labelled image sets: the one shape every image experiment's data takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where the user said; the message says what is missing and where to get it."""


@dataclass(frozen=True)
class ImageDataset:
    """Images ``(N, C, H, W)`` as float32, integer ``labels`` ``(N,)`` and one name per class."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W); got shape {tuple(self.images.shape)}")
        if not self.images.is_floating_point():
            raise ValueError(f"images must be floating point; got {self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be ({len(self.images)},); got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.long:
            raise ValueError(f"labels must be int64; got {self.labels.dtype}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.class_names)


@dataclass(frozen=True)
class ImageSplits:
    train: ImageDataset
    test: ImageDataset


def normalize_splits(splits: ImageSplits) -> ImageSplits:
    """Standardize each channel with the *training* mean and std (the test set never leaks in)."""
    mean = splits.train.images.mean(dim=(0, 2, 3), keepdim=True)
    std = splits.train.images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ImageSplits(*(ImageDataset((d.images - mean) / std, d.labels, d.class_names)
                         for d in (splits.train, splits.test)))


def stratified_subset(dataset: ImageDataset, per_class: int | None, seed: int) -> ImageDataset:
    """At most ``per_class`` samples of every class, drawn deterministically from ``seed``; None keeps all."""
    if per_class is None:
        return dataset
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None; got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)
    picked = [order[dataset.labels[order] == c][:per_class] for c in range(len(dataset.class_names))]
    return dataset.subset(torch.cat(picked).sort().values)
