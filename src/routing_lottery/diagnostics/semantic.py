"""Semantic alignment: do contexts that mean similar things share more weights?

WordNet is read offline from the Debian packages ``wordnet-base`` (data.*, index.*, *.exc) and
``wordnet-sense-index`` (index.sense), or from any WordNet 3.0 ``dict`` directory named by
``RTL_WORDNET_DIR``. NLTK reads corpora only from inside its data path and refuses symlinks that
leave it, and the Debian files lack ``lexnames``; so ``load_wordnet`` copies the files into
``<cache>/corpora/wordnet/`` (cache: ``$RTL_CACHE/nltk_data``, else
``~/.cache/routing-lottery/nltk_data``), writes ``lexnames`` from the list in the
``lexnames(5WN)`` man page (``LEXNAMES`` below), and opens that copy.

Context names map to noun synsets by, in order: the caller's ``overrides``; the built-in choices
for CIFAR-10, CIFAR-100 and the digit names (``KNOWN_SYNSETS``: first senses are often wrong for
images -- "whale" is first a large person, "turtle" a sweater); then the first noun sense of the
name (what ``<name>.n.01`` means in NLTK, with WordNet's own lemmatization, so "oak_tree" finds
oak.n.02); then the first noun sense of its last underscore part, the head of an English compound
("aquarium_fish" -> fish.n.01). Spaces and hyphens count as underscores.

The alignment statistic is Spearman's rho over the K(K-1)/2 context pairs between a mask
similarity matrix and the semantic matrix, with a Mantel permutation p-value: the contexts of one
matrix are relabelled (rows and columns permuted together), because the pairs share contexts and
are not independent, so the ordinary Spearman p-value would be too small.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

from ..io import atomic_write_bytes, atomic_write_text

Measure = Literal["path", "wup"]
Alternative = Literal["two-sided", "greater", "less"]

INSTALL_HINT = (
    "install WordNet 3.0 with `apt-get install wordnet-base wordnet-sense-index` "
    "(or set RTL_WORDNET_DIR to a WordNet 3.0 dict directory)"
)

SOURCE_DIRS = ("/usr/share/wordnet", "/usr/local/WordNet-3.0/dict", "/usr/share/WordNet-3.0/dict")
"""Where WordNet 3.0 is looked for when RTL_WORDNET_DIR and WNSEARCHDIR are unset (Debian first)."""

REQUIRED_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")) + (
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
)
OPTIONAL_FILES = ("index.sense", "cntlist.rev")  # sense keys and lemma counts; NLTK reads them lazily

LEXNAMES: tuple[tuple[str, int], ...] = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)
"""WordNet 3.0 lexicographer files, numbered 00-44 in this order (lexnames(5WN)); the second field
is the syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb)."""

CIFAR10_SYNSETS: dict[str, str] = {
    "airplane": "airplane.n.01", "automobile": "car.n.01", "bird": "bird.n.01", "cat": "cat.n.01",
    "deer": "deer.n.01", "dog": "dog.n.01", "frog": "frog.n.01", "horse": "horse.n.01",
    "ship": "ship.n.01", "truck": "truck.n.01",
}

# The digits are all direct hyponyms of digit.n.01, so every pair is equally similar: a flat
# semantic matrix, and no alignment can be measured on the digits task (rho is NaN there).
DIGIT_SYNSETS: dict[str, str] = {
    "zero": "zero.n.02",  # zero.n.01 is "nothing" (a quantity of no importance); n.02 is the digit
    "one": "one.n.01", "two": "two.n.01", "three": "three.n.01", "four": "four.n.01",
    "five": "five.n.01", "six": "six.n.01", "seven": "seven.n.01", "eight": "eight.n.01", "nine": "nine.n.01",
}

# The sense an image of the class shows, where the first sense is not it (fur, food, people, ...).
CIFAR100_SYNSETS: dict[str, str] = {
    "apple": "apple.n.01", "aquarium_fish": "fish.n.01", "baby": "baby.n.01", "bear": "bear.n.01",
    "beaver": "beaver.n.07", "bed": "bed.n.01", "bee": "bee.n.01", "beetle": "beetle.n.01",
    "bicycle": "bicycle.n.01", "bottle": "bottle.n.01", "bowl": "bowl.n.03", "boy": "male_child.n.01",
    "bridge": "bridge.n.01", "bus": "bus.n.01", "butterfly": "butterfly.n.01", "camel": "camel.n.01",
    "can": "can.n.01", "castle": "castle.n.02", "caterpillar": "caterpillar.n.01", "cattle": "cattle.n.01",
    "chair": "chair.n.01", "chimpanzee": "chimpanzee.n.01", "clock": "clock.n.01", "cloud": "cloud.n.02",
    "cockroach": "cockroach.n.01", "couch": "sofa.n.01", "crab": "crab.n.01", "crocodile": "crocodile.n.01",
    "cup": "cup.n.01", "dinosaur": "dinosaur.n.01", "dolphin": "dolphin.n.02", "elephant": "elephant.n.01",
    "flatfish": "flatfish.n.02", "forest": "forest.n.01", "fox": "fox.n.01", "girl": "girl.n.01",
    "hamster": "hamster.n.01", "house": "house.n.01", "kangaroo": "kangaroo.n.01", "keyboard": "keyboard.n.01",
    "lamp": "lamp.n.02", "lawn_mower": "lawn_mower.n.01", "leopard": "leopard.n.02", "lion": "lion.n.01",
    "lizard": "lizard.n.01", "lobster": "lobster.n.02", "man": "man.n.01", "maple_tree": "maple.n.02",
    "motorcycle": "motorcycle.n.01", "mountain": "mountain.n.01", "mouse": "mouse.n.01",
    "mushroom": "mushroom.n.01", "oak_tree": "oak.n.02", "orange": "orange.n.01", "orchid": "orchid.n.01",
    "otter": "otter.n.02", "palm_tree": "palm.n.03", "pear": "pear.n.01", "pickup_truck": "pickup.n.01",
    "pine_tree": "pine.n.01", "plain": "plain.n.01", "plate": "plate.n.04", "poppy": "poppy.n.01",
    "porcupine": "porcupine.n.01", "possum": "opossum.n.02", "rabbit": "rabbit.n.01", "raccoon": "raccoon.n.02",
    "ray": "ray.n.07", "road": "road.n.01", "rocket": "rocket.n.01", "rose": "rose.n.01", "sea": "sea.n.01",
    "seal": "seal.n.09", "shark": "shark.n.01", "shrew": "shrew.n.02", "skunk": "skunk.n.04",
    "skyscraper": "skyscraper.n.01", "snail": "snail.n.01", "snake": "snake.n.01", "spider": "spider.n.01",
    "squirrel": "squirrel.n.01", "streetcar": "streetcar.n.01", "sunflower": "sunflower.n.01",
    "sweet_pepper": "sweet_pepper.n.02", "table": "table.n.02", "tank": "tank.n.01",
    "telephone": "telephone.n.01", "television": "television_receiver.n.01", "tiger": "tiger.n.02",
    "tractor": "tractor.n.01", "train": "train.n.01", "trout": "trout.n.02", "tulip": "tulip.n.01",
    "turtle": "turtle.n.02", "wardrobe": "wardrobe.n.01", "whale": "whale.n.02", "willow_tree": "willow.n.01",
    "wolf": "wolf.n.01", "woman": "woman.n.01", "worm": "worm.n.01",
}

KNOWN_SYNSETS: dict[str, str] = {**DIGIT_SYNSETS, **CIFAR100_SYNSETS, **CIFAR10_SYNSETS}


class WordNetUnavailable(RuntimeError):
    """The WordNet 3.0 database files are not on this machine; the message says what to install."""


# -- loading -----------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$RTL_CACHE/nltk_data`` or ``~/.cache/routing-lottery/nltk_data``: NLTK's data root for our copy."""
    root = os.environ.get("RTL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "routing-lottery") / "nltk_data"


def find_wordnet_source() -> Path:
    """The WordNet 3.0 dict directory to copy from, or ``WordNetUnavailable`` naming what to install."""
    explicit = os.environ.get("RTL_WORDNET_DIR")
    candidates = [explicit] if explicit else [os.environ.get("WNSEARCHDIR"), *SOURCE_DIRS]
    for candidate in filter(None, candidates):
        if all((Path(candidate) / f).is_file() for f in REQUIRED_FILES):
            return Path(candidate)
    where = f"RTL_WORDNET_DIR={explicit}" if explicit else ", ".join(filter(None, candidates))
    raise WordNetUnavailable(f"no WordNet 3.0 database found (looked in {where}); {INSTALL_HINT}")


def lexnames_text() -> str:
    """The ``lexnames`` file: ``NN<TAB>name<TAB>category`` per line, as WordNet 3.0 ships it."""
    return "".join(f"{i:02d}\t{name}\t{category}\n" for i, (name, category) in enumerate(LEXNAMES))


def prepare_wordnet_dir(cache_dir: str | Path | None = None, source_dir: str | Path | None = None) -> Path:
    """Copy the WordNet files into ``<cache>/corpora/wordnet`` (once) and write ``lexnames``; return the cache.

    Files are copied atomically and only when missing or of a different size, so concurrent runs
    and a half-finished earlier copy are both safe. Copies are owner-only (0600): NLTK refuses
    corpus files that another account could have written.
    """
    source = Path(source_dir) if source_dir is not None else find_wordnet_source()
    missing = [f for f in REQUIRED_FILES if not (source / f).is_file()]
    if missing:
        raise WordNetUnavailable(f"{source} lacks WordNet files {missing}; {INSTALL_HINT}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for directory in (cache, cache / "corpora", target):
        _private_to_owner(directory)
    for file_name in REQUIRED_FILES + tuple(f for f in OPTIONAL_FILES if (source / f).is_file()):
        src, dst = source / file_name, target / file_name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            atomic_write_bytes(dst, src.read_bytes())
    lexnames = target / "lexnames"
    if not lexnames.is_file() or lexnames.read_text(encoding="utf-8") != lexnames_text():
        atomic_write_text(lexnames, lexnames_text())
    return cache


def _private_to_owner(directory: Path) -> None:
    """Drop group/world write on a cache directory we own: NLTK refuses data roots others can write
    (a umask of 002 would otherwise make the fresh cache unreadable to it)."""
    info = directory.stat()
    if info.st_mode & 0o022 and info.st_uid == getattr(os, "getuid", lambda: info.st_uid)():
        directory.chmod(info.st_mode & ~0o022 & 0o7777)


@functools.lru_cache(maxsize=4)
def _open_wordnet(cache: str) -> Any:
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:  # a dependency of this feature, not of the whole library
        raise ImportError("WordNet similarity needs NLTK: pip install 'nltk>=3.9'") from err
    # NLTK opens corpus files only under its data path, so the cache must be on it.
    if cache not in nltk.data.path:
        nltk.data.path.append(cache)

    class OfflineWordNet(WordNetCorpusReader):  # type: ignore[misc]
        def map_wn(self, version: str = "wordnet") -> None:
            # NLTK maps WordNet 3.0 sense keys onto the loaded version for multilingual data by
            # reading index.sense twice (~4 s). The loaded version IS 3.0 and we load no
            # multilingual data, so the map is the identity, which NLTK spells ``None``.
            return None

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        try:
            root = nltk.data.find("corpora/wordnet", paths=[cache])
        except LookupError as err:  # e.g. a cache directory another account can write to
            raise WordNetUnavailable(f"NLTK cannot read the WordNet copy in {cache}: {err}") from None
        return OfflineWordNet(root, None)


def load_wordnet(cache_dir: str | Path | None = None, source_dir: str | Path | None = None) -> Any:
    """An NLTK WordNet reader over the offline WordNet 3.0 copy (loaded once per cache: a few seconds).

    Raises ``WordNetUnavailable`` (with the apt command) when the database is not installed.
    """
    cache = prepare_wordnet_dir(cache_dir, source_dir).resolve()
    return _open_wordnet(str(cache))


def wordnet_available() -> bool:
    """True when a WordNet 3.0 database can be found (NLTK itself is not checked)."""
    try:
        find_wordnet_source()
    except WordNetUnavailable:
        return False
    return True


# -- names to synsets --------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """``"Maple tree"`` -> ``"maple_tree"``: WordNet lemmas are lower case with underscores."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def synset_for(name: str, wordnet: Any | None = None, overrides: Mapping[str, str] | None = None) -> Any:
    """The noun synset a context name stands for (rule in the module docstring).

    Example
    -------
    >>> synset_for("automobile").name()  # doctest: +SKIP
    'car.n.01'
    """
    wn = wordnet if wordnet is not None else load_wordnet()
    key = normalize_name(name)
    chosen = {normalize_name(k): v for k, v in (overrides or {}).items()}.get(key) or KNOWN_SYNSETS.get(key)
    if chosen is not None:
        return wn.synset(chosen)
    for candidate in dict.fromkeys([key, key.rsplit("_", 1)[-1]]):
        found = wn.synsets(candidate, pos="n")
        if found:
            return found[0]
    raise ValueError(f"no WordNet noun for context name {name!r}; pass overrides={{{name!r}: 'lemma.n.NN'}}")


def _similarity(a: Any, b: Any, measure: Measure) -> float:
    value = a.path_similarity(b) if measure == "path" else a.wup_similarity(b)
    return float("nan") if value is None else float(value)


def semantic_similarity_matrix(
    names: Sequence[str | Sequence[str]],
    measure: Measure = "path",
    wordnet: Any | None = None,
    overrides: Mapping[str, str] | None = None,
) -> np.ndarray:
    """K×K WordNet similarity of the contexts' names (1 on the diagonal).

    Parameters
    ----------
    names : one entry per context: a name (``"dog"``), or the class names a context groups
        (a CIFAR-100 cluster); a group's similarity to another is the mean over all member pairs.
    measure : ``"path"`` (the paper's; 1 / (1 + shortest is-a path)) or ``"wup"`` (Wu–Palmer).
    overrides : name -> synset name, for names whose sense the built-in rule gets wrong.

    Example
    -------
    >>> m = semantic_similarity_matrix(["cat", "dog", "truck"])  # doctest: +SKIP
    >>> m[0, 1] > m[1, 2]  # doctest: +SKIP
    True
    """
    if measure not in ("path", "wup"):
        raise ValueError(f"measure must be 'path' or 'wup'; got {measure!r}")
    if len(names) < 2:
        raise ValueError(f"a semantic matrix needs at least 2 contexts; got {len(names)}")
    wn = wordnet if wordnet is not None else load_wordnet()
    groups = [[n] if isinstance(n, str) else list(n) for n in names]
    if any(not g for g in groups):
        raise ValueError("every context needs at least one name")
    synsets = [[synset_for(n, wn, overrides) for n in g] for g in groups]
    k = len(groups)
    out = np.eye(k)
    for i, j in itertools.combinations(range(k), 2):
        out[i, j] = out[j, i] = float(np.mean([_similarity(a, b, measure) for a in synsets[i] for b in synsets[j]]))
    return out


# -- Spearman + Mantel ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MantelResult:
    """Spearman rho over context pairs and its Mantel permutation p-value."""

    rho: float  # NaN when either matrix is constant over the pairs (no ranking to compare)
    p_value: float  # NaN with rho
    n_pairs: int
    n_permutations: int  # permutations actually evaluated (all K! when that is fewer than asked)
    exact: bool  # True when every permutation was enumerated
    alternative: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _symmetric(matrix: Any, name: str) -> np.ndarray:
    m = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square K×K matrix; got shape {m.shape}")
    if not np.allclose(m, m.T, equal_nan=True):
        raise ValueError(f"{name} must be symmetric (a similarity between contexts)")
    return m


def _rank_matrix(m: np.ndarray, iu: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Symmetric matrix of the average ranks of the upper-triangle entries.

    A joint relabelling of contexts only moves pairs around, so ranks computed once stay valid
    for every permutation: each permutation's Spearman rho is a Pearson correlation of ranks.
    """
    r = np.zeros_like(m)
    r[iu] = rankdata(m[iu])
    return r + r.T


def _permutations(k: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    if math.factorial(k) <= n_permutations:
        return np.array(list(itertools.permutations(range(k)))), True
    rng = np.random.default_rng(seed)
    return np.array([rng.permutation(k) for _ in range(n_permutations)]), False


def mantel_spearman(
    a: Any, b: Any, n_permutations: int = 999, seed: int = 0, alternative: Alternative = "two-sided"
) -> MantelResult:
    """Spearman rho between two K×K similarity matrices over their K(K-1)/2 pairs, Mantel p-value.

    The null distribution relabels the contexts of ``b`` (rows and columns together) with
    ``n_permutations`` seeded random permutations -- or all K! of them when that is fewer, which
    makes the p-value exact. p = (1 + #{permuted statistic at least as extreme}) / (1 + n) for
    random permutations, #{...} / K! when exact (the identity is one of them).

    Parameters
    ----------
    a, b : symmetric K×K matrices (numpy or torch), K ≥ 3; diagonals are ignored.
    n_permutations : random relabellings (at most this many; see above).
    seed : seeds the permutations; the same seed gives the same p-value.
    alternative : ``"two-sided"`` (|rho|), ``"greater"`` (alignment) or ``"less"``.

    Example
    -------
    >>> x = np.array([[1, .9, .1, .2], [.9, 1, .3, .4], [.1, .3, 1, .8], [.2, .4, .8, 1]])
    >>> mantel_spearman(x, x ** 2).rho
    1.0
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less'; got {alternative!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be at least 1; got {n_permutations!r}")
    ma, mb = _symmetric(a, "a"), _symmetric(b, "b")
    if ma.shape != mb.shape:
        raise ValueError(f"a and b must have the same shape; got {ma.shape} and {mb.shape}")
    k = ma.shape[0]
    if k < 3:
        raise ValueError(f"a rank correlation over pairs needs K >= 3 contexts (3 pairs); got K={k}")
    iu = np.triu_indices(k, 1)
    if not (np.all(np.isfinite(ma[iu])) and np.all(np.isfinite(mb[iu]))):
        raise ValueError("a and b must be finite off the diagonal")
    ra = rankdata(ma[iu])
    ra = ra - ra.mean()
    rb_full = _rank_matrix(mb, iu)
    perms, exact = _permutations(k, int(n_permutations), seed)
    rb = rb_full[perms[:, :, None], perms[:, None, :]][:, iu[0], iu[1]]
    rb = rb - rb.mean(axis=1, keepdims=True)
    denominator = np.linalg.norm(ra) * np.linalg.norm(rb[0])  # ranks are a permutation of one multiset
    if denominator == 0:
        return MantelResult(float("nan"), float("nan"), len(ra), len(perms), exact, alternative, seed)
    null = rb @ ra / denominator
    observed = rb_full[iu]
    rho = float((observed - observed.mean()) @ ra / denominator)
    tol = 1e-12  # ties in float arithmetic count as "at least as extreme"
    if alternative == "two-sided":
        hits = int(np.sum(np.abs(null) >= abs(rho) - tol))
    elif alternative == "greater":
        hits = int(np.sum(null >= rho - tol))
    else:
        hits = int(np.sum(null <= rho + tol))
    p = hits / len(perms) if exact else (1 + hits) / (1 + len(perms))
    return MantelResult(round(rho, 12), min(p, 1.0), len(ra), len(perms), exact, alternative, seed)


def layer_alignment(
    matrices: Mapping[str, Any],
    semantic: Any,
    n_permutations: int = 999,
    seed: int = 0,
    alternative: Alternative = "two-sided",
) -> dict[str, MantelResult]:
    """``mantel_spearman(mask_matrix, semantic)`` for each layer (and ``"all"`` if given), same seed each.

    ``matrices`` is typically ``SimilarityReport.matrices()``; the result keeps its order (depth).
    """
    return {
        name: mantel_spearman(m, semantic, n_permutations=n_permutations, seed=seed, alternative=alternative)
        for name, m in matrices.items()
    }
