"""Experiment configuration: one typed dataclass per concern, loaded from YAML, validated once.

A YAML file holds the base settings plus ``scales:`` -- named overrides (``smoke``, ``full``)
deep-merged over the base when a scale is chosen. Full scale reproduces the paper's networks and
settings; smaller scales shrink width, epochs and subset sizes but never change the method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from .data.speech import SpeechMixConfig
from .errors import ConfigError
from .recipe import RTLConfig

@dataclass(frozen=True)
class DataConfig:
    # classification: digits, cifar10, cifar100 or a user's loader as package.module:callable, called as
    # loader(data_config, seed) -> (train, test) LabelledDatasets; INR: skimage, ade20k; speech: speech
    name: str = "digits"
    root: str | None = None  # directory holding the full-scale files (CIFAR pickles, ADE20K folder, speech/noise)
    image_size: int = 16  # digits: 8x8 images upsampled to this; INR: the images' short side
    train_per_class: int | None = None  # cap per class (None: all), a stratified deterministic subset
    test_per_class: int | None = None
    # contexts: one per class; the paper's 8 CIFAR-100 clusters; the 20 CIFAR-100 superclasses;
    # clusters of the class names (offline text encoder + UMAP + HDBSCAN); or a partition.json path
    contexts: str = "classes"
    clusters: int | None = None  # "clusters": the target cluster count (None: whatever HDBSCAN finds)
    images: tuple[str, ...] = ()  # INR: embedded image names (empty: all ten) -- ignored for ADE20K
    limit: int = 10  # INR on ADE20K: the first `limit` images of the folder
    regions: int = 8  # INR on the embedded images: unsupervised regions per image
    options: dict[str, Any] = field(default_factory=dict)  # passed on to a user's loader (data_config.options)
    # classification: the fraction of each class's training examples held out (never trained on) to
    # calibrate the detectors' thresholds; 0 holds none out (no calibration possible)
    calibration: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.calibration < 1.0:
            raise ConfigError(f"data.calibration must be a fraction in [0, 1); got {self.calibration!r}")


@dataclass(frozen=True)
class SpeechConfig(SpeechMixConfig):
    """Speech enhancement: the mixture settings (``data.speech.SpeechMixConfig``: sample rate, clip
    length, clips per environment and split, SNR range, level, and ``seed``, which fixes the
    mixtures apart from the run's seed so that runs with different seeds see the same data), plus
    where the real noise lives and the STFT of the U-Net."""

    noise_root: str | None = None  # TAU Urban Acoustic Scenes 2020 folder; clean speech from data.root
    n_fft: int = 1024  # STFT window (the paper: 1024 at 16 kHz)
    hop_length: int = 256
    examples_per_environment: int = 1  # test clips drawn as spectrograms


@dataclass(frozen=True)
class ModelConfig:
    # None: the task's own network (classification: ghostnet; inr: coordinate_mlp; speech: unet), or a
    # registered model or a user's factory as package.module:callable, called as
    # factory(num_outputs=..., input_shape=..., **options).
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {width: 0.5}: GhostNet's channel multiplier


ROUTERS = ("detectors", "entropy", "learned")


@dataclass(frozen=True)
class DeployConfig:
    """Deployment without an oracle: inferred routing, routing errors and calibrated detectors.

    Everything here is measured after training on the trained subnetworks, so it changes no mask
    and no weight: it is kept out of a run's identity, and a record is recomputed when it changes.
    """

    # routers recorded beside oracle routing, where the task supports them (router.py): detectors,
    # entropy and learned for classification; learned for speech; the INR reads its region from the input
    routers: tuple[str, ...] = ROUTERS
    # fractions of test inputs sent to a wrong context (tasks whose context is not the label itself)
    error_rates: tuple[float, ...] = (0.1, 0.25, 0.5)
    # fit a threshold per detector on data.calibration's split: f1, balanced_accuracy, precision; null: do not
    calibration: str | None = None
    target_precision: float = 0.8  # calibration: precision
    delta: float | None = None  # calibration: precision with a Learn-Then-Test guarantee at this risk
    rule: str = "most_confident"  # when zero or several detectors fire: most_confident or abstain

    def __post_init__(self) -> None:
        from .calibration import OBJECTIVES, RULES

        unknown = [r for r in self.routers if r not in ROUTERS]
        if unknown:
            raise ConfigError(f"deploy.routers: unknown {unknown}; choose from {list(ROUTERS)}")
        bad = [r for r in self.error_rates if not 0.0 < r <= 1.0]
        if bad:
            raise ConfigError(f"deploy.error_rates must be fractions in (0, 1]; got {bad}")
        if self.calibration is not None and self.calibration not in OBJECTIVES:
            raise ConfigError(f"deploy.calibration must be one of {list(OBJECTIVES)} or null; got {self.calibration!r}")
        if not 0.0 < self.target_precision <= 1.0:
            raise ConfigError(f"deploy.target_precision must be in (0, 1]; got {self.target_precision!r}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ConfigError(f"deploy.delta must be in (0, 1) or null; got {self.delta!r}")
        if self.rule not in RULES:
            raise ConfigError(f"deploy.rule must be one of {list(RULES)}; got {self.rule!r}")


EXECUTION_SETTINGS = ("device", "threads", "workers", "distributed_retraining")
"""Settings that decide where and how fast a run goes, never its results (left out of its identity)."""


@dataclass(frozen=True)
class ExperimentConfig(RTLConfig):
    """A comparison of methods on one task: the RTL recipe plus data, model and execution settings."""

    name: str = "digits"
    task: str = "classification"  # classification, inr, speech, or a user's builder as package.module:callable
    device: str = "auto"  # "auto": CUDA when present, else CPU
    methods: tuple[str, ...] = ("dense", "single_imp", "multi_imp", "rtl", "random")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    speech: SpeechConfig | None = None  # task: speech only
    deploy: DeployConfig = field(default_factory=DeployConfig)
    threads: int | None = None  # torch CPU threads (None: torch's default); small models run faster on 1
    # seeds seed, seed+1, ..., each a full run in <out>/seeds/<seed>; tables then report the mean, a 95 %
    # interval and paired tests across them (statistics.py). 1: one run in <out> itself
    replicates: int = 1
    # processes for stage 1 (the per-context and single-mask IMP runs, run.workers); each gets threads, or
    # the cores shared out. The masks do not depend on it (for the same threads per process)
    workers: int = 1
    # under torchrun: split each joint-retraining step over the ranks (run.distributed). False keeps
    # it on rank 0: for a small network on CPU the per-step all-reduces cost more than they save
    distributed_retraining: bool = True

    def __post_init__(self) -> None:
        from .methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {METHODS.names()}")
        if not self.methods:
            raise ConfigError("methods must name at least one method")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError):
                raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or another torch device; got {self.device!r}") from None
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1; got {self.threads}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1; got {self.workers}")
        if self.replicates < 1:
            raise ConfigError(f"replicates must be >= 1 (the number of seeds); got {self.replicates}")
        # Names are resolved now, before a run directory is claimed, so a typo costs nothing.
        from .models import MODELS
        from .run.builders import DATASETS, TASKS

        TASKS.get(self.task)
        if self.task == "classification":
            DATASETS.get(self.data.name)
            MODELS.get(self.model.name or "ghostnet")

    def replace(self, **changes: Any) -> ExperimentConfig:
        return build(ExperimentConfig, _deep_merge(self.to_dict(), changes))


def load_config(path: str | Path, scale: str | None = None, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply a named scale and then explicit overrides (``--set``).

    Every problem raises ``ConfigError`` naming the file (and line, for YAML syntax) or ``--set``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    except (UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{path} is not a YAML text file ({type(err).__name__})") from None
    if raw is None:
        raise ConfigError(f"{path} is empty; a config needs at least a name and a task (see configs/digits.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got a {type(raw).__name__}")
    return config_from_dict(raw, scale, overrides, source=str(path))


def config_from_dict(raw: Mapping[str, Any], scale: str | None = None, overrides: Mapping[str, Any] | None = None,
                     source: str = "config") -> ExperimentConfig:
    """The config of mapping ``raw`` with a scale and overrides; errors name ``source``, or ``--set`` when
    only the overrides make the settings invalid."""
    raw = dict(raw)
    scales = raw.pop("scales", {}) or {}
    if not isinstance(scales, Mapping):
        raise ConfigError(f"{source}: scales must be a mapping of name -> settings")
    if scale is not None:
        if scale not in scales:
            raise ConfigError(f"{source}: no scale {scale!r}; it defines {sorted(scales) or 'none'}")
        if not isinstance(scales[scale], Mapping):
            raise ConfigError(f"{source}: scale {scale!r} must be a mapping of settings")
        raw = _deep_merge(raw, scales[scale])
    if not overrides:
        try:
            return build(ExperimentConfig, raw)
        except (TypeError, ValueError, RecursionError) as err:
            raise ConfigError(f"{source}: {err}") from None
    try:  # the merged settings decide; blame --set only when the file alone is valid
        return build(ExperimentConfig, _deep_merge(raw, overrides))
    except (TypeError, ValueError, RecursionError) as err:
        try:
            build(ExperimentConfig, raw)
        except (TypeError, ValueError, RecursionError):
            raise ConfigError(f"{source} with --set: {err}") from None
        raise ConfigError(f"--set (over {source}): {err}") from None


def build(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {[f'{where}{u}' for u in unknown]}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own validation: say which section
        raise ConfigError(f"{where.rstrip('.')}: {err}" if where else str(err)) from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # int | float: keep the YAML type, it carries meaning (count vs fraction)
        for arg in args:
            if arg is not type(None) and isinstance(value, arg) and not (arg is int and isinstance(value, bool)):
                return value
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1:  # X | None: X's own error names the problem
            return _coerce(candidates[0], value, where)
        for arg in candidates:
            try:
                return _coerce(arg, value, where)
            except ValueError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping; got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list; got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number; got {value!r}")
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {hint.__name__}; got {value!r}")
    return value


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
