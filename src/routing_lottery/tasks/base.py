"""What tasks share besides the contract: outputs kept while scoring (verified, regenerated when
damaged) and rows grouped by context. The contract itself -- ``Task``, its optional capabilities,
``supports`` -- is ``routing_lottery.contract``, re-exported here for the tasks that import it from
this module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ..contract import (  # noqa: F401 -- re-exported: tasks are written against this module
    SharedPredict, RoutedPredict, Row, Task, REQUIRED_ATTRIBUTES, REQUIRED_METHODS,
    HasContextExamples, SupportsRouting, SupportsDetectors, ReusesScores, RouterFeatures, ContextIsLabel,
    ArgmaxRows, WritesFigures, ChecksOutputs, HasPartition, HasContextMembers, Named,
    CHOSEN, VALUES, FLAGS, Capability, CAPABILITIES, SETTINGS,
    has_piece, supports, capabilities, half_capabilities, task_setting,
)
from ..errors import CheckpointError


def rows_by_context(chosen: torch.Tensor, num_contexts: int, rows: int) -> list[torch.Tensor]:
    """Row indices per context of a routing ``chosen`` (one context id per test row, from a router or
    with injected errors), checked; what a task's ``score_routed(chosen=...)`` groups by."""
    chosen = torch.as_tensor(chosen).long().cpu()
    if chosen.shape != (rows,) or (rows and not 0 <= int(chosen.min()) <= int(chosen.max()) < num_contexts):
        raise ValueError(f"chosen must be {rows} context ids in 0..{num_contexts - 1}; got shape {tuple(chosen.shape)}")
    return [(chosen == k).nonzero(as_tuple=True)[0] for k in range(num_contexts)]


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


def verified_outputs(directory: Path, pattern: str, load: Callable[[Path], Kept], figure: Path,
                     rank: Callable[[str], float] | None = None) -> dict[tuple[str, float], Kept]:
    """The outputs in ``directory`` matching ``pattern`` that ``load`` verifies, keyed ``(method, level)``; one
    that fails is left out of ``figure`` with a warning naming it, files of other names are ignored.

    Ordered by ``rank(method)``, then method name, then level; without ``rank``, by method name and
    level. Tables order methods by ``report.method_rank``: a task passes it here so its figures
    follow the tables (this module cannot import the report, which sits above the tasks).
    """
    kept = {}
    for path in sorted(directory.glob(pattern)):
        key = output_key(path)
        if key is None:
            continue  # not a file the runner wrote
        try:
            kept[key] = load(path)
        except CheckpointError as err:
            warnings.warn(f"{err}; left out of {figure} (resume the run to regenerate it)", stacklevel=3)

    def order(item: tuple[tuple[str, float], Kept]) -> tuple[float, str, float]:
        (method, level), _ = item
        return (rank(method) if rank is not None else 0.0, method, level)

    return dict(sorted(kept.items(), key=order))
