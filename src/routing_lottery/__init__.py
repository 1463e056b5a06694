"""Routing the Lottery: adaptive lottery tickets, one pruning mask per data context.

The front door::

    from routing_lottery import AdaptiveTickets, RTLConfig, PruningConfig, TrainingConfig, tensor_stream

    rtl = AdaptiveTickets(model, RTLConfig(pruning=PruningConfig(sparsities=(0.5,))))
    routed = rtl.fit({"cats": cat_stream, "dogs": dog_stream})   # extract + jointly retrain
    routed(x, ["cats", "dogs", "cats"])                          # route a mixed batch by context name
    rtl.save("tickets/")                                         # weights + packed masks + recipe
    rtl.router = LearnedRouter.fit(inputs, contexts, num_contexts=2)  # no context at inference:
    rtl.routed(x)                                                # the router chooses one per row

``run_experiment(config, out)`` runs the same tickets beside the baselines (dense, single IMP,
multiple IMP, random control), resumably, on a built-in or user task; ``check_task(task)``
tests a user's task against the contract first.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Idle OpenMP threads sleep instead of spinning (unless the user chose): a run beside another
    # run, or beside any busy process, otherwise burns its cores waiting. Measured here, two
    # 2-thread trainings at once on 2 already busy cores: 123-127 s each with OpenMP's default,
    # 29-30 s each passive. It changes scheduling only, never a result. OpenMP reads it when torch
    # loads, so it must come first.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import DataConfig, ExperimentConfig, ModelConfig, load_config  # noqa: E402
from .data.labelled import LabelledDataset, Splits  # noqa: E402
from .masks import MaskSet  # noqa: E402
from .methods import METHODS  # noqa: E402
from .models import MODELS  # noqa: E402
from .recipe import PruningConfig, RTLConfig, TrainingConfig  # noqa: E402
from .routed import RoutedModel  # noqa: E402
from .router import DetectorRouter, EntropyRouter, LearnedRouter  # noqa: E402
from .run import DATASETS, TASKS, make_runner, run_experiment  # noqa: E402
from .tasks.checks import TaskContractError, check_task  # noqa: E402
from .tickets import AdaptiveTickets, tensor_stream  # noqa: E402
from .training import OptimizerConfig, Stream  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "AdaptiveTickets", "RTLConfig", "PruningConfig", "TrainingConfig", "OptimizerConfig", "Stream", "tensor_stream",
    "RoutedModel", "DetectorRouter", "EntropyRouter", "LearnedRouter", "MaskSet", "LabelledDataset", "Splits",
    "ExperimentConfig", "DataConfig", "ModelConfig", "load_config", "run_experiment",
    "make_runner", "check_task", "TaskContractError", "METHODS", "MODELS", "TASKS", "DATASETS",
]
