"""A content fingerprint of tensors and data: part of a run's identity (core: tickets and the run directory both use it).

Two runs in one directory must see the same data; the config alone cannot tell (a user's loader
may return another split for the same settings), so each task hashes what it actually serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def fingerprint(*parts: Any) -> str:
    """sha256 over tensors, arrays, strings, numbers and (nested) sequences or mappings of them.

    Tensors count with their dtype and shape, so ``zeros(2, 3)`` and ``zeros(3, 2)`` differ.
    """
    digest = hashlib.sha256()
    for part in parts:
        _update(digest, part)
    return digest.hexdigest()


def _update(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().contiguous()
        digest.update(f"tensor{obj.dtype}{tuple(obj.shape)}".encode())
        digest.update(obj.reshape(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b"")
    elif isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        digest.update(f"array{obj.dtype}{obj.shape}".encode())
        digest.update(obj.tobytes())
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in sorted(obj, key=str):
            _update(digest, str(key))
            _update(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for item in obj:
            _update(digest, item)
        digest.update(b"]")
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__}; give tensors, arrays, numbers or strings")
