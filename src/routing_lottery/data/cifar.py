"""CIFAR-10 and CIFAR-100 from the official python-pickle files in a directory the user names.

The pickles are untrusted input. Before anything is unpickled the bytes are parsed with
``pickletools.genops`` (which reads opcodes without executing them) and refused if they could make
the unpickler allocate more than the file itself: an opcode the official files never use, a memo
index beyond the opcodes seen so far, a frame longer than the rest of the file, more opcodes than
the images a file of that size could hold need (each opcode builds at most one object, and a
one-byte ``}`` is a 64-byte dict), or a file far larger than the official one. Only then is it
unpickled, by an unpickler that hands out checked stand-ins for the few NumPy names the files use (numeric dtypes only, arrays built with
``np.frombuffer`` from exactly the bytes their shape needs), so a tampered file can neither run
code, nor build objects the file does not pay for, nor feed NumPy's own ``__setstate__``. Every
failure, whatever its type, becomes one ``DataError`` that names the file, the problem and the remedy.
"""

from __future__ import annotations

import math
import os
import pickle
import pickletools
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import DataError
from .labelled import Splits, name_problem
from .images import DatasetNotFoundError, ImageDataset, normalize_splits

SOURCE_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FOLDER, CIFAR100_FOLDER = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PIXELS = 3 * 32 * 32

_MiB = 1 << 20
# About twice the official files (31 MB per 10,000 images, 158 bytes and 1.5 kB of names), so a
# re-pickled copy passes and a file that could only be an allocation bomb does not.
_META_BYTES, _BATCH_BYTES, _CIFAR100_TRAIN_BYTES = 64 * 1024, 64 * _MiB, 320 * _MiB

# What the official files (Python 2, protocol 2) use, plus the Python 3 spellings of the same
# values (protocols 3-4: bytes, frames, implicit memo), so that a re-pickled copy still loads.
_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2",
    "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
})
# The official files spend 3 opcodes per image (a label, a file name and its memo slot; CIFAR-100's
# train file 4) and a few hundred on the rest; 8 per image the file's size allows is twice that.
_OPCODES_PER_IMAGE, _OPCODES_BESIDES = 8, 1024
_NUMERIC_DTYPES = frozenset({"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8"})


def _remedy() -> str:
    return f"download the dataset again from {SOURCE_URL} and extract it in place"


def _bad(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; {_remedy()}")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Whatever goes wrong while reading ``path`` (MemoryError, OverflowError, ...) as a DataError."""
    try:
        yield
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file may fail in any way; all mean the same
        detail = str(error)
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise _bad(path, f"is not a readable CIFAR pickle ({type(error).__name__}: {detail})") from error


class _NdarrayStandIn:
    """Named by the pickle where ``numpy.ndarray`` is, but not callable: only ``_reconstruct`` takes it."""

    def __repr__(self) -> str:
        return "numpy.ndarray (as a pickle argument)"


_NDARRAY = _NdarrayStandIn()


def _int(value: Any) -> bool:
    return type(value) is int  # not bool, not a NumPy scalar


class _PickledDtype:
    """Stands for ``numpy.dtype(name)`` while unpickling.

    The pickle's BUILD state is checked here and never reaches ``dtype.__setstate__``: NumPy 2.4
    crashes the interpreter (SIGSEGV) on a state tuple with fields missing.
    """

    def __init__(self, name: str) -> None:
        self.dtype = np.dtype(name)

    def __setstate__(self, state: Any) -> None:
        # (version 3, byte order, subarray, names, fields, elsize, alignment, flags) of a plain number
        if not (isinstance(state, tuple) and len(state) == 8 and _int(state[0]) and state[0] == 3
                and all(x is None for x in state[2:5]) and all(_int(x) for x in state[5:])
                and state[5:] == (-1, -1, 0)):
            raise pickle.UnpicklingError(f"unexpected dtype state {state!r:.120}")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"unexpected byte order {state[1]!r:.20}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> _PickledDtype:
    name = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
    if not isinstance(name, str) or name not in _NUMERIC_DTYPES:
        raise pickle.UnpicklingError(f"dtype {spec!r:.40} is not a numeric type the CIFAR files use "
                                     "(object arrays, strings and records are refused)")
    return _PickledDtype(name)


class _PickledArray:
    """Stands for the empty array NumPy pickles; its BUILD state (shape, dtype, bytes) is checked
    here and the array made with ``np.frombuffer``, so NumPy never parses untrusted state."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and _int(state[0]) and state[0] == 1):
            raise pickle.UnpicklingError(f"unexpected array state {state!r:.120}")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and len(shape) <= 4 and all(_int(n) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"unexpected array shape {shape!r:.80}")
        if not isinstance(dtype, _PickledDtype) or not isinstance(fortran, bool) or not isinstance(data, bytes):
            raise pickle.UnpicklingError("malformed array state")
        count = math.prod(shape)
        if count * dtype.dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f"an array of shape {shape} holds {len(data)} bytes, "
                                         f"not {count * dtype.dtype.itemsize}")
        self.array = np.frombuffer(data, dtype.dtype, count).reshape(shape, order="F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PickledArray:
    # NumPy pickles every array as an empty int8 array whose state (BUILD) brings shape and bytes;
    # anything else here could ask for an arbitrarily large allocation from a few bytes.
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError(f"unexpected array constructor arguments {shape!r:.40}, {typecode!r:.40}")
    return _PickledArray()


def _scalar(dtype: Any, data: Any) -> Any:
    if not isinstance(dtype, _PickledDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("malformed NumPy scalar")
    return np.frombuffer(data, dtype.dtype)[0]


_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar, ("numpy._core.multiarray", "scalar"): _scalar,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return _GLOBALS[module, name]


def _opcode_budget(max_bytes: int) -> int:
    """The most opcodes a CIFAR pickle of at most ``max_bytes`` may hold.

    A file that size holds at most ``max_bytes // PIXELS`` images, and each image costs the official
    files 3 or 4 opcodes (see ``_OPCODES_PER_IMAGE``). The budget is what bounds the unpickler's
    memory: each opcode pushes at most one object, so a file of one-byte ``}`` (EMPTY_DICT)
    opcodes, 64 bytes of dict each, is refused after a bounded count instead of growing 80-fold.
    """
    return _OPCODES_PER_IMAGE * (max_bytes // PIXELS) + _OPCODES_BESIDES


def _check_opcodes(raw: bytes, path: Path, max_opcodes: int) -> None:
    """Refuse, before unpickling, what could make the unpickler allocate more than the file holds.

    ``genops`` only parses; it already refuses unknown opcodes and strings longer than the bytes
    left. The memo is the trap it does not catch: the unpickler grows its memo table to the
    largest index a PUT names, so four bytes can ask for gigabytes. The other is count: every
    opcode builds an object or a stack slot, so more than ``max_opcodes`` is refused as soon as
    the scan passes that many (which also bounds the scan's own time).
    """
    for seen, (opcode, arg, position) in enumerate(pickletools.genops(raw)):
        if seen >= max_opcodes:
            raise _bad(path, f"holds more than {max_opcodes:,} pickle opcodes (reached at byte {position}), more than "
                             "a CIFAR file needs (3 or 4 per image): it is corrupt or built to exhaust memory")
        if opcode.name not in _OPCODES:
            raise _bad(path, f"holds pickle opcode {opcode.name} at byte {position}, which CIFAR files never use")
        if opcode.name in ("BINPUT", "LONG_BINPUT") and arg > seen:
            raise _bad(path, f"names memo slot {arg} at byte {position} after only {seen} opcodes (corrupt)")
        if opcode.name == "FRAME" and arg > len(raw) - position - 9:  # 9: the opcode and its length
            raise _bad(path, f"declares a {arg}-byte frame at byte {position} in a {len(raw)}-byte file (truncated)")


def _read_pickle(path: Path, max_bytes: int) -> dict[str, Any]:
    with _reading(path):
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            # read(n) reserves n bytes up front: ask for what the file holds, not for the cap
            raw = f.read(size + 1) if size <= max_bytes else b""
        if max(size, len(raw)) > max_bytes:
            raise _bad(path, f"is {max(size, len(raw)):,} bytes, far more than the official file "
                             f"(at most {max_bytes:,} accepted)")
        _check_opcodes(raw, path, _opcode_budget(max_bytes))
        loaded = _NumpyOnlyUnpickler(BytesIO(raw), encoding="bytes").load()
        if not isinstance(loaded, dict):
            raise _bad(path, f"holds a {type(loaded).__name__}, not the dictionary a CIFAR file holds")
        return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in loaded.items()}


def _find_folder(root: str | Path, folder: str, required: tuple[str, ...], archive: str) -> Path:
    """``root`` itself or ``root/folder``, whichever holds every required file."""
    root = Path(root).expanduser()
    for candidate in (root, root / folder):
        if all((candidate / name).is_file() for name in required):
            return candidate
    missing = [n for n in required if not (root / folder / n).is_file() and not (root / n).is_file()]
    raise DatasetNotFoundError(
        f"{root} does not hold the official {folder} files (missing: {', '.join(missing)}). "
        f"Download {archive} from {SOURCE_URL} and extract it there, so that {root / folder} exists."
    )


def _entry(entry: dict[str, Any], key: str, path: Path) -> Any:
    if key not in entry:
        raise _bad(path, f"has no {key!r} entry (keys: {', '.join(map(str, list(entry)[:8])) or 'none'})")
    return entry[key]


def _array(value: Any, key: str, kinds: str, path: Path) -> np.ndarray:
    if isinstance(value, _PickledArray):
        if value.array is None:
            raise _bad(path, f"{key!r} is an array the file never fills in")
        value = value.array
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - ragged or exotic nesting
        raise _bad(path, f"{key!r} is not an array ({type(error).__name__}: {error})") from error
    if array.dtype.kind not in kinds:
        what = {"O": "objects", "U": "text", "S": "text", "b": "booleans"}.get(array.dtype.kind, str(array.dtype))
        expected = "integers" if kinds == "iu" else "numbers"
        raise _bad(path, f"{key!r} holds {what}, not {expected}")
    return array


def _images(entry: dict[str, Any], path: Path) -> torch.Tensor:
    data = _array(_entry(entry, "data", path), "data", "iuf", path)
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] != PIXELS:
        raise _bad(path, f"'data' must be (N, {PIXELS}) pixels with N >= 1; got shape {data.shape}")
    if data.dtype != np.uint8:
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):  # NaN fails too
            raise _bad(path, "'data' holds non-integer pixel values")
        low, high = data.min(), data.max()
        if low < 0 or high > 255:
            raise _bad(path, f"'data' holds pixel values in {low}..{high}, outside 0..255")
        data = data.astype(np.uint8)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def _labels(entry: dict[str, Any], key: str, count: int, classes: int, path: Path) -> torch.Tensor:
    labels = _array(_entry(entry, key, path), key, "iu", path)
    if labels.shape != (count,):
        raise _bad(path, f"{count} images but {key!r} has shape {labels.shape}")
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if outside.size:
        first = int(outside[0])
        raise _bad(path, f"label {labels[first]} at position {first} of {key!r} is outside 0..{classes - 1} "
                         f"({classes} classes)")
    return torch.from_numpy(labels.astype(np.int64))


def _names(meta: dict[str, Any], key: str, count: int, path: Path) -> tuple[str, ...]:
    names = _entry(meta, key, path)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        got = f"{len(names)} entries" if isinstance(names, (list, tuple)) else f"a {type(names).__name__}"
        raise _bad(path, f"{key!r} must list the {count} class names; got {got}")
    decoded = []
    for i, name in enumerate(names):
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(path, f"class name {i} of {key!r} is not UTF-8 text: {name!r}") from None
        problem = name_problem(name)
        if problem is not None:  # a name reaches tables, figures and export folder names
            shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
            raise _bad(path, f"class name {i} of {key!r} ({shown}) {problem}")
        decoded.append(name)
    if len(set(decoded)) != count:
        raise _bad(path, f"{key!r} repeats a class name")
    return tuple(decoded)


def _batch(path: Path, label_key: str, classes: int, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _read_pickle(path, max_bytes)
    with _reading(path):
        images = _images(entry, path)
        return images, _labels(entry, label_key, len(images), classes, path)


def _read_names(path: Path, key: str, count: int) -> tuple[str, ...]:
    meta = _read_pickle(path, _META_BYTES)
    with _reading(path):
        return _names(meta, key, count, path)


def load_cifar10(root: str | Path) -> Splits:
    """The 50,000/10,000 CIFAR-10 split, channels standardized with training statistics.

    Raises ``DatasetNotFoundError`` when files are missing and ``DataError`` (naming the file) when
    one is corrupt, truncated or not a CIFAR-10 file.
    """
    folder = _find_folder(root, CIFAR10_FOLDER, (*CIFAR10_TRAIN, "test_batch", "batches.meta"), "cifar-10-python.tar.gz")
    names = _read_names(folder / "batches.meta", "label_names", 10)

    def split(files: tuple[str, ...]) -> ImageDataset:
        batches = [_batch(folder / name, "labels", len(names), _BATCH_BYTES) for name in files]
        return ImageDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), names)

    return normalize_splits(Splits(split(CIFAR10_TRAIN), split(("test_batch",))))


def load_cifar100(root: str | Path, label: Literal["fine", "coarse"] = "fine") -> Splits:
    """CIFAR-100 with its 100 fine labels or its 20 official superclasses (``label="coarse"``).

    Raises as ``load_cifar10`` does.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse'; got {label!r}")
    folder = _find_folder(root, CIFAR100_FOLDER, ("train", "test", "meta"), "cifar-100-python.tar.gz")
    names = _read_names(folder / "meta", f"{label}_label_names", 100 if label == "fine" else 20)

    def split(name: str) -> ImageDataset:
        limit = _CIFAR100_TRAIN_BYTES if name == "train" else _BATCH_BYTES
        images, labels = _batch(folder / name, f"{label}_labels", len(names), limit)
        return ImageDataset(images, labels, names)

    return normalize_splits(Splits(split("train"), split("test")))
