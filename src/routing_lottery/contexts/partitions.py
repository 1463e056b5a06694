"""Partitions of class names into contexts: the result type, the shipped references, the scores.

A :class:`Partition` says which context each class name belongs to. It is what the clustering
(:mod:`.clustering`) produces, what ``partition.json`` stores, and what the experiment runner and
the CLI read back to map labels to contexts. This module holds everything needed to build, save,
load, compare and print partitions -- the type, the reference partitions shipped with the
library (the paper's 8 CIFAR-100 clusters and CIFAR-100's 20 superclasses), the adjusted Rand
index and the text format -- and nothing of the clustering itself, so reading or scoring a
partition never imports UMAP (numba), the text encoders or their models.

Every partition can be scored with the adjusted Rand index against the paper's 8 clusters and
CIFAR-100's 20 superclasses (:func:`reference_scores`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import CheckpointError, atomic_write_json, read_json
from .names import CIFAR100_COARSE, CIFAR100_FINE, CIFAR100_SUPERCLASSES, PAPER_CIFAR100_CLUSTERS

PARTITION_FORMAT = "routing-lottery/partition"
PARTITION_VERSION = 1
PARTITION_FILE = "partition.json"
REFERENCES: tuple[str, ...] = ("paper", "superclasses")


# -- the result type -------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    """Class names split into contexts: ``assignment[i]`` is the context of ``names[i]``.

    Contexts are numbered 0..K-1 and none is empty. ``settings`` records how the partition was
    made (method, UMAP/HDBSCAN settings, seed, encoder, search outcome) so a saved partition
    explains itself; it is normalised through JSON on construction, so it must be
    JSON-serialisable and compares equal after a save/load round trip. ``noise_reassigned``
    lists the names HDBSCAN left as noise and the noise rule then placed. ``titles`` optionally
    names each context (the paper's clusters and the superclasses have names).
    """

    names: tuple[str, ...]
    assignment: tuple[int, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    noise_reassigned: tuple[str, ...] = ()
    titles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        assignment = tuple(int(a) for a in self.assignment)
        if len(names) != len(assignment):
            raise ValueError(
                f"names has {len(names)} entries but assignment has {len(assignment)}; "
                "expected one context per name"
            )
        if not names:
            raise ValueError("a partition needs at least one name")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"names contains duplicates: {dup}")
        k = max(assignment) + 1
        if min(assignment) < 0 or set(assignment) != set(range(k)):
            raise ValueError(
                f"assignment must use every context 0..K-1 and nothing else; got "
                f"{sorted(set(assignment))}"
            )
        titles = tuple(str(t) for t in self.titles)
        if titles and len(titles) != k:
            raise ValueError(f"titles has {len(titles)} entries for {k} contexts")
        noise = tuple(str(n) for n in self.noise_reassigned)
        unknown = sorted(set(noise) - set(names))
        if unknown:
            raise ValueError(f"noise_reassigned names not in names: {unknown}")
        try:
            settings = json.loads(json.dumps(dict(self.settings)))
        except TypeError as err:
            raise ValueError(f"settings must be JSON-serialisable: {err}") from None
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "assignment", assignment)
        object.__setattr__(self, "titles", titles)
        object.__setattr__(self, "noise_reassigned", noise)
        object.__setattr__(self, "settings", settings)

    @property
    def n_clusters(self) -> int:
        """Number of contexts K."""
        return max(self.assignment) + 1

    def clusters(self) -> tuple[tuple[str, ...], ...]:
        """Members of each context, in context order; members keep the order of ``names``."""
        groups: list[list[str]] = [[] for _ in range(self.n_clusters)]
        for name, a in zip(self.names, self.assignment):
            groups[a].append(name)
        return tuple(tuple(g) for g in groups)

    def context_of(self, name: str) -> int:
        """The context index of one class name."""
        try:
            return self.assignment[self.names.index(name)]
        except ValueError:
            raise KeyError(f"{name!r} is not in this partition") from None

    def contexts_for(self, class_names: Sequence[str]) -> tuple[int, ...]:
        """Context of each class in a dataset's label order (``class_names[label]``).

        This is what a task needs to map labels to contexts; it raises naming every class the
        partition does not cover, so a partition built for another dataset fails loudly.
        """
        index = dict(zip(self.names, self.assignment))
        missing = [n for n in class_names if n not in index]
        if missing:
            raise KeyError(f"classes not covered by the partition: {missing}")
        return tuple(index[n] for n in class_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``clusters`` is a redundant, human-readable copy of ``assignment``."""
        return {
            "format": PARTITION_FORMAT,
            "version": PARTITION_VERSION,
            "n_clusters": self.n_clusters,
            "names": list(self.names),
            "assignment": list(self.assignment),
            "titles": list(self.titles),
            "noise_reassigned": list(self.noise_reassigned),
            "settings": self.settings,
            "clusters": [list(c) for c in self.clusters()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partition:
        """Inverse of :meth:`to_dict`; checks the format tag and that the copies agree."""
        if data.get("format") != PARTITION_FORMAT:
            raise ValueError(f"format={data.get('format')!r}, expected {PARTITION_FORMAT!r}")
        if data.get("version") != PARTITION_VERSION:
            raise ValueError(f"version={data.get('version')!r}, expected {PARTITION_VERSION}")
        part = cls(
            names=tuple(data["names"]),
            assignment=tuple(data["assignment"]),
            settings=data.get("settings", {}),
            noise_reassigned=tuple(data.get("noise_reassigned", ())),
            titles=tuple(data.get("titles", ())),
        )
        if "n_clusters" in data and data["n_clusters"] != part.n_clusters:
            raise ValueError(f"n_clusters={data['n_clusters']} but assignment has {part.n_clusters}")
        if "clusters" in data and [list(c) for c in part.clusters()] != data["clusters"]:
            raise ValueError("clusters disagrees with names/assignment; the file was edited by hand?")
        return part

    def save(self, path: str | Path) -> Path:
        """Write the partition as JSON atomically; a directory gets ``partition.json`` inside."""
        path = Path(path)
        if path.is_dir():
            path = path / PARTITION_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a partition saved by :meth:`save` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / PARTITION_FILE
        data = read_json(path)  # missing file -> FileNotFoundError, bad JSON -> CheckpointError
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is not a valid partition: {err}") from None


# -- references and scores -------------------------------------------------------------------
def _from_groups(groups: Mapping[str, Sequence[str]], method: str) -> Partition:
    context = {name: i for i, members in enumerate(groups.values()) for name in members}
    return Partition(
        CIFAR100_FINE,
        tuple(context[n] for n in CIFAR100_FINE),
        settings={"method": method},
        titles=tuple(groups),
    )


def paper_partition() -> Partition:
    """The paper's 8 CIFAR-100 contexts, numbered in the paper's order (0 = aquatic animals)."""
    return _from_groups(PAPER_CIFAR100_CLUSTERS, "reference:paper")


def superclass_partition() -> Partition:
    """CIFAR-100's 20 official superclasses as contexts, in coarse-label order."""
    return _from_groups({c: CIFAR100_SUPERCLASSES[c] for c in CIFAR100_COARSE}, "reference:superclasses")


def reference_partition(key: str) -> Partition:
    """A shipped partition by name: ``paper`` (8 clusters) or ``superclasses`` (20)."""
    if key == "paper":
        return paper_partition()
    if key == "superclasses":
        return superclass_partition()
    raise KeyError(f"unknown reference partition {key!r}; known: {', '.join(REFERENCES)}")


def adjusted_rand(a: Partition, b: Partition) -> float:
    """Adjusted Rand index between two partitions over the names they share.

    1.0 for the same grouping whatever the numbering; about 0 for unrelated groupings. Names in
    only one partition are ignored; fewer than two shared names is an error (ARI is undefined).
    """
    from sklearn.metrics import adjusted_rand_score

    b_index = dict(zip(b.names, b.assignment))
    common = [(x, b_index[n]) for n, x in zip(a.names, a.assignment) if n in b_index]
    if len(common) < 2:
        raise ValueError(f"partitions share {len(common)} names; ARI needs at least 2")
    left, right = zip(*common)
    return float(adjusted_rand_score(left, right))


def reference_scores(partition: Partition) -> dict[str, float]:
    """ARI against each shipped reference whose names cover all of ``partition``'s names.

    For a CIFAR-100 partition: ``{"paper": ..., "superclasses": ...}``; for names of another
    dataset (CIFAR-10) the references do not apply and the dict is empty.
    """
    scores: dict[str, float] = {}
    for key in REFERENCES:
        ref = reference_partition(key)
        if set(partition.names) <= set(ref.names) and len(partition.names) >= 2:
            scores[key] = adjusted_rand(partition, ref)
    return scores


def format_partition(partition: Partition) -> str:
    """One line per context: index, title if any, size and members; noise-reassigned names get *.

    >>> print(format_partition(Partition(("a", "b", "c"), (0, 1, 0), noise_reassigned=("c",))))
    0 (2): a, c*
    1 (1): b
    * HDBSCAN noise, reassigned to the nearest cluster centroid
    """
    noise = set(partition.noise_reassigned)
    width = len(str(partition.n_clusters - 1))
    lines = []
    for i, members in enumerate(partition.clusters()):
        title = f" {partition.titles[i]}" if partition.titles else ""
        listed = ", ".join(m + ("*" if m in noise else "") for m in members)
        lines.append(f"{i:>{width}}{title} ({len(members)}): {listed}")
    if noise:
        lines.append("* HDBSCAN noise, reassigned to the nearest cluster centroid")
    return "\n".join(lines)
