"""Speech enhancement with one context (one ticket) per acoustic environment.

The paper's speech experiment: a U-Net denoises speech whose noise comes from three scene
groups (indoor, outdoor, transportation); each group is a context, and at inference each clip is
routed by its *known* environment. Methods differ only in which streams they train on:

- dense and single-mask IMP: :meth:`SpeechTask.all_stream`, every environment's training clips;
- multiple IMP and RTL: :meth:`SpeechTask.environment_stream` ``(k)``, environment k's clips.

Every stream trains with the weighted-SDR loss of Choi et al. 2019 (``audio.weighted_sdr_loss``).
That loss needs the noisy input as well as the clean target (its second term compares the true
noise ``noisy - clean`` with the estimated noise ``noisy - enhanced``), so a batch is
``(noisy, targets)`` with ``targets = stack([noisy, clean], dim=1)`` of shape ``(B, 2, T)``.

Scoring is SI-SNRi (dB) on the test split: per environment, and overall as the mean over all
test clips (environments have equal clip counts by construction, so the two averages agree).

``SpeechTask`` implements the runner's ``tasks.base.Task`` contract (``context_stream``,
``shared_stream``, ``build_model``, ``score_shared``, ``score_routed``) and the optional
``write_figures(outputs)`` capability (spectrogram PNGs of a few test clips, noisy / each method / clean).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..audio import save_spectrograms, si_snr, si_snr_improvement, weighted_sdr_loss
from ..data.speech import SpeechDataset, SpeechSplit
from ..fingerprint import fingerprint
from ..errors import CheckpointError
from ..io import atomic_write_with_sha256, read_with_sha256
from ..router import spectrum_features
from ..models.unet import MaskActivation, SpeechUNet
from ..report import method_rank
from ..training import Batch, Stream
from .base import RoutedPredict, Row, SharedPredict, output_problem, rows_by_context, verified_outputs

PredictEnvironment = RoutedPredict
"""``(environment id, noisy (B, T)) -> enhanced (B, T)``: a method's routed enhancer.

Dense and single IMP ignore the id; multiple IMP picks model k; RTL runs ticket k
(``lambda k, x: routed.subnetwork(x, k)``). It must be in evaluation mode (BatchNorm statistics).
"""


def speech_loss(enhanced: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weighted-SDR loss with ``targets = stack([noisy, clean], dim=1)`` (the streams' target layout)."""
    if targets.dim() != 3 or targets.shape[1] != 2:
        raise ValueError(f"targets must be (B, 2, T) = stack([noisy, clean], 1); got shape {tuple(targets.shape)}")
    return weighted_sdr_loss(enhanced, targets[:, 0], targets[:, 1])


@dataclass
class SpeechTask:
    """The speech data, its environments as contexts, and how subnetworks see and are scored on it."""

    data: SpeechDataset
    batch_size: int = 8
    eval_batch_size: int = 16
    n_fft: int = 1024  # STFT size and window (the paper: 1024 at 16 kHz)
    hop_length: int = 256  # STFT hop (the paper: 256)
    mask_activation: MaskActivation = "bounded_tanh"
    examples_per_environment: int = 1  # test clips per environment drawn as spectrograms
    # An environment's epoch shows each of its clips once, and so does an epoch of all data: the
    # shared stream needs no more epochs than the context streams for the same exposure per clip.
    shared_epoch_factor = 1
    context_is_label = False  # the context (the environment) is not the output: routing errors cost quality
    routers = ("learned",)  # the environment is inferred from the noisy input's spectrum (router_features)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1; got {self.batch_size}, {self.eval_batch_size}")
        if self.examples_per_environment < 0:
            raise ValueError(f"examples_per_environment must be >= 0; got {self.examples_per_environment}")
        counts = torch.bincount(self.data.train.environment, minlength=self.num_contexts)
        empty = [self.context_names[k] for k in range(self.num_contexts) if counts[k] == 0]
        if empty:
            raise ValueError(f"environments with no training clips: {empty}")
        self.context_sizes = counts.tolist()

    @property
    def context_names(self) -> tuple[str, ...]:
        return self.data.environment_names

    @property
    def num_contexts(self) -> int:
        return len(self.data.environment_names)

    @property
    def sample_rate(self) -> int:
        return self.data.sample_rate

    # -- the Task contract (tasks.base) ------------------------------------------------------
    def data_fingerprint(self) -> str:
        splits = (self.data.train, self.data.test)
        return fingerprint(list(self.context_names), self.sample_rate,
                           [(d.noisy, d.clean, d.environment) for d in splits])

    def build_model(self) -> nn.Module:
        """The paper's U-Net (37,368 prunable weights)."""
        return SpeechUNet(self.n_fft, self.hop_length, self.mask_activation)

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        return model  # dense and single IMP use the same network and θ₀ as the tickets

    def context_stream(self, k: int) -> Stream:
        return self.environment_stream(k)

    def shared_stream(self) -> Stream:
        return self.all_stream()

    def score_shared(self, predict: SharedPredict, label: str = "", outputs: Path | None = None) -> list[Row]:
        return self._score(lambda k, noisy: predict(noisy), label, outputs)

    def score_routed(self, predict: RoutedPredict, label: str = "", outputs: Path | None = None,
                     chosen: torch.Tensor | None = None) -> list[Row]:
        """SI-SNRi with every clip enhanced by its environment's subnetwork, or by ``chosen[i]``'s."""
        return self._score(predict, label, outputs, chosen)

    def _score(self, predict: RoutedPredict, label: str, outputs: Path | None,
               chosen: torch.Tensor | None = None) -> list[Row]:
        enhanced = self.enhance(predict, chosen=chosen)
        if outputs is not None and label:
            self._keep_examples(outputs / f"{label}.npz", enhanced)
        return environment_rows(enhanced, self.data.test)

    # -- example spectrograms (the optional write_figures capability of tasks.base.Task) ------------------------------------------
    def example_rows(self) -> dict[str, int]:
        """The test clips drawn as spectrograms: ``<environment>_<i>`` -> row, the first few of each."""
        test = self.data.test
        return {f"{name}_{i}": row for k, name in enumerate(self.context_names)
                for i, row in enumerate(test.indices(k)[: self.examples_per_environment].tolist())}

    def _keep_examples(self, path: Path, enhanced: torch.Tensor) -> None:
        """Save the example clips' enhanced waveforms as ``path`` (``<outputs>/<label>.npz``, atomically).

        Kept while scoring, so a resumed run that skips a finished method still has its examples.
        """
        arrays = {key: enhanced[row].numpy() for key, row in self.example_rows().items()}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_with_sha256(path, buffer.getvalue())

    def load_output(self, path: Path) -> dict[str, np.ndarray]:
        """The example clips ``_keep_examples`` saved in ``path``, verified; else ``CheckpointError`` naming it."""
        data = read_with_sha256(path)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                # np.savez stores its members uncompressed: a member that claims compression is not
                # ours, and refusing it keeps what loading allocates within the file's size.
                if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
                    raise ValueError("a member is compressed; np.savez writes stored members")
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except Exception as err:  # noqa: BLE001 -- zipfile and NumPy raise several types for a malformed archive
            raise CheckpointError(f"{path} is not a NumPy .npz archive ({type(err).__name__}: {err})") from None
        expected, length = set(self.example_rows()), self.data.test.noisy.shape[1]
        dtype = self.data.test.noisy.numpy().dtype
        if set(arrays) != expected or any(a.shape != (length,) or a.dtype != dtype for a in arrays.values()):
            raise CheckpointError(f"{path} does not hold this task's example clips ({sorted(expected)}, {dtype} of "
                                  f"length {length}); it holds {sorted(arrays)[:6]}")
        return arrays

    def output_problem(self, outputs: Path, label: str) -> str | None:
        """Why the example clips ``score_*`` kept for ``label`` are missing or unusable; None when they verify."""
        return output_problem(self.load_output, outputs / f"{label}.npz")

    def write_figures(self, outputs: Path) -> list[Path]:
        """``spectrograms/<environment>_<i>_<level>.png`` beside ``outputs``: one per example clip and level.

        Each shows the noisy clip, every method's enhancement at that sparsity (dense in every
        level's figure, as the reference) and the clean clip, titled with SI-SNR / SI-SNRi. Only
        verified clips are drawn; a file that fails its checksum is left out with a warning naming it.
        """
        if not outputs.is_dir():
            return []
        kept = verified_outputs(outputs, "*.npz", self.load_output, outputs.parent / "spectrograms", rank=method_rank)
        if not kept:
            return []
        levels = sorted({level for _, level in kept if level > 0}) or [0.0]
        test, written = self.data.test, []
        for level in levels:
            chosen = [(m, lv) for m, lv in kept if lv == level or lv == 0.0]
            for key, row in self.example_rows().items():
                enhanced = {f"{m} {lv:.0%}": torch.from_numpy(kept[(m, lv)][key]) for m, lv in chosen
                            if key in kept[(m, lv)]}
                path = outputs.parent / "spectrograms" / f"{key}_{level:.0%}.png".replace("%", "pct")
                self._write_clip(path, test.noisy[row], test.clean[row], enhanced)
                written.append(path)
        return written

    def _write_clip(self, path: Path, noisy: torch.Tensor, clean: torch.Tensor,
                    enhanced: Mapping[str, torch.Tensor]) -> None:
        panels = {f"noisy ({float(si_snr(noisy, clean)):.1f} dB SI-SNR)": noisy}
        for method, waveform in enhanced.items():
            panels[f"{method} ({float(si_snr_improvement(waveform, noisy, clean)):+.1f} dB SI-SNRi)"] = waveform
        panels["clean"] = clean
        save_spectrograms(path, panels, self.sample_rate)

    # -- what each subnetwork trains on ------------------------------------------------------
    def environment_stream(self, k: int, batch_size: int | None = None) -> Stream:
        """Environment k's training mixtures, reshuffled every epoch (multiple IMP, RTL)."""
        self._check_environment(k)
        return self._stream(self.context_names[k], self.data.train.indices(k), batch_size)

    def all_stream(self, batch_size: int | None = None) -> Stream:
        """Every training mixture, all environments shuffled together (dense, single-mask IMP)."""
        return self._stream("all", torch.arange(len(self.data.train)), batch_size)

    def _stream(self, name: str, index: torch.Tensor, batch_size: int | None) -> Stream:
        size = batch_size or self.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1; got {size}")
        train = self.data.train

        def epoch(gen: torch.Generator) -> list[Batch]:
            order = index[torch.randperm(len(index), generator=gen)]
            return [(train.noisy[part], torch.stack([train.noisy[part], train.clean[part]], dim=1))
                    for part in order.split(size)]

        return Stream(name, epoch, speech_loss, -(-len(index) // size))

    # -- deployment without an oracle (router.py) ----------------------------------------------
    def context_examples(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy clips and their environments of ``split`` (train or test)."""
        clips = self.data.split(split)
        return clips.noisy, clips.environment

    # What a learned router sees of a clip: its log power per frequency bin, averaged over time (an
    # acoustic environment is a noise spectrum; the waveform's phase says nothing of it).
    router_features = staticmethod(spectrum_features)

    def _check_environment(self, k: int) -> None:
        if not 0 <= k < self.num_contexts:
            raise ValueError(f"environment id {k} is outside 0..{self.num_contexts - 1}")

    # -- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def enhance(self, predict_env: PredictEnvironment, split: str = "test",
                device: torch.device | str = "cpu", chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Enhanced waveforms ``(N, T)`` for every clip of ``split``, each routed by its environment
        (or by ``chosen[i]``: a router's choice, or injected routing errors)."""
        clips = self.data.split(split)
        groups = ([clips.indices(k) for k in range(self.num_contexts)] if chosen is None
                  else rows_by_context(chosen, self.num_contexts, len(clips.noisy)))
        out = torch.empty_like(clips.noisy)
        for k, rows in enumerate(groups):
            if not len(rows):
                continue
            for part in rows.split(self.eval_batch_size):
                enhanced = predict_env(k, clips.noisy[part].to(device)).float().cpu()
                if enhanced.shape != (len(part), clips.noisy.shape[1]):
                    raise ValueError(f"predict_env returned shape {tuple(enhanced.shape)} for input "
                                     f"{(len(part), clips.noisy.shape[1])}")
                out[part] = enhanced
        return out


def environment_rows(enhanced: torch.Tensor, clips: SpeechSplit) -> list[Row]:
    """Result rows: ``environment: "all"`` (every clip), then one per environment, each with ``si_snri`` (dB)."""
    if enhanced.shape != clips.noisy.shape:
        raise ValueError(f"enhanced shape {tuple(enhanced.shape)} != clips shape {tuple(clips.noisy.shape)}")
    before, after = si_snr(clips.noisy, clips.clean), si_snr(enhanced, clips.clean)
    groups = [("all", torch.arange(len(before)))]
    groups += [(name, clips.indices(k)) for k, name in enumerate(clips.environment_names) if len(clips.indices(k))]
    return [{"environment": name, "si_snri": float((after[rows] - before[rows]).mean()),
             "si_snr_input": float(before[rows].mean()), "si_snr_enhanced": float(after[rows].mean()),
             "clips": len(rows)} for name, rows in groups]


__all__ = ["SpeechTask", "PredictEnvironment", "speech_loss", "environment_rows"]
