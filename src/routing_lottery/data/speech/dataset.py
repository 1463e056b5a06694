"""The object both speech sources give, the settings every mixture shares, and the on-disk cache.

Both sources give the same object, a :class:`SpeechDataset` with train / validation / test
:class:`SpeechSplit` s of equal-length clips: ``noisy`` and ``clean`` waveforms ``(N, T)``,
``environment`` ids ``(N,)`` and the environment names. One environment is one RTL context.

Results are cached as ``.npz`` under ``$RTL_CACHE/speech`` (``~/.cache/routing-lottery/speech``
when unset), named by a hash of every generation setting, the recipe version and the
synthesizer's identity, and written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...io import atomic_write_bytes

ENVIRONMENTS: tuple[str, ...] = ("indoor", "outdoor", "transportation")
"""The three scene groups of TAU Urban Acoustic Scenes 2020 3Class, in context-id order."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
RECIPE_VERSION = 1
"""Bump when a recipe changes what it generates: old cache entries then stop matching."""


# == the dataset object ==========================================================================
@dataclass(frozen=True)
class SpeechSplit:
    """Equal-length clips of one split: ``noisy`` = ``clean`` + noise, the clip's environment and origin.

    ``sources[i]`` names clip i's clean utterance (voice and text, or file and offset), so
    tests and reports can check that splits never share one.
    """

    noisy: torch.Tensor
    clean: torch.Tensor
    environment: torch.Tensor
    snr_db: torch.Tensor
    sources: tuple[str, ...]
    environment_names: tuple[str, ...]
    sample_rate: int

    def __post_init__(self) -> None:
        if self.noisy.ndim != 2 or self.noisy.shape != self.clean.shape:
            raise ValueError(f"noisy and clean must both be (N, T); got {tuple(self.noisy.shape)} and {tuple(self.clean.shape)}")
        n = self.noisy.shape[0]
        if self.environment.shape != (n,) or self.environment.dtype != torch.long:
            raise ValueError(f"environment must be int64 of shape ({n},); got {self.environment.dtype} {tuple(self.environment.shape)}")
        if self.snr_db.shape != (n,) or len(self.sources) != n:
            raise ValueError(f"snr_db and sources must have {n} entries")
        if n and not 0 <= int(self.environment.min()) <= int(self.environment.max()) < len(self.environment_names):
            raise ValueError(f"environment ids must lie in 0..{len(self.environment_names) - 1}")

    def __len__(self) -> int:
        return self.noisy.shape[0]

    def indices(self, environment: int) -> torch.Tensor:
        """Positions of the clips recorded in ``environment``."""
        return (self.environment == environment).nonzero(as_tuple=True)[0]


@dataclass(frozen=True)
class SpeechDataset:
    """Train / validation / test splits over the same environments, plus the settings that made them."""

    train: SpeechSplit
    validation: SpeechSplit
    test: SpeechSplit
    environment_names: tuple[str, ...]
    sample_rate: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> SpeechSplit:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        return getattr(self, name)


# == settings ====================================================================================
@dataclass(frozen=True)
class SpeechMixConfig:
    """What every mixture shares, whatever the source of its speech and noise."""

    sample_rate: int = 16000  # Hz; the paper's 16 kHz
    # Defaults are the smoke scale (every method at three sparsities in minutes on 2 CPU cores);
    # FULL_SCALE_MIX holds the paper-like sizes.
    clip_seconds: float = 1.0  # every clip is cut or padded to this length (the paper: 10 s)
    train_per_environment: int = 24  # training mixtures per environment
    validation_per_environment: int = 4
    test_per_environment: int = 8
    snr_db: tuple[float, float] = (-5.0, 5.0)  # SNR of each mixture, uniform in this range (the paper: unstated)
    level_db: float = -25.0  # RMS of every mixture in dBFS (the DNS Challenge's target level)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sample_rate < 1000:
            raise ValueError(f"sample_rate must be >= 1000 Hz; got {self.sample_rate}")
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0; got {self.clip_seconds}")
        for name in ("train_per_environment", "validation_per_environment", "test_per_environment"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if len(self.snr_db) != 2 or not self.snr_db[0] <= self.snr_db[1]:
            raise ValueError(f"snr_db must be (low, high) with low <= high; got {self.snr_db}")
        if not self.level_db < 0:
            raise ValueError(f"level_db must be below 0 dBFS; got {self.level_db}")

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    def count(self, split: str) -> int:
        return {"train": self.train_per_environment, "validation": self.validation_per_environment,
                "test": self.test_per_environment}[split]


FULL_SCALE_MIX = SpeechMixConfig(clip_seconds=10.0, train_per_environment=500, validation_per_environment=50,
                                 test_per_environment=100)
"""10-s clips as in the paper; the mixture counts are ours (the paper does not give them): 1,500
training mixtures (about 4 h of audio, 1.9 GB in memory) and 300 test clips."""


# == caching =====================================================================================
def default_cache_dir() -> Path:
    """``$RTL_CACHE/speech``, or ``~/.cache/routing-lottery/speech`` when RTL_CACHE is unset."""
    root = os.environ.get("RTL_CACHE")
    return Path(root).expanduser() / "speech" if root else Path.home() / ".cache" / "routing-lottery" / "speech"


def _cache_key(kind: str, settings: Mapping[str, Any]) -> str:
    text = json.dumps({"kind": kind, "recipe": RECIPE_VERSION, **settings}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _save_cache(path: Path, dataset: SpeechDataset) -> None:
    arrays: dict[str, np.ndarray] = {
        "environment_names": np.array(dataset.environment_names),
        "sample_rate": np.array(dataset.sample_rate),
        "settings": np.array(json.dumps(dict(dataset.settings), sort_keys=True, default=str)),
    }
    for name in SPLITS:
        s = dataset.split(name)
        arrays |= {f"{name}/noisy": s.noisy.numpy(), f"{name}/clean": s.clean.numpy(),
                   f"{name}/environment": s.environment.numpy(), f"{name}/snr_db": s.snr_db.numpy(),
                   f"{name}/sources": np.array(s.sources, dtype=str)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _load_cache(path: Path) -> SpeechDataset | None:
    """The cached dataset, or None when the file is missing or unreadable (then it is regenerated)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = tuple(str(n) for n in z["environment_names"])
            rate = int(z["sample_rate"])
            splits = {name: SpeechSplit(
                torch.from_numpy(z[f"{name}/noisy"].copy()), torch.from_numpy(z[f"{name}/clean"].copy()),
                torch.from_numpy(z[f"{name}/environment"].copy()), torch.from_numpy(z[f"{name}/snr_db"].copy()),
                tuple(str(s) for s in z[f"{name}/sources"]), names, rate) for name in SPLITS}
            settings = json.loads(str(z["settings"]))
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None
    return SpeechDataset(splits["train"], splits["validation"], splits["test"], names, rate, settings)


def _cached(kind: str, settings: Mapping[str, Any], cache_dir: str | Path | None, use_cache: bool,
            build: Callable[[], SpeechDataset]) -> SpeechDataset:
    if not use_cache:
        return build()
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{_cache_key(kind, settings)}.npz"
    found = _load_cache(path)
    if found is not None:
        return found
    dataset = build()
    _save_cache(path, dataset)
    return dataset


__all__ = ["ENVIRONMENTS", "SPLITS", "RECIPE_VERSION", "SpeechSplit", "SpeechDataset", "SpeechMixConfig", "FULL_SCALE_MIX", "default_cache_dir"]
