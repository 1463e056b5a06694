"""The IDX format of MNIST and Fashion-MNIST, read with NumPy alone, plain or gzip-compressed.

An IDX file is a 4-byte magic number -- two zero bytes, a type code (0x08 unsigned byte, 0x09
signed byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64) and the number of dimensions --
then one big-endian uint32 per dimension, then the values in C order, big-endian. The files are
untrusted input: the header is checked before anything is allocated (a dimension of 2**32 - 1 in
eight bytes must not ask for gigabytes), data is read in chunks so a short file costs only what it
holds, and every failure -- wrong magic, unknown type, truncated, trailing bytes, a damaged gzip
stream -- is one ``DataError`` line that names the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
"""Type code -> the values' dtype as stored (big-endian)."""

MAX_ELEMENTS = 2**31
"""Most values a header may promise: Fashion-MNIST's largest file holds 47 million; a header asking for
more than two billion is corrupt or built to exhaust memory, and is refused before any allocation."""

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24  # 16 MiB per read: memory grows with the bytes a file really holds, not with its header


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX header declares: the values' stored dtype, the shape, and the header's own length."""

    dtype: np.dtype
    shape: tuple[int, ...]
    header_bytes: int

    @property
    def data_bytes(self) -> int:
        """Bytes of values the header promises after itself."""
        return math.prod(self.shape) * self.dtype.itemsize


@contextmanager
def _opened(path: Path) -> Iterator[BinaryIO]:
    """``path`` for reading, decompressed when it is gzip (told by its first bytes, not its name)."""
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if not compressed:
                yield raw
                return
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream  # type: ignore[misc] -- GzipFile is a binary stream
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except EOFError as error:  # the gzip stream stops before its end marker: a cut-off download
        raise DataError(f"{path}: is truncated: the gzip stream ends early ({error})") from error
    except (OSError, zlib.error) as error:  # BadGzipFile is an OSError; so is a read failure
        raise DataError(f"{path}: cannot be read: {type(error).__name__}: {error}") from error


def _read_up_to(stream: BinaryIO, count: int) -> bytearray:
    """At most ``count`` bytes of ``stream`` (fewer only at its end), gathered in chunks."""
    buffer = bytearray()
    while len(buffer) < count:
        chunk = stream.read(min(_CHUNK, count - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer


def _parse_header(stream: BinaryIO, path: Path, max_elements: int) -> IdxHeader:
    magic = _read_up_to(stream, 4)
    if len(magic) < 4:
        raise DataError(f"{path}: is truncated: {len(magic)} bytes, shorter than the 4-byte IDX magic number")
    if magic[0] or magic[1]:
        raise DataError(f"{path}: is not an IDX file: wrong magic number 0x{magic.hex()} "
                        "(an IDX file begins with two zero bytes, a type code and the number of dimensions)")
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unsupported IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: its IDX header declares 0 dimensions; an IDX array has at least one")
    raw_dims = _read_up_to(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: is truncated: the header declares {ndim} dimensions ({4 * ndim} bytes) "
                        f"but only {len(raw_dims)} bytes follow the magic number")
    shape = struct.unpack(f">{ndim}I", raw_dims)
    if math.prod(shape) > max_elements:
        raise DataError(f"{path}: its IDX header declares shape {shape}, {math.prod(shape):,} values, more than "
                        f"the {max_elements:,} accepted: the file is corrupt")
    return IdxHeader(IDX_DTYPES[code], shape, 4 + 4 * ndim)


def read_idx_header(path: str | Path, max_elements: int = MAX_ELEMENTS) -> IdxHeader:
    """The header of the IDX file at ``path`` (plain or gzip), checked but without reading the values."""
    path = Path(path)
    with _opened(path) as stream:
        return _parse_header(stream, path, max_elements)


def read_idx(path: str | Path, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """The array stored in the IDX file at ``path``, plain or gzip-compressed, in native byte order.

    Raises ``DataError`` (one line: the file and the problem) when the file is missing, not IDX, of an
    unknown type, promises more than ``max_elements`` values, holds fewer bytes than its header
    promises, or holds more.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny-idx2-ubyte"
    >>> _ = path.write_bytes(bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    >>> read_idx(path).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    path = Path(path)
    with _opened(path) as stream:
        header = _parse_header(stream, path, max_elements)
        data = _read_up_to(stream, header.data_bytes)
        if len(data) < header.data_bytes:
            raise DataError(f"{path}: is truncated: its header promises shape {header.shape} "
                            f"({header.data_bytes:,} bytes of values) but only {len(data):,} bytes follow")
        extra = len(_read_up_to(stream, _CHUNK))
        if extra:
            more = f"{extra:,}" if extra < _CHUNK else f"at least {extra:,}"
            raise DataError(f"{path}: holds {more} bytes after the {header.data_bytes:,} its header promises "
                            f"for shape {header.shape}: the file is corrupt or not the one named")
    values = np.frombuffer(data, header.dtype).reshape(header.shape)
    return values if header.dtype.itemsize == 1 else values.astype(header.dtype.newbyteorder("="))
