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

from .config import DataConfig, ExperimentConfig, ModelConfig, load_config
from .data.labelled import LabelledDataset, Splits
from .masks import MaskSet
from .methods import METHODS
from .models import MODELS
from .recipe import PruningConfig, RTLConfig, TrainingConfig
from .routed import RoutedModel
from .router import DetectorRouter, EntropyRouter, LearnedRouter
from .run import DATASETS, TASKS, make_runner, run_experiment
from .tasks.checks import TaskContractError, check_task
from .tickets import AdaptiveTickets, tensor_stream
from .training import OptimizerConfig, Stream

__version__ = "0.2.0"

__all__ = [
    "AdaptiveTickets", "RTLConfig", "PruningConfig", "TrainingConfig", "OptimizerConfig", "Stream", "tensor_stream",
    "RoutedModel", "DetectorRouter", "EntropyRouter", "LearnedRouter", "MaskSet", "LabelledDataset", "Splits",
    "ExperimentConfig", "DataConfig", "ModelConfig", "load_config", "run_experiment",
    "make_runner", "check_task", "TaskContractError", "METHODS", "MODELS", "TASKS", "DATASETS",
]
