"""Binary masks over named tensors: one ``Mask`` per ticket, a ``MaskSet`` of K tickets.

A ticket is a dict ``{tensor name: bool tensor}``. RTL keeps K of them over one shared weight
tensor, so the questions we ask are about sets of masks: how many weights each keeps, how many
the union keeps (what RTL must store), and how much two masks overlap (Jaccard, the paper's
diagnostic). Masks are stored as ``torch.bool``; on disk they are bit-packed (see ``pack``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Mask = dict[str, torch.Tensor]
"""One ticket: tensor name -> bool tensor of that tensor's shape (True = weight kept)."""


def ones_like(params: Mapping[str, torch.Tensor]) -> Mask:
    """The all-ones mask (nothing pruned) over ``params``."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}


def validate_mask(mask: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``mask`` covers exactly ``params`` with bool tensors of their shapes."""
    missing = sorted(set(params) - set(mask))
    extra = sorted(set(mask) - set(params))
    if missing or extra:
        raise ValueError(f"mask does not match the prunable tensors: missing {missing}, unexpected {extra}")
    for name, m in mask.items():
        if m.dtype != torch.bool:
            raise ValueError(f"mask for {name!r} has dtype {m.dtype}; expected torch.bool")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(m.shape)} but the tensor has shape {tuple(params[name].shape)}"
            )


def count(mask: Mapping[str, torch.Tensor]) -> int:
    """Number of kept weights."""
    return int(sum(int(m.sum()) for m in mask.values()))


def size(mask: Mapping[str, torch.Tensor]) -> int:
    """Number of maskable positions."""
    return int(sum(m.numel() for m in mask.values()))


def sparsity(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of positions pruned."""
    return 1.0 - count(mask) / size(mask)


def is_nested(inner: Mapping[str, torch.Tensor], outer: Mapping[str, torch.Tensor]) -> bool:
    """True when every weight kept by ``inner`` is also kept by ``outer`` (IMP's invariant)."""
    return all(bool((inner[n] & ~outer[n]).sum() == 0) for n in inner)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two bool tensors; 1.0 when both are empty (identical masks)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool tensor (any shape) into uint8, 8 positions per byte, row-major."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


_MAX_EXTENT = 2**63
"""Bound on the product of a shape's dims (0 counted as 1): beyond it torch's strides overflow int64."""


def check_shape(shape: object, what: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of ints, or a ``ValueError`` naming ``what``.

    Checks what a shape read from a file needs before anything is allocated from it: a sequence
    of non-negative Python or NumPy integers (no bools, floats, ``inf`` or strings) whose extent
    fits torch's int64 strides. A 0-d shape ``()`` is fine.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise ValueError(f"{what} must be a list of non-negative integers; got {type(shape).__name__}")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"{what} must be a list of non-negative integers; got a dim {d!r:.40}")
        dims.append(int(d))
    if math.prod(max(d, 1) for d in dims) >= _MAX_EXTENT:
        raise ValueError(f"{what} {tuple(dims)} is too large for a tensor")
    return tuple(dims)


def _packed_length(shape: tuple[int, ...]) -> int:
    return (math.prod(shape) + 7) // 8  # math.prod(()) == 1: a 0-d mask is one bit


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_bits``: bool tensor of ``shape``.

    Any mismatch (``packed`` not a 1-D uint8 tensor of ``ceil(numel/8)`` bytes, a malformed
    ``shape``) raises ``ValueError``, which readers of files wrap with the file's name.
    """
    shape = check_shape(shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        found = f"{packed.dtype} tensor of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"a packed mask is a 1-D uint8 tensor; got a {found}")
    n, need = math.prod(shape), _packed_length(shape)
    if packed.numel() != need:
        raise ValueError(f"packed mask has {packed.numel()} bytes; a tensor of shape {shape} needs {need}")
    bits = np.unpackbits(packed.cpu().numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


class MaskSet:
    """K tickets over the same named tensors, one per data context.

    Stored as one bool tensor of shape ``(K, *shape)`` per tensor name, so per-context
    lookups are views and set algebra (union, overlap) is one vectorized op per layer.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], context_names: Sequence[str] | None = None) -> None:
        if not masks:
            raise ValueError("a MaskSet needs at least one tensor")
        ks = {m.shape[0] if m.dim() else -1 for m in masks.values()}
        if len(ks) != 1 or -1 in ks:
            raise ValueError(f"every stacked mask needs the same leading context dimension; got {sorted(ks)}")
        for name, m in masks.items():
            if m.dtype != torch.bool:
                raise ValueError(f"mask for {name!r} has dtype {m.dtype}; expected torch.bool")
        self.stacked: dict[str, torch.Tensor] = dict(masks)
        self.num_contexts = ks.pop()
        if self.num_contexts < 1:
            raise ValueError("a MaskSet needs at least one context")
        names = list(context_names) if context_names is not None else [str(k) for k in range(self.num_contexts)]
        if len(names) != self.num_contexts:
            raise ValueError(f"{len(names)} context names for {self.num_contexts} masks")
        self.context_names: list[str] = names

    @classmethod
    def from_tickets(cls, tickets: Sequence[Mapping[str, torch.Tensor]], context_names: Sequence[str] | None = None) -> MaskSet:
        """Stack K per-context masks (all over the same tensors, in ticket 0's order) into a MaskSet."""
        if not tickets:
            raise ValueError("from_tickets needs at least one ticket")
        names = list(tickets[0])
        for k, t in enumerate(tickets):
            if set(t) != set(names):
                raise ValueError(f"ticket {k} covers tensors {sorted(t)}, ticket 0 covers {sorted(names)}")
        return cls({n: torch.stack([t[n] for t in tickets]) for n in names}, context_names)

    # -- lookups -------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self.stacked)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(m.shape[1:]) for n, m in self.stacked.items()}

    def check_context(self, k: int | str) -> int:
        """The index of context ``k`` (an index or a context name); a clear ``ValueError`` otherwise.

        Floats and bools are refused rather than truncated: ``1.7`` routed to context 1 would be a
        silent error.
        """
        if isinstance(k, str):
            if k not in self.context_names:
                raise ValueError(f"unknown context {k!r}; contexts: {self.context_names}")
            return self.context_names.index(k)
        if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"a context is an integer id or a name; got {k!r}")
        k = int(k)
        if not 0 <= k < self.num_contexts:
            raise ValueError(f"context id {k} is outside 0..{self.num_contexts - 1}")
        return k

    def __getitem__(self, k: int | str) -> Mask:
        k = self.check_context(k)
        return {n: m[k] for n, m in self.stacked.items()}

    def __len__(self) -> int:
        return self.num_contexts

    def validate(self, params: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` unless this set covers exactly ``params`` with matching shapes."""
        validate_mask(self[0], params)

    # -- counts ----------------------------------------------------------------------------
    def size(self) -> int:
        """Number of maskable positions (prunable weights)."""
        return size(self[0])

    def counts(self) -> list[int]:
        """Kept weights per context."""
        return [count(self[k]) for k in range(self.num_contexts)]

    def union(self) -> Mask:
        """Weights kept by at least one context: what RTL must store (shared weights once)."""
        return {n: m.any(dim=0) for n, m in self.stacked.items()}

    def union_count(self) -> int:
        return count(self.union())

    # -- overlap ---------------------------------------------------------------------------
    def jaccard_matrix(self, tensor_name: str | None = None) -> torch.Tensor:
        """K×K Jaccard similarity, over one tensor or (``None``) over all prunable weights."""
        names = [tensor_name] if tensor_name is not None else self.tensor_names
        if tensor_name is not None and tensor_name not in self.stacked:
            raise KeyError(f"no mask for tensor {tensor_name!r}")
        flat = torch.cat([self.stacked[n].reshape(self.num_contexts, -1) for n in names], dim=1).float()
        inter = flat @ flat.T
        sizes = flat.sum(dim=1)
        union = sizes[:, None] + sizes[None, :] - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))

    # -- serialization ---------------------------------------------------------------------
    def packed(self) -> dict[str, torch.Tensor]:
        """Per tensor, a (K, ceil(numel/8)) uint8 tensor: K bits per prunable weight on disk."""
        out = {}
        for n, m in self.stacked.items():
            rows = m.detach().cpu().numpy().reshape(self.num_contexts, math.prod(m.shape[1:]))
            out[n] = torch.from_numpy(np.packbits(rows, axis=1))
        return out

    @classmethod
    def from_packed(
        cls, packed: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], context_names: Sequence[str]
    ) -> MaskSet:
        """Inverse of ``packed``: every tensor in ``shapes`` needs a (K, ceil(numel/8)) uint8 entry.

        Anything inconsistent raises ``ValueError`` (never ``TypeError`` or a torch error), so a
        reader can name the file it came from.
        """
        if set(packed) != set(shapes):
            raise ValueError(
                f"packed masks for {sorted(packed)[:5]} but shapes recorded for {sorted(shapes)[:5]}"
            )
        masks = {}
        for n, p in packed.items():
            shape = check_shape(shapes[n], f"shape of {n!r}")
            if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 2 or p.shape[0] < 1:
                found = f"{p.dtype} tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"packed mask {n!r} must be a (K, bytes) uint8 tensor with K >= 1; got a {found}")
            need = _packed_length(shape)
            if p.shape[1] != need:
                raise ValueError(f"packed mask {n!r} has {p.shape[1]} bytes per context; a tensor of shape {shape} needs {need}")
            bits = np.unpackbits(p.cpu().numpy(), axis=1, count=math.prod(shape))
            masks[n] = torch.from_numpy(bits.astype(bool)).reshape((p.shape[0], *shape))
        return cls(masks, context_names)
