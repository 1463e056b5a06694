"""What the synthetic talkers say and how they say it.

*Clean speech* is synthesized by espeak-ng: sentences from a small seeded word grammar, each
spoken by one of several English voices with a voice variant (male / female / Klatt
timbres), pitch, pitch range and rate drawn at random. This module draws the sentences and
the voices and speaks sentences until a clip is filled; ``synthesizer`` does the speaking.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ...audio import resample
from .synthesizer import LANGUAGES, VARIANTS, Speaker, Voice

_WORDS: dict[str, tuple[str, ...]] = {
    "det": ("the", "a", "every", "one", "that", "this", "my", "your", "our", "some"),
    "adj": ("old", "green", "quiet", "heavy", "bright", "small", "cold", "happy", "broken", "early", "narrow",
            "golden", "careful", "sudden", "gentle", "strange", "wooden", "distant", "busy", "silver"),
    "noun": ("farmer", "window", "river", "teacher", "garden", "engine", "letter", "doctor", "kitchen", "market",
             "bridge", "pilot", "basket", "station", "mountain", "painter", "ladder", "harbor", "violin", "candle",
             "student", "village", "compass", "tiger", "blanket", "lantern", "captain", "orchard", "museum", "kettle"),
    "verb": ("found", "carried", "painted", "followed", "opened", "watched", "cleaned", "counted", "borrowed",
             "repaired", "visited", "pushed", "described", "remembered", "noticed", "collected", "moved", "lifted"),
    "prep": ("near", "behind", "under", "beside", "across", "inside", "above", "around", "past", "along"),
    "adv": ("slowly", "today", "again", "quietly", "at dawn", "last winter", "twice", "without a word",
            "before noon", "in the rain", "by accident", "with great care"),
}


def _noun_phrase(rng: np.random.Generator) -> str:
    words = [rng.choice(_WORDS["det"])]
    if rng.random() < 0.6:
        words.append(rng.choice(_WORDS["adj"]))
    words.append(rng.choice(_WORDS["noun"]))
    return " ".join(str(w) for w in words)


def make_sentence(rng: np.random.Generator) -> str:
    """One sentence: noun phrase, verb, noun phrase, optional place and manner (about 10^8 possibilities)."""
    parts = [_noun_phrase(rng), str(rng.choice(_WORDS["verb"])), _noun_phrase(rng)]
    if rng.random() < 0.5:
        parts += [str(rng.choice(_WORDS["prep"])), _noun_phrase(rng)]
    if rng.random() < 0.5:
        parts.append(str(rng.choice(_WORDS["adv"])))
    sentence = " ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def random_voice(rng: np.random.Generator) -> Voice:
    """A voice with a random accent, timbre, pitch (25-75), pitch range (20-80) and rate (130-200 wpm)."""
    name = f"{rng.choice(LANGUAGES)}+{rng.choice(VARIANTS)}"
    return Voice(name, int(rng.integers(25, 76)), int(rng.integers(20, 81)), int(rng.integers(130, 201)))


def _trim_silence(x: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    """Cut the silence espeak leaves before and after an utterance."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    return x[loud[0]:loud[-1] + 1] if loud.size else x


def _speak_to_length(speaker: Speaker, sentences: Iterator[str], voice: Voice, samples: int, rate: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Speak sentences (0.1-0.4 s pauses between them) until ``samples`` are filled; return audio and texts."""
    pieces, texts, total = [], [], 0
    while total < samples:
        text = next(sentences)
        audio = _trim_silence(resample(speaker.speak(text, voice), speaker.sample_rate, rate))
        pause = np.zeros(int(rng.uniform(0.1, 0.4) * rate), dtype=np.float32)
        pieces += [audio, pause]
        texts.append(text)
        total += audio.size + pause.size
    return np.concatenate(pieces), texts


__all__ = ["make_sentence", "random_voice"]
