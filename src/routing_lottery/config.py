"""Experiment configuration: one typed dataclass per concern, loaded from YAML, validated once.

A YAML file holds the base settings plus ``scales:`` -- named overrides (``smoke``, ``full``)
deep-merged over the base when a scale is chosen. Full scale reproduces the paper's networks and
settings; smaller scales shrink width, epochs and subset sizes but never change the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .data.speech import SpeechMixConfig
from .calibration import OBJECTIVES, RULES
from .errors import ConfigError, brief, shorten
from .models import MODELS
from .registries import DATASETS, METHODS, TASKS
from .recipe import RTLConfig
from .router import ROUTERS, STRATEGIES
from .settings import (
    _INT_BOUND, MAX_CONFIG_BYTES, MAX_DEPTH, MAX_INT_DIGITS, MAX_TEXT, MAX_VALUES, _deep_merge, _long_integer,
    apply_scale, build, plain_data,
)

# Bounds on what a config may hold, checked before anything is built from it. A config is a page of
# settings (the packaged ones hold about 100 values); these are far beyond any real one and keep a
# hostile file -- an alias bomb, a few lines that expand to billions of values -- to about a second.
MAX_MESSAGE = 1000  # an error is one readable line, never an echo of a huge value
# Execution settings. A value past these is a typo that would claim the run directory and then
# exhaust memory or processes: no machine has 1,024 cores to give one process or a worker per core.
MAX_THREADS = 1024
MAX_WORKERS = 1024  # workers beyond the stage-1 streams (contexts + 1) start no process anyway
MAX_REPLICATES = 1000  # each is a full run; statistics over seeds settle long before
MAX_SEED = 2**63 - 1  # seeds reach torch and NumPy as signed 64-bit integers


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




@dataclass(frozen=True)
class DeployConfig:
    """Deployment without an oracle: inferred routing, routing errors and calibrated detectors.

    Everything here is measured after training on the trained subnetworks, so it changes no mask
    and no weight: it is kept out of a run's identity, and a record is recomputed when it changes.
    """

    # routers recorded beside oracle routing, where the task supports them (router.py): detectors,
    # entropy and learned for classification; learned for speech; the INR reads its region from the input
    routers: tuple[str, ...] = STRATEGIES
    # fractions of test inputs sent to a wrong context (tasks whose context is not the label itself)
    error_rates: tuple[float, ...] = (0.1, 0.25, 0.5)
    # fit a threshold per detector on data.calibration's split: f1, balanced_accuracy, precision; null: do not
    calibration: str | None = None
    target_precision: float = 0.8  # calibration: precision
    delta: float | None = None  # calibration: precision with a Learn-Then-Test guarantee at this risk
    rule: str = "most_confident"  # when zero or several detectors fire: most_confident or abstain

    def __post_init__(self) -> None:
        for name in self.routers:  # a registered router, or a user's by import path
            try:
                ROUTERS.get(name)
            except ConfigError as err:
                raise ConfigError(f"deploy.routers: {err}") from None
        bad = [r for r in self.error_rates if not 0.0 < r <= 1.0]
        if bad:
            raise ConfigError(f"deploy.error_rates must be fractions in (0, 1]; got {bad}")
        if self.calibration is not None and self.calibration not in OBJECTIVES:
            raise ConfigError(f"deploy.calibration must be one of {list(OBJECTIVES)} or null; got "
                              f"{brief(self.calibration)}")
        if not 0.0 < self.target_precision <= 1.0:
            raise ConfigError(f"deploy.target_precision must be in (0, 1]; got {self.target_precision!r}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ConfigError(f"deploy.delta must be in (0, 1) or null; got {self.delta!r}")
        if self.rule not in RULES:
            raise ConfigError(f"deploy.rule must be one of {list(RULES)}; got {brief(self.rule)}")


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
        for method in self.methods:  # a registered name, or a user's method by import path
            try:
                METHODS.get(method)
            except ConfigError as err:
                raise ConfigError(f"unknown methods: {err}") from None
        if not self.methods:
            raise ConfigError("methods must name at least one method")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError):
                raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or another torch device; got "
                                  f"{brief(self.device)}") from None
        # Bounded before anything is claimed or allocated (MAX_* above says why each bound is where it is).
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"threads must be >= 1 and <= {MAX_THREADS} (torch CPU threads per process); got "
                              f"{brief(self.threads)}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be >= 1 and <= {MAX_WORKERS} (stage-1 processes; more than the "
                              f"contexts + 1 start none); got {brief(self.workers)}")
        if not 1 <= self.replicates <= MAX_REPLICATES:
            raise ConfigError(f"replicates must be >= 1 and <= {MAX_REPLICATES} (--seeds: the number of seeds, each "
                              f"a full run); got {brief(self.replicates)}")
        if not 0 <= self.seed <= MAX_SEED - (self.replicates - 1):
            raise ConfigError(f"seed must be in 0..2**63-1 (replicate i runs seed + i, which must be too: torch and "
                              f"NumPy take seeds as 64-bit integers); got {brief(self.seed)}")
        # Names are resolved now, before a run directory is claimed, so a typo costs nothing.
        TASKS.get(self.task)
        if self.task == "classification":
            DATASETS.get(self.data.name)
            MODELS.get(self.model.name or "ghostnet")

    def replace(self, **changes: Any) -> ExperimentConfig:
        return build(ExperimentConfig, _deep_merge(self.to_dict(), changes))


def load_config(path: str | Path, scale: str | None = None, overrides: Mapping[str, Any] | None = None,
                overrides_from: str = "--set") -> ExperimentConfig:
    """Read a YAML experiment file, apply a named scale and then explicit overrides (``--set``).

    Every problem raises ``ConfigError`` naming the file (and line, for YAML syntax) or
    ``overrides_from`` (the command-line options the overrides came from), in at most
    ``MAX_MESSAGE`` characters; the file is bounded in size, values and nesting (``MAX_*``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size:,} bytes; a config file holds at most {MAX_CONFIG_BYTES:,} "
                          "(give large data to a loader as a file path in data.options)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a YAML text file ({type(err).__name__})") from None
    raw = load_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path} is empty; a config needs at least a name and a task (see configs/digits.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got a {type(raw).__name__}")
    return config_from_dict(raw, scale, overrides, source=str(path), overrides_from=overrides_from)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded as a config is (``MAX_*``) before it constructs any value.

    It refuses a document of more than ``MAX_VALUES`` values as written (counted while composing,
    so a long file stops early), one that nests deeper than ``MAX_DEPTH``, whose aliases expand it
    past ``MAX_VALUES`` values, ``MAX_TEXT`` characters or ``MAX_DEPTH`` levels or make it contain
    itself, and an integer of more than ``MAX_INT_DIGITS`` digits. Aliases share nodes, so a few
    lines can stand for billions of values, and everything after loading (merging, validation,
    ``to_dict``, writing config.yaml) copies them out: the expansion is counted on the node graph,
    once per node. Dates and times stay the text they were written as (as in YAML 1.2): no setting
    takes one, and a ``datetime`` neither writes to JSON nor compares equal after a round trip.
    """

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source, self.depth, self.composed = source, 0, 0

    def refuse(self, mark: Any, problem: str) -> ConfigError:
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return ConfigError(f"{self.source}{where}: {problem}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        # the composer recurses per level: refused here, a deep document never reaches the recursion limit
        self.depth += 1
        self.composed += 1
        try:
            if self.depth > MAX_DEPTH:
                raise self.refuse(self.peek_event().start_mark, f"values nest deeper than {MAX_DEPTH} levels")
            if self.composed > MAX_VALUES:
                raise self.refuse(self.peek_event().start_mark, f"more than {MAX_VALUES:,} values; a config "
                                                                "holds far fewer")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            self.check_expansion(node)
        return node

    def check_expansion(self, root: Any) -> None:
        """Refuse a node graph that contains itself, or whose aliases expand it past the bounds; linear
        in the nodes as written (each node's expanded size is computed once, from its children's)."""
        size: dict[int, tuple[int, int, int]] = {}  # node -> (values, characters, depth), expanded
        open_nodes: set[int] = set()
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, finished = stack.pop()
            children = _children(node)
            if finished:
                open_nodes.discard(id(node))
                below = [size[id(c)] for c in children]
                values = min(MAX_VALUES + 1, 1 + sum(v for v, _, _ in below))
                text = min(MAX_TEXT + 1, sum(t for _, t, _ in below) if children else len(str(node.value)))
                size[id(node)] = values, text, 1 + max((d for _, _, d in below), default=0)
                if values > MAX_VALUES or text > MAX_TEXT or size[id(node)][2] > MAX_DEPTH:
                    raise self.refuse(node.start_mark, "through its aliases, this value expands to more than "
                                      f"{MAX_VALUES:,} values, {MAX_TEXT:,} characters or {MAX_DEPTH} levels; a "
                                      "config holds far fewer")
            elif id(node) in open_nodes:
                raise self.refuse(node.start_mark, "an alias refers to a value that contains it (the value "
                                                   "would be infinite)")
            elif id(node) not in size:
                open_nodes.add(id(node))
                stack.append((node, True))
                stack.extend((c, False) for c in children)

    def construct_yaml_int(self, node: Any) -> int:
        text = str(node.value)
        if len(text.replace("_", "")) > MAX_INT_DIGITS + 3:  # refused before converting: int() of it is costly
            raise self.refuse(node.start_mark, _long_integer(len(text)))
        value = super().construct_yaml_int(node)
        if abs(value) >= _INT_BOUND:
            raise self.refuse(node.start_mark, _long_integer(None))
        return value

    def construct_yaml_timestamp(self, node: Any) -> str:  # type: ignore[override]
        return str(self.construct_scalar(node))


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", _BoundedLoader.construct_yaml_timestamp)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml(text: str, source: str) -> Any:
    """The value of YAML document ``text`` (a config file, or one ``--set`` value), bounded as
    ``_BoundedLoader`` says; every problem is a ``ConfigError`` naming ``source`` (and the line)."""
    loader = None
    try:
        loader = _BoundedLoader(text, source)  # its reader already refuses control characters
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(shorten(f"{source} is not valid YAML: {' '.join(str(err).split())}", MAX_MESSAGE)) from None
    except (ValueError, OverflowError, RecursionError) as err:  # ConfigError included: a bound above
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source} holds a value YAML cannot construct ({type(err).__name__}: "
                          f"{shorten(str(err), 200)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def config_yaml(config: ExperimentConfig) -> str:
    """The text of a run's ``config.yaml``: what ``load_config`` reads back as ``config``."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _check_writable(config: ExperimentConfig, source: str) -> ExperimentConfig:
    """``config`` itself, once its config.yaml is known to be readable again: expanded aliases and
    escaped characters can make the written file larger than the one read."""
    try:
        size = len(config_yaml(config).encode("utf-8"))
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # not expected after plain_data: said, not raised
        raise ConfigError(f"{source}: the settings cannot be written as config.yaml ({type(err).__name__}: "
                          f"{shorten(str(err), 200)})") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: written out as config.yaml (aliases expanded), these settings take {size:,} "
                          f"bytes, more than the {MAX_CONFIG_BYTES:,} a config file may hold; give large data to a "
                          "loader as a file path in data.options")
    return config


def config_from_dict(raw: Mapping[str, Any], scale: str | None = None, overrides: Mapping[str, Any] | None = None,
                     source: str = "config", overrides_from: str = "--set") -> ExperimentConfig:
    """The config of mapping ``raw`` with a scale and overrides; errors name ``source``, or
    ``overrides_from`` (the command-line options that gave the overrides) when only the overrides make
    the settings invalid. Every message is at most ``MAX_MESSAGE`` characters."""
    try:
        return _check_writable(_config_from_dict(raw, scale, overrides, source, overrides_from), source)
    except ConfigError as err:
        raise ConfigError(shorten(str(err), MAX_MESSAGE)) from None


def _config_from_dict(raw: Mapping[str, Any], scale: str | None, overrides: Mapping[str, Any] | None,
                      source: str, overrides_from: str) -> ExperimentConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, got {brief(raw)}")
    try:
        raw = plain_data(raw, "", depth=1)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if overrides:
        try:
            overrides = plain_data(overrides, "", depth=1)
        except ConfigError as err:
            raise ConfigError(f"{overrides_from}: {err}") from None
    raw = apply_scale(raw, scale, source)
    if not overrides:
        try:
            return build(ExperimentConfig, raw)
        except (TypeError, ValueError, OverflowError, RecursionError) as err:
            raise ConfigError(f"{source}: {err}") from None
    try:  # the merged settings decide; blame the overrides only when the file alone is valid
        return build(ExperimentConfig, _deep_merge(raw, overrides))
    except (TypeError, ValueError, OverflowError, RecursionError) as err:
        try:
            build(ExperimentConfig, raw)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise ConfigError(f"{source} with {overrides_from}: {err}") from None
        raise ConfigError(f"{overrides_from} (over {source}): {err}") from None
