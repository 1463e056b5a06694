"""Generated noise, one recipe per environment, for the embedded default.

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .grammar import _speak_to_length, make_sentence, random_voice
from .mixing import _random_window, _unit_power
from .synthesizer import Speaker


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


__all__ = ["NOISE_RECIPES", "indoor_noise", "outdoor_noise", "transportation_noise"]
