"""Text domains for the pretrained-LM experiment: documents per domain, split, tokenized, fingerprinted.

A domain is a context of the paper: one mask each. Its documents are split into calibration
(one-shot scores), retraining (Algorithm 2) and test **by document**, never by token, so no test
text was seen during calibration or retraining even in part. Each domain's split depends only on
its own documents and the seed (the generator is seeded from the seed and the domain's name), so
adding or dropping another domain leaves it unchanged.

A folder holds one sub-folder of UTF-8 ``.txt`` files per domain, one document per file, as
``scripts/fetch_lm_data.sh CACHE_DIR`` writes them (its ``models`` folder is not a domain).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from routing_lottery.errors import DataError
from routing_lottery.fingerprint import fingerprint as _fingerprint

__all__ = ["NOT_DOMAINS", "SPLITS", "TextDomains", "Tokenizer"]

SPLITS = ("calibration", "retraining", "test")
# Folders of a cache that hold something other than text: the fetch script keeps the model there.
NOT_DOMAINS = frozenset({"models"})


class Tokenizer(Protocol):
    """What :meth:`TextDomains.sequences` uses of a ``transformers`` tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class TextDomains:
    """Documents per domain (names sorted), split by document into calibration / retraining / test.

    Parameters:
        documents: domain name -> its documents (strings); blank documents are dropped.
        fractions: the share of each domain's documents in calibration, retraining and test, summing
            to 1; a share may be 0 (e.g. no retraining for a one-shot run).
        seed: seeds each domain's shuffle of its documents before they are cut into the splits.

    Example:
        >>> domains = TextDomains.from_mapping({"b": ["x", "y", "z", "w"], "a": ["p", "q", "r", "s"]},
        ...                                    fractions=(0.25, 0.25, 0.5))
        >>> domains.names, len(domains.documents("a", "test"))
        (('a', 'b'), 2)
    """

    def __init__(self, documents: Mapping[str, Sequence[str]], *, fractions: Sequence[float] = (0.25, 0.5, 0.25),
                 seed: int = 0) -> None:
        self.fractions = _check_fractions(fractions)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        if not isinstance(documents, Mapping) or not documents:
            raise DataError(f"text domains need a mapping of domain name -> documents with at least one domain, "
                            f"got {type(documents).__name__} {documents!r:.60}")
        self._documents: dict[str, tuple[str, ...]] = {}
        for name in sorted(documents):
            self._documents[name] = _check_documents(name, documents[name])
        self._splits = {name: self._split(name) for name in self._documents}
        self._fingerprint: str | None = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, documents: Mapping[str, Sequence[str]], **settings: Any) -> TextDomains:
        """Domains from ``{name: [document, ...]}``; ``settings`` are ``fractions`` and ``seed``."""
        return cls(documents, **settings)

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str], domains: Sequence[str] | None = None,
                    **settings: Any) -> TextDomains:
        """Domains from ``root/<domain>/*.txt`` (UTF-8, one document per file, read in sorted order).

        ``domains`` picks some of the sub-folders by name (default: all but hidden ones and
        :data:`NOT_DOMAINS`). ``settings`` are ``fractions`` and ``seed``.

        Raises:
            DataError: ``root`` is missing or has no domain folders, a named domain is not there, a
                domain has no non-blank ``.txt`` file, or a file is not UTF-8 text (named).
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"text folder {root} does not exist; fetch the default domains with "
                            f"scripts/fetch_lm_data.sh {root}, or give a folder with one sub-folder "
                            f"of .txt files per domain")
        present = sorted(path.name for path in root.iterdir()
                         if path.is_dir() and not path.name.startswith(".") and path.name not in NOT_DOMAINS)
        if not present:
            raise DataError(f"text folder {root} has no domain sub-folders; "
                            f"put each domain's .txt files in {root}/<domain>/")
        chosen = present if domains is None else list(_check_names(domains))
        for name in chosen:
            if name not in present:
                raise DataError(_unknown(name, present, f"in {root}"))
        return cls({name: _read_domain(root / name) for name in chosen}, **settings)

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The domain names, sorted: the order of contexts (masks) everywhere downstream."""
        return tuple(self._documents)

    def documents(self, domain: str, split: str | None = None) -> list[str]:
        """A domain's documents: all (in their given order), or one split's (in its shuffled order)."""
        self._check_domain(domain)
        if split is None:
            return list(self._documents[domain])
        return [self._documents[domain][index] for index in self._splits[domain][_check_split(split)]]

    def split_indices(self, domain: str) -> dict[str, list[int]]:
        """Which documents (by position in :meth:`documents`) each split of ``domain`` holds."""
        self._check_domain(domain)
        return {split: list(indices) for split, indices in self._splits[domain].items()}

    def fingerprint(self) -> str:
        """sha256 over every document and the split settings: part of a run's identity.

        Documents enter through their own sha256, so hashing a large corpus costs one pass over it.
        """
        if self._fingerprint is None:
            digests = {name: [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in texts]
                       for name, texts in self._documents.items()}
            self._fingerprint = _fingerprint("TextDomains", digests, list(self.fractions), self.seed)
        return self._fingerprint

    # -- tokenized sequences -----------------------------------------------------------------------
    def sequences(self, tokenizer: Tokenizer, seq_len: int, split: str, *, domains: Sequence[str] | None = None,
                  max_sequences: int | None = None) -> dict[str, torch.Tensor]:
        """Fixed-length token sequences per domain for one split: ``{domain: (num_seq, seq_len) int64}``.

        A split's documents are concatenated in their shuffled order with the tokenizer's EOS between
        them, cut into ``seq_len`` chunks, and the remainder dropped; so a sequence may span a document
        boundary, as in pretraining. With ``max_sequences``, tokenizing stops once that many sequences
        are filled, so a large domain costs only what is used (the first documents of the shuffle).

        Raises:
            DataError: an unknown domain, an empty split, or a split with fewer tokens than one sequence.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if max_sequences is not None and (isinstance(max_sequences, bool) or not isinstance(max_sequences, int)
                                          or max_sequences < 1):
            raise ValueError(f"max_sequences must be a positive int or None, got {max_sequences!r}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if not isinstance(eos, int):
            raise ValueError(f"the tokenizer has no eos_token_id (got {eos!r}); documents are joined with EOS")
        split = _check_split(split)
        names = self.names if domains is None else _check_names(domains)
        for name in names:
            self._check_domain(name)
        return {name: self._tokenize(name, split, tokenizer, eos, seq_len, max_sequences) for name in names}

    def tokenize(self, tokenizer: Tokenizer, seq_len: int, *, domains: Sequence[str] | None = None,
                 max_sequences: int | Mapping[str, int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """:meth:`sequences` for every split with a non-zero fraction: ``{split: {domain: tensor}}``.

        ``max_sequences`` is one cap for all splits or a cap per split name.
        """
        caps = max_sequences if isinstance(max_sequences, Mapping) else dict.fromkeys(SPLITS, max_sequences)
        for split in caps:
            _check_split(split)
        return {split: self.sequences(tokenizer, seq_len, split, domains=domains, max_sequences=caps.get(split))
                for split, fraction in zip(SPLITS, self.fractions) if fraction > 0}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(texts)}" for name, texts in self._documents.items())
        return f"TextDomains({sizes}; fractions={self.fractions}, seed={self.seed})"

    # -- internals ---------------------------------------------------------------------------------
    def _check_domain(self, name: str) -> None:
        if name not in self._documents:
            raise DataError(_unknown(name, self.names, "here"))

    def _split(self, name: str) -> dict[str, tuple[int, ...]]:
        count = len(self._documents[name])
        sizes = _split_sizes(count, self.fractions)
        for split, fraction, size in zip(SPLITS, self.fractions, sizes):
            if fraction > 0 and size == 0:
                raise DataError(f"domain {name!r} has {count} document(s), too few to give the {split} split "
                                f"(fraction {fraction}) one; add documents or change fractions={self.fractions}")
        # The domain's own generator, seeded from the seed and its name: splits independent of the others.
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}".encode()).digest()[:8], "little") >> 1
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        bounds = [0, sizes[0], sizes[0] + sizes[1], count]
        return {split: tuple(order[bounds[i]:bounds[i + 1]]) for i, split in enumerate(SPLITS)}

    def _tokenize(self, name: str, split: str, tokenizer: Tokenizer, eos: int, seq_len: int,
                  max_sequences: int | None) -> torch.Tensor:
        texts = self.documents(name, split)
        if not texts:
            raise DataError(f"domain {name!r} has no documents in its {split} split (fraction 0)")
        limit = math.inf if max_sequences is None else max_sequences * seq_len
        ids: list[int] = []
        for index, text in enumerate(texts):
            if index:
                ids.append(eos)
            ids.extend(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) >= limit:
                break
        count = len(ids) // seq_len if max_sequences is None else min(len(ids) // seq_len, max_sequences)
        if count == 0:
            raise DataError(f"domain {name!r} has {len(ids)} tokens in its {split} split ({len(texts)} documents), "
                            f"fewer than one sequence of seq_len={seq_len}; add documents or shorten seq_len")
        return torch.tensor(ids[:count * seq_len], dtype=torch.int64).view(count, seq_len)


# -- validation at the edge ------------------------------------------------------------------------
def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(fractions) if isinstance(fractions, Sequence) and not isinstance(fractions, str) else ()
    if len(values) != len(SPLITS) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"fractions must be three numbers for {'/'.join(SPLITS)}, got {fractions!r}")
    if any(not 0 <= v <= 1 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must each lie in [0, 1] and sum to 1, got {fractions!r} (sum {sum(values):g})")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _check_names(domains: Sequence[str]) -> tuple[str, ...]:
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise TypeError(f"domains must be a sequence of domain names, got {domains!r}; write [{domains!r}]")
    return tuple(domains)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _check_documents(name: Any, documents: Any) -> tuple[str, ...]:
    if not isinstance(name, str) or not name:
        raise DataError(f"domain names must be non-empty strings, got {name!r}")
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise DataError(f"domain {name!r}: documents must be a sequence of strings, got {type(documents).__name__}")
    for index, text in enumerate(documents):
        if not isinstance(text, str):
            raise DataError(f"domain {name!r}: document {index} is a {type(text).__name__}, not a string")
    kept = tuple(text for text in documents if text.strip())
    if not kept:
        raise DataError(f"domain {name!r} is empty: it has no non-blank documents")
    return kept


def _split_sizes(count: int, fractions: Sequence[float]) -> list[int]:
    """Documents per split: floors, then the leftovers to the largest remainders (ties: split order)."""
    exact = [count * fraction for fraction in fractions]
    sizes = [math.floor(value + 1e-9) for value in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[:count - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _read_domain(folder: Path) -> list[str]:
    files = sorted(path for path in folder.glob("*.txt") if path.is_file())
    if not files:
        raise DataError(f"domain {folder.name!r} is empty: {folder} holds no .txt files")
    return [_read_text(path) for path in files]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:  # valid UTF-8 but not text: a NUL means a binary file
        raise DataError(f"{path} is a binary file (NUL byte at offset {nul}), not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                        f"convert it to UTF-8 or remove it") from None


def _unknown(name: str, known: Sequence[str], where: str) -> str:
    return f"unknown domain {name!r} {where}; the domains are {', '.join(known)}"
