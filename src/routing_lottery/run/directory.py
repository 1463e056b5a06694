"""A run directory: its identity, and every file a run resumes from.

Layout::

    identity.json                   what determines the results (see ``run_identity``) and its sha256; a
                                    run whose identity differs is refused, naming the settings that differ
    identity.copy.json              the same file again: a damaged or deleted identity.json is rewritten
                                    from it when this run's identity matches it (see ``RunDirectory.claim``)
    .lock, .lock.owner              held by the process running in the directory (pid, host, since)
    config.yaml                     the resolved config of the latest invocation (for people)
    environment.json                library versions, thread count and device of the latest invocation
    deployment.{json,md,png}        the methods without an oracle (``run.deploy``); routing/, calibration/ figures
    theta0.safetensors              the shared initialization θ₀ (rewind.safetensors when rewinding to θ_j)
    imp/<stream>/round_NNN.safetensors   the bit-packed mask after every IMP round, its pruned count, a checksum
    train/<method>_<level>.pt       joint-retraining state after the last finished epoch
    records/<method>_<level>.json   one finished result record, with the stage-1 rounds it used
    checkpoints/rtl_<level>/        the RTL tickets: shared weights + packed masks + recipe (see ``io``)
    results.json / .csv / .md       all records of the latest invocation

The identity leaves out where and how fast a run goes (device, threads) and what only adds to it
(methods, sparsity levels): moving a run to a GPU resumes it, and adding a level or a method
reuses every IMP round and record that the new plan shares with the old one. Round files and
records carry the cumulative pruned counts they were made for, so a round that another schedule
would have made differently is recomputed rather than trusted.
"""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import EXECUTION_SETTINGS, ExperimentConfig, config_yaml
from ..errors import ConfigError
from ..fingerprint import fingerprint
from ..store import (  # noqa: F401 -- the run directory's names, where the runner and tests look for them
    IDENTITY_CHECKSUM, IDENTITY_COPY, IDENTITY_FILE, IDENTITY_VERSION, LOCK_FILE, LOCK_OWNER_FILE, RUN_FILES,
    CheckpointDirectory, identity_diff, read_identity, sign_identity,
)
from ..tickets import model_identity


class RunDirectory(CheckpointDirectory):
    """A ``store.CheckpointDirectory`` that also records the experiment's resolved config (config.yaml)."""

    def claim(self, identity: Mapping[str, Any], config: ExperimentConfig | None = None) -> bool:  # type: ignore[override]
        return super().claim(identity, None if config is None else {"config.yaml": config_yaml(config)})


def software_environment(device: torch.device) -> dict[str, Any]:
    """What besides the config decides a run's figures to the last bit: library versions, the thread
    count and the device (float reductions run in another order on another count or device)."""
    import platform

    import numpy
    import scipy
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "machine": platform.machine(), "system": platform.system()}


def identity_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The settings that decide a run's results: the config minus execution settings, methods, levels,
    the run's name, where the data files lie, the deployment measurements and the replicate count
    (each replicate is a run of its own seed)."""
    identity = config.to_dict()
    for key in (*EXECUTION_SETTINGS, "methods", "name", "deploy", "replicates"):
        identity.pop(key, None)
    identity["pruning"].pop("sparsities", None)
    identity["data"].pop("root", None)  # the data fingerprint covers the content, wherever it lies
    if identity.get("speech"):
        identity["speech"].pop("noise_root", None)
    return identity


def run_identity(config: ExperimentConfig, data_fingerprint: str, task: object | None = None,
                 model: torch.nn.Module | None = None) -> dict[str, Any]:
    """What determines a run's results: the config minus what does not (execution settings, methods,
    levels, the run's name, where the data files lie, the deployment measurements), the task's class
    and the network's layout (a task handed in as an object is not described by the config), and a
    fingerprint of the data the task serves."""
    return {"version": IDENTITY_VERSION, "config": identity_settings(config),
            "task_class": None if task is None else f"{type(task).__module__}.{type(task).__qualname__}",
            "model": None if model is None else model_identity(model),
            "theta0": None if model is None else fingerprint(model.state_dict()),
            "data_fingerprint": data_fingerprint}


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device`` setting; a clear error when it is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available on this machine; use device=auto or cpu")
    return device


__all__ = ["IDENTITY_CHECKSUM", "IDENTITY_COPY", "IDENTITY_FILE", "IDENTITY_VERSION", "LOCK_FILE", "LOCK_OWNER_FILE",
           "RUN_FILES", "RunDirectory", "identity_diff", "identity_settings", "read_identity", "resolve_device",
           "run_identity", "sign_identity", "software_environment"]
