"""The RTL recipe: how tickets are extracted and retrained, as typed settings validated once.

``RTLConfig`` is what a ticket checkpoint records beside its weights (so a checkpoint alone says
how it was made) and what the experiment config (``config.ExperimentConfig``) extends with the
data, the model and the comparison to run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError, brief
from .pruning import validate_sparsity, validate_step
from .training import OptimizerConfig


# Defaults are for a small model of the user's (the front door, ``RTLConfig()``): a step that scales
# with the model, and the optimizer's learning rate (``training.OptimizerConfig``). The paper's
# settings (4,096 weights per round, Adam lr 1e-4) are written out in its configs
# (configs/cifar10.yaml, ...), so these defaults do not change them.


@dataclass(frozen=True)
class PruningConfig:
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    # fraction of survivors per IMP round (float; classic IMP: 0.2) or weights per round (int; the paper: 4,096)
    step: int | float = 0.2
    scope: Literal["global", "layerwise"] = "global"
    # weight: the paper's unstructured masks; channel: whole output channels with every coupled slice
    # (channels.ChannelStructure), sliceable into a smaller dense network. Levels and step count channels.
    granularity: Literal["weight", "channel"] = "weight"
    rewind_steps: int = 0  # 0: rewind to θ₀ (the paper); j > 0: to θ_j, after j dense steps on all data
    include: tuple[str, ...] = ()  # glob patterns over parameter names to mask (empty: conv, linear, attention)
    exclude: tuple[str, ...] = ()  # glob patterns removed from what would be masked
    # fraction of every masked tensor's weights that each ticket keeps. 0 (the paper): global ranking
    # may prune a tensor of smaller weights (a head, an embedding) away entirely, which is reported
    min_keep_per_tensor: float = 0.0
    # None: iterative magnitude pruning with training (the paper). A one-shot score instead (``scores.SCORES``:
    # "magnitude", "wanda", or package.module:attribute) ranks a pretrained model's weights once, from each
    # context's calibration batches, without training; ``score_group`` is where its counts are exact
    # (Wanda: per output row) and ``n_m`` asks for N:M masks (e.g. [2, 4]; the levels are then 1 - N/M)
    score: str | None = None
    score_group: Literal["row", "tensor", "global"] = "row"
    n_m: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.sparsities:
            raise ConfigError("pruning.sparsities must list at least one level")
        for s in self.sparsities:
            validate_sparsity(s, "pruning.sparsities entry")
            if round(s, 4) != s:  # levels name files (records/rtl_0.2500.json): four decimals must identify them
                raise ConfigError(f"pruning.sparsities entries need at most 4 decimals; got {s}")
        try:
            object.__setattr__(self, "step", validate_step(self.step))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.rewind_steps < 0:
            raise ConfigError(f"pruning.rewind_steps must be >= 0; got {self.rewind_steps}")
        if self.granularity not in ("weight", "channel"):
            raise ConfigError(f"pruning.granularity must be 'weight' or 'channel'; got {self.granularity!r}")
        keep = self.min_keep_per_tensor
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 <= keep < 1.0:
            raise ConfigError(f"pruning.min_keep_per_tensor must be a fraction in [0, 1); got {keep!r}")
        if keep and self.granularity != "weight":
            raise ConfigError("pruning.min_keep_per_tensor applies to weight tickets; channel tickets keep "
                              "channels, not weights (set it to 0 or use granularity: weight)")
        if self.score is not None and self.granularity != "weight":
            raise ConfigError("pruning.score ranks single weights (one-shot weight tickets); channel tickets are "
                              "found by IMP (set score: null or granularity: weight)")
        if self.score_group not in ("row", "tensor", "global"):
            raise ConfigError(f"pruning.score_group must be row, tensor or global; got {self.score_group!r}")
        if self.n_m is not None:
            n_m = tuple(self.n_m)
            if self.score is None:
                raise ConfigError("pruning.n_m is a one-shot mask shape: set pruning.score too (e.g. wanda)")
            if len(n_m) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in n_m) \
                    or not 0 < n_m[0] <= n_m[1]:
                raise ConfigError(f"pruning.n_m must be [N, M] with 0 < N <= M; got {list(n_m)}")
            level = round(1 - n_m[0] / n_m[1], 4)
            if any(s != level for s in self.sparsities):
                raise ConfigError(f"pruning.n_m {list(n_m)} prunes {level:g} of every group: pruning.sparsities must "
                                  f"be [{level:g}]; got {list(self.sparsities)}")
            object.__setattr__(self, "n_m", n_m)


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int | None = 64  # None: full batch (INR, as the paper); read by the tasks that batch data
    imp_epochs: int = 10  # per IMP round, per context (detectors); the classifier gets twice as many
    epochs: int = 10  # final training / joint retraining (the paper: 10); the classifier gets twice as many
    negative_ratio: float = 1.0  # classification: negatives per positive in a detector's balanced batches
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "imp_epochs", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.negative_ratio < math.inf:  # also refuses NaN
            raise ConfigError(f"training.negative_ratio must be a positive finite number; got {self.negative_ratio}")


@dataclass(frozen=True)
class RTLConfig:
    """Everything that decides a set of adaptive tickets, given the model and the data.

    Examples
    --------
    >>> recipe = RTLConfig(seed=0, pruning=PruningConfig(sparsities=(0.5,), step=0.2),
    ...                    training=TrainingConfig(imp_epochs=2, epochs=3, optimizer=OptimizerConfig(lr=1e-3)))
    >>> recipe.training.optimizer.lr, recipe.pruning.scope
    (0.001, 'global')
    """

    seed: int = 0
    pruning: PruningConfig = field(default_factory=PruningConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        # torch and NumPy take seeds as signed 64-bit integers: a larger one fails deep inside
        # (``Overflow when unpacking long``) after the run directory was claimed
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in 0..2**63-1; got {brief(self.seed)}")

    @property
    def recipe(self) -> RTLConfig:
        """Only the recipe fields (an ``ExperimentConfig`` narrowed to what its tickets depend on)."""
        return RTLConfig(self.seed, self.pruning, self.training)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data; settings added later are left out at their default (granularity
        weight, no floor), so recipes and run directories made before they existed keep their identity."""
        out = _plain(dataclasses.asdict(self))
        pruning = out.get("pruning", {})
        for key, default in (("granularity", "weight"), ("min_keep_per_tensor", 0.0), ("score", None),
                             ("score_group", "row"), ("n_m", None)):
            if key in pruning and pruning[key] == default:
                del pruning[key]
        return out


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively: the form YAML and JSON write and read back."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
