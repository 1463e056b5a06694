"""Mask similarity: K×K Jaccard matrices per layer and over all weights, and per-subnetwork scores.

The paper's diagnostic is the overlap of the K tickets. Two summaries matter:

* a subnetwork's **similarity score**: the mean Jaccard of its mask with every *other* mask.
  It needs no labels, so it can be watched during a sparsity sweep (see ``collapse``);
* a layer's **mean off-diagonal similarity**: how much the contexts share that layer (the paper
  reports about 0.86 in shallow layers and 0.31 in deep ones on CIFAR-10).

The diagonal (a mask with itself, always 1) is excluded from both, otherwise every score would be
pulled towards 1 by 1/K. The Jaccard arithmetic itself lives in ``MaskSet.jaccard_matrix``.
"""

from __future__ import annotations

import csv
import io as _io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_json, atomic_write_text
from ..masks import MaskSet

ALL_WEIGHTS = "all"
"""Key of the matrix over all prunable weights, beside the per-layer keys."""

DEPTH_GROUPS = ("shallow", "middle", "deep")


def _square(matrix: Any, name: str = "matrix") -> np.ndarray:
    """``matrix`` as a float64 K×K array, or a ``ValueError`` naming ``name``."""
    m = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square K×K matrix; got shape {m.shape}")
    return m


def similarity_scores(matrix: Any) -> np.ndarray:
    """Each subnetwork's similarity score: row mean of a K×K similarity matrix without its diagonal.

    Parameters
    ----------
    matrix : K×K array-like (numpy or torch), K ≥ 2.

    Returns
    -------
    (K,) float64 array; entry k = mean_{j≠k} matrix[k, j].

    Example
    -------
    >>> similarity_scores([[1, .5, 0], [.5, 1, .25], [0, .25, 1]]).tolist()
    [0.25, 0.375, 0.125]
    """
    m = _square(matrix)
    k = m.shape[0]
    if k < 2:
        raise ValueError(f"a similarity score needs at least 2 contexts; the matrix is {k}×{k}")
    off = ~np.eye(k, dtype=bool)
    return np.array([m[i, off[i]].mean() for i in range(k)])


def mean_off_diagonal(matrix: Any) -> float:
    """Mean of the K(K-1) off-diagonal entries: how much the contexts share, on average."""
    return float(similarity_scores(matrix).mean())


def jaccard_matrices(masks: MaskSet) -> dict[str, np.ndarray]:
    """Per prunable tensor (model order), the K×K Jaccard matrix of the K masks, as float64."""
    return {name: masks.jaccard_matrix(name).double().numpy() for name in masks.tensor_names}


def depth_groups(layer_names: Sequence[str]) -> dict[str, list[str]]:
    """Split layers, in the given (model) order, into thirds: shallow, middle, deep.

    ``numpy.array_split`` semantics: when the count is not divisible by 3 the earlier groups get
    the extra layer. Empty groups (fewer than 3 layers) are left out.
    """
    parts = np.array_split(np.arange(len(layer_names)), 3)
    return {g: [layer_names[i] for i in idx] for g, idx in zip(DEPTH_GROUPS, parts) if len(idx)}


def safe_file_stem(name: str) -> str:
    """A tensor name as a portable file-name fragment (``features.0.weight`` stays readable)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "tensor"


def matrix_csv(matrix: Any, names: Sequence[str]) -> str:
    """A K×K matrix as CSV text with the context names as header row and first column."""
    m = _square(matrix)
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} names for a {m.shape[0]}×{m.shape[0]} matrix")
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["context", *names])
    for name, row in zip(names, m):
        writer.writerow([name, *(_fmt(v) for v in row)])
    return buffer.getvalue()


def _fmt(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.6g}"


def _json_number(value: float) -> float | None:
    # JSON has no NaN; a missing value is clearer than an invalid file.
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class SimilarityReport:
    """Jaccard matrices of one MaskSet and the summaries the paper reads from them.

    Attributes
    ----------
    context_names : the K contexts, in mask order.
    layer_names : prunable tensors in model order (the order defines depth).
    overall : K×K Jaccard over all prunable weights.
    per_layer : tensor name -> K×K Jaccard over that tensor.
    sparsity : per context, the fraction of prunable weights its mask removes.
    """

    context_names: tuple[str, ...]
    layer_names: tuple[str, ...]
    overall: np.ndarray
    per_layer: Mapping[str, np.ndarray]
    sparsity: tuple[float, ...]

    @property
    def scores(self) -> np.ndarray:
        """(K,) global similarity score of each subnetwork."""
        return similarity_scores(self.overall)

    @property
    def mean_score(self) -> float:
        """Mean of the K global scores (= mean off-diagonal Jaccard): the sweep's label-free score."""
        return mean_off_diagonal(self.overall)

    @property
    def layer_scores(self) -> dict[str, np.ndarray]:
        """Per layer, the (K,) similarity score of each subnetwork within that layer."""
        return {n: similarity_scores(self.per_layer[n]) for n in self.layer_names}

    @property
    def layer_mean(self) -> dict[str, float]:
        """Per layer, the mean off-diagonal Jaccard (paper: ~0.86 shallow, ~0.31 deep on CIFAR-10)."""
        return {n: mean_off_diagonal(self.per_layer[n]) for n in self.layer_names}

    @property
    def group_mean(self) -> dict[str, float]:
        """Mean of ``layer_mean`` over the shallow / middle / deep thirds of the layers."""
        means = self.layer_mean
        return {g: float(np.mean([means[n] for n in names])) for g, names in depth_groups(self.layer_names).items()}

    def matrices(self) -> dict[str, np.ndarray]:
        """``{"all": overall, <layer>: matrix, ...}``: every matrix under one key each."""
        return {ALL_WEIGHTS: self.overall, **{n: self.per_layer[n] for n in self.layer_names}}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes ``None``); ``from_dict`` reads it back."""
        groups = {n: g for g, names in depth_groups(self.layer_names).items() for n in names}
        layer_scores, layer_mean = self.layer_scores, self.layer_mean

        def block(matrix: np.ndarray, scores: np.ndarray, mean: float) -> dict[str, Any]:
            return {
                "mean_off_diagonal": _json_number(mean),
                "scores": [_json_number(v) for v in scores],
                "matrix": [[_json_number(v) for v in row] for row in matrix],
            }

        return {
            "context_names": list(self.context_names),
            "sparsity": [float(s) for s in self.sparsity],
            "all_weights": block(self.overall, self.scores, self.mean_score),
            "layers": [
                {"name": n, "depth": i, "group": groups[n], **block(self.per_layer[n], layer_scores[n], layer_mean[n])}
                for i, n in enumerate(self.layer_names)
            ],
            "group_mean": {g: _json_number(v) for g, v in self.group_mean.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimilarityReport:
        """Inverse of ``to_dict`` (a ``similarity.json`` written by ``write``)."""

        def arr(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
            return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)

        layers = list(data["layers"])
        return cls(
            context_names=tuple(data["context_names"]),
            layer_names=tuple(layer["name"] for layer in layers),
            overall=arr(data["all_weights"]["matrix"]),
            per_layer={layer["name"]: arr(layer["matrix"]) for layer in layers},
            sparsity=tuple(float(s) for s in data["sparsity"]),
        )

    def scores_csv(self) -> str:
        """One row per context: its sparsity, global score, and score within each layer."""
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["context", "sparsity", ALL_WEIGHTS, *self.layer_names])
        layer_scores = self.layer_scores
        for k, name in enumerate(self.context_names):
            row = [self.scores[k], *(layer_scores[n][k] for n in self.layer_names)]
            writer.writerow([name, _fmt(self.sparsity[k]), *(_fmt(v) for v in row)])
        return buffer.getvalue()

    def layers_csv(self) -> str:
        """One row per layer in depth order: index, name, depth group, mean off-diagonal Jaccard."""
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["depth", "layer", "group", "mean_off_diagonal"])
        groups = {n: g for g, names in depth_groups(self.layer_names).items() for n in names}
        for i, (n, mean) in enumerate(self.layer_mean.items()):
            writer.writerow([i, n, groups[n], _fmt(mean)])
        writer.writerow(["", ALL_WEIGHTS, "", _fmt(self.mean_score)])
        return buffer.getvalue()

    def matrix_file_names(self) -> dict[str, str]:
        """Key of ``matrices()`` -> CSV file name; layers are numbered so names stay unique and ordered."""
        names = {ALL_WEIGHTS: "jaccard_all.csv"}
        names.update({n: f"jaccard_{i:02d}_{safe_file_stem(n)}.csv" for i, n in enumerate(self.layer_names)})
        return names

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write ``similarity.json``, ``similarity_scores.csv``, ``layer_similarity.csv`` and one
        ``jaccard_*.csv`` per matrix into ``directory`` (atomically); return key -> path."""
        directory = Path(directory)
        paths = {
            "json": directory / "similarity.json",
            "scores": directory / "similarity_scores.csv",
            "layers": directory / "layer_similarity.csv",
        }
        atomic_write_json(paths["json"], self.to_dict())
        atomic_write_text(paths["scores"], self.scores_csv())
        atomic_write_text(paths["layers"], self.layers_csv())
        matrices = self.matrices()
        for key, file_name in self.matrix_file_names().items():
            paths[f"matrix:{key}"] = directory / file_name
            atomic_write_text(paths[f"matrix:{key}"], matrix_csv(matrices[key], self.context_names))
        return paths


def similarity_report(masks: MaskSet) -> SimilarityReport:
    """Jaccard matrices (per layer and over all weights) and scores of a MaskSet with K ≥ 2.

    Example
    -------
    >>> import torch
    >>> s = MaskSet({"w": torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)}, ["a", "b"])
    >>> round(similarity_report(s).mean_score, 4)
    0.3333
    """
    if masks.num_contexts < 2:
        raise ValueError(f"similarity needs at least 2 contexts; the MaskSet has {masks.num_contexts}")
    total = masks.size()
    return SimilarityReport(
        context_names=tuple(masks.context_names),
        layer_names=tuple(masks.tensor_names),
        overall=masks.jaccard_matrix(None).double().numpy(),
        per_layer=jaccard_matrices(masks),
        sparsity=tuple(1.0 - c / total for c in masks.counts()),
    )
