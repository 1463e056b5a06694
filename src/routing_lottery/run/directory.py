"""A run directory: its identity, and every file a run resumes from.

Layout::

    identity.json                   what determines the results (see ``run_identity``); a run whose
                                    identity differs is refused, naming the settings that differ
    config.yaml                     the resolved config of the latest invocation (for people)
    theta0.safetensors              the shared initialization θ₀ (rewind.safetensors when rewinding to θ_j)
    imp/<stream>/round_NNN.safetensors   the bit-packed mask after every IMP round, with its pruned count
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

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import yaml

from ..config import EXECUTION_SETTINGS, ExperimentConfig
from ..io import (
    CheckpointError, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, torch_load,
)
from ..masks import Mask, MaskSet
from ..training import State

IDENTITY_FILE = "identity.json"
IDENTITY_VERSION = 2  # 1: config.yaml alone identified a run


def run_identity(config: ExperimentConfig, data_fingerprint: str, task: object | None = None) -> dict[str, Any]:
    """What determines a run's results: the config minus execution settings, methods and levels, the
    task's class (a task handed in as an object is not described by the config) and a fingerprint of
    the data the task serves."""
    identity = config.to_dict()
    for key in (*EXECUTION_SETTINGS, "methods"):
        identity.pop(key, None)
    identity["pruning"].pop("sparsities", None)
    task_class = None if task is None else f"{type(task).__module__}.{type(task).__qualname__}"
    return {"version": IDENTITY_VERSION, "config": identity, "task_class": task_class,
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
    """Paths and resumable state of one run; the ``TicketStore`` that ``AdaptiveTickets`` checkpoints into."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def claim(self, identity: Mapping[str, Any], config: ExperimentConfig | None = None) -> bool:
        """Record ``identity`` (or check it matches the one already there); True when resuming.

        Raises ``ValueError`` naming every differing setting when the directory holds another run.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file, not a run directory")
        path = self.path / IDENTITY_FILE
        resuming = path.exists()
        if resuming:
            found = read_json(path)
            if found != json.loads(json.dumps(identity)):
                diff = "; ".join(identity_diff(found, identity)[:8])
                raise ValueError(f"{self.path} holds a run of different data or settings ({diff}); "
                                 "choose another output directory to start a new run")
        elif (self.path / "config.yaml").exists():
            raise ValueError(f"{self.path} holds a run from an older routing-lottery (no {IDENTITY_FILE}); "
                             "choose another output directory")
        else:
            atomic_write_json(path, identity)
        if config is not None:
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        return resuming

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
        atomic_write_bytes(self.state_dict_file(name), safetensors.torch.save(tensors))

    def load_state(self, name: str) -> State | None:
        path = self.state_dict_file(name)
        if not path.exists():
            return None
        try:
            return safetensors.torch.load(path.read_bytes())
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path} is truncated or corrupt ({err}); delete it to start this run over") from None

    # -- IMP rounds ------------------------------------------------------------------------
    def save_round(self, stream: str, r: int, mask: Mask, pruned: int) -> None:
        ms = MaskSet.from_tickets([mask])
        meta = {"shapes": json.dumps({n: list(s) for n, s in ms.shapes.items()}), "pruned": str(pruned)}
        tensors = {n: p.contiguous() for n, p in ms.packed().items()}
        atomic_write_bytes(self.round_file(stream, r), safetensors.torch.save(tensors, metadata=meta))

    def load_round(self, stream: str, r: int, pruned: int | None = None, order: Sequence[str] | None = None) -> Mask | None:
        """The mask saved after round ``r`` (its tensors in ``order``, the model's, when given).

        None when there is none, or when it was made for another cumulative count than ``pruned``
        (an earlier plan with other levels): that round must be recomputed.
        """
        path = self.round_file(stream, r)
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                meta = f.metadata()
                shapes = json.loads(meta["shapes"])
                saved_pruned = int(meta["pruned"])
                packed = {n: f.get_tensor(n) for n in f.keys()}
        except Exception as err:
            raise CheckpointError(f"{path} is truncated or corrupt ({err}); delete it to redo that round") from None
        if pruned is not None and saved_pruned != pruned:
            return None
        mask = MaskSet.from_packed(packed, shapes, ["ticket"])[0]
        if order is not None:
            if set(order) != set(mask):
                raise CheckpointError(f"{path} masks tensors {sorted(mask)[:4]}..., the model's are "
                                      f"{sorted(order)[:4]}...; delete it to redo that round")
            mask = {n: mask[n] for n in order}
        return mask

    # -- joint retraining ------------------------------------------------------------------
    def load_training(self, key: str, basis: Any) -> dict[str, Any] | None:
        path = self.train_state_file(key)
        if not path.exists():
            return None
        saved = torch_load(path)
        return saved if saved.get("basis") == basis else None

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
        saved = read_json(path)
        if not isinstance(saved, dict) or "rows" not in saved:
            raise CheckpointError(f"{path} is not a record of this library version; delete it to recompute")
        return saved["rows"] if saved.get("basis") == basis else None

    def save_record(self, method: str, level: float, basis: Any, rows: list[dict[str, Any]]) -> None:
        atomic_write_json(self.record_file(method, level), {"basis": basis, "rows": rows})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
