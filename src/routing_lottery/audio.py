"""Audio signal measures, the weighted-SDR loss, mixing, wav I/O and spectrogram figures.

Everything works on the last axis, so a batch of clips is a ``(..., T)`` tensor and measures
come back shaped ``(...)``. Wav files go through soundfile (libsndfile), never torchaudio, and are
resampled with ``scipy.signal.resample_poly`` (a polyphase FIR with a Kaiser window: exact for
rational ratios such as 22,050 → 16,000 and 48,000 → 16,000, and free of the wrap-around of FFT
resampling).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write_bytes

EPS = 1e-8
"""Guards divisions and logarithms; far below the energy of any audible clip."""


# -- measures ----------------------------------------------------------------------------------
def _check_pair(estimate: torch.Tensor, reference: torch.Tensor) -> None:
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate shape {tuple(estimate.shape)} != reference shape {tuple(reference.shape)}")
    if estimate.shape[-1] < 2:
        raise ValueError(f"signals need at least 2 samples on the last axis; got shape {tuple(estimate.shape)}")


def si_snr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB, over the last axis.

    Both signals are made zero-mean; the reference is scaled to its projection on the estimate's
    span (``s_t = <ŝ, s> s / ||s||²``) and the rest of the estimate counts as error
    (``e = ŝ - s_t``): SI-SNR = 10·log10(||s_t||² / ||e||²). Rescaling the estimate leaves it
    unchanged, which is why enhancement papers report it (and its improvement, SI-SNRi).

    Example
    -------
    >>> s = torch.randn(16000)
    >>> float(si_snr(3 * s, s)) > 100
    True
    """
    _check_pair(estimate, reference)
    est = estimate - estimate.mean(dim=-1, keepdim=True)
    ref = reference - reference.mean(dim=-1, keepdim=True)
    scale = (est * ref).sum(dim=-1, keepdim=True) / ((ref * ref).sum(dim=-1, keepdim=True) + EPS)
    target = scale * ref
    error = est - target
    return 10 * torch.log10(((target * target).sum(dim=-1) + EPS) / ((error * error).sum(dim=-1) + EPS))


def si_snr_improvement(enhanced: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """SI-SNRi (dB): how much enhancement raised SI-SNR over the noisy input, per clip."""
    return si_snr(enhanced, clean) - si_snr(noisy, clean)


def _negative_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-<a, b> / (||a|| ||b||) over the last axis: the SDR loss term of Choi et al. 2019."""
    return -(a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)


def weighted_sdr_loss(enhanced: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The weighted-SDR loss of Choi et al. 2019 (DCUNet, "Phase-aware speech enhancement ..."), batch mean.

    With noisy x, clean y, estimate ŷ, true noise z = x - y and estimated noise ẑ = x - ŷ:

        loss = α · (-cos(y, ŷ)) + (1 - α) · (-cos(z, ẑ)),   α = ||y||² / (||y||² + ||z||²)

    The second term rewards getting the *noise* right as well as the speech, so the network
    cannot score by simply muting quiet speech; α weights each term by its share of the energy.
    Lies in [-1, 1]; -1 is a perfect estimate. The first term ignores the level of ŷ, the
    second does not (x - ŷ must line up with the true noise), which pins the estimate's level;
    that is why the noisy input is part of the target.
    """
    _check_pair(enhanced, clean)
    _check_pair(noisy, clean)
    noise, noise_estimate = noisy - clean, noisy - enhanced
    clean_energy = (clean * clean).sum(dim=-1)
    alpha = clean_energy / (clean_energy + (noise * noise).sum(dim=-1) + EPS)
    loss = alpha * _negative_cosine(clean, enhanced) + (1 - alpha) * _negative_cosine(noise, noise_estimate)
    return loss.mean()


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float | torch.Tensor) -> torch.Tensor:
    """``clean + g·noise`` with g chosen so the mixture's SNR (power, not zero-mean) is exactly ``snr_db``.

    ``snr_db`` may be one number or one per clip (shape ``clean.shape[:-1]``).

    Example
    -------
    >>> speech, noise = torch.randn(16000), torch.randn(16000)
    >>> mix = mix_at_snr(speech, noise, 5.0)
    >>> round(float(10 * torch.log10((speech ** 2).sum() / ((mix - speech) ** 2).sum())), 3)
    5.0
    """
    if clean.shape != noise.shape:
        raise ValueError(f"clean shape {tuple(clean.shape)} != noise shape {tuple(noise.shape)}")
    noise_power = (noise * noise).sum(dim=-1, keepdim=True)
    if bool((noise_power <= 0).any()):
        raise ValueError("noise is silent (zero energy): no gain can reach a finite SNR")
    snr = torch.as_tensor(snr_db, dtype=clean.dtype, device=clean.device)
    if snr.dim() > 0:
        snr = snr.unsqueeze(-1)
    clean_power = (clean * clean).sum(dim=-1, keepdim=True)
    gain = torch.sqrt(clean_power / (noise_power * 10 ** (snr / 10)))
    return clean + gain * noise


# -- wav files ---------------------------------------------------------------------------------
def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample the last axis from ``from_rate`` to ``to_rate`` Hz with a polyphase filter."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive; got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return np.asarray(waveform, dtype=np.float32)
    from scipy.signal import resample_poly  # imported here: scipy is needed only when rates differ

    ratio = Fraction(to_rate, from_rate)
    return resample_poly(waveform, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


def read_wav(path: str | Path, sample_rate: int | None = 16000) -> np.ndarray:
    """A wav (or any libsndfile format) as float32 mono at ``sample_rate`` (None: the file's own rate).

    Multi-channel files are downmixed by averaging the channels (TAU scenes are binaural).
    Raises ``FileNotFoundError`` naming the path when it is missing.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as err:  # soundfile raises LibsndfileError (a RuntimeError) for bad files
        raise ValueError(f"{path} is not a readable audio file ({err})") from None
    mono = data.mean(axis=1)
    return mono if sample_rate is None else resample(mono, rate, sample_rate)


def write_wav(path: str | Path, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Write a mono float waveform as 16-bit PCM wav, atomically (see ``io``)."""
    import soundfile

    data = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    if data.ndim != 1:
        raise ValueError(f"waveform must be 1-D (mono); got shape {data.shape}")
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(data, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    atomic_write_bytes(path, buffer.getvalue())


# -- figures -----------------------------------------------------------------------------------
def _log_spectrogram(waveform: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Log-magnitude (dB) STFT, frequency × frames."""
    x = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=True, return_complex=True)
    return (20 * torch.log10(spec.abs() + 1e-5)).numpy()


def save_spectrograms(
    path: str | Path,
    clips: Mapping[str, np.ndarray | torch.Tensor],
    sample_rate: int,
    n_fft: int = 512,
    hop_length: int = 128,
    dynamic_range_db: float = 80.0,
    columns: int = 1,
) -> None:
    """A PNG grid of log-magnitude spectrograms, one panel per labelled clip, on one colour scale.

    One shared colour scale (the loudest panel's peak down ``dynamic_range_db``) makes panels
    comparable: residual noise in an enhanced clip shows up as the same colour as in the noisy
    one. Written atomically, so a report never links a half-written image.

    Example
    -------
    >>> clean = torch.randn(16000)
    >>> noisy, enhanced = clean + 0.5 * torch.randn(16000), clean + 0.1 * torch.randn(16000)
    >>> save_spectrograms("clip0.png", {"noisy": noisy, "RTL": enhanced, "clean": clean}, 16000)
    """
    if not clips:
        raise ValueError("clips is empty: nothing to draw")
    if columns < 1:
        raise ValueError(f"columns must be >= 1; got {columns}")
    # Figure without pyplot: no global backend switch, no display needed, nothing left open.
    from matplotlib.figure import Figure

    specs = {}
    for label, clip in clips.items():
        data = clip.detach().cpu().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip)
        if data.ndim != 1:
            raise ValueError(f"clip {label!r} must be 1-D; got shape {data.shape}")
        specs[label] = _log_spectrogram(data, n_fft, hop_length)
    top = max(float(s.max()) for s in specs.values())
    rows = math.ceil(len(specs) / columns)
    fig = Figure(figsize=(5.5 * columns + 1, 1.6 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    image = None
    for ax, (label, spec) in zip(axes.flat, specs.items()):
        seconds = spec.shape[1] * hop_length / sample_rate
        image = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=top - dynamic_range_db, vmax=top,
                          extent=(0.0, seconds, 0.0, sample_rate / 2000))
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("kHz", fontsize=8)
    for ax in list(axes.flat)[len(specs):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("s", fontsize=8)
    fig.colorbar(image, ax=axes, label="dB", aspect=40)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


__all__ = [
    "si_snr", "si_snr_improvement", "weighted_sdr_loss", "mix_at_snr", "resample", "read_wav", "write_wav",
    "save_spectrograms",
]
