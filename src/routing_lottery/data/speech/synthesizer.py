"""Speech synthesis by espeak-ng: the clean speech of the embedded default.

The synthesizer is the shared library that the PyPI package ``espeakng-loader`` ships (driven
through ctypes), or else the Debian ``espeak-ng`` program; neither present is an error that
says what to install. Either way each clip is spoken by a fresh process, so its audio depends
on nothing but the clip's own seed (see :class:`Synthesizer`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ...audio import read_wav


class SynthesizerNotFoundError(RuntimeError):
    """No espeak-ng is available; the message says what to install."""


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


__all__ = ["Voice", "Speaker", "Synthesizer", "LANGUAGES", "VARIANTS", "EspeakLibrary", "EspeakProgram", "SynthesizerNotFoundError", "find_synthesizer"]
