"""The contract between an experiment's data and the runner: streams to train on, models, scores.

Every experiment (classification, implicit neural representations, speech enhancement) is a
``Task``: K contexts, a training ``Stream`` per context (what RTL, multiple IMP and the random
control train on), one stream over all data (dense and single-mask IMP), the networks, and two
scorers that turn predictions into flat result rows. The runner (``experiment.Experiment``) owns
everything else -- θ₀, IMP rounds, joint retraining, resuming, accounting -- identically for all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from ..errors import CheckpointError
from ..report import method_rank
from ..training import Stream

SharedPredict = Callable[[torch.Tensor], torch.Tensor]
"""The dense or single-mask network: inputs (as the shared stream builds them) -> outputs."""

RoutedPredict = Callable[[int, torch.Tensor], torch.Tensor]
"""Context k's subnetwork: ``predict(k, inputs)`` -> outputs."""

Row = dict[str, Any]


def rows_by_context(chosen: torch.Tensor, num_contexts: int, rows: int) -> list[torch.Tensor]:
    """Row indices per context of a routing ``chosen`` (one context id per test row, from a router or
    with injected errors), checked; what a task's ``score_routed(chosen=...)`` groups by."""
    chosen = torch.as_tensor(chosen).long().cpu()
    if chosen.shape != (rows,) or (rows and not 0 <= int(chosen.min()) <= int(chosen.max()) < num_contexts):
        raise ValueError(f"chosen must be {rows} context ids in 0..{num_contexts - 1}; got shape {tuple(chosen.shape)}")
    return [(chosen == k).nonzero(as_tuple=True)[0] for k in range(num_contexts)]


class Task(Protocol):
    """What the runner needs of an experiment's data; ``check_task(task)`` tests a task against it.

    Required: the attributes and methods below. Optional capabilities, used when present:
    ``write_figures(outputs) -> list[Path]`` (figures from the examples kept while scoring),
    ``partition`` (a ``contexts.partitions.Partition`` the contexts come from) and
    ``context_members`` (the class names in each context).

    Deployment without an oracle (``run.deploy``), also optional: ``context_examples(split) ->
    (inputs, contexts)`` for ``"train"`` and ``"test"`` (and ``"calibration"``, held out of the
    training data, for detectors to calibrate), a ``chosen=`` argument to ``score_routed`` (one
    context per test input, from a router or with injected errors; ``chosen`` equal to the true
    contexts must score exactly as oracle routing), ``routers`` (the strategies that apply, default
    ``("learned",)``), ``context_is_label`` (True: a wrong context is a wrong answer, no error
    injection), ``router_features(inputs)`` (what a learned router sees) and
    ``detector_scores(predict, split)`` ((N, K) one-vs-rest logits, for calibration).

    The runner builds the model under a seeded generator state (``build_model`` must not seed
    anything itself) and hands every scorer the directory where it may keep example outputs.
    """

    context_names: Sequence[str]
    shared_epoch_factor: int
    """How many times the context streams' epoch count the shared stream trains for (classification: 2,
    because a detector epoch shows each sample about twice -- once positive, once as a negative)."""

    def context_stream(self, k: int) -> Stream: ...

    def shared_stream(self) -> Stream: ...

    def data_fingerprint(self) -> str:
        """A hash of the data this task serves (``fingerprint.fingerprint``): part of a run's identity."""

    def build_model(self) -> nn.Module:
        """The network whose weights the K context masks share (and multiple IMP copies)."""

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        """The dense / single-mask network; ``model`` itself unless the baseline differs (INR)."""

    def score_shared(self, predict: SharedPredict, label: str, outputs: Path | None = None) -> list[Row]:
        """Rows of metrics for the dense / single-mask network (one row, or one per sub-group).

        ``label`` names the method and level (``"single_imp_0.5000"``); tasks that keep example
        outputs for figures write them into ``outputs`` under that name.
        """

    def score_routed(self, predict: RoutedPredict, label: str, outputs: Path | None = None) -> list[Row]:
        """Rows of metrics when every test input is handled by its own context's subnetwork."""


# -- outputs a task keeps while scoring (INR reconstructions, speech examples) ------------------------
Kept = TypeVar("Kept")


def output_key(path: Path) -> tuple[str, float] | None:
    """``(method, level)`` of an output named ``<method>_<level>.<ext>`` by the runner; None for any other name."""
    method, _, level = path.stem.rpartition("_")
    try:
        value = float(level)
    except ValueError:
        return None
    return (method, value) if method and math.isfinite(value) else None


def output_problem(load: Callable[[Path], object], path: Path) -> str | None:
    """Why the output at ``path`` is missing or unusable (``load`` raised ``CheckpointError``); None when it verifies.

    A resumed run asks this of every finished (method, level) and recomputes the ones that fail,
    so its figures are drawn from the same outputs as an uninterrupted run's.
    """
    try:
        load(path)
    except CheckpointError as err:
        return str(err)
    return None


def verified_outputs(directory: Path, pattern: str, load: Callable[[Path], Kept],
                     figure: Path) -> dict[tuple[str, float], Kept]:
    """The outputs in ``directory`` matching ``pattern`` that ``load`` verifies, keyed ``(method, level)`` in
    table order; one that fails is left out of ``figure`` with a warning naming it, files of other
    names are ignored."""
    kept = {}
    for path in sorted(directory.glob(pattern)):
        key = output_key(path)
        if key is None:
            continue  # not a file the runner wrote
        try:
            kept[key] = load(path)
        except CheckpointError as err:
            warnings.warn(f"{err}; left out of {figure} (resume the run to regenerate it)", stacklevel=3)
    return dict(sorted(kept.items(), key=lambda item: (method_rank(item[0][0]), item[0][0], item[0][1])))
