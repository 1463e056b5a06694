"""Labelled examples of any shape: the one form a classification task's data takes.

Rows may be images ``(N, C, H, W)``, tabular features ``(N, F)``, token ids ``(N, L)`` or any
other ``(N, ...)`` tensor; the task and the model decide what they mean. A user's loader
(``data.name: package.module:callable`` in a config) returns two of these, train and test.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DataError

MAX_NAME_LENGTH = 200
"""Longest class name accepted: real ones are words ("sweet_pepper"); a longer one is a corrupt file."""

_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Unicode categories refused in a name: controls (NUL, newline, escape), format characters (bidirectional
overrides that make text read differently from its bytes), lone surrogates (not encodable as UTF-8) and
line or paragraph separators."""


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot serve as a class or context name, or None when it can.

    Names travel into records, tables, figure labels, log lines and (made safe, see
    ``export.safe_filename``) file names; one that is empty, unprintable or as long as a file is
    refused where it is read, so the error names that file rather than a figure or a path later.
    Slashes, dots and spaces are allowed: ``sweet/pepper`` is a fair class name, and whatever
    turns a name into a path must map it anyway.
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name.strip():
        return "is empty" if not name else "is only whitespace"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name):,} characters long (at most {MAX_NAME_LENGTH})"
    bad = next((c for c in name if unicodedata.category(c) in _UNPRINTABLE), None)
    if bad is not None:
        return f"holds the unprintable character U+{ord(bad):04X} ({unicodedata.category(bad)})"
    return None


def check_class_names(names: Sequence[object], source: str) -> tuple[str, ...]:
    """``names`` as a tuple, each usable (``name_problem``) and all distinct, else ``DataError`` naming ``source``."""
    names = tuple(names)
    if not names:
        raise DataError(f"{source}: no class names")
    seen: set[str] = set()
    for i, name in enumerate(names):
        problem = name_problem(name)
        if problem is not None:
            shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
            raise DataError(f"{source}: class name {i} ({shown}) {problem}; give every class a short printable name")
        if name in seen:
            raise DataError(f"{source}: class name {name[:40]!r} appears twice; class names must be distinct")
        seen.add(name)
    return names  # type: ignore[return-value] -- every entry passed name_problem, so it is a str


@dataclass(frozen=True)
class LabelledDataset:
    """Inputs ``(N, ...)`` (any dtype), integer ``labels`` ``(N,)`` in 0..C-1 and one name per class."""

    inputs: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor) or self.inputs.ndim < 1:
            raise ValueError(f"inputs must be a tensor (N, ...); got {type(self.inputs).__name__}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.shape != (len(self.inputs),):
            raise ValueError(f"labels must be a tensor of shape ({len(self.inputs)},); got "
                             f"{tuple(getattr(self.labels, 'shape', ())) or type(self.labels).__name__}")
        if self.labels.dtype != torch.long:
            raise ValueError(f"labels must be int64; got {self.labels.dtype}")
        names = check_class_names(self.class_names, "class_names")
        object.__setattr__(self, "class_names", names)
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(names):
            raise ValueError(f"labels must lie in 0..{len(names) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> LabelledDataset:
        return type(self)(self.inputs[index], self.labels[index], self.class_names)


@dataclass(frozen=True)
class Splits:
    train: LabelledDataset
    test: LabelledDataset

    def __post_init__(self) -> None:
        if self.train.class_names != self.test.class_names:
            raise ValueError("train and test must share class_names")
        if self.train.inputs.shape[1:] != self.test.inputs.shape[1:]:
            raise ValueError(f"train rows {tuple(self.train.inputs.shape[1:])} and test rows "
                             f"{tuple(self.test.inputs.shape[1:])} differ in shape")


def as_splits(loaded: object, source: str) -> Splits:
    """A loader's result as ``Splits``: a ``Splits`` or a (train, test) pair of ``LabelledDataset``."""
    if isinstance(loaded, Splits):
        return loaded
    if isinstance(loaded, Sequence) and len(loaded) == 2 and all(isinstance(d, LabelledDataset) for d in loaded):
        return Splits(loaded[0], loaded[1])
    raise ValueError(f"{source} must return Splits or a (train, test) pair of LabelledDataset; "
                     f"got {type(loaded).__name__}")


def stratified_subset(dataset: LabelledDataset, per_class: int | None, seed: int) -> LabelledDataset:
    """At most ``per_class`` samples of every class, drawn deterministically from ``seed``; None keeps all."""
    if per_class is None:
        return dataset
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None; got {per_class}")
    picked = [members[:per_class] for members in _shuffled_by_class(dataset, seed)]
    return dataset.subset(torch.cat(picked).sort().values)


def _shuffled_by_class(dataset: LabelledDataset, seed: int) -> list[torch.Tensor]:
    """Each class's row indices, in one random order drawn from ``seed`` (the same order for every class)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return [order[dataset.labels[order] == c] for c in range(len(dataset.class_names))]


def stratified_holdout(dataset: LabelledDataset, fraction: float, seed: int) -> tuple[LabelledDataset, LabelledDataset]:
    """``(kept, held_out)``: ``round(fraction * n_c)`` examples of every class c held out, at least one of
    each class with two or more examples, drawn deterministically from ``seed``; a class's last example
    is never held out (training needs every class)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1); got {fraction}")
    held = [members[:min(len(members) - 1, max(1, round(fraction * len(members))))] if fraction and len(members) > 1
            else members[:0] for members in _shuffled_by_class(dataset, seed)]
    held_index = torch.cat(held).sort().values
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[held_index] = False
    return dataset.subset(keep.nonzero(as_tuple=True)[0]), dataset.subset(held_index)
