"""Clean speech and noise into mixtures, the same way for both sources.

*Mixtures* put each clean clip and a noise clip together at an SNR drawn uniformly from
``snr_db`` (exact, see ``audio.mix_at_snr``), then scale both to the mixture level
``level_db`` (RMS in dBFS) so every network input has the same loudness.

Also here: random windows of speech and noise, unit-power scaling, each clip's own random
generator and the stacking of clips into a :class:`SpeechSplit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...audio import mix_at_snr
from .dataset import SpeechSplit


# == windows and levels ==========================================================================
def _unit_power(x: np.ndarray) -> np.ndarray:
    return (x / (np.sqrt(np.mean(x * x)) + 1e-12)).astype(np.float32)


def _random_window(x: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``samples``-long window of ``x``; zero-padded at a random offset when ``x`` is shorter."""
    if x.size >= samples:
        start = int(rng.integers(0, x.size - samples + 1))
        return x[start:start + samples]
    out = np.zeros(samples, dtype=np.float32)
    start = int(rng.integers(0, samples - x.size + 1))
    out[start:start + x.size] = x
    return out


def _speech_window(speech: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random window that holds speech: very short clips could otherwise land in a pause."""
    for _ in range(10):
        window = _random_window(speech, samples, rng)
        if np.sqrt(np.mean(window * window)) > 1e-3:
            return window
    loud = np.flatnonzero(np.abs(speech) > 1e-3)
    start = int(loud[0]) if loud.size else 0  # a very quiet file: any window will do
    return _random_window(speech[start:start + samples], samples, rng)


# == mixing ======================================================================================
def _mix(clean: np.ndarray, noise: np.ndarray, snr_db: float, level_db: float) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) at exactly ``snr_db``, both scaled so the mixture's RMS is ``level_db`` dBFS.

    Should a loud noise peak push the mixture past full scale, both are scaled down further,
    which keeps the SNR and avoids clipping in a written wav.
    """
    c, z = torch.from_numpy(clean.astype(np.float64)), torch.from_numpy(noise.astype(np.float64))
    noisy = mix_at_snr(c, z, snr_db)
    gain = 10 ** (level_db / 20) / float(torch.sqrt(torch.mean(noisy * noisy)) + 1e-12)
    gain = min(gain, 0.99 / (float(noisy.abs().max()) + 1e-12))
    return (noisy * gain).numpy().astype(np.float32), (c * gain).numpy().astype(np.float32)


@dataclass(frozen=True)
class _Clip:
    noisy: np.ndarray
    clean: np.ndarray
    environment: int
    snr_db: float
    source: str


def _assemble(clips: Sequence[_Clip], names: tuple[str, ...], rate: int) -> SpeechSplit:
    return SpeechSplit(
        noisy=torch.from_numpy(np.stack([c.noisy for c in clips])),
        clean=torch.from_numpy(np.stack([c.clean for c in clips])),
        environment=torch.tensor([c.environment for c in clips], dtype=torch.long),
        snr_db=torch.tensor([c.snr_db for c in clips], dtype=torch.float32),
        sources=tuple(c.source for c in clips),
        environment_names=names,
        sample_rate=rate,
    )


def _clip_rng(seed: int, *position: int) -> np.random.Generator:
    """An independent generator for one clip: the run seed and the clip's (split, environment, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *position]))
