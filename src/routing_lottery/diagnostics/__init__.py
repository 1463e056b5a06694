"""Diagnostics of a ticket set: mask similarity, collapse warning, semantic alignment, figures.

``similarity`` and ``collapse`` need only masks (numpy); ``semantic`` needs NLTK and an offline
WordNet 3.0; ``figures`` needs matplotlib. Import the submodules directly to pull in less.
"""

from .collapse import CollapseSettings, CollapseWarning, LevelCheck, detect_collapse, metric_drop_level, rule_text
from .semantic import (
    MantelResult,
    WordNetUnavailable,
    layer_alignment,
    load_wordnet,
    mantel_spearman,
    semantic_similarity_matrix,
    synset_for,
    wordnet_available,
)
from .similarity import (
    SimilarityReport,
    depth_groups,
    jaccard_matrices,
    mean_off_diagonal,
    similarity_report,
    similarity_scores,
)

__all__ = [
    "CollapseSettings", "CollapseWarning", "LevelCheck", "MantelResult", "SimilarityReport",
    "WordNetUnavailable", "depth_groups", "detect_collapse", "jaccard_matrices", "layer_alignment",
    "load_wordnet", "mantel_spearman", "mean_off_diagonal", "metric_drop_level", "rule_text",
    "semantic_similarity_matrix", "similarity_report", "similarity_scores", "synset_for",
    "wordnet_available",
]
