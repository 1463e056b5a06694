"""The paper's lightweight speech-enhancement U-Net: complex STFT in, complex ratio mask out.

Layout (the paper's, with the choices it leaves open written down here)
    The noisy waveform's STFT (``torch.stft``; n_fft = window = 1024, hop 256, Hann by default)
    enters as two channels, real and imaginary, shaped ``(B, 2, F, T)`` with F = n_fft/2 + 1
    frequency bins and T frames.

    Encoder, five stages ``conv -> ELU -> BatchNorm``, channels 2→12→12→12→24→48.
    Decoder, five transposed-conv stages, each fed the previous stage concatenated with the
    encoder output of the same resolution (skip connections): 48→24, 48→12, 24→12, 24→12, 24→2.
    Every decoder stage but the last is followed by ELU -> BatchNorm; the last one emits the mask.

    Kernels are 3×3 (frequency × time), the first encoder and the last decoder kernels 3×5: the
    wider time span at the full-resolution ends sees a few more frames of context.

    **Stride 2 along frequency, 1 along time.** The frequency size is fixed by ``n_fft`` while the
    number of frames follows the clip length, so striding frequency keeps the mask at full time
    resolution and makes the network indifferent to clip length (no time padding, no frames to
    crop). With padding 1 a stride-2 conv maps F bins to ``(F - 1) // 2 + 1`` and the matching
    transposed conv maps them back to ``2 * (F' - 1) + 1``; for n_fft = 1024 (513 = 2^4·32 + 1)
    every stage inverts exactly (513→257→129→65→33→17 and back). For other sizes each decoder
    output is zero-padded or cropped along frequency to the size of the skip it meets, so any
    ``n_fft`` works and the output always matches the input.

Prunable weights
    Every conv and transposed-conv weight: 360 + 1,296 + 1,296 + 2,592 + 10,368 = 15,912 in the
    encoder (2·12·3·5, 12·12·9, 12·12·9, 12·24·9, 24·48·9) and 10,368 + 5,184 + 2,592 + 2,592 + 720
    = 21,456 in the decoder (48·24·9, 48·12·9, 24·12·9, 24·12·9, 24·2·3·5): exactly 37,368, the
    paper's count. Biases (170) and BatchNorm's affine parameters (336) stay dense and shared, as
    in every other model here, so the count the paper reports is the weights alone (37,874
    parameters in all).

Mask
    The last stage's two channels are the real and imaginary parts of a complex ratio mask M; the
    enhanced spectrum is ``M · X`` and ``torch.istft`` returns a waveform of the input's length.
    ``mask_activation="bounded_tanh"`` (default) is the polar bounded mask of Choi et al. 2019
    (DCUNet): ``|M| = tanh(|O|)``, phase of O kept. It keeps |M| < 1, which stops the early,
    untrained network from amplifying noise and keeps the wSDR loss well conditioned.
    ``"linear"`` uses O as the mask as is (unbounded).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

MaskActivation = Literal["bounded_tanh", "linear"]

ENCODER_CHANNELS: tuple[int, ...] = (2, 12, 12, 12, 24, 48)
"""Input and output channels of the five encoder stages, in order."""

DECODER_CHANNELS: tuple[tuple[int, int], ...] = ((48, 24), (48, 12), (24, 12), (24, 12), (24, 2))
"""(in, out) channels of the five decoder stages; inputs after skip concatenation."""

EDGE_KERNEL: tuple[int, int] = (3, 5)
"""Kernel (frequency, time) of the first encoder and last decoder stage."""

INNER_KERNEL: tuple[int, int] = (3, 3)
"""Kernel (frequency, time) of every other stage."""

STRIDE: tuple[int, int] = (2, 1)
"""Stride 2 along frequency, 1 along time (see the module docstring for why)."""


def _same_time_padding(kernel: tuple[int, int]) -> tuple[int, int]:
    """Padding (1 along frequency, half the kernel along time) so time size is preserved."""
    return (kernel[0] // 2, kernel[1] // 2)


class EncoderStage(nn.Module):
    """``conv -> ELU -> BatchNorm``, stride 2 along frequency."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=STRIDE, padding=_same_time_padding(kernel))
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.elu(self.conv(x)))


class DecoderStage(nn.Module):
    """Transposed conv (stride 2 along frequency), then ELU -> BatchNorm unless it emits the mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], last: bool) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, kernel, stride=STRIDE, padding=_same_time_padding(kernel)
        )
        self.norm = None if last else nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, freq_bins: int) -> torch.Tensor:
        y = _fit_frequency(self.conv(x), freq_bins)
        return y if self.norm is None else self.norm(F.elu(y))


def _fit_frequency(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Zero-pad or crop the frequency axis (dim 2) at the top to exactly ``bins``."""
    have = x.shape[2]
    if have == bins:
        return x
    if have > bins:
        return x[:, :, :bins]
    return F.pad(x, (0, 0, 0, bins - have))


class SpeechUNet(nn.Module):
    """U-Net on the complex STFT predicting a complex ratio mask; waveform ``(B, T)`` in and out.

    Parameters
    ----------
    n_fft:
        FFT size and window length (the paper: 1024 at 16 kHz).
    hop_length:
        Frame hop in samples (the paper: 256).
    mask_activation:
        ``"bounded_tanh"`` (DCUNet's bounded polar mask) or ``"linear"``.

    Example
    -------
    >>> net = SpeechUNet()
    >>> enhanced = net(torch.randn(4, 32000))      # (4, 32000)
    >>> sum(dict(net.named_parameters())[n].numel() for n in net.prunable_names())
    37368
    """

    def __init__(self, n_fft: int = 1024, hop_length: int = 256, mask_activation: MaskActivation = "bounded_tanh") -> None:
        super().__init__()
        if n_fft < 32 or n_fft % 2:
            raise ValueError(f"n_fft must be an even number >= 32 (five stride-2 stages need room); got {n_fft}")
        if not 0 < hop_length <= n_fft:
            raise ValueError(f"hop_length must be in 1..n_fft={n_fft}; got {hop_length}")
        if mask_activation not in ("bounded_tanh", "linear"):
            raise ValueError(f"mask_activation must be 'bounded_tanh' or 'linear'; got {mask_activation!r}")
        self.n_fft, self.hop_length, self.mask_activation = n_fft, hop_length, mask_activation
        # Not persistent: the window is a function of n_fft, not a learned state worth checkpointing.
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        pairs = list(zip(ENCODER_CHANNELS[:-1], ENCODER_CHANNELS[1:]))
        self.encoder = nn.ModuleList(
            EncoderStage(i, o, EDGE_KERNEL if s == 0 else INNER_KERNEL) for s, (i, o) in enumerate(pairs)
        )
        last = len(DECODER_CHANNELS) - 1
        self.decoder = nn.ModuleList(
            DecoderStage(i, o, EDGE_KERNEL if s == last else INNER_KERNEL, last=s == last)
            for s, (i, o) in enumerate(DECODER_CHANNELS)
        )

    def prunable_names(self) -> list[str]:
        """Every conv and transposed-conv weight (37,368 in all); biases and BatchNorm stay dense."""
        return [f"encoder.{s}.conv.weight" for s in range(len(self.encoder))] + [
            f"decoder.{s}.conv.weight" for s in range(len(self.decoder))
        ]

    # -- signal path ---------------------------------------------------------------------------
    def stft(self, waveform: torch.Tensor) -> torch.Tensor:
        """Complex spectrum ``(B, F, T_frames)`` of a ``(B, T)`` waveform (centred frames)."""
        return torch.stft(
            waveform, self.n_fft, self.hop_length, window=self.window, center=True, return_complex=True
        )

    def istft(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        """Waveform ``(B, length)`` from a complex spectrum made by :meth:`stft`."""
        return torch.istft(spectrum, self.n_fft, self.hop_length, window=self.window, center=True, length=length)

    def ratio_mask(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The complex ratio mask ``(B, F, T_frames)`` the network predicts for ``spectrum``."""
        x = torch.stack([spectrum.real, spectrum.imag], dim=1)
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            skips.append(x)
            x = stage(x)
        # skips[s] is the input of encoder stage s, i.e. the output of stage s - 1. Decoder stage d
        # restores the resolution of skips[-1 - d]; all but the last are then joined with it
        # (the last meets the STFT itself, whose size it only copies).
        for d, stage in enumerate(self.decoder):
            x = stage(x, skips[-1 - d].shape[2])
            if d < len(self.decoder) - 1:
                x = torch.cat([x, skips[-1 - d]], dim=1)
        return self._activate(x)

    def _activate(self, out: torch.Tensor) -> torch.Tensor:
        re, im = out[:, 0], out[:, 1]
        if self.mask_activation == "linear":
            return torch.complex(re, im)
        # tanh(|O|) / |O| is finite (→ 1) as |O| → 0; the epsilon keeps its gradient finite too.
        magnitude = torch.sqrt(re * re + im * im + 1e-12)
        gain = torch.tanh(magnitude) / magnitude
        return torch.complex(re * gain, im * gain)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be (batch, samples); got shape {tuple(waveform.shape)}")
        spectrum = self.stft(waveform)
        return self.istft(self.ratio_mask(spectrum) * spectrum, waveform.shape[-1])


__all__ = ["SpeechUNet", "MaskActivation", "ENCODER_CHANNELS", "DECODER_CHANNELS", "EDGE_KERNEL", "INNER_KERNEL", "STRIDE"]
