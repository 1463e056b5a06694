"""Files on disk: atomic writes for the whole library, and the RTL ticket checkpoint.

Atomic writes
    Every file the library writes goes through ``atomic_*``: the bytes land in a temporary file
    in the same directory, are flushed and fsynced, and only then ``os.replace`` puts them at the
    final path. A run killed at any moment therefore leaves either the old file or the new one,
    never half of one -- which is what lets a resumed run trust whatever it finds on disk.

Ticket checkpoint
    RTL keeps ONE shared weight tensor per prunable layer and K binary masks. What must be stored
    is the shared weights at the union of the masks, K bits per prunable position, and the dense
    rest of the model. A checkpoint directory holds exactly that:

    ``tickets.safetensors``
        ``masks/<name>``   uint8 (K, ceil(numel/8)), the K masks bit-packed;
        ``values/<name>``  1-D, the shared weight at the union positions (row-major order);
        ``state/<key>``    every other state_dict entry (biases, BN, classifier, buffers) as is.
    ``tickets.json``
        format, version, context names, mask shapes, the model's state_dict signature and its
        fingerprint, the sha256 of ``tickets.safetensors``, and the caller's metadata.

    The JSON is written after the weights and records their hash, so a JSON that matches its
    weights file always describes a complete one; a torn pair (killed between the two writes)
    is reported as corrupt instead of loading silently-wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from torch import nn

from .errors import CheckpointError
from .masks import MaskSet

TICKETS_FORMAT = "routing-lottery/tickets"
TICKETS_VERSION = 1
WEIGHTS_FILE = "tickets.safetensors"
INDEX_FILE = "tickets.json"

Signature = dict[str, tuple[list[int], str]]
"""state_dict key -> (shape, dtype name): what a checkpoint needs of a model to load into it."""


# -- atomic writes ---------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_file(path: str | Path, mode: str) -> Iterator[IO[Any]]:
    """Yield a temp file next to ``path``; on clean exit fsync it and move it onto ``path``.

    The temp file lives in the target directory because ``os.replace`` is atomic only within
    one file system. On any failure (including KeyboardInterrupt) the temp file is removed and
    the previous content of ``path``, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); platforms that cannot open directories skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    with _atomic_file(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    with _atomic_file(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically.

    Serialised before anything touches the disk, so an unserialisable object raises without
    creating even a temp file.
    """
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically: resumable training states must never be half-written."""
    with _atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a file that is not valid JSON raises ``CheckpointError`` naming it.

    A missing file raises ``FileNotFoundError`` as usual: callers check existence to decide
    whether a step was done, whereas an unparsable file means it must be redone.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); it is truncated or corrupt") from None


def torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by ``atomic_torch_save``; a truncated or corrupt file raises ``CheckpointError``.

    Uses ``weights_only=True``: the library only saves tensors, plain containers and numbers
    (model and optimizer state dicts of Adam and SGD load that way), and refusing arbitrary
    pickled objects means a checkpoint from elsewhere cannot run code. ``map_location`` defaults
    to CPU so a state written on a GPU machine loads anywhere; ``load_state_dict`` moves it back.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from None


# -- model signature -------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _signature(model: nn.Module) -> Signature:
    return {key: (list(t.shape), _dtype_name(t.dtype)) for key, t in model.state_dict().items()}


def _fingerprint(signature: Mapping[str, tuple[list[int], str]]) -> str:
    rows = sorted([key, [int(d) for d in shape], str(dtype)] for key, (shape, dtype) in signature.items())
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's sorted (state_dict key, shape, dtype) list.

    Names what a checkpoint can be loaded into: any model with the same architecture, whatever
    its weights or device.
    """
    return _fingerprint(_signature(model))


def _signature_diff(recorded: Signature, actual: Signature, limit: int = 5) -> list[str]:
    """Human-readable differences between two signatures, at most ``limit`` plus a count."""
    diffs = [f"{k}: not in the model" for k in sorted(set(recorded) - set(actual))]
    diffs += [f"{k}: not in the checkpoint" for k in sorted(set(actual) - set(recorded))]
    for k in sorted(set(recorded) & set(actual)):
        (rs, rd), (as_, ad) = recorded[k], actual[k]
        if list(rs) != list(as_) or rd != ad:
            diffs.append(f"{k}: checkpoint {tuple(rs)} {rd}, model {tuple(as_)} {ad}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


# -- ticket checkpoint -----------------------------------------------------------------------
def save_tickets(
    directory: str | Path, model: nn.Module, masks: MaskSet, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Store the K tickets of ``masks`` over ``model``'s shared weights in ``directory``.

    Only the union of the masks is stored for each masked tensor, plus K bits per position and
    the dense rest of the state_dict -- RTL's storage cost, which benchmarks compare with the file
    size. Raises ``ValueError`` when a mask names a tensor the model lacks or has the wrong shape.
    Returns the directory.
    """
    directory = Path(directory)
    state = model.state_dict()
    missing = [n for n in masks.tensor_names if n not in state]
    if missing:
        raise ValueError(f"masks name tensors the model does not have: {missing}")
    masks.validate({n: state[n] for n in masks.tensor_names})

    tensors: dict[str, torch.Tensor] = {}
    packed = masks.packed()
    for name, union in masks.union().items():
        weight = state[name].detach().cpu()
        tensors[f"masks/{name}"] = packed[name].contiguous()
        tensors[f"values/{name}"] = weight[union.cpu()].contiguous()  # boolean indexing is row-major
    for key, value in state.items():
        if key not in masks.stacked:
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[f"state/{key}"] = value.detach().cpu().clone().contiguous()
    blob = safetensors.torch.save(tensors)

    signature = _signature(model)
    index = {
        "format": TICKETS_FORMAT,
        "version": TICKETS_VERSION,
        "context_names": list(masks.context_names),
        "tensors": {n: list(s) for n, s in masks.shapes.items()},
        "state": {k: {"shape": shape, "dtype": dtype} for k, (shape, dtype) in signature.items()},
        "fingerprint": _fingerprint(signature),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "metadata": dict(metadata or {}),
    }
    # Serialise before writing anything, so unserialisable metadata leaves the directory as it was.
    index_text = json.dumps(index, indent=2) + "\n"
    atomic_write_bytes(directory / WEIGHTS_FILE, blob)
    atomic_write_text(directory / INDEX_FILE, index_text)
    return directory


def _read_index(directory: Path) -> dict[str, Any]:
    """The checkpoint's JSON, checked for format, version and internal consistency."""
    path = directory / INDEX_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a complete ticket checkpoint")
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != TICKETS_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise CheckpointError(f"{path} is not a ticket checkpoint index (format {found!r}, expected {TICKETS_FORMAT!r})")
    if index.get("version") != TICKETS_VERSION:
        raise CheckpointError(f"{path} has version {index.get('version')!r}; this library reads version {TICKETS_VERSION}")
    try:
        context_names = [str(c) for c in index["context_names"]]
        shapes = {str(n): [int(d) for d in s] for n, s in index["tensors"].items()}
        signature: Signature = {str(k): ([int(d) for d in v["shape"]], str(v["dtype"])) for k, v in index["state"].items()}
        fingerprint, weights_sha256 = str(index["fingerprint"]), str(index["weights_sha256"])
        metadata = index["metadata"]
        if not isinstance(metadata, dict):
            raise TypeError("metadata is not an object")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path} is corrupt: missing or malformed field ({type(err).__name__}: {err})") from None
    if _fingerprint(signature) != fingerprint:
        raise CheckpointError(f"{path} is corrupt: its fingerprint does not match its recorded state_dict signature")
    bad = [n for n, s in shapes.items() if n not in signature or signature[n][0] != s]
    if bad or not context_names:
        raise CheckpointError(f"{path} is corrupt: mask shapes disagree with the state_dict signature {bad}")
    return {"context_names": context_names, "tensors": shapes, "state": signature, "fingerprint": fingerprint,
            "weights_sha256": weights_sha256, "metadata": metadata}


def _read_weights(directory: Path, index: dict[str, Any]) -> tuple[dict[str, torch.Tensor], MaskSet]:
    """The checkpoint's tensors (hash-checked against the index) and its masks."""
    index_path = directory / INDEX_FILE
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing: {directory} is not a complete ticket checkpoint")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != index["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path} is truncated or corrupt: its sha256 does not match the one recorded in {index_path}"
        )
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as err:  # safetensors raises its own error types for unparsable files
        raise CheckpointError(f"{weights_path} is truncated or corrupt ({err})") from None

    shapes: dict[str, list[int]] = index["tensors"]
    expected = {f"{p}/{n}" for n in shapes for p in ("masks", "values")}
    expected |= {f"state/{k}" for k in index["state"] if k not in shapes}
    if set(tensors) != expected:
        raise CheckpointError(
            f"{weights_path} is corrupt: entries missing {sorted(expected - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - expected)[:5]}"
        )
    try:
        masks = MaskSet.from_packed({n: tensors[f"masks/{n}"] for n in shapes}, shapes, index["context_names"])
    except ValueError as err:
        raise CheckpointError(f"{weights_path} is corrupt: bad packed masks ({err})") from None

    return tensors, masks


def load_masks(directory: str | Path) -> tuple[MaskSet, dict[str, Any]]:
    """Only the masks and metadata of a ticket checkpoint (no model needed): what diagnostics read."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"ticket checkpoint {directory} is missing (no such directory)")
    index = _read_index(directory)
    _, masks = _read_weights(directory, index)
    return masks, dict(index["metadata"])


def load_tickets(directory: str | Path, model: nn.Module) -> tuple[MaskSet, dict[str, Any]]:
    """Load a checkpoint written by ``save_tickets`` into ``model``; return its masks and metadata.

    The shared weights are restored at the union positions; every position outside the union
    becomes exactly 0 (it was never stored, and no ticket uses it). Every problem -- missing
    files, a bad index, a truncated or corrupt weights file, a checkpoint written for another
    architecture -- raises ``CheckpointError`` naming the file, before the model is touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"ticket checkpoint {directory} is missing (no such directory)")
    index = _read_index(directory)
    index_path = directory / INDEX_FILE

    actual = _signature(model)
    if _fingerprint(actual) != index["fingerprint"]:
        diffs = "; ".join(_signature_diff(index["state"], actual))
        raise CheckpointError(f"{index_path}: checkpoint was written for a different model ({diffs})")

    tensors, masks = _read_weights(directory, index)
    weights_path = directory / WEIGHTS_FILE
    state: dict[str, torch.Tensor] = {}
    for name, union in masks.union().items():
        values = tensors[f"values/{name}"]
        if values.dim() != 1 or values.numel() != int(union.sum()):
            raise CheckpointError(
                f"{weights_path} is corrupt: {name!r} stores {values.numel()} values for a union of {int(union.sum())}"
            )
        weight = torch.zeros(union.shape, dtype=values.dtype)
        weight[union] = values
        state[name] = weight
    for key in index["state"]:
        if key not in masks.stacked:
            state[key] = tensors[f"state/{key}"]
    model.load_state_dict(state, strict=True)
    return masks, dict(index["metadata"])


def directory_bytes(directory: str | Path) -> int:
    """Total size in bytes of the files under ``directory``: a checkpoint's real storage cost."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
