"""Noisy-speech mixtures in three acoustic environments: an embedded synthetic default and real folders.

Both sources give the same object, a :class:`SpeechDataset` with train / validation / test
:class:`SpeechSplit` s of equal-length clips: ``noisy`` and ``clean`` waveforms ``(N, T)``,
``environment`` ids ``(N,)`` and the environment names. One environment is one RTL context.

Embedded default (``synthetic_speech_dataset``) -- offline, deterministic, cached
    espeak-ng speech in generated indoor / outdoor / transportation noise; see ``synthetic``.

Full scale (``folder_speech_dataset``) -- DNS Challenge clean speech + TAU Urban Acoustic Scenes 2020
    real recordings from two folders; see ``folders``.

One module per concern, each importing only modules listed above it:

    dataset      the dataset object, the mixture settings (``SpeechMixConfig``) and the on-disk cache
    synthesizer  espeak-ng, through ctypes in worker processes or as the command-line program
    grammar      what the synthetic talkers say and how: seeded sentences and random voices
    mixing       clip windows, mixing at an exact SNR and level, stacking clips into splits
    noise        the generated noise recipes, one per environment
    synthetic    the embedded default, ``synthetic_speech_dataset``
    folders      the full-scale folders, ``folder_speech_dataset``

Every public name is re-exported here: import them from ``routing_lottery.data.speech``.
"""

from __future__ import annotations

import shutil  # noqa: F401  -- kept as an attribute: tests patch ``speech.shutil.which`` to hide espeak-ng

from ..images import DatasetNotFoundError
from .dataset import (
    ENVIRONMENTS, FULL_SCALE_MIX, RECIPE_VERSION, SPLITS, SpeechDataset, SpeechMixConfig, SpeechSplit,
    default_cache_dir,
)
from .folders import (
    TAU_3CLASS, FolderSpeechConfig, NoiseFile, environments_of, find_clean_files, folder_speech_dataset, read_tau_meta,
)
from .grammar import make_sentence, random_voice
from .noise import NOISE_RECIPES, indoor_noise, outdoor_noise, transportation_noise
from .synthesizer import (
    LANGUAGES, VARIANTS, EspeakLibrary, EspeakProgram, Speaker, Synthesizer, SynthesizerNotFoundError, Voice,
    find_synthesizer,
)
from .synthetic import synthetic_speech_dataset

__all__ = [
    "ENVIRONMENTS", "TAU_3CLASS", "SPLITS", "NOISE_RECIPES", "SpeechSplit", "SpeechDataset", "SpeechMixConfig",
    "FULL_SCALE_MIX",
    "FolderSpeechConfig", "NoiseFile", "Voice", "Speaker", "Synthesizer", "EspeakLibrary", "EspeakProgram", "SynthesizerNotFoundError", "find_synthesizer",
    "synthetic_speech_dataset", "folder_speech_dataset", "read_tau_meta", "find_clean_files", "environments_of",
    "make_sentence", "random_voice", "indoor_noise", "outdoor_noise", "transportation_noise", "default_cache_dir",
]
