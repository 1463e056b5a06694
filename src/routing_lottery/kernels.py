"""Sparse kernels for pruned networks, chosen per layer by measuring on the machine that will run them.

A context's standalone network (``RoutedModel.standalone(k)``) holds its pruned weights as exact
zeros, so it is as slow and as large as the dense one. Whether a sparse kernel beats the dense one
depends on the layer's shape, its density, the batch, the thread count and the CPU: on one thread,
torch's CSR matmul loses to dense at 50 % sparsity on a 1024x1024 layer and wins by several times
at 90 %; block-sparse (BSR) wins only when the zeros come in blocks. No rule of thumb survives all
of that, so :func:`prepare` times every candidate on the user's own input and keeps a sparse form
only where it measured clearly faster -- pruning and acceleration stay separate steps, as in torchao.

"Never slower than dense" is the promise, and a busy machine makes timings lie: comparing
medians with a 5 % margin once kept sparse forms that ran the demo network at 0.6-0.8x dense
speed (issue 23). So each decision follows ``timing.compare``'s rule -- interleaved rounds, a margin on the
medians, on the per-round pairs and on the fastest samples alike, dense unless the sparse form is
clearly faster -- and after the per-layer choices the whole prepared network is timed against the
dense one the same way; if it is not faster, every layer goes back to dense.

Which torch path is used, and why: a sparse ``W`` times the *transposed* activations,
``torch.addmm(bias[:, None], W, x.T).T``, goes to MKL's sparse-times-dense kernel, the fastest CSR
form on CPU; ``F.linear(x, W_csr)`` computes the same thing through dense-times-sparse, which was
slower than dense even at 90 % sparsity, and ``torch.sparse.mm`` on COO slower still (the
measurements: the documentation's Benchmarks page, "Export and per-layer kernels"). MKL's sparse
kernels take float32 and float64 only, so other dtypes stay dense.

A convolution is run in its matrix form: ``F.unfold`` (im2col) turns the input into columns and
one sparse matmul applies the ``(out_channels, in_channels * kh * kw)`` weight matrix. A grouped
or depthwise convolution becomes one block-diagonal sparse matrix over all groups, so the sparse
kernel skips the off-diagonal zeros for free instead of looping over groups in Python. On small
feature maps (GhostNet at 16x16: 1x1 convs on 1x1 to 8x8 maps) the sparse form often wins by
avoiding ``conv2d``'s fixed per-call cost rather than by skipping zeros -- it wins alike at 50 % and
90 % sparsity there -- while depthwise layers stay dense, since im2col costs more than it saves.

The replacement modules are inference-only: they compute under ``no_grad`` semantics (no
gradient reaches the sparse weight) and do not round-trip through ``state_dict`` (torch cannot
copy a sparse tensor of a different nnz into a buffer); ``torch.save`` of the whole prepared
module and ``copy.deepcopy`` work.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import timing

KERNELS: tuple[str, ...] = ("dense", "csr", "bsr")
"""Kernel names :func:`prepare` knows: the layer as it was, compressed sparse rows, block-sparse rows."""

SPARSE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
"""Weight dtypes torch's CPU sparse matmul (MKL) accepts; layers of other dtypes stay dense."""

_WARMUP = 3  # MKL analyses a sparse matrix on its first products; those calls are not timed.

WHOLE_MODULE_NOTE = "whole-module check"
"""How the notes of :class:`KernelChoice` start their part about the whole prepared network's timing."""


# -- the record of one decision ------------------------------------------------------------------
@dataclass(frozen=True)
class KernelChoice:
    """What :func:`prepare` decided for one layer, and the timings it decided on.

    ``dense_seconds`` and ``chosen_seconds`` are medians per call on the captured input; both are
    ``None`` when the layer was not timed (nothing pruned, an unsupported configuration, or a
    forced kernel). ``note`` says why a layer was not timed, why a requested form was not used, or
    how the sparse form measured against dense (and the whole prepared network against the dense
    one: :data:`WHOLE_MODULE_NOTE`).
    """

    layer: str
    kind: str  # "linear" | "conv2d"
    density: float  # share of the weight's entries that are nonzero
    kernel: str  # "dense" | "csr" | "bsr"
    block: tuple[int, int] | None  # BSR block shape, None for the other kernels
    dense_seconds: float | None
    chosen_seconds: float | None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        """Dense time over chosen time (1.0 when dense was kept); ``None`` when not timed."""
        if self.dense_seconds is None or self.chosen_seconds is None or self.chosen_seconds <= 0:
            return None
        return self.dense_seconds / self.chosen_seconds

    @property
    def limit(self) -> float:
        """The physical limit of any sparse kernel on this layer: 1 / density (it skips only zeros)."""
        return math.inf if self.density == 0 else 1.0 / self.density

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, speedup and limit included (an infinite limit as ``None``)."""
        out = asdict(self)
        out["block"] = None if self.block is None else list(self.block)
        out["speedup"] = self.speedup
        out["limit"] = None if math.isinf(self.limit) else self.limit
        return out


# -- sparse layers ---------------------------------------------------------------------------------
def _to_layout(matrix: Tensor, kernel: str, block: tuple[int, int] | None) -> Tensor:
    """``matrix`` (dense or COO) as a CSR or BSR tensor."""
    with warnings.catch_warnings():
        # torch warns once that sparse CSR is "in beta"; we use it deliberately and measure it.
        warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR).*beta.*")
        if kernel == "csr":
            return matrix.to_sparse_csr()
        if kernel == "bsr":
            assert block is not None
            return matrix.to_sparse_bsr(block)
    raise ValueError(f"no sparse layout for kernel {kernel!r}")


def _sparse_times(weight: Tensor, columns: Tensor, bias: Tensor | None) -> Tensor:
    """``weight @ columns (+ bias per row)``: the sparse-times-dense product MKL runs fastest."""
    if bias is None:
        return torch.sparse.mm(weight, columns)
    return torch.addmm(bias.unsqueeze(1), weight, columns)


def _nnz(weight: Tensor) -> int:
    return int(weight.values().count_nonzero())


class _SparseLayer(nn.Module):
    """Shared plumbing: a sparse ``weight`` buffer, a dense ``bias`` buffer, and a deep copy that
    torch itself cannot do (``copy.deepcopy`` of a sparse CSR/BSR tensor raises, so sparse buffers
    are cloned instead)."""

    weight: Tensor
    bias: Tensor | None

    def __init__(self, matrix: Tensor, bias: Tensor | None, kernel: str, block: tuple[int, int] | None) -> None:
        super().__init__()
        if kernel not in ("csr", "bsr"):
            raise ValueError(f"kernel must be 'csr' or 'bsr', got {kernel!r}")
        self.kernel = kernel
        self.block = block
        self.register_buffer("weight", _to_layout(matrix.detach(), kernel, block))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def __deepcopy__(self, memo: dict[int, Any]) -> _SparseLayer:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {n: b.clone() if b is not None and b.layout != torch.strided else copy.deepcopy(b, memo)
                         for n, b in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def _describe(self) -> str:
        rows, cols = self.weight.shape
        block = f", block={self.block}" if self.kernel == "bsr" else ""
        return f"kernel={self.kernel}{block}, nnz={_nnz(self.weight)} of {rows * cols}, bias={self.bias is not None}"


class SparseLinear(_SparseLayer):
    """``nn.Linear`` with its weight held as a CSR or BSR matrix; same function, any leading shape.

    Computes ``(W @ x.T + b).T`` rather than ``x @ W.T``: torch's fast sparse kernel is
    sparse-times-dense, and dense-times-sparse (what ``F.linear`` would run) is slower than dense.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: str, block: tuple[int, int] | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        super().__init__(weight, bias, kernel, block)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str, block: tuple[int, int] | None = None) -> SparseLinear:
        """The sparse twin of ``linear`` (its current weight and bias, copied)."""
        return cls(linear.weight, linear.bias, kernel, block)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        out = _sparse_times(self.weight, rows.t(), self.bias).t().contiguous()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._describe()}"


def _conv_matrix(weight: Tensor, groups: int) -> Tensor:
    """The convolution weight as the matrix that multiplies im2col columns: ``(O, C * kh * kw)``.

    With groups, output channel ``o`` sees only its group's slice of the columns, so the matrix is
    block-diagonal; it is built sparse (COO) so that a depthwise layer with many channels never
    materializes its mostly-zero dense form.
    """
    out_channels = weight.shape[0]
    per_group = weight.reshape(out_channels, -1).detach()
    if groups == 1:
        return per_group
    row, col = per_group.nonzero(as_tuple=True)
    values = per_group[row, col]
    width = per_group.shape[1]
    col = col + (row // (out_channels // groups)) * width
    return torch.sparse_coo_tensor(torch.stack([row, col]), values, (out_channels, width * groups),
                                   check_invariants=True).coalesce()


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Padding as ``F.pad`` takes it, (left, right, top, bottom); ``"same"`` may be asymmetric and
    then puts the extra row/column at the end, as ``F.conv2d`` does."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) as im2col + sparse matmul.

    The weight is the ``(out_channels, in_channels * kh * kw)`` matrix, block-diagonal over groups;
    a 1x1 convolution with stride 1 and no padding skips ``F.unfold``, since its input already is
    its column matrix.
    """

    def __init__(self, conv: nn.Conv2d, kernel: str, block: tuple[int, int] | None = None) -> None:
        super().__init__(_conv_matrix(conv.weight, conv.groups), conv.bias, kernel, block)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self.pad = _conv_padding(conv)
        # Zero padding that is symmetric is left to F.unfold, which pads without a copy of the input.
        self.unfold_padding = (self.pad[2], self.pad[0])
        symmetric = self.pad[0] == self.pad[1] and self.pad[2] == self.pad[3]
        self.pre_pad = conv.padding_mode != "zeros" or not symmetric
        if self.pre_pad:
            self.unfold_padding = (0, 0)
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1) and not any(self.pad))

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, kernel: str, block: tuple[int, int] | None = None) -> SparseConv2d:
        """The sparse twin of ``conv`` (its current weight and bias, copied)."""
        return cls(conv, kernel, block)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.pre_pad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.pad, mode=mode)
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel_size, self.stride, self.dilation, self.unfold_padding
        out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.pointwise:
            columns = x.reshape(n, self.in_channels, h * w)
        else:
            columns = F.unfold(x, self.kernel_size, self.dilation, self.unfold_padding, self.stride)
        # (N, C*kh*kw, L) -> (C*kh*kw, N*L): one product for the whole batch.
        columns = columns.transpose(0, 1).reshape(columns.shape[1], -1)
        out = _sparse_times(self.weight, columns, self.bias)
        out = out.reshape(self.out_channels, n, out_h, out_w).transpose(0, 1).contiguous()
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"pad={self.pad}, dilation={self.dilation}, groups={self.groups}, {self._describe()}")


# -- measuring -------------------------------------------------------------------------------------
def _layer_kind(module: nn.Module) -> str | None:
    """"linear" or "conv2d" for layers whose forward is torch's own; subclasses that override
    forward (LoRA wrappers, quantized stubs) compute something else and are left alone."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward:
        return "conv2d"
    return None


def _capture_inputs(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> dict[int, list[Tensor]]:
    """The inputs every Linear/Conv2d of ``model`` sees on one forward pass, by module id.

    Copies are kept because a later in-place op could overwrite a tensor a layer has read.
    """
    seen: dict[int, list[Tensor]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], Tensor):
            seen.setdefault(id(module), []).append(args[0].detach().clone())

    handles = [m.register_forward_hook(hook) for m in model.modules() if _layer_kind(m) is not None]
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _sparse_module(layer: nn.Module, kind: str, kernel: str, block: tuple[int, int] | None) -> _SparseLayer:
    if kind == "linear":
        return SparseLinear.from_linear(layer, kernel, block)  # type: ignore[arg-type]
    return SparseConv2d.from_conv2d(layer, kernel, block)  # type: ignore[arg-type]


def _matrix_shape(layer: nn.Module, kind: str) -> tuple[int, int]:
    weight = layer.weight
    if kind == "linear":
        return (weight.shape[0], weight.shape[1])
    return (weight.shape[0], weight[0].numel() * layer.groups)  # type: ignore[union-attr]


def _label(kernel: str, block: tuple[int, int] | None) -> str:
    return kernel if block is None else f"{kernel} {block[0]}x{block[1]}"


def _replace(model: nn.Module, names: Sequence[str], new: nn.Module) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# -- validation ------------------------------------------------------------------------------------
def _check_margin(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise ValueError(f"{name} must be a finite number >= 1 ({what}), got {value!r}")


def _check_args(module: Any, example_inputs: Any, kernels: Any, blocks: Any, margin: Any, module_margin: Any,
                repeats: Any, threads: Any, force: Any,
                timer: Any) -> tuple[tuple[Tensor, ...], tuple[str, ...], tuple[tuple[int, int], ...]]:
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ValueError("example_inputs must be a tensor or a non-empty tuple of tensors, got "
                         f"{type(example_inputs).__name__}")
    if isinstance(kernels, str):
        raise ValueError(f"kernels must be a sequence of kernel names such as ('csr',), got the string {kernels!r}")
    kernels = tuple(kernels)
    if not kernels:
        raise ValueError(f"kernels must name at least one of {KERNELS}, got an empty sequence")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"kernels contains unknown names {unknown}; expected names from {KERNELS}")
    given = blocks
    try:
        blocks = tuple(tuple(b) for b in blocks)
    except TypeError:
        raise ValueError(f"blocks must be (rows, cols) pairs of positive ints, got {given!r}") from None
    if not all(len(b) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in b)
               for b in blocks):
        raise ValueError(f"blocks must be (rows, cols) pairs of positive ints, got {given!r}")
    if ("bsr" in kernels or force == "bsr") and not blocks:
        raise ValueError(f"blocks must hold at least one (rows, cols) pair when 'bsr' is requested, got {blocks!r}")
    _check_margin("margin", margin, "how much faster than dense a sparse layer must be")
    _check_margin("module_margin", module_margin, "how much faster than dense the whole prepared module must be")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    if force is not None and force not in KERNELS:
        raise ValueError(f"force must be None or one of {KERNELS}, got {force!r}")
    if not callable(timer):
        raise ValueError(f"timer must be a clock in seconds such as time.perf_counter, got {timer!r}")
    return inputs, kernels, blocks


# -- the entry point -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Timing:
    """How :func:`prepare` measures: the rule's margins, the rounds, the clock and the device to wait for."""

    margin: float
    module_margin: float
    repeats: int
    timer: timing.Timer
    device: torch.device

    def sample(self, variants: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        return timing.sample(variants, self.repeats, timer=self.timer, sync=timing.device_sync(self.device),
                             warmup=_WARMUP)

    def compare(self, dense: Callable[[], object], candidate: Callable[[], object], margin: float) -> timing.Verdict:
        return timing.compare(dense, candidate, margin=margin, repeats=self.repeats, timer=self.timer,
                              sync=timing.device_sync(self.device), warmup=_WARMUP)


@torch.no_grad()
def prepare(
    module: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    kernels: Iterable[str] = KERNELS,
    blocks: Iterable[tuple[int, int]] = ((4, 4), (8, 8), (16, 16)),
    margin: float = 1.15,
    module_margin: float = 1.05,
    repeats: int = 20,
    threads: int | None = None,
    force: str | None = None,
    timer: timing.Timer = time.perf_counter,
) -> tuple[nn.Module, list[KernelChoice]]:
    """A copy of ``module`` whose pruned Linear/Conv2d layers use a sparse kernel where it measured clearly faster.

    Each ``nn.Linear`` and ``nn.Conv2d`` that ``example_inputs`` reaches is timed on the very input
    it received: every candidate sparse form against dense, the fastest candidate then against
    dense once more in fresh interleaved rounds, and it replaces the layer only when
    ``timing.compare`` finds it faster by ``margin`` on the medians, the per-round pairs and the
    fastest samples alike. Then the whole prepared copy is timed against the dense module the
    same way (``module_margin``); if it is not faster, the dense copy is returned and every
    choice says so. So, as measured, neither a layer nor the whole is slower than dense. The
    decision holds for the batch shape, thread count and machine it was measured on; the sparse
    modules compute the same function for any batch size.

    Parameters
    ----------
    module : the network, pruned weights as exact zeros (e.g. ``RoutedModel.standalone(k)``).
        It is deep-copied and never changed.
    example_inputs : one tensor, or a tuple passed as ``module(*example_inputs)``; a realistic
        batch, since the timings (and so the choices) depend on its shape.
    kernels : the forms to consider, from ``("dense", "csr", "bsr")``. Dense is always the baseline,
        so ``("dense",)`` changes nothing.
    blocks : BSR block shapes to try; a block is used only where it divides the weight matrix, and
        on CPU only if it is square (MKL's BSR product refuses other blocks).
    margin : how many times faster than dense a sparse layer must measure (>= 1); the default asks
        for 15 %, more than the noise of a shared machine.
    module_margin : how many times faster than the dense module the whole prepared copy must
        measure (>= 1), else all of it stays dense.
    repeats : interleaved rounds per comparison.
    threads : torch's thread count during measurement (restored afterwards); measure with the
        count you will deploy with. ``None`` keeps the current one.
    force : skip measurement and use this kernel wherever the layer allows it (for BSR, the first
        block of ``blocks`` that divides the matrix); meant for tests and for reproducing a
        decision on another machine.
    timer : the clock in seconds (``time.perf_counter``); tests pass a fake one.

    Returns
    -------
    (prepared, choices) : tuple[nn.Module, list[KernelChoice]]
        The copy, in eval mode, and one ``KernelChoice`` per Linear/Conv2d layer, in module order.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(64, 64))
    >>> fast, choices = prepare(net, torch.randn(8, 64), repeats=3)
    >>> choices[0].kernel  # nothing pruned: stays dense, untimed
    'dense'
    """
    inputs, kernels, blocks = _check_args(module, example_inputs, kernels, blocks, margin, module_margin, repeats,
                                          threads, force, timer)
    sparse_kernels = [k for k in kernels if k != "dense"]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dense = copy.deepcopy(module).eval()
        model = copy.deepcopy(dense)
        captured = _capture_inputs(model, inputs)
        names_of: dict[int, list[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            names_of.setdefault(id(m), []).append(name)
        choices = []
        for name, layer in model.named_modules():
            kind = _layer_kind(layer)
            if kind is None:
                continue
            clock = _Timing(margin, module_margin, repeats, timer, layer.weight.device)
            choice, replacement = _decide(name, layer, kind, captured.get(id(layer)), sparse_kernels, blocks,
                                          clock, force)
            choices.append(choice)
            if replacement is not None:
                _replace(model, names_of[id(layer)], replacement)
        if force is not None or all(c.kernel == "dense" for c in choices):
            return model, choices
        return _check_whole(dense, model, inputs, choices, _Timing(margin, module_margin, repeats, timer,
                                                                    _device_of(dense, inputs)))
    finally:
        torch.set_num_threads(previous_threads)


def _device_of(module: nn.Module, inputs: tuple[Tensor, ...]) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else inputs[0].device


def _check_whole(dense: nn.Module, prepared: nn.Module, inputs: tuple[Tensor, ...], choices: list[KernelChoice],
                 clock: _Timing) -> tuple[nn.Module, list[KernelChoice]]:
    """``prepared`` if the whole of it is clearly faster than ``dense``, else ``dense`` with every choice dense.

    Layers timed alone miss what the network adds around them (layouts converted between a sparse
    layer and its dense neighbours, caches shared by the layers, the machine's load at another
    moment), so the promise is checked on the whole forward too.
    """
    verdict = clock.compare(lambda: dense(*inputs), lambda: prepared(*inputs), clock.module_margin)
    if verdict.faster:
        note = f"{WHOLE_MODULE_NOTE}: the prepared module measured {verdict.describe()} against dense: kept"
        return prepared, [dataclasses.replace(c, note="; ".join(filter(None, [c.note, note])))
                          if c.kernel != "dense" else c for c in choices]
    note = (f"{WHOLE_MODULE_NOTE}: the prepared module measured {verdict.describe()} against dense, not faster: "
            "every layer left dense")
    return dense, [dataclasses.replace(c, kernel="dense", block=None, chosen_seconds=c.dense_seconds,
                                       note="; ".join(filter(None, [c.note, note])))
                   if c.kernel != "dense" else c for c in choices]


def _candidates(layer: nn.Module, kind: str, wanted: list[str], blocks: tuple[tuple[int, int], ...],
                force: str | None) -> tuple[list[tuple[str, tuple[int, int] | None]], str]:
    """The sparse forms to try on ``layer`` (kernel, block) and a note on what was skipped and why."""
    shape = _matrix_shape(layer, kind)
    usable = blocks
    if layer.weight.device.type == "cpu":  # MKL's BSR product raises on non-square blocks
        usable = tuple(b for b in blocks if b[0] == b[1])
    dividing = [b for b in usable if shape[0] % b[0] == 0 and shape[1] % b[1] == 0]
    candidates: list[tuple[str, tuple[int, int] | None]] = []
    notes: list[str] = []
    for kernel in wanted:
        if kernel == "csr":
            candidates.append(("csr", None))
        elif kernel == "bsr":
            if not dividing:
                square = "" if usable == blocks else " (on CPU only square blocks, MKL's BSR takes no others)"
                notes.append(f"no block of {list(blocks)} divides the weight matrix {shape}{square}: bsr skipped")
            candidates += [("bsr", b) for b in (dividing[:1] if force else dividing)]
    return candidates, "; ".join(notes)


def _decide(name: str, layer: nn.Module, kind: str, seen: list[Tensor] | None, sparse_kernels: list[str],
            blocks: tuple[tuple[int, int], ...], clock: _Timing,
            force: str | None) -> tuple[KernelChoice, nn.Module | None]:
    """The choice for one layer and its replacement (``None`` to keep the dense layer)."""
    weight = layer.weight
    density = float(weight.count_nonzero()) / weight.numel()

    def keep(note: str, dense_s: float | None = None) -> tuple[KernelChoice, None]:
        return KernelChoice(name, kind, density, "dense", None, dense_s, dense_s, note), None

    if seen is None:
        return keep("not reached by example_inputs: left dense")
    if force == "dense":
        return keep("forced")
    if density == 1.0:
        return keep("nothing pruned: left dense, not timed")
    if weight.dtype not in SPARSE_DTYPES:
        return keep(f"dtype {weight.dtype} has no CPU sparse matmul (float32/float64 only): left dense")
    if weight.device.type not in ("cpu", "cuda"):
        return keep(f"device {weight.device.type} is not supported: left dense")

    candidates, note = _candidates(layer, kind, [force] if force is not None else sparse_kernels, blocks, force)
    if not candidates:
        return keep(note or "no sparse kernel requested: left dense")
    modules = {(k, b): _sparse_module(layer, kind, k, b) for k, b in candidates}
    if force is not None:
        (kernel, block), replacement = next(iter(modules.items()))
        forced = KernelChoice(name, kind, density, kernel, block, None, None, "; ".join(filter(None, ["forced", note])))
        return forced, replacement

    def run(m: nn.Module) -> Callable[[], object]:
        return lambda: [m(x) for x in seen]

    best_key = next(iter(modules))
    if len(modules) > 1:  # screen the candidates together, then confirm the fastest against dense afresh
        screened = clock.sample({_label(*key): run(m) for key, m in modules.items()})
        best_key = min(modules, key=lambda key: statistics.median(screened[_label(*key)]))
    # Fresh rounds for the one that is kept or not: picking the best of several on the same samples
    # would favour whichever got lucky.
    verdict = clock.compare(run(layer), run(modules[best_key]), clock.margin)
    measured = f"best sparse form {_label(*best_key)} measured {verdict.describe()} against dense"
    if not verdict.faster:
        return keep("; ".join(filter(None, [f"{measured}: left dense", note])), verdict.baseline_seconds)
    kernel, block = best_key
    return (KernelChoice(name, kind, density, kernel, block, verdict.baseline_seconds, verdict.candidate_seconds,
                         "; ".join(filter(None, [measured, note]))), modules[best_key])


# -- reporting -------------------------------------------------------------------------------------
def choices_markdown(choices: Iterable[KernelChoice]) -> str:
    """The choices as a Markdown table, each speedup beside its physical limit 1/density.

    The limit is what a kernel that did no work for zeros and no extra work for indices would
    reach; the gap between the two columns is the overhead of the sparse format on this machine.
    """
    rows = list(choices)
    bad = [type(c).__name__ for c in rows if not isinstance(c, KernelChoice)]
    if bad:
        raise ValueError(f"choices must be KernelChoice records (as prepare returns), got {bad[:3]}")

    def ms(seconds: float | None) -> str:
        return "–" if seconds is None else f"{seconds * 1e3:.3f}"

    lines = ["| layer | kind | density | kernel | block | dense ms | chosen ms | speedup | limit 1/density | note |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for c in rows:
        block = "–" if c.block is None else f"{c.block[0]}x{c.block[1]}"
        speedup = "–" if c.speedup is None else f"{c.speedup:.2f}x"
        limit = "∞" if math.isinf(c.limit) else f"{c.limit:.2f}x"
        note = c.note.replace("|", "\\|")
        lines.append(f"| {c.layer} | {c.kind} | {c.density:.3f} | {c.kernel} | {block} | {ms(c.dense_seconds)} | "
                     f"{ms(c.chosen_seconds)} | {speedup} | {limit} | {note} |")
    return "\n".join(lines) + "\n"
