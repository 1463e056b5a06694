"""One context's subnetwork as files that run without this library: ``rtl export RUN --context NAME``.

A ticket is a dense module with zeros; what a device serving one context needs is smaller. The
export directory holds

- ``weights.safetensors``: the compact checkpoint. Each masked tensor is stored as its kept values
  (float, in row-major order) plus its mask bit-packed, 1 bit per weight, so at density d a
  tensor costs ``4 d + 1/8`` bytes per weight instead of 4; the other tensors are stored as they
  are. The metadata carries each tensor's shape and a sha256 over the metadata and every tensor's
  name, dtype, shape and bytes.
- ``load_weights.py``: the loaders, standalone (torch, NumPy and safetensors only):
  ``load_compact_state`` rebuilds the dense state dict, exact zeros included, for the user's own
  copy of the architecture; ``load_program`` loads ``model.pt2``.
- ``model.pt2``: the subnetwork as a ``torch.export`` program (graph and weights), where the model
  can be exported. Load it with ``load_program``: ``torch.export.load`` checks no checksum, and a
  flipped bit in the archive can load and compute other outputs.
- ``export.json``: what was exported, each file's size and sha256, the dense size beside it, and
  the verification: the outputs of the reloaded files against the routed model's on that context.

Every loader here and in ``load_weights.py`` reads ``export.json`` beside the file it loads
(bounded in size, checked for type), checks the file's size and sha256 against it, and for the
weights also the file's own digest; any problem raises ``CheckpointError`` naming the file.
Format 1 (whose digest covered the values, not the shapes that cut them into tensors) is not
read: export again.

Paths: an export folder's default name comes from the context's name through ``safe_filename``
(a class name read from a data set may be ``../../x``), and every file is written only after its
path is checked to resolve inside the directory the user named or the run directory.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from .channels import ChannelStructure, slice_model
from .errors import CheckpointError
from .io import atomic_write_bytes, atomic_write_json, read_json
from .kernels import prepare
from .routed import RoutedModel, as_tuple
from .timing import compare, device_sync

FORMAT = "routing-lottery-compact/2"  # 1: the digest left the metadata (its shapes map) out; not read
WEIGHTS_FILE, LOADER_FILE, PROGRAM_FILE, INDEX_FILE = "weights.safetensors", "load_weights.py", "model.pt2", "export.json"
PREPARED_FILE = "prepared.pt"
MAX_EXPORT_JSON_BYTES = 1 << 20
"""Largest ``export.json`` a loader reads: the library writes a few KB (tens of KB with ``--kernels``)."""
MAX_NAME_CHARACTERS = 64
"""Longest export folder stem taken from a context name."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def safe_filename(name: str, index: int) -> str:
    """A file name for context ``name`` (number ``index``) that stays in the folder it is joined to.

    A name of letters, digits, ``_``, ``-`` and ``.`` (not first), at most ``MAX_NAME_CHARACTERS``
    long, is its own file name, so ``three`` exports to ``three_0.7500`` as it always did. Any
    other name (``sweet/pepper``, ``../../x``, ``/etc``, ``.``, a long one) keeps its letters,
    digits, ``_`` and ``-``, every other run of characters becomes one ``_``, and ``@`` and the
    context index follow: ``@`` is never part of a name kept as it is, and the index differs
    between contexts, so two contexts never share a folder.

    >>> safe_filename("three", 3), safe_filename("../../x", 0), safe_filename("sweet/pepper", 83)
    ('three', '_x@0', 'sweet_pepper@83')
    """
    if _SAFE_NAME.fullmatch(name) and len(name) <= MAX_NAME_CHARACTERS:
        return name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:MAX_NAME_CHARACTERS].lstrip("-") or "context"
    return f"{stem}@{int(index)}"


def inside_directory(path: Path, root: Path, what: str) -> Path:
    """``path``, after checking that it resolves (links followed) under ``root``; else ``CheckpointError``.

    Names are made safe before they become paths; what can still lead elsewhere is a symbolic link
    already on disk (a run directory unpacked from someone else may bring one).
    """
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise CheckpointError(f"{path} resolves to {resolved}, outside {what} {base}; remove the symbolic link "
                              "that leads there, or name another export directory (--out)")
    return path


# -- the loaders: standalone (torch, NumPy, safetensors); load_weights.py holds their source -------------------
def compact_digest(tensors: dict, metadata: dict) -> str:
    """sha256 over ``metadata`` (all but its ``sha256``) and every tensor's name, dtype, shape and bytes.

    The metadata counts because its ``shapes`` map is what cuts the stored values into tensors: a
    digest of the tensors alone let a flipped bit there load wrong names or shapes.
    """
    digest = hashlib.sha256()
    fields = {key: value for key, value in metadata.items() if key != "sha256"}
    digest.update(json.dumps(fields, sort_keys=True).encode() + b"\n")
    for name in sorted(tensors):
        flat = tensors[name].contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        # each length too, so that no two different sets of tensors hash the same stream
        digest.update(json.dumps([name, str(flat.dtype), list(tensors[name].shape), len(data)]).encode() + b"\n")
        digest.update(data)
    return digest.hexdigest()


def _safetensors_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` map of a safetensors file's header (``safetensors.torch.load`` drops it)."""
    size = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 or size > len(blob) - 8:
        raise ValueError(f"its header claims {size} bytes")
    header = json.loads(blob[8:8 + size])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its metadata is not a map of strings")
    return metadata


def _dense_state(tensors: dict, shapes: Any) -> dict:
    """The dense state dict from the stored tensors and the ``shapes`` map; ValueError where they disagree.

    Every size is checked before anything is allocated, so a map written to fit its digest still
    cannot ask for more memory than the file pays for.
    """
    if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and len(s) <= 8 and all(type(d) is int and d >= 0 for d in s) for s in shapes.values()):
        raise ValueError("its 'shapes' entry is not a map of tensor names to shapes")
    plain = {name: t for name, t in tensors.items() if name not in ("masked::values", "masked::mask")}
    if set(shapes) & set(plain):
        raise ValueError(f"{sorted(set(shapes) & set(plain))[:3]} are stored both masked and as they are")
    if not shapes:
        if len(plain) != len(tensors):
            raise ValueError("it stores masked values but no shapes to cut them into")
        return plain
    values, packed = tensors.get("masked::values"), tensors.get("masked::mask")
    if values is None or packed is None:
        raise ValueError("its shapes name masked tensors but masked::values or masked::mask is missing")
    total = sum(math.prod(shape) for shape in shapes.values())
    if values.dim() != 1 or packed.dim() != 1 or packed.dtype != torch.uint8 or packed.numel() != (total + 7) // 8:
        raise ValueError(f"masked::mask holds {packed.numel()} bytes, {(total + 7) // 8} needed for {total} weights")
    kept = torch.from_numpy(np.unpackbits(packed.numpy(), count=total).astype(bool))
    if int(kept.sum()) != values.numel():
        raise ValueError(f"the masks keep {int(kept.sum())} weights but {values.numel()} values are stored")
    dense = torch.zeros(total, dtype=values.dtype)
    dense[kept] = values
    state, offset = {}, 0
    for name, shape in shapes.items():  # a JSON object keeps its order: the order of the concatenation
        numel = math.prod(shape)
        state[name] = dense[offset:offset + numel].reshape(shape).clone()
        offset += numel
    state.update(plain)
    return state


def _export_files(directory: Path) -> dict:
    """The entries of ``directory``'s export.json by file name, each checked for type."""
    path = directory / INDEX_FILE
    try:
        if not path.is_file():  # a FIFO would block the read
            raise FileNotFoundError(2, "missing or not a regular file")
        index = read_json(path, max_bytes=MAX_EXPORT_JSON_BYTES)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}): it holds the checksums that verify "
                              "the export; copy the whole export folder, or export again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else f"a JSON {type(index).__name__}"
        raise CheckpointError(f"{path} is not a routing-lottery export index of this version (format "
                              f"{str(found)[:60]!r}, expected {FORMAT!r}); export again with this version")
    files, entries = index.get("files"), {}
    for entry in files if isinstance(files, list) else [None]:
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and type(entry.get("bytes")) is int
                and entry["bytes"] >= 0 and isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
            raise CheckpointError(f"{path} is corrupt: 'files' must list each file's name, bytes and sha256; "
                                  f"got {repr(entry)[:80]}; export again")
        if entry["file"] in entries:
            raise CheckpointError(f"{path} is corrupt: it lists {entry['file'][:60]!r} twice; export again")
        entries[entry["file"]] = entry
    return entries


def _verified_bytes(path: Path, entries: dict) -> bytes:
    """``path``'s bytes, after checking their size and sha256 against its export.json entry."""
    entry = entries.get(path.name)
    if entry is None:
        raise CheckpointError(f"{path.parent / INDEX_FILE} does not list {path.name}: the export is incomplete "
                              "or export.json is corrupt; export again")
    try:
        if not path.is_file():  # a FIFO would block the read
            raise FileNotFoundError(2, "missing or not a regular file")
        with open(path, "rb") as handle:
            # read(n) reserves n bytes: never more than the file holds, whatever export.json says
            data = handle.read(min(entry["bytes"], path.stat().st_size) + 1)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}); export again") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} is truncated, corrupt or was edited: its size or sha256 differs from "
                              f"what {INDEX_FILE} records; export again")
    return data


def _compact_state(path: Path, entries: dict) -> dict:
    """``load_compact_state`` against the given export.json entries."""
    blob = _verified_bytes(path, entries)
    try:
        tensors, metadata = safetensors.torch.load(blob), _safetensors_metadata(blob)
    except Exception as err:  # noqa: BLE001 -- safetensors has its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a routing-lottery compact export of this version (format "
                              f"{str(metadata.get('format'))[:60]!r}, expected {FORMAT!r}); export again")
    if set(metadata) != {"format", "shapes", "sha256"} or compact_digest(tensors, metadata) != metadata["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch; the file is corrupt or was edited; export again")
    try:
        return _dense_state(tensors, json.loads(metadata["shapes"]))
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is corrupt: {str(err)[:200]}; export again") from None


def _program(path: Path, entries: dict) -> Any:
    """``load_program`` against the given export.json entries."""
    blob = _verified_bytes(path, entries)
    try:
        return torch.export.load(io.BytesIO(blob))
    except Exception as err:  # noqa: BLE001 -- torch raises many types for a bad archive
        raise CheckpointError(f"{path} is not a loadable torch.export program ({type(err).__name__}: "
                              f"{str(err)[:200]}); export again") from None


def load_compact_state(path: str | Path) -> dict:
    """The dense state dict in a ``weights.safetensors`` written by routing-lottery's export.

    Standalone on purpose (torch, NumPy and safetensors only): ``rtl export`` writes this
    function's source and its helpers' as ``load_weights.py`` beside the weights. Masked tensors
    come back dense, pruned positions exactly zero. The file is checked against ``export.json``
    beside it (size and sha256) and against its own digest, which covers its metadata and every
    tensor's name, dtype and shape as well as the values. Every problem -- a missing, truncated,
    corrupt or edited file, export.json included -- raises ``CheckpointError`` naming the file.
    """
    path = Path(path)
    return _compact_state(path, _export_files(path.parent))


def load_program(path: str | Path) -> Any:
    """The ``torch.export`` program in an export's ``model.pt2``, checked against ``export.json`` first.

    ``torch.export.load`` alone checks nothing, so a flipped bit can load and compute other
    outputs. Every problem raises ``CheckpointError`` naming the file; ``.module()`` runs the result.
    """
    path = Path(path)
    return _program(path, _export_files(path.parent))


_STANDALONE = (read_json, compact_digest, _safetensors_metadata, _dense_state, _export_files, _verified_bytes,
               _compact_state, _program, load_compact_state, load_program)
"""What ``load_weights.py`` holds, in order: the two loaders and everything they call (one copy of each)."""

_LOADER_HEADER = '''"""Load a routing-lottery compact export (needs torch, numpy and safetensors; not routing-lottery).

Usage:
    state = load_compact_state("weights.safetensors"); model.load_state_dict(state)
    program = load_program("model.pt2"); outputs = program.module()(inputs)

Each file is checked against {index} beside it (size and sha256), the weights against their own
digest too; any problem raises CheckpointError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

FORMAT = {format!r}
INDEX_FILE = {index!r}
MAX_EXPORT_JSON_BYTES = {max_bytes}


class CheckpointError(ValueError):
    """A file of the export is missing, truncated, corrupt or was edited."""
'''


def loader_source() -> str:
    """The text of ``load_weights.py``: the library's own loaders, so that both verify alike."""
    header = _LOADER_HEADER.format(index=INDEX_FILE, format=FORMAT, max_bytes=MAX_EXPORT_JSON_BYTES)
    return header + "".join("\n\n" + inspect.getsource(function) for function in _STANDALONE)


# -- writing ---------------------------------------------------------------------------------------------------
def compact_state(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``weights.safetensors`` for ``model``'s state with ``mask`` applied.

    The masked tensors travel as two: ``masked::values`` (every kept value, tensor after tensor in
    ``masked`` order, row-major) and ``masked::mask`` (their masks, concatenated and bit-packed); a
    file of one small network would otherwise be mostly per-tensor headers.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    order = [name for name in state if name in mask]
    if len({state[n].dtype for n in order}) > 1:
        raise ValueError(f"masked tensors of several dtypes {sorted({str(state[n].dtype) for n in order})}; "
                         "export them in one dtype")
    bits = [mask[n].detach().cpu().bool().reshape(-1) for n in order]
    tensors = {name: value for name, value in state.items() if name not in mask}
    if order:
        tensors["masked::values"] = torch.cat([state[n].reshape(-1)[b] for n, b in zip(order, bits)])
        tensors["masked::mask"] = torch.from_numpy(np.packbits(torch.cat(bits).numpy()))
    shapes = {n: list(state[n].shape) for n in order}  # a JSON object keeps its order: the order of the concatenation
    metadata = {"format": FORMAT, "shapes": json.dumps(shapes)}
    return tensors, {**metadata, "sha256": compact_digest(tensors, metadata)}


def _file_entry(name: str, data: bytes) -> dict[str, Any]:
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _program_bytes(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[bytes | None, str]:
    """``module`` as ``torch.export`` archive bytes with a dynamic batch dimension, or None and why not."""
    try:
        # any batch size (torch specializes sizes 0 and 1, so the example needs two or more rows)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module.cpu(), example_inputs, dynamic_shapes=tuple({0: batch} for _ in example_inputs))
        buffer = io.BytesIO()  # bytes in memory, then one atomic write: no temp path of our own to be linked elsewhere
        torch.export.save(program, buffer)
        return buffer.getvalue(), ""
    except Exception as err:  # noqa: BLE001 -- torch.export refuses many dynamic models; the weights still export
        return None, f"torch.export failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def export_context(routed: RoutedModel, context: int | str, out: str | Path, example: Any,
                   verify: Any | None = None, metadata: Mapping[str, Any] | None = None,
                   kernels: bool = False, channels: ChannelStructure | None = None) -> dict[str, Any]:
    """Write context ``context``'s subnetwork to ``out`` (see the module docstring); return ``export.json``.

    Parameters
    ----------
    routed : the routed model (its masks and trained shared weights).
    context : the context's index or name.
    out : the export directory (created; files replaced atomically; each file's path must resolve
        inside it, else ``CheckpointError`` before anything is written).
    example : inputs of the right shape for ``torch.export`` (a tensor or a tuple of tensors).
    verify : inputs of that context to compare outputs on (default: ``example``).
    metadata : extra fields for ``export.json`` (the run, the level).
    kernels : also choose dense, CSR or BSR per layer by measuring on ``verify`` (``kernels.prepare``),
        save the prepared module as ``prepared.pt`` (``torch.load(..., weights_only=False)``; it needs
        ``routing_lottery.kernels`` to unpickle) and record each layer's choice and the whole
        module's measured speed against the dense one.
    channels : for channel tickets, their ``ChannelStructure``: the subnetwork is sliced into a
        smaller dense network (``channels.slice_model``), whose state dict is ``weights.safetensors``
        (no masks left to store) and whose architecture travels in ``model.pt2``.
    """
    k = routed.masks.check_context(context)
    name = routed.masks.context_names[k]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for file in (WEIGHTS_FILE, LOADER_FILE, PROGRAM_FILE, PREPARED_FILE, INDEX_FILE):
        inside_directory(out / file, out, "the export directory")
    module = routed.standalone(k).eval()
    mask = {n: m.bool() for n, m in routed.mask(k).items()}
    # the same state written densely in the same format: what the compact file is measured against
    dense_bytes = len(safetensors.torch.save({n: v.detach().cpu().contiguous() for n, v in module.state_dict().items()}))
    dense_parameters = sum(p.numel() for p in module.parameters())
    sliced = None
    if channels is not None:
        sliced = slice_model(module, channels, _channels_of(channels, mask), example)
        module, mask = sliced, {}
    tensors, meta = compact_state(module, mask)
    blobs = {WEIGHTS_FILE: safetensors.torch.save(tensors, metadata=meta), LOADER_FILE: loader_source().encode()}
    program, program_note = _program_bytes(module, tuple(t.detach().cpu() for t in as_tuple(example)))
    if program is not None:
        blobs[PROGRAM_FILE] = program
    for file, data in blobs.items():
        atomic_write_bytes(out / file, data)
    if program is None:
        (out / PROGRAM_FILE).unlink(missing_ok=True)
    files = {file: _file_entry(file, data) for file, data in blobs.items()}
    check = tuple(t.detach().cpu() for t in as_tuple(verify if verify is not None else example))
    verification = verify_export(out, routed, k, check, into=sliced, files=files)
    masked = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    index = {"format": FORMAT, "context": name, "context_index": k, **dict(metadata or {}),
             "granularity": "weight" if channels is None else "channel",
             "masked_weights": masked, "kept_weights": kept, "density": kept / max(masked, 1),
             "parameters": sum(p.numel() for p in module.parameters()), "dense_parameters": dense_parameters,
             "dense_file_bytes": dense_bytes, "files": list(files.values()),
             "program": program_note or "model.pt2 (load_program in load_weights.py)", "verification": verification}
    index["compact_ratio"] = files[WEIGHTS_FILE]["bytes"] / dense_bytes
    if sliced is not None:
        index["sliced_shapes"] = {n: list(p.shape) for n, p in sliced.named_parameters()}
        index["loader"] = ("the weights are the sliced network's state dict; its architecture is in model.pt2 "
                           "(sliced_shapes lists each tensor's new shape)")
    if kernels:
        index["kernels"], prepared = _prepare_kernels(module.cpu(), check)
        atomic_write_bytes(out / PREPARED_FILE, prepared)
        index["files"].append(_file_entry(PREPARED_FILE, prepared))
    atomic_write_json(out / INDEX_FILE, index)
    if not verification["equal"]:
        raise CheckpointError(f"{out}: the exported subnetwork's outputs differ from the routed model's "
                              f"(max |diff| {verification['max_abs_diff']:.3g}); the export is kept for inspection")
    return index


def _prepare_kernels(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[str, Any], bytes]:
    """Per-layer kernels for ``module`` measured on ``inputs``: the choices and timings, and the
    prepared module's ``torch.save`` bytes (checked to compute what the dense one does)."""
    prepared, choices = prepare(module, inputs)
    with torch.no_grad():
        if not torch.allclose(prepared(*inputs), module(*inputs), atol=1e-4, rtol=1e-4):
            raise CheckpointError("the kernel-prepared subnetwork's outputs differ from the dense one's")
        # the speed-up recorded for users, measured as the kernels were chosen (interleaved rounds)
        verdict = compare(lambda: module(*inputs), lambda: prepared(*inputs), margin=1.0, repeats=7,
                          sync=device_sync(inputs[0].device))
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    return ({"batch": int(inputs[0].shape[0]), "threads": torch.get_num_threads(),
             "dense_seconds": verdict.baseline_seconds, "prepared_seconds": verdict.candidate_seconds,
             "speedup": verdict.median_ratio, "layers": [c.to_dict() for c in choices]},
            buffer.getvalue())


def verify_export(out: Path, routed: RoutedModel, k: int, inputs: tuple[torch.Tensor, ...],
                  atol: float = 1e-5, rtol: float = 1e-4, into: nn.Module | None = None,
                  files: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Reload the exported files through the loaders users get and compare their outputs with ``routed(inputs, k)``.

    ``into``: the network the weights file is loaded into (default: the routed model's own
    architecture; for channel tickets, the sliced network). ``files``: the ``export.json`` entries
    to check the files against (default: read ``out/export.json``); ``export_context`` passes the
    ones it is about to write, computed from the bytes it wrote.
    """
    out = Path(out)
    entries = dict(files) if files is not None else _export_files(out)
    with torch.no_grad():
        device = next(routed.model.parameters()).device
        expected = routed(tuple(t.to(device) for t in inputs) if len(inputs) > 1 else inputs[0].to(device), k).cpu()
        module = (copy.deepcopy(into) if into is not None else routed.standalone(k)).cpu().eval()
        module.load_state_dict(_compact_state(out / WEIGHTS_FILE, entries))
        from_weights = module(*inputs)
        diffs = {"weights": float((from_weights - expected).abs().max())}
        ok = torch.allclose(from_weights, expected, atol=atol, rtol=rtol)
        if PROGRAM_FILE in entries:
            start = time.perf_counter()
            program = _program(out / PROGRAM_FILE, entries).module()
            from_program = program(*inputs)
            diffs["program"] = float((from_program - expected).abs().max())
            diffs["program_load_seconds"] = time.perf_counter() - start
            ok = ok and torch.allclose(from_program, expected, atol=atol, rtol=rtol)
    return {"rows": int(inputs[0].shape[0]), "equal": bool(ok), "atol": atol, "rtol": rtol,
            "max_abs_diff": max(v for key, v in diffs.items() if not key.endswith("seconds")), **diffs}


def _channels_of(structure: ChannelStructure, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The channels ``mask`` keeps, after checking it is a channel ticket of ``structure`` (no stray weight)."""
    if set(mask) != set(structure.names):
        extra, missing = sorted(set(mask) - set(structure.names)), sorted(set(structure.names) - set(mask))
        raise ValueError(f"these masks are not channel tickets of this model's traced groups: they also cover "
                         f"{extra[:3]} and lack {missing[:3]} (made by another version of the trace?)")
    keep = structure.channels(mask)
    rebuilt = structure.expand(keep)
    if any(not torch.equal(rebuilt[n], mask[n].cpu()) for n in mask):
        raise ValueError("these masks are not whole channels of this model's groups (weight tickets?): "
                         "export them without channels=")
    return keep


__all__ = ["export_context", "inside_directory", "load_compact_state", "load_program", "safe_filename", "verify_export"]
