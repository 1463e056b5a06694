"""Noisy-speech mixtures in three acoustic environments: an embedded synthetic default and real folders.

Both sources give the same object, a :class:`SpeechDataset` with train / validation / test
:class:`SpeechSplit` s of equal-length clips: ``noisy`` and ``clean`` waveforms ``(N, T)``,
``environment`` ids ``(N,)`` and the environment names. One environment is one RTL context.

Embedded default (``synthetic_speech_dataset``) -- offline, deterministic, cached
    *Clean speech* is synthesized by espeak-ng: sentences from a small seeded word grammar, each
    spoken by one of several English voices with a voice variant (male / female / Klatt
    timbres), pitch, pitch range and rate drawn at random. The synthesizer is the shared library
    that the PyPI package ``espeakng-loader`` ships (driven through ctypes), or else the Debian
    ``espeak-ng`` program; neither present is an error that says what to install.

    *Noise* follows one recipe per environment, each built from what makes those scenes sound
    different (levels relative to the recipe's main component; every noise clip is then scaled
    to unit power before mixing):

    ``indoor``          babble of 4-7 synthetic talkers, convolved with an exponentially decaying
                        room response (RT60 0.3-0.9 s); appliance / mains hum at 50 Hz and its
                        harmonics with the 100 Hz line strongest (transformer hum), -18..-6 dB;
                        faint ventilation hiss (pink noise), -30..-20 dB.
    ``outdoor``         wind: white noise low-passed at 150-600 Hz and modulated by slow
                        log-normal gusts; bird chirps: 2-7 kHz frequency sweeps of 30-150 ms in
                        trills of 1-5, Poisson-timed, -12..-3 dB; distant traffic: noise below
                        150-300 Hz plus brown noise, swelling as vehicles pass, -10..0 dB.
    ``transportation``  engine: a 25-60 Hz fundamental whose rpm drifts slowly (±15 %) with 12
                        harmonics; broadband cabin rumble (30-2,000 Hz band-passed plus pink
                        noise), -6..+2 dB; a periodic rhythm, either rail clicks (pairs of sharp bursts
                        from the two wheels of a bogie crossing a joint, every 0.6-1.3 s) or road
                        thumps (low bursts from expansion joints, every 0.8-2 s), -12..-4 dB.

    *Mixtures* put each clean clip and a noise clip together at an SNR drawn uniformly from
    ``snr_db`` (exact, see ``audio.mix_at_snr``), then scale both to the mixture level
    ``level_db`` (RMS in dBFS) so every network input has the same loudness.

    *Splits never share a clean utterance*: every sentence text is drawn once for the whole pool
    (duplicates are redrawn) and each clip has its own. Texts are drawn for the test split first,
    then validation, then training, and each clip's audio comes from its own seed (run seed,
    split, environment, index) in a fresh synthesizer process, so enlarging the training set
    leaves the test clips as they were.

    Results are cached as ``.npz`` under ``$RTL_CACHE/speech`` (``~/.cache/routing-lottery/speech``
    when unset), named by a hash of every generation setting, the recipe version and the
    synthesizer's identity, and written atomically.

Full scale (``folder_speech_dataset``) -- DNS Challenge clean speech + TAU Urban Acoustic Scenes 2020
    Clean speech: every ``*.wav`` under ``<clean_root>/clean/`` (or under ``clean_root`` itself
    when it has no ``clean`` folder), recursively; files are split between train / validation /
    test by a seeded permutation, so no file serves two splits. Noise: ``<noise_root>/meta.csv``
    (tab-separated, header ``filename  scene_label  [identifier ...]``) naming ``audio/*.wav``
    files, grouped into environments by ``scene_map`` (default: TAU 2020 3Class). Noise files
    are split by their recording location (``identifier``) when the column is there and an
    environment has at least three locations, so a test mixture never hears a place heard in
    training; otherwise by file. Audio is downmixed to mono and resampled to ``sample_rate``
    with a polyphase filter. All clips are held in memory: at 10 s and 16 kHz a mixture takes
    1.28 MB (noisy + clean, float32), so size ``*_per_environment`` to the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..audio import mix_at_snr, read_wav, resample
from ..io import atomic_write_bytes
from .images import DatasetNotFoundError

ENVIRONMENTS: tuple[str, ...] = ("indoor", "outdoor", "transportation")
"""The three scene groups of TAU Urban Acoustic Scenes 2020 3Class, in context-id order."""

TAU_3CLASS: dict[str, str] = {
    "airport": "indoor", "shopping_mall": "indoor", "metro_station": "indoor",
    "park": "outdoor", "public_square": "outdoor", "street_pedestrian": "outdoor", "street_traffic": "outdoor",
    "bus": "transportation", "metro": "transportation", "tram": "transportation",
}
"""TAU 2020 Mobile scene label -> 3Class environment (the official grouping of Task 1B)."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
RECIPE_VERSION = 1
"""Bump when a recipe changes what it generates: old cache entries then stop matching."""


class SynthesizerNotFoundError(RuntimeError):
    """No espeak-ng is available; the message says what to install."""


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


# == speech synthesis ============================================================================
@dataclass(frozen=True)
class Voice:
    """How one utterance is spoken: an espeak-ng voice (``language+variant``) and its prosody."""

    name: str  # e.g. "en-us+f3"
    pitch: int  # espeak's 0..100 base pitch
    pitch_range: int  # 0..100: monotone .. lively
    rate: int  # words per minute

    def describe(self) -> str:
        return f"{self.name} p{self.pitch} r{self.pitch_range} s{self.rate}"


class Speaker(Protocol):
    """Speaks utterances one after another; ``speak`` returns float audio at ``sample_rate``."""

    sample_rate: int

    def speak(self, text: str, voice: Voice) -> np.ndarray: ...


class Synthesizer(Protocol):
    """Opens speaking sessions; ``identity`` names the engine and version (part of the cache key).

    Why sessions: espeak-ng keeps state that no API call resets (pitch flutter position, glottal
    phase, noise generator) and carries it from one utterance to the next, even across
    ``espeak_Terminate`` / ``espeak_Initialize``. The same call sequence from a fresh process is
    reproducible, though. So each clip opens its own session, a fresh worker process, and the
    clip's audio depends on nothing but the clip's own seed.
    """

    sample_rate: int
    identity: str

    def session(self) -> contextlib.AbstractContextManager[Speaker]: ...


LANGUAGES: tuple[str, ...] = ("en-us", "en", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp")
"""English espeak-ng voices (accents) in both the PyPI package and the Debian package."""

VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2")
"""Voice variants (timbres) that ship with espeak-ng: seven male, five female, two Klatt formant voices."""

# The worker runs under ``python -S -c`` with the standard library only (no numpy, no site
# packages), so it starts in tens of milliseconds. Protocol: it writes a header line
# "<sample rate> <version>", then answers each JSON request line on stdin with an 8-byte header
# (status, byte count) and that many bytes of 16-bit little-endian PCM. Both random generators
# espeak-ng draws from (its own and libc's rand) are reseeded before each utterance.
_WORKER_SOURCE = r"""
import ctypes, json, struct, sys
lib = ctypes.CDLL(sys.argv[1])
libc = ctypes.CDLL(None)
lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                             ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
lib.espeak_Info.restype = ctypes.c_char_p
has_seed = hasattr(lib, "espeak_ng_SetRandSeed")
if has_seed:
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
rate = lib.espeak_Initialize(2, 0, sys.argv[2].encode(), 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
if rate <= 0:
    sys.exit("espeak_Initialize failed with data at " + sys.argv[2])
chunks = []
def collect(samples, count, events):
    if samples and count > 0:
        chunks.append(ctypes.string_at(samples, 2 * count))
    return 0
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(collect)
lib.espeak_SetSynthCallback(callback)
out = sys.stdout.buffer
out.write(("%d %s\n" % (rate, lib.espeak_Info(None).decode())).encode())
out.flush()
for line in sys.stdin:
    request = json.loads(line)
    status = lib.espeak_SetVoiceByName(request["voice"].encode())
    if status == 0:
        for parameter, value in ((1, request["rate"]), (3, request["pitch"]), (4, request["range"])):
            lib.espeak_SetParameter(parameter, value, 0)
        if has_seed:
            lib.espeak_ng_SetRandSeed(1)
        libc.srand(1)
        del chunks[:]
        text = request["text"].encode()
        status = lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, 0, None, None)  # 1: POS_CHARACTER
        lib.espeak_Synchronize()
    data = b"".join(chunks) if status == 0 else b""
    out.write(struct.pack("<iI", status, len(data)))
    out.write(data)
    out.flush()
"""


class _WorkerSpeaker:
    """One espeak-ng worker process: a fresh library state, so its output is reproducible."""

    def __init__(self, library: str, data: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-S", "-c", _WORKER_SOURCE, library, data],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self._process.stdout is not None and self._process.stdin is not None
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        header = self._stdout.readline().decode().split(maxsplit=1)
        if len(header) != 2:
            raise SynthesizerNotFoundError(f"the espeak-ng worker failed to start: {self._error()}")
        self.sample_rate, self.version = int(header[0]), header[1].strip()

    def _error(self) -> str:
        self.close()
        assert self._process.stderr is not None
        return self._process.stderr.read().decode(errors="replace").strip() or f"exit status {self._process.returncode}"

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        request = {"text": text, "voice": voice.name, "pitch": voice.pitch, "range": voice.pitch_range,
                   "rate": voice.rate}
        try:
            self._stdin.write((json.dumps(request) + "\n").encode())
            self._stdin.flush()
            status, size = struct.unpack("<iI", self._stdout.read(8))
            data = self._stdout.read(size)
        except (BrokenPipeError, struct.error) as err:
            raise RuntimeError(f"the espeak-ng worker died ({err}): {self._error()}") from None
        if status != 0 or not data:
            raise RuntimeError(f"espeak-ng failed to speak {text!r} with voice {voice.name!r} (status {status})")
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0

    def close(self) -> None:
        if self._process.poll() is None:
            self._stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stdout.close()


class EspeakLibrary:
    """libespeak-ng from the ``espeakng-loader`` wheel, driven through ctypes in worker processes."""

    def __init__(self) -> None:
        import espeakng_loader

        self._library, self._data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        if not Path(self._library).is_file():
            raise OSError(f"{self._library} is missing")
        self._variants = Path(self._data) / "voices" / "!v"
        probe = _WorkerSpeaker(self._library, self._data)
        probe.close()
        self.sample_rate = probe.sample_rate
        self.identity = f"libespeak-ng {probe.version} (espeakng-loader)"

    @contextlib.contextmanager
    def session(self) -> Iterator[Speaker]:
        speaker = _WorkerSpeaker(self._library, self._data)
        try:
            yield _CheckedSpeaker(speaker, self._variants)
        finally:
            speaker.close()


@dataclass
class _CheckedSpeaker:
    """Refuses voice variants espeak-ng does not ship: it would silently fall back to the plain voice."""

    speaker: _WorkerSpeaker
    variants: Path

    @property
    def sample_rate(self) -> int:
        return self.speaker.sample_rate

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        variant = voice.name.partition("+")[2]
        if variant and not (self.variants / variant).is_file():
            raise ValueError(f"espeak-ng voice variant {variant!r} is not in {self.variants}")
        return self.speaker.speak(text, voice)


class EspeakProgram:
    """The ``espeak-ng`` command-line program (Debian package ``espeak-ng``), one process per utterance.

    Each call starts from a fresh process, so output is reproducible. The program has no
    pitch-range option, so ``Voice.pitch_range`` is not used here.
    """

    sample_rate = 22050

    def __init__(self, program: str) -> None:
        self._program = program
        version = subprocess.run([program, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        self.identity = f"espeak-ng program: {version}"

    @contextlib.contextmanager
    def session(self) -> Iterator[Speaker]:
        yield self

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "utterance.wav"
            command = [self._program, "-v", voice.name, "-p", str(voice.pitch), "-s", str(voice.rate), "-w", str(out), text]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0 or not out.is_file():
                raise RuntimeError(f"{' '.join(command[:-1])} failed: {result.stderr.strip()}")
            return read_wav(out, sample_rate=None)


def find_synthesizer() -> Synthesizer:
    """The bundled libespeak-ng when ``espeakng-loader`` is installed, else the ``espeak-ng`` program.

    Raises ``SynthesizerNotFoundError`` saying what to install when neither is there.
    """
    reason = "espeakng-loader is not installed"
    try:
        return EspeakLibrary()
    except ImportError:
        pass
    except (OSError, SynthesizerNotFoundError) as err:  # the wheel is there but its library does not work here
        reason = f"espeakng-loader's libespeak-ng does not work here ({err})"
    program = shutil.which("espeak-ng")
    if program is not None:
        return EspeakProgram(program)
    raise SynthesizerNotFoundError(
        f"the synthetic speech dataset needs espeak-ng ({reason}; no espeak-ng program on PATH): install the "
        "Python package `pip install espeakng-loader` (bundles libespeak-ng and its voices) or the system package "
        "`apt-get install espeak-ng`; or use real speech with folder_speech_dataset"
    )


# -- the sentence grammar ------------------------------------------------------------------------
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


# == noise recipes ===============================================================================
def _unit_power(x: np.ndarray) -> np.ndarray:
    return (x / (np.sqrt(np.mean(x * x)) + 1e-12)).astype(np.float32)


def _db(rng: np.random.Generator, low: float, high: float) -> float:
    """A random amplitude gain drawn uniformly in dB."""
    return float(10 ** (rng.uniform(low, high) / 20))


def _filtered_noise(rng: np.random.Generator, n: int, rate: int, band: tuple[float | None, float | None],
                    order: int = 4) -> np.ndarray:
    """White noise through a Butterworth low-, high- or band-pass ``band=(low_hz, high_hz)``."""
    from scipy.signal import butter, sosfilt

    low, high = band
    nyquist = rate / 2
    high = None if high is None else min(high, 0.95 * nyquist)
    white = rng.standard_normal(n)
    if low and high:
        sos = butter(order, (low, high), btype="bandpass", fs=rate, output="sos")
    elif high:
        sos = butter(order, high, btype="lowpass", fs=rate, output="sos")
    elif low:
        sos = butter(order, low, btype="highpass", fs=rate, output="sos")
    else:
        return white
    return sosfilt(sos, white)


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum ∝ 1/f^exponent (1: pink, 2: brown), shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    spectrum /= f ** (exponent / 2)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def _slow_envelope(rng: np.random.Generator, n: int, rate: int, cutoff_hz: float) -> np.ndarray:
    """A smooth random curve (zero mean, unit variance) varying no faster than ``cutoff_hz``."""
    from scipy.signal import butter, sosfiltfilt

    sos = butter(2, cutoff_hz, btype="lowpass", fs=rate, output="sos")
    curve = sosfiltfilt(sos, rng.standard_normal(n + rate))[rate // 2: rate // 2 + n]
    return (curve - curve.mean()) / (curve.std() + 1e-12)


def _room_response(rng: np.random.Generator, rate: int, rt60: float) -> np.ndarray:
    """A simple room impulse response: direct path plus exponentially decaying diffuse noise.

    The decay is 60 dB over ``rt60`` seconds (amplitude ∝ exp(-6.91 t / rt60)); the first 5 ms
    are left empty, the gap between the direct sound and the first reflections.
    """
    t = np.arange(int(rt60 * rate)) / rate
    tail = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60)
    tail[: int(0.005 * rate)] = 0.0
    tail *= 0.6 / (np.sqrt(np.sum(tail * tail)) + 1e-12)
    tail[0] = 1.0
    return tail


def _harmonics(f0: np.ndarray, rate: int, amplitudes: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Σ_k a_k sin(k·φ(t) + θ_k), φ the running phase of the (possibly time-varying) fundamental ``f0``."""
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros_like(phase)
    for k, a in enumerate(amplitudes, start=1):
        if k * float(np.max(f0)) < rate / 2:
            out += a * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _place_bursts(n: int, times: Sequence[float], burst: Callable[[], np.ndarray], rate: int) -> np.ndarray:
    """Sum of bursts (each from ``burst()``) starting at ``times`` seconds; bursts past the end are cut."""
    out = np.zeros(n)
    for t in times:
        start = int(t * rate)
        if 0 <= start < n:
            b = burst()
            end = min(n, start + b.size)
            out[start:end] += b[: end - start]
    return out


def _babble(rng: np.random.Generator, n: int, rate: int, speaker: Speaker) -> np.ndarray:
    """4-7 synthetic talkers at random levels, each speaking its own sentences."""
    talkers = int(rng.integers(4, 8))
    out = np.zeros(n)
    for _ in range(talkers):
        voice = random_voice(rng)
        sentences = iter(lambda: make_sentence(rng), None)
        speech, _ = _speak_to_length(speaker, sentences, voice, n, rate, rng)
        out += _db(rng, -6, 0) * _unit_power(_random_window(speech, n, rng))
    return out


def indoor_noise(rng: np.random.Generator, n: int, rate: int, speaker: Speaker | None) -> np.ndarray:
    """Reverberant babble + mains/appliance hum (50 Hz harmonics, 100 Hz strongest) + ventilation hiss."""
    from scipy.signal import fftconvolve

    if speaker is None:
        raise ValueError("indoor noise needs a speaker for its babble")
    babble = _unit_power(fftconvolve(_babble(rng, n, rate, speaker), _room_response(rng, rate, rng.uniform(0.3, 0.9)))[:n])
    mains = 50.0 * (1 + 0.002 * _slow_envelope(rng, n, rate, 0.5))  # the grid wanders by a few tenths of a Hz
    hum = _harmonics(mains, rate, [0.5, 1.0, 0.4, 0.3, 0.2, 0.15, 0.1, 0.08], rng)
    hiss = _colored_noise(rng, n, 1.0)
    return _unit_power(babble + _db(rng, -18, -6) * _unit_power(hum) + _db(rng, -30, -20) * _unit_power(hiss))


def _chirp(rng: np.random.Generator, rate: int) -> np.ndarray:
    """One bird chirp: a 30-150 ms sweep between 2 and 7 kHz under a Hann envelope."""
    duration = rng.uniform(0.03, 0.15)
    m = int(duration * rate)
    top = min(7000.0, 0.45 * rate)
    f_start, f_end = rng.uniform(2000, top, size=2)
    f = np.linspace(f_start, f_end, m) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(20, 60) * np.arange(m) / rate))
    return np.hanning(m) * np.sin(2 * np.pi * np.cumsum(f) / rate)


def _bird_song(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """Trills of 1-5 chirps 80-150 ms apart, starting as a Poisson process of 0.5-3 trills per second."""
    seconds = n / rate
    starts = np.sort(rng.uniform(0, seconds, size=rng.poisson(rng.uniform(0.5, 3.0) * seconds)))
    times: list[float] = []
    for s in starts:
        gap = rng.uniform(0.08, 0.15)
        times += [s + i * gap for i in range(int(rng.integers(1, 6)))]
    if not times:  # a clip without birds is a plain windy street; keep at least one for the recipe's character
        times = [rng.uniform(0, seconds)]
    return _place_bursts(n, times, lambda: _chirp(rng, rate), rate)


def outdoor_noise(rng: np.random.Generator, n: int, rate: int, speaker: Speaker | None = None) -> np.ndarray:
    """Gusty low-passed wind + bird chirps + distant traffic rumble with passing-vehicle swells."""
    gusts = np.exp(0.7 * _slow_envelope(rng, n, rate, rng.uniform(0.3, 1.5)))
    wind = _filtered_noise(rng, n, rate, (None, rng.uniform(150, 600)), order=2) * gusts
    swells = 1 + sum(np.exp(-0.5 * ((np.arange(n) / rate - rng.uniform(0, n / rate)) / rng.uniform(0.5, 2.0)) ** 2)
                     * rng.uniform(1, 4) for _ in range(int(rng.integers(1, 4))))
    traffic = _filtered_noise(rng, n, rate, (None, rng.uniform(150, 300))) + 0.3 * _colored_noise(rng, n, 2.0)
    birds = _bird_song(rng, n, rate)
    return _unit_power(_unit_power(wind) + _db(rng, -10, 0) * _unit_power(traffic * swells)
                       + _db(rng, -12, -3) * _unit_power(birds))


def _click(rng: np.random.Generator, rate: int) -> np.ndarray:
    """A rail click: 5-15 ms of band-passed (500-4,000 Hz) noise with a fast exponential decay."""
    m = int(rng.uniform(0.005, 0.015) * rate)
    return _filtered_noise(rng, m, rate, (500.0, 4000.0), order=2) * np.exp(-np.arange(m) / (0.2 * m))


def _thump(rng: np.random.Generator, rate: int) -> np.ndarray:
    """A road thump: 20-50 ms of a 50-200 Hz decaying tone, a tyre over an expansion joint."""
    m = int(rng.uniform(0.02, 0.05) * rate)
    t = np.arange(m) / rate
    return np.sin(2 * np.pi * rng.uniform(50, 200) * t) * np.exp(-t / (0.3 * m / rate))


def _rhythm(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """Rail: click pairs (a bogie's two axles) every 0.6-1.3 s. Road: thumps every 0.8-2 s. Even odds."""
    seconds = n / rate
    if rng.random() < 0.5:
        period, axle_gap = rng.uniform(0.6, 1.3), rng.uniform(0.1, 0.2)
        starts = np.arange(rng.uniform(0, period), seconds, period)
        times = sorted([*starts, *(starts + axle_gap)])
        return _place_bursts(n, times, lambda: _click(rng, rate), rate)
    period = rng.uniform(0.8, 2.0)
    times = list(np.arange(rng.uniform(0, period), seconds, period))
    return _place_bursts(n, times, lambda: _thump(rng, rate), rate)


def transportation_noise(rng: np.random.Generator, n: int, rate: int, speaker: Speaker | None = None) -> np.ndarray:
    """Engine harmonics with slow rpm drift + broadband cabin rumble + rail clicks or road rhythm."""
    rpm = rng.uniform(25, 60) * (1 + 0.15 * np.tanh(_slow_envelope(rng, n, rate, 0.2)))
    engine = _harmonics(rpm, rate, [1 / k * rng.uniform(0.5, 1.5) for k in range(1, 13)], rng)
    rumble = _filtered_noise(rng, n, rate, (30.0, 2000.0), order=2) + _colored_noise(rng, n, 1.0)
    return _unit_power(_unit_power(engine) + _db(rng, -6, 2) * _unit_power(rumble)
                       + _db(rng, -12, -4) * _unit_power(_rhythm(rng, n, rate)))


NOISE_RECIPES: dict[str, Callable[[np.random.Generator, int, int, Speaker | None], np.ndarray]] = {
    "indoor": indoor_noise, "outdoor": outdoor_noise, "transportation": transportation_noise,
}
"""Environment -> noise generator ``(rng, samples, sample_rate, speaker) -> waveform`` (unit power)."""


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


# == the embedded default ========================================================================
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


# == full scale: DNS clean speech + TAU Urban Acoustic Scenes 2020 ===============================
@dataclass(frozen=True)
class NoiseFile:
    """One TAU recording: its path, scene label, environment and recording location."""

    path: Path
    scene: str
    environment: str
    location: str


def environments_of(scene_map: Mapping[str, str]) -> tuple[str, ...]:
    """Environment names in context-id order: the 3Class order when they are those, else first appearance."""
    names = list(dict.fromkeys(scene_map.values()))
    return ENVIRONMENTS if sorted(names) == sorted(ENVIRONMENTS) else tuple(names)


def read_tau_meta(noise_root: str | Path, scene_map: Mapping[str, str] = TAU_3CLASS) -> list[NoiseFile]:
    """The recordings listed in ``<noise_root>/meta.csv``, each tagged with its environment.

    The file is TAU's tab-separated table with a header naming at least ``filename`` and
    ``scene_label``; ``identifier`` (the recording location) is used when present. Raises
    ``DatasetNotFoundError`` for a missing folder, meta.csv or listed wav file and ``ValueError``
    for scene labels ``scene_map`` does not map.
    """
    root = Path(noise_root).expanduser()
    meta = root / "meta.csv"
    if not root.is_dir():
        raise DatasetNotFoundError(f"noise folder {root} does not exist; it should hold TAU Urban Acoustic Scenes "
                                   "2020 (meta.csv and audio/*.wav)")
    if not meta.is_file():
        raise DatasetNotFoundError(f"{meta} is missing: {root} does not look like a TAU Urban Acoustic Scenes 2020 "
                                   "folder (meta.csv and audio/*.wav)")
    lines = [line.rstrip("\r\n") for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].split("\t") if lines else []
    if "filename" not in header or "scene_label" not in header:
        raise ValueError(f"{meta} must be tab-separated with a header naming 'filename' and 'scene_label'; got {header}")
    column = {name: i for i, name in enumerate(header)}
    rows = [line.split("\t") for line in lines[1:]]
    unknown = sorted({r[column["scene_label"]] for r in rows} - set(scene_map))
    if unknown:
        raise ValueError(f"{meta} has scene labels the scene map does not assign to an environment: {unknown}; "
                         f"known labels: {sorted(scene_map)}")
    files = []
    for r in rows:
        path = root / r[column["filename"]]
        scene = r[column["scene_label"]]
        location = r[column["identifier"]] if "identifier" in column else str(path.name)
        files.append(NoiseFile(path, scene, scene_map[scene], location))
    missing = [str(f.path) for f in files if not f.path.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} audio files listed in {meta} are missing, e.g. {missing[:3]}")
    return files


def find_clean_files(clean_root: str | Path) -> list[Path]:
    """Every ``*.wav`` under ``<clean_root>/clean`` (DNS layout) or under ``clean_root``, sorted."""
    root = Path(clean_root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"clean speech folder {root} does not exist; it should hold the DNS Challenge "
                                   "clean speech (any *.wav under clean/)")
    base = root / "clean" if (root / "clean").is_dir() else root
    files = sorted(base.rglob("*.wav"))
    if not files:
        raise DatasetNotFoundError(f"no *.wav files under {base}")
    return files


def _split_groups(keys: Sequence[str], fractions: Sequence[float], rng: np.random.Generator) -> list[list[int]]:
    """Assign items to splits by group key (items sharing a key share a split), a seeded share per split.

    Every split gets at least one group when there are at least as many groups as splits.
    """
    groups = list(dict.fromkeys(keys))
    order = [groups[i] for i in rng.permutation(len(groups))]
    bounds = np.cumsum([0.0, *fractions]) / sum(fractions) * len(order)
    cuts = [int(round(b)) for b in bounds]
    if len(order) >= len(fractions):
        for i in range(1, len(cuts)):
            cuts[i] = max(cuts[i], cuts[i - 1] + 1) if i < len(cuts) - 1 else len(order)
        for i in range(len(cuts) - 2, 0, -1):
            cuts[i] = min(cuts[i], cuts[i + 1] - 1)
    split_of = {g: s for s in range(len(fractions)) for g in order[cuts[s]:cuts[s + 1]]}
    return [[i for i, k in enumerate(keys) if split_of[k] == s] for s in range(len(fractions))]


@dataclass(frozen=True)
class FolderSpeechConfig:
    """Where the real audio is and how to cut it; ``mix`` holds what every mixture shares."""

    clean_root: str  # DNS Challenge folder (any *.wav under clean/)
    noise_root: str  # TAU Urban Acoustic Scenes 2020 folder (meta.csv, audio/*.wav)
    mix: SpeechMixConfig = field(default_factory=lambda: FULL_SCALE_MIX)
    scene_map: Mapping[str, str] = field(default_factory=lambda: dict(TAU_3CLASS))
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test share of files


def _folder_clip(mix: SpeechMixConfig, clean_file: Path, source: str, noise_file: NoiseFile, env: int,
                 rng: np.random.Generator) -> _Clip:
    """One mixture: a random window of the speech file (zero-padded if short) in a random window of the noise.

    Noise shorter than a clip is tiled rather than padded: silence in the noise would make the
    clip's SNR a lie for the part that has none.
    """
    n = mix.clip_samples
    speech, noise = read_wav(clean_file, mix.sample_rate), read_wav(noise_file.path, mix.sample_rate)
    for path, audio in ((clean_file, speech), (noise_file.path, noise)):
        if not np.any(audio):
            raise ValueError(f"{path} is silent (all samples zero)")
    clean = _speech_window(speech, n, rng)
    noise = np.resize(noise, n) if noise.size < n else _random_window(noise, n, rng)
    snr = float(rng.uniform(*mix.snr_db))
    noisy, clean = _mix(_unit_power(clean), _unit_power(noise), snr, mix.level_db)
    return _Clip(noisy, clean, env, snr, source)


def folder_speech_dataset(config: FolderSpeechConfig, cache_dir: str | Path | None = None,
                          use_cache: bool = True) -> SpeechDataset:
    """Full scale: DNS clean speech mixed with TAU scenes grouped into environments (see the module docstring).

    Each split draws its clean files from its own share of the files (cycling through a seeded
    permutation, so files repeat only when a split needs more clips than it has files) and its
    noise from its own share of every environment's recording locations.
    """
    clean_files = find_clean_files(config.clean_root)
    noise_files = read_tau_meta(config.noise_root, config.scene_map)
    names = environments_of(config.scene_map)
    listing = hashlib.sha256("\n".join([*(str(p) for p in clean_files), *(str(f.path) for f in noise_files)])
                             .encode()).hexdigest()
    settings = {"source": "folders", **dataclasses.asdict(config), "files": listing}

    def build() -> SpeechDataset:
        rng = np.random.default_rng(np.random.SeedSequence([config.mix.seed, 104729]))
        clean_split = _split_groups([str(p) for p in clean_files], config.split_fractions, rng)
        noise_split: dict[str, list[list[int]]] = {}
        for env in names:
            members = [i for i, f in enumerate(noise_files) if f.environment == env]
            if not members:
                raise DatasetNotFoundError(f"no noise recordings for environment {env!r} in {config.noise_root}")
            # Split by recording location when there are enough of them, else by file.
            locations = [noise_files[i].location for i in members]
            keys = locations if len(set(locations)) >= len(SPLITS) else [str(noise_files[i].path) for i in members]
            parts = _split_groups(keys, config.split_fractions, rng)
            noise_split[env] = [[members[j] for j in part] for part in parts]
        splits = {}
        for s, split in enumerate(SPLITS):
            pool = clean_split[s]
            if not pool:
                raise ValueError(f"no clean files left for the {split} split: {len(clean_files)} files are too few")
            clips, turn = [], 0
            for e, env in enumerate(names):
                if not noise_split[env][s]:
                    raise ValueError(f"environment {env!r} has too few recording locations to give the {split} split one")
                for i in range(config.mix.count(split)):
                    rng_clip = _clip_rng(config.mix.seed, s, e, i)
                    clean_file = clean_files[pool[turn % len(pool)]]
                    turn += 1
                    noise_file = noise_files[noise_split[env][s][int(rng_clip.integers(len(noise_split[env][s])))]]
                    source = str(clean_file.relative_to(Path(config.clean_root).expanduser()))
                    clips.append(_folder_clip(config.mix, clean_file, source, noise_file, e, rng_clip))
            splits[split] = _assemble(clips, names, config.mix.sample_rate)
        return SpeechDataset(splits["train"], splits["validation"], splits["test"], names, config.mix.sample_rate,
                             settings)

    return _cached("folders", settings, cache_dir, use_cache, build)


__all__ = [
    "ENVIRONMENTS", "TAU_3CLASS", "SPLITS", "NOISE_RECIPES", "SpeechSplit", "SpeechDataset", "SpeechMixConfig",
    "FULL_SCALE_MIX",
    "FolderSpeechConfig", "NoiseFile", "Voice", "Speaker", "Synthesizer", "EspeakLibrary", "EspeakProgram", "SynthesizerNotFoundError", "find_synthesizer",
    "synthetic_speech_dataset", "folder_speech_dataset", "read_tau_meta", "find_clean_files", "environments_of",
    "make_sentence", "random_voice", "indoor_noise", "outdoor_noise", "transportation_noise", "default_cache_dir",
]
