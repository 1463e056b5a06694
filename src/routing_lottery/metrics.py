"""Evaluation metrics, one-vs-rest per context and macro-averaged (the paper's Table 1 framing).

A context's detector is scored on the whole test set: positives are that context's samples.
A K-way classifier is scored the same way from its confusion matrix, so its recall per class is
that class's accuracy and its macro recall is the (balanced) top-1 accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BinaryCounts:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def balanced_accuracy(self) -> float:
        return (self.recall + self.specificity) / 2


def _ratio(num: int, den: int) -> float:
    # An empty denominator (no predicted positives) scores 0, as scikit-learn's zero_division=0.
    return num / den if den else 0.0


def binary_counts(predicted: torch.Tensor, actual: torch.Tensor) -> BinaryCounts:
    """Confusion counts of two bool tensors of the same shape."""
    if predicted.shape != actual.shape:
        raise ValueError(f"predicted shape {tuple(predicted.shape)} != actual shape {tuple(actual.shape)}")
    p, a = predicted.bool(), actual.bool()
    return BinaryCounts(tp=int((p & a).sum()), fp=int((p & ~a).sum()), fn=int((~p & a).sum()), tn=int((~p & ~a).sum()))


def one_vs_rest_from_confusion(confusion: torch.Tensor) -> list[BinaryCounts]:
    """Per-class one-vs-rest counts from a K×K confusion matrix (rows: true, columns: predicted)."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be square; got shape {tuple(confusion.shape)}")
    c = confusion.long()
    total = int(c.sum())
    out = []
    for k in range(c.shape[0]):
        tp = int(c[k, k])
        fn = int(c[k].sum()) - tp
        fp = int(c[:, k].sum()) - tp
        out.append(BinaryCounts(tp=tp, fp=fp, fn=fn, tn=total - tp - fn - fp))
    return out


def confusion_matrix(predicted: torch.Tensor, actual: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×K counts, rows true class, columns predicted class."""
    index = actual.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro(per_context: list[BinaryCounts]) -> dict[str, float]:
    """Macro average over contexts of balanced accuracy, precision and recall."""
    n = len(per_context)
    if n == 0:
        raise ValueError("no contexts to average")
    return {
        "balanced_accuracy": sum(c.balanced_accuracy for c in per_context) / n,
        "precision": sum(c.precision for c in per_context) / n,
        "recall": sum(c.recall for c in per_context) / n,
    }
