"""Classification with one context per class (CIFAR-10, digits) or per class cluster (CIFAR-100).

Inputs may have any shape (images, tabular rows, token sequences) and the network may be any
module with K outputs: the built-in GhostNet (``model="ghostnet"``), a registered name, an
import path ``package.module:callable`` or a callable, called as
``factory(num_outputs=K, input_shape=..., **model_options)``.

The paper's framing, which its Table 1 numbers fit exactly:

- RTL and multiple-IMP subnetworks are **binary one-vs-rest detectors**: subnetwork k reads
  output k of the network's K-way head as its detector logit and trains with binary
  cross-entropy on balanced batches (its own samples plus ``negative_ratio`` times as many drawn
  from the other contexts). The head is dense and shared; a subnetwork's loss touches only its
  own row of it, so each detector effectively owns a 1-output head. That is our reading of the
  "C-way head" in the paper's layer table.
- Dense and single-IMP are **one K-way softmax classifier** trained on all data. Both are scored
  one-vs-rest (a detector on the whole test set; the classifier from its confusion matrix) and
  macro-averaged over contexts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from torch import nn

from ..fingerprint import fingerprint
from ..errors import DataError
from ..data.labelled import LabelledDataset
from ..models import MODELS
from ..metrics import BinaryCounts, binary_counts, confusion_matrix, macro, one_vs_rest_from_confusion
from ..report import per_context_key
from ..training import Batch, Stream
from .base import RoutedPredict, Row, SharedPredict


@dataclass
class ClassificationTask:
    """Train/test examples, the class -> context map, the network, and how subnetworks see the data."""

    train_set: LabelledDataset
    test_set: LabelledDataset
    context_of_class: Sequence[int]
    context_names: Sequence[str]
    batch_size: int = 64
    negative_ratio: float = 1.0
    eval_batch_size: int = 1000
    model: str | Callable[..., nn.Module] = "ghostnet"  # a registered name, an import path or a factory
    model_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"width": 0.5} for GhostNet
    context_members: list[list[str]] | None = None  # class names of each context when contexts group classes
    partition: Any = None  # the contexts.Partition the grouping came from, saved beside the results
    calibration_set: LabelledDataset | None = None  # held out of the training data to calibrate the detectors
    shared_epoch_factor = 2  # a detector epoch shows each sample ~twice: the classifier trains twice as long
    # The context is the label: oracle routing hands the answer in, so an inferred router *is* a K-way
    # classifier (scored as one) and sending inputs to a wrong context on purpose measures nothing.
    context_is_label = True
    routers = ("detectors", "entropy", "learned")
    _scores: dict[tuple[int, str], tuple[RoutedPredict, torch.Tensor]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        num_classes = len(self.train_set.class_names)
        if len(self.context_of_class) != num_classes:
            raise ValueError(f"context_of_class has {len(self.context_of_class)} entries for {num_classes} classes")
        if len(self.context_names) < 2:
            raise DataError(f"classification needs at least 2 contexts (each detector needs negatives); got "
                            f"{list(self.context_names)}")
        lookup = torch.as_tensor(list(self.context_of_class), dtype=torch.long)
        if lookup.min() < 0 or lookup.max() >= len(self.context_names):
            raise ValueError(f"context ids must be in 0..{len(self.context_names) - 1}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not self.negative_ratio > 0:
            raise ValueError(f"negative_ratio must be > 0; got {self.negative_ratio}")
        self.train_context = lookup[self.train_set.labels]
        self.test_context = lookup[self.test_set.labels]
        self.calibration_context = None if self.calibration_set is None else lookup[self.calibration_set.labels]
        sizes = torch.bincount(self.train_context, minlength=self.num_contexts)
        empty = [self.context_names[k] for k in range(self.num_contexts) if sizes[k] == 0]
        if empty:
            raise ValueError(f"contexts with no training samples: {empty}")
        self.context_sizes = sizes.tolist()

    @property
    def num_contexts(self) -> int:
        return len(self.context_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_set.inputs.shape[1:])

    # -- the Task contract (tasks.base) ------------------------------------------------------
    def data_fingerprint(self) -> str:
        """The examples, the context map and how they are served (batching, negatives, the model asked for)."""
        model = self.model if isinstance(self.model, str) else f"{self.model.__module__}.{self.model.__qualname__}"
        splits = [d for d in (self.train_set, self.test_set, self.calibration_set) if d is not None]
        return fingerprint([(d.inputs, d.labels, list(d.class_names)) for d in splits],
                           list(self.context_of_class), list(self.context_names),
                           [self.batch_size, self.negative_ratio, model, dict(self.model_options)])

    def build_model(self) -> nn.Module:
        arguments = {"num_outputs": self.num_contexts, "input_shape": self.input_shape, **self.model_options}
        # by name: a factory that raises is named by the setting that chose it (registry.Registry.call)
        model = MODELS.call(self.model, **arguments) if isinstance(self.model, str) else self.model(**arguments)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {self.model!r} returned {type(model).__name__}, not an nn.Module")
        with torch.no_grad():  # a wrong head fails here, not after an hour of training
            out = model.eval()(self.train_set.inputs[:2])
        model.train()
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (min(2, len(self.train_set)), self.num_contexts):
            raise ValueError(f"model {self.model!r} must map rows of shape {self.input_shape} to "
                             f"{self.num_contexts} logits, one per context; got {tuple(getattr(out, 'shape', ()))}")
        return model

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        return model  # the classifier baselines use the same network (and θ₀) as the detectors

    def context_stream(self, k: int) -> Stream:
        return self.detector_stream(k)

    def shared_stream(self) -> Stream:
        return self.classifier_stream()

    def score_shared(self, predict: SharedPredict, label: str = "", outputs: Path | None = None) -> list[Row]:
        return [self.score_classifier(self.logits(predict))]

    def score_routed(self, predict: RoutedPredict, label: str = "", outputs: Path | None = None,
                     chosen: torch.Tensor | None = None) -> list[Row]:
        """The paper's scoring -- every detector on every test input -- or, given ``chosen`` (a context
        per test input from a router), the router's answer scored as a K-way classifier."""
        if chosen is not None:
            return [self.score_predictions(chosen)]
        return [self.score_detectors(self.detector_scores(predict, "test").unbind(1))]

    # -- deployment without an oracle (router.py, calibration.py) -----------------------------
    def context_examples(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and true contexts of ``split``: ``train``, ``test`` or ``calibration``."""
        if split == "train":
            return self.train_set.inputs, self.train_context
        if split == "test":
            return self.test_set.inputs, self.test_context
        if split == "calibration":
            if self.calibration_set is None or self.calibration_context is None:
                raise DataError("no calibration split: set data.calibration to a fraction of the training data "
                                "to hold out (e.g. 0.1)")
            return self.calibration_set.inputs, self.calibration_context
        raise ValueError(f"split must be train, test or calibration; got {split!r}")

    @torch.no_grad()
    def detector_scores(self, predict: RoutedPredict, split: str = "test") -> torch.Tensor:
        """(N, K) detector logits on ``split``: column k is subnetwork k's own output k."""
        key = (id(predict), split)
        if self._scores is not None and key in self._scores:
            return self._scores[key][1]
        inputs, _ = self.context_examples(split)
        scores = torch.stack([self.logits(lambda x: predict(k, x), inputs)[:, k] for k in range(self.num_contexts)], 1)
        if self._scores is not None:
            self._scores[key] = (predict, scores)  # holding predict keeps its id from being reused
        return scores

    @contextlib.contextmanager
    def reusing_scores(self) -> Iterator[None]:
        """Inside the block, ``detector_scores`` of one ``predict`` on one split are computed once.

        Scoring one method at one level asks for the same K passes over the test set for the
        paper's scoring, the argmax classifier and the calibrated detectors; the weights must
        not change inside the block (outside it, nothing is kept).
        """
        self._scores = {}
        try:
            yield
        finally:
            self._scores = None

    # -- what each subnetwork trains on -----------------------------------------------------
    def classifier_stream(self) -> Stream:
        """All training data, K-way cross-entropy over contexts (dense and single IMP)."""
        inputs, targets = self.train_set.inputs, self.train_context
        n = len(targets)

        def epoch(gen: torch.Generator) -> list[Batch]:
            order = torch.randperm(n, generator=gen)
            return _batches(inputs, order, targets[order], self.batch_size)

        return Stream("classifier", epoch, F.cross_entropy, -(-n // self.batch_size))

    def detector_stream(self, k: int) -> Stream:
        """Context k's samples (label 1) plus freshly drawn negatives (label 0) each epoch."""
        if not 0 <= k < self.num_contexts:
            raise ValueError(f"context id {k} is outside 0..{self.num_contexts - 1}")
        positives = (self.train_context == k).nonzero(as_tuple=True)[0]
        negatives = (self.train_context != k).nonzero(as_tuple=True)[0]
        num_neg = min(len(negatives), max(1, round(self.negative_ratio * len(positives))))
        n = len(positives) + num_neg
        inputs = self.train_set.inputs

        def epoch(gen: torch.Generator) -> list[Batch]:
            drawn = negatives[torch.randperm(len(negatives), generator=gen)[:num_neg]]
            index = torch.cat([positives, drawn])
            target = torch.cat([torch.ones(len(positives)), torch.zeros(num_neg)])
            order = torch.randperm(n, generator=gen)
            return _batches(inputs, index[order], target[order], self.batch_size)

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits[:, k], target)

        return Stream(self.context_names[k], epoch, loss, -(-n // self.batch_size))

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, predict: SharedPredict, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """K logits for every test example (or row of ``inputs``), computed in evaluation batches
        (``predict`` moves them to its device)."""
        inputs = self.test_set.inputs if inputs is None else inputs
        chunks = [predict(x).float().cpu() for x in inputs.split(self.eval_batch_size)]
        bad = [tuple(c.shape) for c in chunks if c.ndim != 2 or c.shape[1] != self.num_contexts]
        if bad:
            raise ValueError(f"the model must return (batch, {self.num_contexts}) logits, one per context; got {bad[0]}")
        return torch.cat(chunks)

    def score_classifier(self, logits: torch.Tensor) -> dict[str, float]:
        """One-vs-rest metrics of a K-way classifier from its confusion matrix, macro-averaged."""
        return self.score_predictions(logits.argmax(dim=1))

    def score_predictions(self, predicted: torch.Tensor) -> dict[str, float]:
        """One-vs-rest metrics of a K-way answer per test example (a classifier's, or a router's)."""
        cm = confusion_matrix(torch.as_tensor(predicted).long().cpu(), self.test_context, self.num_contexts)
        return _with_per_context(one_vs_rest_from_confusion(cm))

    def score_detectors(self, detector_logits: Sequence[torch.Tensor]) -> dict[str, float]:
        """Macro one-vs-rest metrics of K detectors; ``detector_logits[k]`` is detector k's (N,) logits."""
        per_context: list[BinaryCounts] = [
            binary_counts(logit > 0, self.test_context == k) for k, logit in enumerate(detector_logits)
        ]
        return _with_per_context(per_context)


def _with_per_context(per_context: list[BinaryCounts]) -> dict[str, float]:
    """The macro averages plus each context's balanced accuracy (``balanced_accuracy_context_k``)."""
    row = macro(per_context)
    row.update({per_context_key("balanced_accuracy", k): c.balanced_accuracy for k, c in enumerate(per_context)})
    return row


def _batches(inputs: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, batch_size: int) -> list[Batch]:
    """Consecutive batches of ``(inputs[index], targets)``; ``targets[j]`` belongs to ``index[j]``."""
    return list(zip((inputs[i] for i in index.split(batch_size)), targets.split(batch_size)))
