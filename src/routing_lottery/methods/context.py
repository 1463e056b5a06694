"""What a method sees of the run: a narrow, written contract instead of the whole runner.

A method (``methods.Method``) trains and scores one level through these members and nothing
else; the experiment runner (``run.experiment.Experiment``) provides them, and so can a test or a
user's own driver. Keeping the list short keeps methods independent of how runs are stored,
resumed or spread over processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..masks import Mask, MaskSet
from ..training import ProgressSink, Stream

if TYPE_CHECKING:
    from ..tickets import AdaptiveTickets


class RunContext(Protocol):
    """The members of a run that methods use (``run.experiment.Experiment`` implements them)."""

    config: Any
    """The experiment config (``config.ExperimentConfig``): training, deploy and seed settings."""
    task: Any
    """The task (``contract.Task``): streams, scoring, and its optional capabilities."""
    device: torch.device
    tickets: AdaptiveTickets
    """The K context tickets over the shared network (stage 1's per-context IMP, joint retraining)."""
    shared_tickets: AdaptiveTickets
    """The shared network trained on all data (dense and single-mask IMP)."""
    detectors: Sequence[Stream]
    """Context k's training stream, k = 0..K-1."""
    classifier: Stream
    """All training data, for the shared network."""
    factor: int
    """Epochs of the shared network per epoch of a context's stream (the paper's equal-samples rule)."""
    progress: ProgressSink
    outputs: Path
    """Where a task keeps what it draws from a method's outputs (``tasks.base.verified_outputs``)."""
    directory: Path
    """The run directory: figures go under it (``routing/``, ``calibration/``)."""
    learned_router: Any
    """The run's learned router once fitted (``methods.deployment.learned_router``), else None."""

    def log(self, message: str) -> None:
        """One line for the person running it."""

    def context_masks(self) -> dict[float, MaskSet]:
        """Stage 1's K context masks at every level (computed, or read back, on first use)."""

    def single_rounds(self) -> list[Mask]:
        """Stage 1's single-mask IMP masks after every round."""

    def checkpoint_dir(self, method: str, level: float) -> Path:
        """Where a method keeps its tickets at ``level`` (RTL: checkpoints/rtl_<level>)."""


__all__ = ["RunContext"]
