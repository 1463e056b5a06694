"""Files on disk: atomic writes for the whole library, and the RTL ticket checkpoint.

Atomic writes
    Every file the library writes goes through ``atomic_*``: the bytes land in a temporary file
    ``.NAME.rtl-XXXXXXXX.tmp`` in the same directory, are flushed and fsynced, and only then
    ``os.replace`` puts them at the final path. A run killed at any moment therefore leaves either
    the old file or the new one, never half of one -- which is what lets a resumed run trust
    whatever it finds on disk. ``os.replace`` replaces a symbolic link at the final path, never
    the file it points to. A kill can leave the temp file behind; ``remove_stale_temp_files``
    deletes such litter (a resuming run calls it while it holds the run directory's lock) and
    nothing else: the ``rtl-`` marker keeps a user's own ``.notes.20240101.tmp`` out of its
    pattern. Files get mode ``0o666 & ~umask``, the umask read once at import, as ``open`` would
    give them.

Checksummed torch files
    ``atomic_torch_save`` writes one header line ``RTLSHA256 <64 hex digits>\n`` (the sha256 of
    the rest) followed by the ``torch.save`` bytes; ``torch_load`` verifies it, so one flipped bit
    in a training state that a resume reads is reported instead of silently used.

Ticket checkpoint
    RTL keeps ONE shared weight tensor per prunable layer and K binary masks. What must be stored
    is the shared weights at the union of the masks, K bits per prunable position, and the dense
    rest of the model. A checkpoint directory holds exactly that:

    ``tickets.safetensors``
        ``masks/<name>``   uint8 (K, ceil(numel/8)), the K masks bit-packed;
        ``values/<name>``  1-D, the shared weight at the union positions (row-major order);
        ``state/<key>``    every other state_dict entry (biases, BN, classifier, buffers) as is, once:
                           a key that names the same tensor as another (a tied ``lm_head``) is
                           recorded in the index's ``aliases`` (version 3) instead of stored again.
    ``tickets.json``
        format, version, context names, mask shapes, the model's state_dict signature and its
        fingerprint, the sha256 of ``tickets.safetensors``, the caller's metadata and (version 2)
        ``index_sha256``: the sha256 of the index itself without that field, as canonical JSON
        (``json.dumps(index, sort_keys=True, separators=(",", ":"))``, ASCII), so an edited
        context name or metadata value is reported rather than loaded. Version-1 files (no index
        checksum) are still read.

    The JSON is written after the weights and records their hash, so a JSON that matches its
    weights file always describes a complete one; a torn pair (killed between the two writes)
    is reported as corrupt instead of loading silently-wrong weights. Reading validates every
    field's type and every stored tensor's shape and dtype before anything is loaded, and maps
    every problem to ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from torch import nn

from .errors import CheckpointError, brief
from .masks import MaskSet, check_shape

TICKETS_FORMAT = "routing-lottery/tickets"
TICKETS_VERSION = 2  # 1: no index_sha256 (still read)
ALIASES_VERSION = 3  # written only by a model with tied tensors: 2 plus "aliases"
READABLE_VERSIONS = (1, 2, 3)
WEIGHTS_FILE = "tickets.safetensors"
INDEX_FILE = "tickets.json"

MAX_INDEX_BYTES = 16 * 2**20
"""Largest ``tickets.json`` read: an index is a few KB per thousand tensors plus the caller's metadata."""
MAX_INDEX_DEPTH = 64
"""Deepest nesting of lists and objects accepted in ``tickets.json`` (the index itself needs 4)."""

Signature = dict[str, tuple[list[int], str]]
"""state_dict key -> (shape, dtype name): what a checkpoint needs of a model to load into it."""


# -- atomic writes ---------------------------------------------------------------------------
def _read_umask() -> int:
    """The process umask, without changing it where the OS can say (Linux ``/proc``).

    Elsewhere it is set and restored, once, at import: a thread creating a file in that instant
    gets mode 0o077 applied -- private rather than world-writable.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


_UMASK = _read_umask()
"""Read once: ``os.umask`` can only be read by setting it, which races with other threads."""

_TEMP_MARK, _TEMP_SUFFIX = "rtl-", ".tmp"
_TEMP_NAME = re.compile(r"\..+\." + re.escape(_TEMP_MARK) + r"[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX))
"""``tempfile.mkstemp(prefix=".NAME.rtl-", suffix=".tmp")``: 8 characters from its alphabet. The marker
is what tells the library's litter from a user's file: versions before it wrote ``.NAME.XXXXXXXX.tmp``,
a name a user's ``.notes.20240101.tmp`` has too, so such old litter is left alone."""


@contextlib.contextmanager
def _atomic_file(path: str | Path, mode: str) -> Iterator[IO[Any]]:
    """Yield a temp file next to ``path``; on clean exit fsync it and move it onto ``path``.

    The temp file lives in the target directory because ``os.replace`` is atomic only within
    one file system. On any failure (including KeyboardInterrupt) the temp file is removed and
    the previous content of ``path``, if any, is left untouched. ``mkstemp`` creates it 0600;
    it gets the umask's mode before it is renamed, so the final file never has the wrong one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_TEMP_MARK}", suffix=_TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
            handle.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            else:  # Windows: only the read-only bit exists
                os.chmod(tmp, 0o666 & ~_UMASK)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files ``.NAME.rtl-XXXXXXXX.tmp`` that writers killed mid-write left under ``directory``.

    Recursive; only what this library can have created is removed: regular files whose name matches
    that exact pattern and that belong to this process's user (symlinks and directories are
    neither removed nor followed; another user's file is not ours to delete). Returns the removed
    paths, sorted. Call it only while no other process writes there (a run holds its directory's
    lock): a live writer's temp file looks the same. A missing ``directory`` has nothing to remove.
    """
    removed: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                if not _TEMP_NAME.fullmatch(name) or not _is_own_regular_file(os.lstat(path)):
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def _is_own_regular_file(info: os.stat_result) -> bool:
    """A regular file (not a link, FIFO or directory) of the effective user: what ``mkstemp`` makes."""
    own = not hasattr(os, "geteuid") or info.st_uid == os.geteuid()  # Windows has no owners to compare
    return stat.S_ISREG(info.st_mode) and own


# -- files checked by a sha256 sidecar ------------------------------------------------------
_SIDECAR = re.compile(r"([0-9a-f]{64})  (.+)\n")
_MAX_SIDECAR_BYTES = 1024


def atomic_write_with_sha256(path: str | Path, data: bytes) -> None:
    """Write ``data``, then ``<name>.sha256`` (``sha256sum``'s format), each atomically.

    For files whose format carries no checksum of its own (``.npy``, ``.npz``: the INR and speech
    tasks' kept outputs): a resume tells a flipped bit or a torn write from the real thing. The
    sidecar comes last, so a kill between the two leaves a pair that fails and is regenerated.
    """
    path = Path(path)
    atomic_write_bytes(path, data)
    atomic_write_text(_sidecar(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


def read_with_sha256(path: str | Path) -> bytes:
    """The bytes of a file written by ``atomic_write_with_sha256``; ``CheckpointError`` naming the file if it is
    missing, or it or its sidecar is truncated or corrupt."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if not sidecar.is_file():
        raise CheckpointError(f"{path} cannot be verified: its checksum {sidecar.name} is missing")
    with sidecar.open("rb") as handle:
        text = handle.read(_MAX_SIDECAR_BYTES + 1)
    match = _SIDECAR.fullmatch(text.decode("utf-8", "replace"))
    if match is None or match.group(2) != path.name:
        raise CheckpointError(f"{path} cannot be verified: its checksum {sidecar} is corrupt")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != match.group(1):
        raise CheckpointError(f"{path} is truncated or corrupt: its sha256 does not match {sidecar.name}")
    return data


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


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


_TORCH_MAGIC = b"RTLSHA256 "
_TORCH_HEADER_LEN = len(_TORCH_MAGIC) + 64 + 1
_TORCH_HEADER = re.compile(rb"RTLSHA256 ([0-9a-f]{64})\n")


class _HashingWriter:
    """Forwards writes to a file and hashes them: ``torch.save`` streams, no copy in memory."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.sha256 = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


_PACKED = "__rtl_packed__"
_TENSOR = "__rtl_tensor__"


def _pack(obj: Any, blobs: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]],
          sizes: dict[tuple[torch.dtype, torch.device], int]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = (obj.dtype, obj.device)
        flat = obj.detach().reshape(-1)
        offset = sizes.get(key, 0)
        blobs.setdefault(key, []).append(flat)
        sizes[key] = offset + flat.numel()
        return (_TENSOR, list(blobs).index(key), offset, tuple(obj.shape))
    if isinstance(obj, dict):
        return {k: _pack(v, blobs, sizes) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        packed = [_pack(v, blobs, sizes) for v in obj]
        return packed if isinstance(obj, list) else tuple(packed)
    return obj


def _unpack(obj: Any, blobs: list[torch.Tensor]) -> Any:
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == _TENSOR:
        _, index, offset, shape = obj
        if not (isinstance(index, int) and 0 <= index < len(blobs) and isinstance(offset, int) and offset >= 0
                and isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"bad tensor reference {obj!r}")
        numel = math.prod(shape)
        if offset + numel > blobs[index].numel():
            raise ValueError(f"tensor reference {obj!r} runs past its blob of {blobs[index].numel()} elements")
        return blobs[index][offset:offset + numel].reshape(shape).clone()
    if isinstance(obj, dict):
        return {k: _unpack(v, blobs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, blobs) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unpack(v, blobs) for v in obj)
    return obj


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically, behind a checksum header: resumable training states must never
    be half-written, nor silently corrupt (see the module docstring for the format).

    The tensors are saved packed, one flat tensor per dtype and device: a joint-retraining state
    holds K optimizers' state of every tensor (thousands of small tensors), and ``torch.save``
    spends most of its time per tensor, not per byte (3-5x faster on the demo's). ``torch_load``
    unpacks them, bit for bit.
    """
    blobs: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    skeleton = _pack(obj, blobs, {})
    packed = {_PACKED: 1, "skeleton": skeleton, "blobs": [torch.cat(parts) for parts in blobs.values()]}
    with _atomic_file(path, "wb") as handle:
        handle.write(b"\0" * _TORCH_HEADER_LEN)  # placeholder until the hash is known
        writer = _HashingWriter(handle)
        torch.save(packed, writer)
        handle.seek(0)
        handle.write(_TORCH_MAGIC + writer.sha256.hexdigest().encode() + b"\n")


def read_json(path: str | Path, max_bytes: int | None = None) -> Any:
    """Parse a JSON file; a file that is not valid JSON raises ``CheckpointError`` naming it.

    A missing file raises ``FileNotFoundError`` as usual: callers check existence to decide
    whether a step was done, whereas an unparsable file means it must be redone. Nesting too
    deep for the parser, integers too long, and (with ``max_bytes``) files larger than that are
    reported the same way.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise CheckpointError(f"{path} is larger than {max_bytes} bytes; it is corrupt or not this library's file")
        return json.loads(data.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers beyond the digit limit
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not valid JSON ({err}); it is truncated or corrupt") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON (nested too deeply to parse); it is corrupt") from None
    except MemoryError:
        raise CheckpointError(f"{path} is too large to parse; it is corrupt or not this library's file") from None


def torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by ``atomic_torch_save``; a truncated or corrupt file raises ``CheckpointError``.

    The checksum header is verified first, so a file with a flipped bit, a missing header
    (written by ``torch.save`` itself, or by an older version of this library) or a torn tail
    is reported rather than loaded. Uses ``weights_only=True``: the library only saves tensors,
    plain containers and numbers (model and optimizer state dicts of Adam and SGD load that
    way), and refusing arbitrary pickled objects means a checkpoint from elsewhere cannot run
    code. ``map_location`` defaults to CPU so a state written on a GPU machine loads anywhere;
    ``load_state_dict`` moves it back.
    """
    path = Path(path)
    with path.open("rb") as handle:  # FileNotFoundError propagates: "not saved yet" is not corruption
        header, body = handle.read(_TORCH_HEADER_LEN), handle.read()
    match = _TORCH_HEADER.fullmatch(header)
    if match is None:
        raise CheckpointError(
            f"{path} has no RTLSHA256 checksum header: it is corrupt, or was not written by this "
            "version's atomic_torch_save; delete it to recompute it"
        )
    if hashlib.sha256(body).hexdigest() != match.group(1).decode():
        raise CheckpointError(f"{path} is truncated or corrupt: its sha256 does not match its header")
    try:
        loaded = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
        if isinstance(loaded, dict) and loaded.get(_PACKED) == 1:  # see atomic_torch_save
            blobs = loaded["blobs"]
            if not (isinstance(blobs, list) and all(isinstance(b, torch.Tensor) and b.dim() == 1 for b in blobs)):
                raise ValueError("its packed tensors are not a list of 1-D tensors")
            loaded = _unpack(loaded["skeleton"], blobs)
        return loaded
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
def _index_sha256(index: Mapping[str, Any]) -> str:
    """sha256 of the index without its ``index_sha256`` field, as canonical JSON (sorted keys, no spaces, ASCII)."""
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def _nested_deeper_than(obj: Any, limit: int) -> bool:
    """Whether lists/objects in ``obj`` nest more than ``limit`` levels (iterative: no recursion limit)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _state_aliases(state: Mapping[str, torch.Tensor], masked: Mapping[str, Any]) -> dict[str, str]:
    """key -> the key it repeats, for every unmasked state_dict entry that is the same tensor as another
    (same storage, offset, shape, strides and dtype): a tied ``lm_head`` is its embedding, stored once."""
    def identity(t: torch.Tensor) -> tuple[Any, ...]:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    first: dict[tuple[Any, ...], str] = {}
    for key in [*masked, *state]:  # a masked tensor is the one kept when an unmasked key repeats it
        if state[key].numel():
            first.setdefault(identity(state[key]), key)
    return {key: first[identity(t)] for key, t in state.items()
            if key not in masked and t.numel() and first[identity(t)] != key}


def save_tickets(
    directory: str | Path, model: nn.Module, masks: MaskSet, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Store the K tickets of ``masks`` over ``model``'s shared weights in ``directory``.

    Only the union of the masks is stored for each masked tensor, plus K bits per position and
    the dense rest of the state_dict -- RTL's storage cost, which benchmarks compare with the file
    size. Raises ``ValueError`` when a mask names a tensor the model lacks or has the wrong shape,
    or when ``metadata`` nests deeper than ``MAX_INDEX_DEPTH`` or makes the index larger than
    ``MAX_INDEX_BYTES`` (it could not be read back), and ``TypeError`` when it is not
    JSON-serialisable -- all before anything is written. Returns the directory.
    """
    directory = Path(directory)
    state = model.state_dict()
    missing = [n for n in masks.tensor_names if n not in state]
    if missing:
        raise ValueError(f"masks name tensors the model does not have: {missing}")
    masks.validate({n: state[n] for n in masks.tensor_names})

    signature = _signature(model)
    index = {
        "format": TICKETS_FORMAT,
        "version": TICKETS_VERSION,
        "context_names": [str(c) for c in masks.context_names],
        "tensors": {n: list(s) for n, s in masks.shapes.items()},
        "state": {k: {"shape": shape, "dtype": dtype} for k, (shape, dtype) in signature.items()},
        "fingerprint": _fingerprint(signature),
        "weights_sha256": "",
        "metadata": dict(metadata or {}),
    }
    # Serialise before writing anything, so bad metadata leaves the directory as it was; hash the
    # parsed form (tuples become lists, keys strings), which is what a reader will hash.
    index = json.loads(json.dumps(index))
    if _nested_deeper_than(index, MAX_INDEX_DEPTH):
        raise ValueError(f"metadata nests deeper than {MAX_INDEX_DEPTH - 1} levels; load_tickets would refuse it")

    aliases = _state_aliases(state, masks.stacked)
    if aliases:  # version 3; a model without tied tensors writes version 2, readable by older releases
        index["version"], index["aliases"] = ALIASES_VERSION, aliases
    tensors: dict[str, torch.Tensor] = {}
    packed = masks.packed()
    for name, union in masks.union().items():
        weight = state[name].detach().cpu()
        tensors[f"masks/{name}"] = packed[name].contiguous()
        tensors[f"values/{name}"] = weight[union.cpu()].contiguous()  # boolean indexing is row-major
    for key, value in state.items():
        if key not in masks.stacked and key not in aliases:
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[f"state/{key}"] = value.detach().cpu().clone().contiguous()
    blob = safetensors.torch.save(tensors)

    index["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    index["index_sha256"] = _index_sha256(index)
    index_text = json.dumps(index, indent=2) + "\n"
    if len(index_text.encode("utf-8")) > MAX_INDEX_BYTES:
        raise ValueError(f"metadata makes {INDEX_FILE} larger than {MAX_INDEX_BYTES} bytes; load_tickets would refuse it")
    atomic_write_bytes(directory / WEIGHTS_FILE, blob)
    atomic_write_text(directory / INDEX_FILE, index_text)
    return directory


def _read_index(directory: Path) -> dict[str, Any]:
    """The checkpoint's JSON, checked for format, version, checksum, field types and consistency."""
    path = directory / INDEX_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a complete ticket checkpoint")
    index = read_json(path, max_bytes=MAX_INDEX_BYTES)
    if _nested_deeper_than(index, MAX_INDEX_DEPTH):
        raise CheckpointError(f"{path} is corrupt: its JSON nests deeper than {MAX_INDEX_DEPTH} levels")
    if not isinstance(index, dict) or index.get("format") != TICKETS_FORMAT:
        found = brief(index.get("format")) if isinstance(index, dict) else f"a JSON {_json_type(index)}"
        raise CheckpointError(f"{path} is not a ticket checkpoint index (format {found}, expected {TICKETS_FORMAT!r})")
    version = index.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # type(): True == 1.0 == 1
        raise CheckpointError(
            f"{path} has version {brief(version)}; this library reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    # Version 1 never wrote the field, so one that is there is checked too: flipping 2 to 1 is no way around it.
    if (version >= 2 or "index_sha256" in index) and index.get("index_sha256") != _index_sha256(index):
        raise CheckpointError(
            f"{path} was edited or is corrupt: its index_sha256 does not match its content "
            "(context names, shapes, metadata and the weights' hash are all covered by it)"
        )

    def corrupt(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt: {problem}")

    def field(name: str, kind: type) -> Any:
        value = index.get(name)
        if not isinstance(value, kind):
            raise corrupt(f"field {name!r} is {'missing' if name not in index else brief(value)}, expected a JSON "
                          f"{ {list: 'array', dict: 'object', str: 'string'}[kind] }")
        return value

    context_names = field("context_names", list)
    if not context_names or not all(isinstance(c, str) for c in context_names):
        raise corrupt(f"context_names must be a non-empty array of strings; got {brief(context_names)}")
    try:
        shapes = {n: list(check_shape(s, f"tensors[{n!r}]")) for n, s in field("tensors", dict).items()}
        signature: Signature = {}
        for key, entry in field("state", dict).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
                raise ValueError(f"state[{key!r}] must be an object with a shape and a dtype string; got {brief(entry)}")
            signature[key] = (list(check_shape(entry.get("shape"), f"state[{key!r}].shape")), entry["dtype"])
    except ValueError as err:
        raise corrupt(str(err)) from None
    fingerprint, weights_sha256 = field("fingerprint", str), field("weights_sha256", str)
    metadata = field("metadata", dict)
    aliases = field("aliases", dict) if version >= ALIASES_VERSION else {}
    bad_alias = [k for k, t in aliases.items() if not isinstance(t, str) or k in shapes or t not in signature
                 or k not in signature or t in aliases or signature[k] != signature[t]]
    if bad_alias:
        raise corrupt(f"aliases {bad_alias[:5]} must each name an unmasked state entry and another, "
                      "unaliased entry of the same shape and dtype")
    if _fingerprint(signature) != fingerprint:
        raise corrupt("its fingerprint does not match its recorded state_dict signature")
    bad = [n for n, s in shapes.items() if n not in signature or signature[n][0] != s]
    if bad or not shapes:
        raise corrupt(f"mask shapes disagree with the state_dict signature {bad[:5]}" if bad else "it masks no tensor")
    return {"context_names": context_names, "tensors": shapes, "state": signature, "aliases": aliases,
            "fingerprint": fingerprint,
            "weights_sha256": weights_sha256, "metadata": metadata}


def _read_weights(directory: Path, index: dict[str, Any]) -> tuple[dict[str, torch.Tensor], MaskSet]:
    """The checkpoint's tensors and masks, each checked against the index: hash, names, shapes, dtypes."""
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

    def corrupt(problem: str) -> CheckpointError:
        return CheckpointError(f"{weights_path} is corrupt or does not belong to {index_path}: {problem}")

    shapes: dict[str, list[int]] = index["tensors"]
    signature: Signature = index["state"]
    expected = {f"{p}/{n}" for n in shapes for p in ("masks", "values")}
    expected |= {f"state/{k}" for k in signature if k not in shapes and k not in index["aliases"]}
    if set(tensors) != expected:
        raise corrupt(f"entries missing {sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    try:
        masks = MaskSet.from_packed({n: tensors[f"masks/{n}"] for n in shapes}, shapes, index["context_names"])
    except ValueError as err:
        raise corrupt(f"bad packed masks ({err})") from None

    for name, union in masks.union().items():
        values, dtype = tensors[f"values/{name}"], signature[name][1]
        if values.dim() != 1 or values.numel() != int(union.sum()) or _dtype_name(values.dtype) != dtype:
            raise corrupt(f"values/{name} is a {_dtype_name(values.dtype)} tensor of shape {tuple(values.shape)}; "
                          f"the masks' union needs {int(union.sum())} {dtype} values")
    for key, (shape, dtype) in signature.items():
        if key not in shapes and key not in index["aliases"]:
            t = tensors[f"state/{key}"]
            if list(t.shape) != shape or _dtype_name(t.dtype) != dtype:
                raise corrupt(f"state/{key} is {tuple(t.shape)} {_dtype_name(t.dtype)}, the index records {tuple(shape)} {dtype}")
    return tensors, masks


def load_masks(directory: str | Path) -> tuple[MaskSet, dict[str, Any]]:
    """Only the masks and metadata of a ticket checkpoint (no model needed): what diagnostics read.

    Validates the whole checkpoint as ``load_tickets`` does; every problem raises ``CheckpointError``.
    """
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
    architecture -- raises ``CheckpointError`` naming the file, before the model is touched:
    the complete state dict is built and checked against the model's first.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"ticket checkpoint {directory} is missing (no such directory)")
    index = _read_index(directory)
    index_path = directory / INDEX_FILE

    target = model.state_dict()
    actual = _signature(model)
    if _fingerprint(actual) != index["fingerprint"]:
        diffs = "; ".join(_signature_diff(index["state"], actual))
        raise CheckpointError(f"{index_path}: checkpoint was written for a different model ({diffs})")

    tensors, masks = _read_weights(directory, index)
    weights_path = directory / WEIGHTS_FILE
    state: dict[str, torch.Tensor] = {}
    for name, union in masks.union().items():
        values = tensors[f"values/{name}"]
        weight = torch.zeros(union.shape, dtype=values.dtype)
        weight[union] = values
        state[name] = weight
    for key in index["state"]:
        if key not in masks.stacked and key not in index["aliases"]:
            state[key] = tensors[f"state/{key}"]
    for key, repeated in index["aliases"].items():
        state[key] = state[repeated]
    # The fingerprint already matched; check the tensors themselves too, because load_state_dict
    # copies every entry it can before it reports the ones it cannot.
    wrong = [k for k, t in target.items() if k not in state or state[k].shape != t.shape or state[k].dtype != t.dtype]
    if wrong or set(state) != set(target):
        raise CheckpointError(f"{weights_path} does not fit the model: {(wrong or sorted(set(state) - set(target)))[:5]}")
    model.load_state_dict(state, strict=True)
    return masks, dict(index["metadata"])


def directory_bytes(directory: str | Path) -> int:
    """Total size in bytes of the files under ``directory``: a checkpoint's real storage cost."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
