"""Routing the Lottery: adaptive lottery tickets, one pruning mask per data context.

The core, which stands alone (torch, NumPy, safetensors; nothing of the experiment framework)::

    from routing_lottery import AdaptiveTickets, RTLConfig, PruningConfig, tensor_stream

    rtl = AdaptiveTickets(model, RTLConfig(pruning=PruningConfig(sparsities=(0.5,)))).fit(
        {"cats": cat_stream, "dogs": dog_stream})              # extract + jointly retrain
    rtl.routed(x, ["cats", "dogs", "cats"])                   # route a mixed batch by context name
    rtl.save("tickets/")                                      # weights + packed masks + recipe
    rtl.router = LearnedRouter.fit(inputs, contexts, num_contexts=2)  # no context at inference:
    rtl.routed(x)                                             # the router chooses one per row

Your own training loop instead of ``fit``'s retraining: ``RoutedModel.use(context)`` (or
``masked_forward``) for context k's forward, ``context_optimizers`` to make any torch optimizer
per-context, ``as_stream`` for a ``DataLoader``. The paper's comparisons, run resumably from a
config, are the experiment framework: ``routing_lottery.experiments``.
"""

import importlib
import warnings
from typing import Any

from .masks import MaskSet
from .recipe import PruningConfig, RTLConfig, TrainingConfig
from .routed import RoutedModel, masked_forward
from .scores import SCORES, input_norms, one_shot_mask
from .router import ROUTERS, DetectorRouter, EntropyRouter, LearnedRouter
from .tickets import AdaptiveTickets, tensor_stream
from .training import ContextOptimizer, OptimizerConfig, Stream, as_stream, context_optimizers

__version__ = "0.3.0"

__all__ = [
    "AdaptiveTickets", "RTLConfig", "PruningConfig", "TrainingConfig", "OptimizerConfig", "Stream", "tensor_stream",
    "RoutedModel", "masked_forward", "DetectorRouter", "EntropyRouter", "LearnedRouter", "ROUTERS", "MaskSet",
    "ContextOptimizer", "context_optimizers", "as_stream", "SCORES", "input_norms", "one_shot_mask",
]

# Names this package exported before the core was split from the framework (0.2): still importable
# from here for one release, with a warning naming their new home.
_MOVED = {name: "routing_lottery.experiments" for name in (
    "ExperimentConfig", "DataConfig", "ModelConfig", "load_config", "run_experiment", "make_runner", "check_task",
    "TaskContractError", "METHODS", "MODELS", "TASKS", "DATASETS", "LabelledDataset", "Splits")}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"routing_lottery.{name} moved to {_MOVED[name]} (the experiment framework) in 0.3; import it "
                      "from there: importing routing_lottery itself no longer loads the framework",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'routing_lottery' has no attribute {name!r}")
