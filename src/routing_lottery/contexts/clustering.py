"""Contexts from class names: UMAP then HDBSCAN over name embeddings, with fixed seeds.

The paper builds its 8 CIFAR-100 contexts by embedding the class names with CLIP's text encoder,
reducing with UMAP and clustering with HDBSCAN; it does not publish the settings. This module
does the same with every choice explicit and recorded in the result:

Reduction
    umap-learn, ``metric="cosine"`` on unit vectors, ``min_dist=0`` (packs clusters tightly,
    which is what a density clusterer wants), ``random_state=seed`` (this also makes UMAP
    single-threaded, the price of determinism). The exact k-nearest-neighbour graph is computed
    here with numpy and handed to UMAP as ``precomputed_knn``: for fewer than 4,096 points UMAP
    would build the same exact graph itself (checked: same fuzzy graph to 1e-6), but through
    numba-parallel code that costs about 15 s of compilation on the first call in every process
    (measured on a loaded 2-core machine; about 9 s of compilation remain for the rest of UMAP). The result depends only on the inputs, the seed and the numba/umap versions.
Clustering
    scikit-learn's ``HDBSCAN`` on the reduced points (Euclidean, UMAP's output space).
Noise
    HDBSCAN labels points in no dense region -1. Every class must belong to a context, so each
    noise point is reassigned to the cluster whose centroid (mean of its non-noise members) is
    nearest in the *reduced* space, Euclidean -- the space and metric the clusters were found in.
    Ties go to the lower cluster index. The reassigned names are kept in the result.
Cluster numbering
    Clusters are renumbered in order of first appearance in ``names``, so the same clustering
    always prints and saves the same way whatever numbering HDBSCAN used internally.
Target count
    :func:`search_for_count` scans a fixed grid (:class:`SearchGrid`) and, among the settings
    that give exactly the asked count, keeps the one whose final partition has the highest
    silhouette (cosine) in the original embedding space -- one yardstick for all candidates,
    whatever their UMAP dimension -- then fewest noise points, then earliest in grid order.
    If none gives it, it either runs Ward agglomerative clustering with the asked count on the
    reduced points of the closest setting (default) or returns the closest HDBSCAN result; the
    choice and the outcome are recorded in ``settings["search"]``.

The result is a :class:`~.partitions.Partition`. The type, the shipped reference partitions and
the scores against them (:func:`~.partitions.reference_scores`) live in :mod:`.partitions`,
which imports none of the above, so reading or scoring a saved partition loads neither UMAP
nor a text encoder.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .encoders import MiniLMEncoder, TextEncoder, embed_names
from .partitions import Partition

SUPPORTED_METRICS: tuple[str, ...] = ("cosine", "euclidean")
NOISE_RULE = "nearest centroid of non-noise members in the UMAP space (Euclidean); ties -> lower index"
SEARCH_RULE = (
    "closest cluster count to target (exact first), then highest silhouette (cosine, original "
    "embedding space, after noise reassignment), then fewest HDBSCAN noise points, then earliest "
    "in grid order (n_neighbors, n_components, min_cluster_size, min_samples, "
    "cluster_selection_method)"
)


# -- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UmapSettings:
    """How names are reduced before clustering (umap-learn)."""

    n_neighbors: int = 15  # neighbourhood size: small keeps local structure, large global
    n_components: int = 5  # dimension HDBSCAN clusters in
    min_dist: float = 0.0  # 0 packs neighbours together; good for density clustering
    metric: str = "cosine"  # on unit vectors: compares directions, as text embeddings mean
    # (one of SUPPORTED_METRICS: the ones the exact neighbour graph below implements)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HdbscanSettings:
    """How reduced points are clustered (sklearn.cluster.HDBSCAN)."""

    min_cluster_size: int = 5  # smallest group HDBSCAN calls a cluster
    min_samples: int | None = None  # density smoothing; None = min_cluster_size
    cluster_selection_method: Literal["eom", "leaf"] = "eom"  # eom: stable big; leaf: fine-grained

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SearchGrid:
    """The settings :func:`search_for_count` tries, in this nested order (first field outermost).

    The default spans the usual UMAP neighbourhoods and dimensions and HDBSCAN sizes from pairs
    to groups of ten, with both selection methods: 12 UMAP fits (about 0.1 s each for 100 names
    once numba has compiled) and 840 HDBSCAN fits (milliseconds each).
    """

    n_neighbors: tuple[int, ...] = (15, 10, 5, 30)
    n_components: tuple[int, ...] = (5, 10, 2)
    min_cluster_size: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10)
    min_samples: tuple[int | None, ...] = (None, 1, 2, 3, 5)
    cluster_selection_method: tuple[Literal["eom", "leaf"], ...] = ("eom", "leaf")
    min_dist: float = 0.0
    metric: str = "cosine"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


# -- building blocks -------------------------------------------------------------------------
def _relabel_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber non-negative labels 0, 1, ... in order of first appearance; -1 stays -1."""
    out = np.full_like(labels, -1)
    mapping: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        if lab >= 0:
            out[i] = mapping.setdefault(lab, len(mapping))
    return out


def reassign_noise(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Give every noise point (label -1) the label of the nearest cluster centroid.

    Centroids are the means of each cluster's non-noise members in ``points``; distance is
    Euclidean; ties go to the lower label. Non-noise labels are returned unchanged.

    Parameters
    ----------
    points:
        (N, d) coordinates the clusters were found in.
    labels:
        (N,) ints: -1 for noise, otherwise 0..K-1 with every value used.

    Returns
    -------
    (N,) int64 labels with no -1.

    >>> reassign_noise(np.array([[0.0], [1.0], [10.0], [11.0], [7.0]]), np.array([0, 0, 1, 1, -1]))
    array([0, 0, 1, 1, 1])
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if points.ndim != 2 or labels.shape != (points.shape[0],):
        raise ValueError(
            f"points must be (N, d) and labels (N,); got {points.shape} and {labels.shape}"
        )
    k = int(labels.max()) + 1 if labels.size else 0
    if k == 0:
        raise ValueError("every point is noise: there is no cluster to reassign noise to")
    if labels.min() < -1 or set(labels[labels >= 0].tolist()) != set(range(k)):
        raise ValueError(f"labels must be -1 or 0..K-1 with every cluster used; got {sorted(set(labels.tolist()))}")
    out = labels.copy()
    noise = labels < 0
    if noise.any():
        centroids = np.stack([points[labels == c].mean(axis=0) for c in range(k)])
        dist = ((points[noise, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
        out[noise] = dist.argmin(axis=1)  # argmin takes the first minimum: ties -> lower label
    return out


def _check_inputs(embeddings: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    x = np.asarray(embeddings, dtype=np.float32)
    names = tuple(names)
    if x.ndim != 2 or x.shape[0] != len(names):
        raise ValueError(
            f"embeddings must be (len(names), d) = ({len(names)}, d); got {x.shape}"
        )
    if len(names) < 4:
        raise ValueError(f"need at least 4 names to cluster; got {len(names)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf")
    return x, names


def _distances(x: np.ndarray, metric: str) -> np.ndarray:
    """All pairwise distances (float64, zero diagonal) under ``metric``."""
    x = x.astype(np.float64)
    if metric == "cosine":
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1.0 - unit @ unit.T
    elif metric == "euclidean":
        sq = (x * x).sum(axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    else:
        raise ValueError(f"metric={metric!r}: expected one of {', '.join(SUPPORTED_METRICS)}")
    d = np.clip(d, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return d


def _exact_knn(x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row, itself first, as UMAP's small-data path has it."""
    d = _distances(x, metric)
    order = d.copy()
    np.fill_diagonal(order, -1.0)  # self first even when a duplicate name ties at distance 0
    # A stable sort keeps equal distances in index order, so ties cannot vary between runs.
    idx = np.argsort(order, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, idx, axis=1)
    return idx.astype(np.int32), dist.astype(np.float32)


def _reduce(x: np.ndarray, umap: UmapSettings, seed: int) -> np.ndarray:
    n = x.shape[0]
    if not 2 <= umap.n_neighbors < n:
        raise ValueError(f"umap.n_neighbors={umap.n_neighbors}: expected 2 <= n_neighbors < {n} (the number of names)")
    if not 1 <= umap.n_components < n - 1:
        raise ValueError(f"umap.n_components={umap.n_components}: expected 1 <= n_components < {n - 1}")
    import umap as umap_learn  # slow to import (numba); only when clustering actually runs

    knn_indices, knn_dists = _exact_knn(x, umap.n_neighbors, umap.metric)
    reducer = umap_learn.UMAP(
        n_neighbors=umap.n_neighbors,
        n_components=umap.n_components,
        min_dist=umap.min_dist,
        metric=umap.metric,
        random_state=seed,
        n_jobs=1,  # what random_state implies anyway; saying it silences umap's warning
        precomputed_knn=(knn_indices, knn_dists, None),
    )
    with warnings.catch_warnings():
        # Without a search index UMAP cannot transform new points; we never do, so its
        # warning about that is not for our users.
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def _hdbscan(points: np.ndarray, settings: HdbscanSettings) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    n = points.shape[0]
    if not 2 <= settings.min_cluster_size <= n:
        raise ValueError(f"hdbscan.min_cluster_size={settings.min_cluster_size}: expected 2..{n}")
    if settings.min_samples is not None and not 1 <= settings.min_samples <= n:
        raise ValueError(f"hdbscan.min_samples={settings.min_samples}: expected None or 1..{n}")
    model = HDBSCAN(
        min_cluster_size=settings.min_cluster_size,
        min_samples=settings.min_samples,
        cluster_selection_method=settings.cluster_selection_method,
        copy=True,
    )
    return _relabel_by_first_appearance(np.asarray(model.fit_predict(points), dtype=np.int64))


def _silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette under precomputed ``distances``; -1 (worst) where it is undefined.

    Rounded to 9 decimals so two settings that give the same partition tie exactly.
    """
    from sklearn.metrics import silhouette_score

    k = len(set(labels.tolist()))
    if not 2 <= k <= len(labels) - 1:
        return -1.0
    return round(float(silhouette_score(distances, labels, metric="precomputed")), 9)


def _hdbscan_partition(
    x: np.ndarray,
    names: tuple[str, ...],
    reduced: np.ndarray,
    labels: np.ndarray,
    umap: UmapSettings,
    hdbscan: HdbscanSettings,
    seed: int,
    extra: Mapping[str, Any] | None = None,
) -> Partition:
    k = int(labels.max()) + 1
    if k == 0:
        raise ValueError(
            f"HDBSCAN found no cluster with {hdbscan}: every name is noise; lower "
            "min_cluster_size/min_samples or use search_for_count"
        )
    noise = tuple(n for n, lab in zip(names, labels.tolist()) if lab < 0)
    final = _relabel_by_first_appearance(reassign_noise(reduced, labels))
    settings: dict[str, Any] = {
        "method": "umap+hdbscan",
        "seed": seed,
        "umap": umap.to_dict(),
        "hdbscan": hdbscan.to_dict(),
        "hdbscan_clusters": k,
        "hdbscan_noise": len(noise),
        "noise_rule": NOISE_RULE,
        "silhouette_cosine": _silhouette(_distances(x, "cosine"), final),
    }
    settings.update(extra or {})
    return Partition(names, tuple(final.tolist()), settings=settings, noise_reassigned=noise)


# -- public pipeline -------------------------------------------------------------------------
def cluster_names(
    embeddings: np.ndarray,
    names: Sequence[str],
    *,
    umap: UmapSettings = UmapSettings(),
    hdbscan: HdbscanSettings = HdbscanSettings(),
    seed: int = 0,
) -> Partition:
    """Cluster class names from their embeddings: UMAP, then HDBSCAN, then noise reassignment.

    Parameters
    ----------
    embeddings:
        (N, d) name embeddings, one row per name (unit rows, as from ``embed_names``).
    names:
        The N class names, in the order of the rows.
    umap, hdbscan:
        Settings of the two stages; the defaults are common choices, not tuned to a count.
    seed:
        UMAP's ``random_state``. The same inputs and seed give the same partition.

    Returns
    -------
    A :class:`Partition` whose ``settings`` record all of the above and the noise rule.

    Example
    -------
    >>> part = cluster_names(embed_names(CIFAR100_FINE), CIFAR100_FINE, seed=0)  # doctest: +SKIP
    >>> print(format_partition(part))  # doctest: +SKIP
    """
    x, names = _check_inputs(embeddings, names)
    reduced = _reduce(x, umap, seed)
    return _hdbscan_partition(x, names, reduced, _hdbscan(reduced, hdbscan), umap, hdbscan, seed)


def search_for_count(
    embeddings: np.ndarray,
    names: Sequence[str],
    target: int,
    *,
    seed: int = 0,
    grid: SearchGrid = SearchGrid(),
    fallback: Literal["agglomerative", "closest"] = "agglomerative",
) -> Partition:
    """Find UMAP/HDBSCAN settings that split ``names`` into exactly ``target`` clusters.

    Every combination in ``grid`` is tried (UMAP once per (n_neighbors, n_components), HDBSCAN
    on each reduction); combinations the data is too small for (n_neighbors >= N, ...) are
    skipped. Among those giving exactly ``target`` clusters the winner is the one whose final
    partition (noise reassigned) has the highest silhouette under cosine distance in the
    *original* embedding space: one yardstick for every candidate, whatever its UMAP dimension,
    and it rewards clusters that are coherent in what the encoder actually says about the names.
    Ties (different settings often give the same partition) go to fewer noise points, then to
    the earliest in grid order. Exhaustive rather than first-hit, so the answer does not hinge on
    how the grid happens to be ordered.

    If nothing gives ``target``: the setting with the closest count (then the same tie-breaks)
    is taken, and with ``fallback="agglomerative"`` (default) its reduced points
    are split into exactly ``target`` clusters by Ward agglomerative clustering; with
    ``"closest"`` its HDBSCAN partition is returned as is. ``settings["search"]`` says which
    happened (``outcome``: ``exact``, ``agglomerative`` or ``closest``), how many settings were
    tried and how many hit the target.

    Parameters
    ----------
    embeddings, names:
        As for :func:`cluster_names`.
    target:
        Wanted number of contexts, 1..N.
    seed:
        UMAP's ``random_state`` for every reduction.
    grid:
        The settings to scan.
    fallback:
        What to do when no setting hits ``target`` exactly.

    Example
    -------
    >>> part = search_for_count(embed_names(CIFAR100_FINE), CIFAR100_FINE, 8)  # doctest: +SKIP
    >>> part.n_clusters, part.settings["search"]["outcome"]  # doctest: +SKIP
    (8, 'exact')
    """
    x, names = _check_inputs(embeddings, names)
    n = len(names)
    if not 1 <= int(target) <= n:
        raise ValueError(f"target={target}: expected 1..{n} (the number of names)")
    if fallback not in ("agglomerative", "closest"):
        raise ValueError(f"fallback={fallback!r}: expected 'agglomerative' or 'closest'")

    distances = _distances(x, "cosine")  # the one space every candidate is judged in
    # Ranking key, smaller is better: (|count - target|, -silhouette, noise, grid index).
    # The grid index makes the order total, so the winner never depends on float ties.
    best_key: tuple[int, float, int, int] | None = None
    best: tuple[UmapSettings, HdbscanSettings, np.ndarray, np.ndarray] | None = None
    tried = hits = 0
    index = -1
    hdbscan_grid = list(
        itertools.product(grid.min_cluster_size, grid.min_samples, grid.cluster_selection_method)
    )
    for n_neighbors, n_components in itertools.product(grid.n_neighbors, grid.n_components):
        if not (2 <= n_neighbors < n and 1 <= n_components < n - 1):
            index += len(hdbscan_grid)  # grid indices count skipped points too, so they stay stable
            continue
        umap = UmapSettings(n_neighbors, n_components, grid.min_dist, grid.metric)
        with warnings.catch_warnings():
            # A scan visits settings that are poor for these data (e.g. spectral init falling
            # back to random on a disconnected graph); such warnings say nothing about the
            # setting finally chosen.
            warnings.simplefilter("ignore", UserWarning)
            reduced = _reduce(x, umap, seed)
        for mcs, ms, method in hdbscan_grid:
            index += 1
            if not 2 <= mcs <= n or (ms is not None and not 1 <= ms <= n):
                continue
            hdb = HdbscanSettings(mcs, ms, method)
            labels = _hdbscan(reduced, hdb)
            tried += 1
            count = int(labels.max()) + 1
            if count == 0:
                continue
            hits += count == target
            gap = abs(count - target)
            if best_key is not None and gap > best_key[0]:
                continue  # cannot win; skip the silhouette
            final = reassign_noise(reduced, labels)
            key = (gap, -_silhouette(distances, final), int((labels < 0).sum()), index)
            if best_key is None or key < best_key:
                best_key, best = key, (umap, hdb, reduced, labels)
    if best is None or best_key is None:
        raise ValueError(
            f"no grid setting could run on {n} names (or every one left all names as noise); "
            "give a grid with smaller n_neighbors / min_cluster_size"
        )
    umap, hdb, reduced, labels = best
    count = int(labels.max()) + 1
    search: dict[str, Any] = {
        "target": int(target),
        "rule": SEARCH_RULE,
        "grid": grid.to_dict(),
        "tried": tried,
        "exact_hits": hits,
        "chosen_grid_index": best_key[3],
        "fallback": fallback,
    }
    if count == target:
        search["outcome"] = "exact"
    elif fallback == "closest":
        search.update(outcome="closest", closest_count=count)
    else:
        from sklearn.cluster import AgglomerativeClustering

        search.update(outcome="agglomerative", closest_count=count)
        ward = AgglomerativeClustering(n_clusters=int(target), linkage="ward").fit_predict(reduced)
        final = _relabel_by_first_appearance(np.asarray(ward, dtype=np.int64))
        settings = {
            "method": "umap+agglomerative",
            "seed": seed,
            "umap": umap.to_dict(),
            "agglomerative": {"linkage": "ward", "n_clusters": int(target)},
            "closest_hdbscan": hdb.to_dict(),
            "silhouette_cosine": _silhouette(distances, final),
            "search": search,
        }
        return Partition(names, tuple(final.tolist()), settings=settings)
    return _hdbscan_partition(x, names, reduced, labels, umap, hdb, seed, {"search": search})


def partition_names(
    names: Sequence[str],
    *,
    encoder: TextEncoder | None = None,
    template: str | None = None,
    target: int | None = None,
    seed: int = 0,
    umap: UmapSettings = UmapSettings(),
    hdbscan: HdbscanSettings = HdbscanSettings(),
    grid: SearchGrid = SearchGrid(),
    fallback: Literal["agglomerative", "closest"] = "agglomerative",
) -> Partition:
    """The whole pipeline: embed ``names`` offline, then cluster (or search for ``target``).

    ``encoder`` defaults to the MiniLM encoder (see ``encoders.make_encoder``). With ``target``
    the ``umap``/``hdbscan`` arguments are ignored and :func:`search_for_count` scans ``grid``.
    The encoder's name and the template are added to ``settings``.
    """
    encoder = MiniLMEncoder() if encoder is None else encoder
    x = embed_names(names, encoder, template=template)
    if target is None:
        part = cluster_names(x, names, umap=umap, hdbscan=hdbscan, seed=seed)
    else:
        part = search_for_count(x, names, target, seed=seed, grid=grid, fallback=fallback)
    settings = {"encoder": encoder.name, "template": template, "embedding_dim": int(x.shape[1])}
    settings.update(part.settings)
    return dataclasses.replace(part, settings=settings)
