"""The embedded default (``synthetic_speech_dataset``) -- offline, deterministic, cached.

Clean speech from espeak-ng (``synthesizer``) saying seeded sentences in random voices
(``grammar``), in generated noise, one recipe per environment (``noise``), mixed as in
``mixing`` and cached as in ``dataset``.

*Splits never share a clean utterance*: every sentence text is drawn once for the whole pool
(duplicates are redrawn) and each clip has its own. Texts are drawn for the test split first,
then validation, then training, and each clip's audio comes from its own seed (run seed,
split, environment, index) in a fresh synthesizer process, so enlarging the training set
leaves the test clips as they were.

Results are cached as ``.npz`` under ``$RTL_CACHE/speech`` (``~/.cache/routing-lottery/speech``
when unset), named by a hash of every generation setting, the recipe version and the
synthesizer's identity, and written atomically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .dataset import ENVIRONMENTS, SPLITS, SpeechDataset, SpeechMixConfig, _cached
from .grammar import _speak_to_length, make_sentence, random_voice
from .mixing import _assemble, _Clip, _clip_rng, _mix, _speech_window, _unit_power
from .noise import NOISE_RECIPES
from .synthesizer import Synthesizer, find_synthesizer


def _draw_texts(config: SpeechMixConfig, environments: int) -> dict[str, list[str]]:
    """One unique sentence per clip, test first so its texts do not depend on the training size.

    Long clips need several sentences; their texts are drawn later, per clip, from the clip's own
    generator, and are checked against this pool and each other (see ``_synthetic_clip``).
    """
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 7919]))
    seen: set[str] = set()
    texts: dict[str, list[str]] = {}
    for split in ("test", "validation", "train"):
        drawn = []
        while len(drawn) < config.count(split) * environments:
            sentence = make_sentence(rng)
            if sentence not in seen:
                seen.add(sentence)
                drawn.append(sentence)
        texts[split] = drawn
    return texts


def _synthetic_clip(config: SpeechMixConfig, synth: Synthesizer, split: int, env: int, index: int,
                    first_text: str, taken: set[str]) -> _Clip:
    rng = _clip_rng(config.seed, split, env, index)
    n, rate = config.clip_samples, config.sample_rate

    def sentences() -> Iterator[str]:
        yield first_text
        while True:
            s = make_sentence(rng)
            if s not in taken:
                taken.add(s)
                yield s

    voice = random_voice(rng)
    with synth.session() as speaker:  # one fresh espeak-ng state per clip: see Synthesizer
        speech, texts = _speak_to_length(speaker, sentences(), voice, n, rate, rng)
        clean = _unit_power(_speech_window(speech, n, rng))
        noise = NOISE_RECIPES[ENVIRONMENTS[env]](rng, n, rate, speaker)
    snr = float(rng.uniform(*config.snr_db))
    noisy, clean = _mix(clean, noise, snr, config.level_db)
    return _Clip(noisy, clean, env, snr, f"{voice.describe()} | {' '.join(texts)}")


def synthetic_speech_dataset(
    config: SpeechMixConfig = SpeechMixConfig(),
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    synthesizer: Synthesizer | None = None,
) -> SpeechDataset:
    """The embedded default: espeak-ng speech in synthetic indoor / outdoor / transportation noise.

    Deterministic given ``config`` (same seed, same arrays) and cached on disk (see the module
    docstring). Raises ``SynthesizerNotFoundError`` when no espeak-ng is installed.

    Example
    -------
    >>> data = synthetic_speech_dataset(SpeechMixConfig(clip_seconds=1.0, train_per_environment=8))
    >>> data.train.noisy.shape, data.environment_names
    (torch.Size([24, 16000]), ('indoor', 'outdoor', 'transportation'))
    """
    synth = synthesizer or find_synthesizer()
    settings = {"source": "synthetic", **dataclasses.asdict(config), "synthesizer": synth.identity}

    def build() -> SpeechDataset:
        texts = _draw_texts(config, len(ENVIRONMENTS))
        taken = {t for pool in texts.values() for t in pool}
        splits = {}
        for split in ("test", "validation", "train"):  # test first: see _draw_texts
            s, count = SPLITS.index(split), config.count(split)
            clips = [_synthetic_clip(config, synth, s, env, i, texts[split][env * count + i], taken)
                     for env in range(len(ENVIRONMENTS)) for i in range(count)]
            splits[split] = _assemble(clips, ENVIRONMENTS, config.sample_rate)
        return SpeechDataset(splits["train"], splits["validation"], splits["test"], ENVIRONMENTS,
                             config.sample_rate, settings)

    return _cached("synthetic", settings, cache_dir, use_cache, build)


__all__ = ["synthetic_speech_dataset"]
