"""A run directory: its identity, and every file a run resumes from.

Layout::

    identity.json                   what determines the results (see ``run_identity``); a run whose
                                    identity differs is refused, naming the settings that differ
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

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import safetensors
import safetensors.torch
import torch
import yaml

from ..config import EXECUTION_SETTINGS, ExperimentConfig
from ..data.fingerprint import fingerprint
from ..errors import CheckpointError, ConfigError, RunLockedError
from ..io import (
    atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, remove_stale_temp_files,
    torch_load,
)
from ..masks import Mask, MaskSet
from ..training import State

IDENTITY_FILE = "identity.json"
LOCK_FILE, LOCK_OWNER_FILE = ".lock", ".lock.owner"
IDENTITY_VERSION = 4  # 1: config.yaml alone; 2: without the model and θ₀; 3: before data.calibration


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
    from ..tickets import model_identity

    return {"version": IDENTITY_VERSION, "config": identity_settings(config),
            "task_class": None if task is None else f"{type(task).__module__}.{type(task).__qualname__}",
            "model": None if model is None else model_identity(model),
            "theta0": None if model is None else fingerprint(model.state_dict()),
            "data_fingerprint": data_fingerprint}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def identity_diff(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Dotted settings that differ, each with both values (``training.epochs: 3 -> 4``)."""
    a, b = _flatten(found), _flatten(wanted)

    def show(value: Any) -> str:  # fingerprints are long hex strings: their start tells them apart
        return repr(value[:12] + "...") if isinstance(value, str) and len(value) == 64 else repr(value)

    return [f"{k.removeprefix('config.')}: {show(a.get(k, '(unset)'))} -> {show(b.get(k, '(unset)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class RunDirectory:
    """Paths and resumable state of one run; the ``TicketStore`` that ``AdaptiveTickets`` checkpoints into.

    Every file a resume reads carries a checksum (safetensors metadata, a JSON field, or
    ``io.atomic_torch_save``'s header). A file that fails it, or cannot be parsed, is reported
    through ``log``, deleted and recomputed: corruption costs time, never a wrong result.
    """

    def __init__(self, path: str | Path, log: Callable[[str], None] = lambda message: None, lock: bool = True) -> None:
        self.path = Path(path)
        self.log = log
        self.lock = lock  # False: a worker process writing under the lock its parent holds (run.workers)
        self._lock: filelock.FileLock | None = None

    # -- ownership -------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (re-entrant): two runs on one directory cannot interleave their writes.

        Raises ``RunLockedError`` naming the holder (pid, host, since when) when another process has it.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a run directory")
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.lock:
            yield
            return
        if self._lock is None:
            self._lock = filelock.FileLock(str(self.path / LOCK_FILE), timeout=0)
        owner = self.path / LOCK_OWNER_FILE
        try:
            self._lock.acquire()
        except filelock.Timeout:
            holder = owner.read_text().strip() if owner.exists() else "another process"
            raise RunLockedError(f"{self.path} is in use by {holder}; wait for it to finish or choose "
                                 "another output directory") from None
        try:
            if self._lock.lock_counter == 1:
                owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            yield
        finally:
            if self._lock.lock_counter == 1:
                owner.unlink(missing_ok=True)
            self._lock.release()

    def claim(self, identity: Mapping[str, Any], config: ExperimentConfig | None = None) -> bool:
        """Record ``identity`` (or check it matches the one already there); True when resuming.

        Raises ``ConfigError`` naming every differing setting when the directory holds another run.
        Runs under the lock, so two runs cannot both pass the check and then mix their files.
        """
        with self.locked():
            path = self.path / IDENTITY_FILE
            resuming = path.exists()
            if resuming:
                found = read_json(path)
                if not isinstance(found, dict) or found.get("version") != IDENTITY_VERSION:
                    raise ConfigError(f"{self.path} holds a run from another routing-lottery version (identity "
                                      f"version {found.get('version') if isinstance(found, dict) else '?'}, this one "
                                      f"writes {IDENTITY_VERSION}); choose another output directory")
                if ("replicates_of" in found) != ("replicates_of" in identity):
                    held, wanted = (("a run of several seeds", "one run") if "replicates_of" in found
                                    else ("one run", "a run of several seeds"))
                    raise ConfigError(f"{self.path} holds {held}; {wanted} needs another output directory "
                                      "(a single run's seed can be one of the seeds: copy it to DIR/seeds/<seed>)")
                if found != json.loads(json.dumps(identity)):
                    diff = "; ".join(identity_diff(found, identity)[:8])
                    raise ConfigError(f"{self.path} holds a run of different data or settings ({diff}); "
                                      "choose another output directory to start a new run")
                # only the lock holder may clean up: a worker would delete a sibling's half-written file
                for litter in (remove_stale_temp_files(self.path) if self.lock else []):
                    self.log(f"removed {litter.relative_to(self.path)}, left by a run killed while writing it")
            elif (self.path / "config.yaml").exists():
                raise ConfigError(f"{self.path} holds a run from an older routing-lottery (no {IDENTITY_FILE}); "
                                  "choose another output directory")
            elif not self.lock:
                raise ConfigError(f"{self.path}: a worker joins a run its parent claimed; there is none here")
            else:
                atomic_write_json(path, identity)
            if config is not None and self.lock:  # a worker's config differs in execution settings only
                atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        return resuming

    def _discard(self, path: Path, problem: str) -> None:
        """A corrupt file: say so, and delete it so that what it held is recomputed."""
        self.log(f"{path.relative_to(self.path)} is corrupt ({problem}): recomputing it")
        path.unlink(missing_ok=True)

    # -- paths -----------------------------------------------------------------------------
    def state_dict_file(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def round_file(self, stream: str, r: int) -> Path:
        return self.path / "imp" / stream / f"round_{r:03d}.safetensors"

    def record_file(self, method: str, level: float) -> Path:
        return self.path / "records" / f"{method}_{level:.4f}.json"

    def train_state_file(self, key: str) -> Path:
        return self.path / "train" / f"{key}.pt"

    def checkpoint_dir(self, method: str, level: float) -> Path:
        return self.path / "checkpoints" / f"{method}_{level:.4f}"

    # -- state dicts -----------------------------------------------------------------------
    def save_state(self, name: str, state: State) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        meta = {"sha256": fingerprint(tensors)}
        atomic_write_bytes(self.state_dict_file(name), safetensors.torch.save(tensors, metadata=meta))

    def load_state(self, name: str) -> State | None:
        """A saved state dict, or None when absent or corrupt (then deleted: it is made again)."""
        path = self.state_dict_file(name)
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get("sha256")
                state = {k: f.get_tensor(k) for k in f.keys()}
        except OSError:
            raise  # the disk or the process, not the file: never delete a file for it
        except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for corrupt files
            self._discard(path, f"{type(err).__name__}: {err}")
            return None
        if recorded != fingerprint(state):
            self._discard(path, "checksum mismatch" if recorded else "no checksum")
            return None
        return state

    # -- IMP rounds ------------------------------------------------------------------------
    def save_round(self, stream: str, r: int, mask: Mask, pruned: int) -> None:
        ms = MaskSet.from_tickets([mask])
        tensors = {n: p.contiguous() for n, p in ms.packed().items()}
        meta = {"shapes": json.dumps({n: list(s) for n, s in ms.shapes.items()}), "pruned": str(pruned),
                "sha256": fingerprint(tensors, ms.shapes, pruned)}
        atomic_write_bytes(self.round_file(stream, r), safetensors.torch.save(tensors, metadata=meta))

    def load_round(self, stream: str, r: int, pruned: int | None = None, order: Sequence[str] | None = None) -> Mask | None:
        """The mask saved after round ``r`` (its tensors in ``order``, the model's, when given).

        None when there is none, when it was made for another cumulative count than ``pruned`` (an
        earlier plan with other levels), or when it is corrupt (then deleted): that round is recomputed.
        """
        path = self.round_file(stream, r)
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                packed = {n: f.get_tensor(n) for n in f.keys()}
            shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
            saved_pruned = int(meta["pruned"])
            if meta.get("sha256") != fingerprint(packed, shapes, saved_pruned):
                raise CheckpointError("checksum mismatch")
            mask = MaskSet.from_packed(packed, shapes, ["ticket"])[0]
            if order is not None and set(order) != set(mask):
                raise CheckpointError(f"it masks {sorted(mask)[:3]}..., the model's tensors are {sorted(order)[:3]}...")
        except OSError:
            raise  # the disk or the process, not the file: never delete a file for it
        except Exception as err:  # noqa: BLE001 -- any unreadable round is recomputed
            self._discard(path, f"{type(err).__name__}: {err}")
            return None
        if pruned is not None and saved_pruned != pruned:
            return None
        return mask if order is None else {n: mask[n] for n in order}

    # -- joint retraining ------------------------------------------------------------------
    def load_training(self, key: str, basis: Any) -> dict[str, Any] | None:
        path = self.train_state_file(key)
        if not path.exists():
            return None
        try:
            saved = torch_load(path)
        except CheckpointError as err:
            self._discard(path, str(err))
            return None
        return saved if isinstance(saved, dict) and saved.get("basis") == basis else None

    def save_training(self, key: str, basis: Any, state: dict[str, Any]) -> None:
        atomic_torch_save(self.train_state_file(key), {**state, "basis": basis})

    def drop_training(self, key: str) -> None:
        self.train_state_file(key).unlink(missing_ok=True)

    # -- records ---------------------------------------------------------------------------
    def load_record(self, method: str, level: float, basis: Any) -> list[dict[str, Any]] | None:
        """The finished rows of (method, level) if computed from the same stage-1 rounds, else None."""
        path = self.record_file(method, level)
        if not path.exists():
            return None
        try:
            saved = read_json(path)
            if not isinstance(saved, dict) or saved.get("sha256") != fingerprint(saved.get("basis"), saved.get("rows")):
                raise CheckpointError("checksum mismatch")
        except (CheckpointError, TypeError) as err:
            self._discard(path, str(err))
            return None
        return saved["rows"] if saved.get("basis") == basis else None

    def save_record(self, method: str, level: float, basis: Any, rows: list[dict[str, Any]]) -> None:
        rows = json.loads(json.dumps(rows))  # the form it is read back in, so the checksum matches
        atomic_write_json(self.record_file(method, level), {"basis": basis, "rows": rows,
                                                            "sha256": fingerprint(basis, rows)})


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
