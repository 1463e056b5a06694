"""The contract between an experiment's data and the runner: streams to train on, models, scores.

Every experiment (classification, implicit neural representations, speech enhancement) is a
``Task``: K contexts, a training ``Stream`` per context (what RTL, multiple IMP and the random
control train on), one stream over all data (dense and single-mask IMP), the networks, and two
scorers that turn predictions into flat result rows. The runner (``experiment.Experiment``) owns
everything else -- θ₀, IMP rounds, joint retraining, resuming, accounting -- identically for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..training import Stream

SharedPredict = Callable[[torch.Tensor], torch.Tensor]
"""The dense or single-mask network: inputs (as the shared stream builds them) -> outputs."""

RoutedPredict = Callable[[int, torch.Tensor], torch.Tensor]
"""Context k's subnetwork: ``predict(k, inputs)`` -> outputs."""

Row = dict[str, Any]


class Task(Protocol):
    context_names: Sequence[str]
    shared_epoch_factor: int
    """How many times the context streams' epoch count the shared stream trains for (classification: 2,
    because a detector epoch shows each sample about twice -- once positive, once as a negative)."""

    def context_stream(self, k: int) -> Stream: ...

    def shared_stream(self) -> Stream: ...

    def build_model(self, seed: int) -> nn.Module:
        """The network whose weights the K context masks share (and multiple IMP copies)."""

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        """The dense / single-mask network; ``model`` itself unless the baseline differs (INR)."""

    def score_shared(self, predict: SharedPredict, label: str) -> list[Row]:
        """Rows of metrics for the dense / single-mask network (one row, or one per sub-group).

        ``label`` names the method and level (``"single_imp_0.5000"``); tasks that keep example
        outputs for figures file them under it.
        """

    def score_routed(self, predict: RoutedPredict, label: str) -> list[Row]:
        """Rows of metrics when every test input is handled by its own context's subnetwork."""


class WritesFigures(Protocol):
    """Optional: tasks whose outputs people would rather look at (reconstructions, spectrograms).

    The runner sets ``output_dir`` (inside the run directory) before scoring; the task saves example
    outputs there while scoring (so a resumed run still has them) and draws ``write_figures`` at the end.
    """

    output_dir: Path | None

    def write_figures(self) -> list[Path]: ...
