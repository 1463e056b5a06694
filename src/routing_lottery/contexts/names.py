"""Class names and reference groupings, shipped as constants so no run needs a dataset's files.

Why constants: contexts are built from class *names*, and the two groupings every computed
clustering is scored against (CIFAR-100's 20 official superclasses and the paper's 8 clusters)
must be available even where the CIFAR pickles are absent. The names are spelled exactly as in
the official ``meta`` files (``aquarium_fish``, ``maple_tree``), so a partition can be matched to
a dataset's ``label_names`` by string equality; :func:`as_words` gives the text an encoder sees.

Sources
    CIFAR-10/100 ``batches.meta`` / ``meta`` (label order = label index). The fine -> coarse map
    is the official one from the ``coarse_labels`` of the training file. The paper's clusters
    are the table in "Routing the Lottery" (arXiv:2601.22141), copied into DESIGN.md §2.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""The 10 CIFAR-10 class names in label order (0 airplane ... 9 truck)."""

CIFAR100_FINE: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
"""The 100 CIFAR-100 fine class names in label order (0 apple ... 99 worm)."""

CIFAR100_COARSE: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip
"""The 20 CIFAR-100 superclass (coarse) names in coarse-label order."""

CIFAR100_SUPERCLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
})  # fmt: skip
"""Superclass -> its five fine classes, in :data:`CIFAR100_COARSE` order."""

CIFAR100_FINE_TO_COARSE: tuple[int, ...] = tuple(
    CIFAR100_COARSE.index(next(c for c, members in CIFAR100_SUPERCLASSES.items() if fine in members))
    for fine in CIFAR100_FINE
)
"""Coarse label of each fine label, indexed by fine label (the official ``coarse_labels`` map)."""

PAPER_CIFAR100_CLUSTERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "aquatic animals": (
        "aquarium_fish", "dinosaur", "dolphin", "flatfish", "ray", "seal", "shark", "trout",
        "whale",
    ),
    "people & objects": (
        "baby", "bed", "bicycle", "bottle", "bowl", "boy", "bridge", "can", "castle", "chair",
        "clock", "couch", "cup", "girl", "house", "keyboard", "lamp", "man", "plain", "plate",
        "road", "rocket", "skyscraper", "table", "telephone", "television", "wardrobe", "woman",
    ),
    "mammals": (
        "bear", "beaver", "camel", "cattle", "chimpanzee", "elephant", "fox", "hamster",
        "kangaroo", "leopard", "lion", "mouse", "otter", "porcupine", "possum", "rabbit",
        "raccoon", "shrew", "skunk", "squirrel", "tiger", "wolf",
    ),
    "reptiles & insects": (
        "bee", "beetle", "butterfly", "caterpillar", "cockroach", "crab", "crocodile", "lizard",
        "lobster", "mushroom", "snail", "snake", "spider", "turtle", "worm",
    ),
    "vehicles": (
        "bus", "lawn_mower", "motorcycle", "pickup_truck", "streetcar", "tank", "tractor",
        "train",
    ),
    "natural scenes": (
        "cloud", "forest", "maple_tree", "mountain", "oak_tree", "palm_tree", "pine_tree", "sea",
        "willow_tree",
    ),
    "fruits": ("apple", "orange", "pear", "sweet_pepper"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
})  # fmt: skip
"""The paper's 8 CIFAR-100 contexts (CLIP text -> UMAP -> HDBSCAN), cluster title -> members.

Kept verbatim, including its oddities (dinosaur among aquatic animals, mushroom among reptiles
& insects, plain among people & objects): it is the reference we score against, not a grouping
we endorse.
"""

NAME_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_FINE}
)
"""Named class-name lists a command line can select (``--names cifar100``)."""


def name_set(key: str) -> tuple[str, ...]:
    """The class names registered under ``key`` (see :data:`NAME_SETS`).

    Raises ``KeyError`` naming the known keys, so a typo on the command line says what exists.

    >>> name_set("cifar10")[:3]
    ('airplane', 'automobile', 'bird')
    """
    try:
        return NAME_SETS[key]
    except KeyError:
        raise KeyError(f"unknown name set {key!r}; known: {', '.join(sorted(NAME_SETS))}") from None


def as_words(name: str) -> str:
    """The text an encoder should see for a class name: underscores become spaces.

    Encoders tokenise ``maple_tree`` as one odd token (or ``maple _ tree``); as words
    (``maple tree``) it lands near trees, which is what a semantic clustering needs.

    >>> as_words("maple_tree")
    'maple tree'
    """
    return " ".join(name.replace("_", " ").split())
