"""Running a configured comparison in a directory: identity, resume, stage 1, methods, parts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

from ..config import ExperimentConfig
from ..contract import Task
from ..tickets import Log, quiet
from ..training import SILENT, ProgressSink
from .builders import DATASETS, TASKS, build_tasks
from .directory import RunDirectory, run_identity
from .experiment import Experiment
from .images import ImageSetExperiment
from .replicates import Replicates


def make_runner(config: ExperimentConfig, out: str | Path, progress: ProgressSink = SILENT, log: Log = quiet,
                tasks: Task | Sequence[Task] | None = None) -> Experiment | ImageSetExperiment | Replicates:
    """The runner of ``config`` in ``out``: one experiment, or one per part when the task has several,
    or one such runner per seed when ``config.replicates`` > 1 (``Replicates``).

    ``tasks`` gives the task object(s) directly (Python users with their own Task); otherwise the
    config's ``task`` names the builder (built anew for every seed).
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if tasks is not None and config.workers > 1:
        raise ConfigError("workers > 1 rebuilds the task from the config in each worker process; a task handed in "
                          "as an object cannot be rebuilt there: register it (TASKS) and name it in the config, "
                          "or run with workers=1")
    if config.replicates > 1:
        return Replicates(config, out, lambda c, o: _runner(c, o, progress, log, tasks), log)
    return _runner(config, out, progress, log, tasks)


def _runner(config: ExperimentConfig, out: str | Path, progress: ProgressSink, log: Log,
            tasks: Task | Sequence[Task] | None) -> Experiment | ImageSetExperiment:
    if tasks is None:
        built = build_tasks(config)
    else:
        built = list(tasks) if isinstance(tasks, (list, tuple)) else [tasks]
    handed_in = tasks is not None  # config.yaml then names the task's class, not what the config would build
    if len(built) == 1 and config.task != "inr":
        return Experiment(config, out, built[0], progress, log, task_object=handed_in)
    return ImageSetExperiment(config, out, built, progress, log, task_object=handed_in)


def run_experiment(config: ExperimentConfig, out: str | Path, progress: ProgressSink = SILENT,
                   log: Log = quiet, tasks: Task | Sequence[Task] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) ``config`` in directory ``out``; return the result records."""
    return make_runner(config, out, progress, log, tasks).run_all()


__all__ = ["DATASETS", "TASKS", "Experiment", "ImageSetExperiment", "Replicates", "RunDirectory", "build_tasks", "make_runner",
           "run_experiment", "run_identity"]
