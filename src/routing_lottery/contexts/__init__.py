"""Contexts from class names: shipped names and reference groupings, offline text encoders,
and UMAP + HDBSCAN clustering into a :class:`Partition` (one context per cluster).

Heavy dependencies (sentence-transformers, umap-learn, open_clip) are imported only when an
encoder or a clustering actually runs, so importing this package is cheap. Code that only
reads, saves or scores partitions can import :mod:`.partitions`, which never needs them.
"""

from .clustering import (
    NOISE_RULE,
    SEARCH_RULE,
    HdbscanSettings,
    SearchGrid,
    UmapSettings,
    cluster_names,
    partition_names,
    reassign_noise,
    search_for_count,
)
from .encoders import (
    DEFAULT_ENCODER,
    ENCODERS,
    ClipTextEncoder,
    EncoderUnavailable,
    MiniLMEncoder,
    TextEncoder,
    embed_names,
    make_encoder,
)
from .names import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE,
    CIFAR100_FINE,
    CIFAR100_FINE_TO_COARSE,
    CIFAR100_SUPERCLASSES,
    NAME_SETS,
    PAPER_CIFAR100_CLUSTERS,
    as_words,
    name_set,
)
from .partitions import (
    PARTITION_FILE,
    REFERENCES,
    Partition,
    adjusted_rand,
    format_partition,
    paper_partition,
    reference_partition,
    reference_scores,
    superclass_partition,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_COARSE",
    "CIFAR100_FINE",
    "CIFAR100_FINE_TO_COARSE",
    "CIFAR100_SUPERCLASSES",
    "DEFAULT_ENCODER",
    "ENCODERS",
    "NAME_SETS",
    "NOISE_RULE",
    "PAPER_CIFAR100_CLUSTERS",
    "PARTITION_FILE",
    "REFERENCES",
    "SEARCH_RULE",
    "ClipTextEncoder",
    "EncoderUnavailable",
    "HdbscanSettings",
    "MiniLMEncoder",
    "Partition",
    "SearchGrid",
    "TextEncoder",
    "UmapSettings",
    "adjusted_rand",
    "as_words",
    "cluster_names",
    "embed_names",
    "format_partition",
    "make_encoder",
    "name_set",
    "paper_partition",
    "partition_names",
    "reassign_noise",
    "reference_partition",
    "reference_scores",
    "search_for_count",
    "superclass_partition",
]
