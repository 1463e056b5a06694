"""The experiment framework's front door: the paper's comparisons, run resumably from a config.

``run_experiment(config, out)`` runs RTL beside the baselines (dense, single IMP, multiple IMP,
random control) on a built-in or a user's task; ``check_task(task)`` tests a user's task against
the contract first. Everything here builds on the core (``routing_lottery``: masks, tickets,
routed model, routers, export), which imports nothing of it::

    from routing_lottery.experiments import load_config, run_experiment

    records = run_experiment(load_config("configs/digits.yaml", "smoke"), "runs/digits")
"""

from __future__ import annotations

from .config import DataConfig, ExperimentConfig, ModelConfig, load_config
from .data.labelled import LabelledDataset, Splits
from .methods import METHODS, Method, RunContext
from .models import MODELS
from .registries import DATASETS, TASKS
from .run import make_runner, run_experiment
from .contract import CAPABILITIES, Task, capabilities, supports
from .tasks.checks import TaskContractError, check_task

__all__ = [
    "CAPABILITIES", "DATASETS", "METHODS", "MODELS", "TASKS", "DataConfig", "ExperimentConfig", "LabelledDataset",
    "Method", "ModelConfig", "RunContext", "Splits", "Task", "TaskContractError", "capabilities", "check_task",
    "load_config", "make_runner", "run_experiment", "supports",
]
