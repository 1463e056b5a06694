"""Routing: run each input through the subnetwork of its context.

Masks are applied by passing masked weights to ``torch.func.functional_call`` -- no forward hooks,
no ``weight_orig``/``weight_mask`` state-dict keys -- so the wrapped module stays an ordinary
module with ordinary parameters, and the mask multiply is the only extra work in the hot path.
Because the effective weight is ``w * m``, gradients reaching ``w`` are already masked.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.func import functional_call, vmap

from . import timing
from .masks import Mask, MaskSet

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
"""A model's inputs: one tensor, or several (token ids and a padding mask, say) passed as ``model(*x)``."""


class Router(Protocol):
    """Anything that chooses one context per input row (``router.py`` holds the built-in ones and their registry).

    ``name`` labels it in reports; ``passes`` is the number of network forward passes per input it
    spends to choose (a backward pass counts as one), so a cost report can add it to the one
    routed forward that follows.
    """

    name: str
    passes: int

    def __call__(self, routed: RoutedModel, x: Inputs) -> torch.Tensor:
        """(N,) int64 context ids in ``0..K-1`` for the N rows of ``x``."""
        ...


MIXED_PATHS: tuple[str, ...] = ("auto", "vmap", "loop")
"""How ``RoutedModel`` runs a batch that mixes contexts: measured per batch shape, batched, or per group."""

VMAP_TOLERANCE: dict[str, float] = {"rtol": 1e-5, "atol": 1e-5}
"""How far the vmapped mixed-batch path's float32 outputs may be from per-context forwards, as
``torch.testing.assert_close`` measures it (tested on MLP, convolutional and attention models).
It runs the same function through other kernels (batched matrix products, the math attention
kernel instead of a fused one, BatchNorm folded into one affine map), so results differ by
rounding. The per-group loop has no tolerance: it is bit for bit the per-context forward."""

PATH_MARGIN = 1.10
"""Under ``mixed_path="auto"``, how many times faster than the per-group loop the vmapped path must
measure to be used: the loop is exact, so it is kept on a tie or in noise."""

PATH_REPEATS = 7
"""Interleaved rounds of the one measurement ``mixed_path="auto"`` makes per batch-shape bucket."""


@dataclass(frozen=True)
class PathDecision:
    """The mixed-batch path ``mixed_path="auto"`` chose for one bucket of batches, and why.

    ``verdict`` compares the per-group loop (the baseline) with the vmapped path (the candidate),
    ``None`` when the vmapped path could not run (an op without a batching rule).
    """

    path: str  # "vmap" | "loop"
    verdict: timing.Verdict | None

    def describe(self) -> str:
        if self.verdict is None:
            return f"{self.path} (the vmapped path cannot run this model)"
        return f"{self.path} (vmap against the loop: {self.verdict.describe()})"


def as_tuple(x: Inputs | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The input tensors of a batch as a tuple (a list is accepted too: torch's default collate turns a
    sample's tuple of inputs into one)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def lacks_batching_rule(err: RuntimeError) -> bool:
    """Whether ``err`` is vmap meeting an op it cannot batch (recurrent layers, some custom kernels),
    where running one item at a time still works -- unlike out-of-memory and other errors."""
    return "atching rule" in str(err)


def masked_forward(model: nn.Module, mask: Mapping[str, torch.Tensor], *inputs: Any, **kwargs: Any) -> Any:
    """``model(*inputs, **kwargs)`` with every masked tensor replaced by ``weight * mask``.

    The functional form of a masked forward for one context, for a user's own loop: ``mask`` is
    that context's float mask (``routed.mask(k)``, or ``masks[k]`` as floats); in training mode it
    is differentiable, and the gradient reaching ``weight`` is already masked. Keyword inputs
    (``input_ids=..., labels=...``) pass through to the model.

    A tensor shared under several names (tied weights) is replaced under all of them. Untying is
    asked of ``functional_call`` only when the model has such a tensor: it walks every module on
    each call, a tenth of a small model's training step.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    buffers = [b for _, b in model.named_buffers(remove_duplicate=False)]
    tied = len({id(p) for p in named.values()}) < len(named) or len({id(b) for b in buffers}) < len(buffers)
    return functional_call(model, {n: named[n] * m for n, m in mask.items()}, inputs, kwargs or None, strict=False,
                           tie_weights=tied)


routed_forward = masked_forward
"""Another name of ``masked_forward``: one context's subnetwork called as a function."""


@torch.no_grad()
def apply_mask_(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned positions of the model's weights in place."""
    params = dict(model.named_parameters())
    for n, m in mask.items():
        params[n].mul_(m)


@contextlib.contextmanager
def _vmappable_attention() -> Iterator[None]:
    """Attention through plain ops that vmap can batch: ``nn.MultiheadAttention``'s fused inference
    kernel and the flash/efficient SDPA kernels have no batching rule (vmap would warn and loop)."""
    with contextlib.ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            before = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, before)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3: SDPA picks its kernel itself
            pass
        else:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


class _FrozenBatchNorm(nn.Module):
    """An evaluation-mode BatchNorm as the affine map it is: ``x * scale + shift`` per channel.

    Under ``vmap``, BatchNorm's batching rule normalizes without the affine part and then applies
    it in separate passes; on the demo network that made BatchNorm cost about 7x its dense time in
    the mixed-context path. The folded map is the same function in one pass.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var + bn.eps)  # type: ignore[operator]
            scale = inv if bn.weight is None else bn.weight * inv
            shift = -bn.running_mean * scale  # type: ignore[operator]
            if bn.bias is not None:
                shift = shift + bn.bias
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)  # channels are dim 1, as BatchNorm's
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view))


def _inference_copy(model: nn.Module, masked: set[str]) -> nn.Module:
    """A copy of ``model`` for batched evaluation: every plain BatchNorm that normalizes with running
    statistics folded into ``_FrozenBatchNorm``. Left as they are: BatchNorms with a masked
    parameter (the mask is passed in at call time, a folded copy would drop it) and subclasses
    with a ``forward`` of their own (fused activations, say)."""
    copy_ = copy.deepcopy(model).eval()
    for prefix, parent in list(copy_.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            if (isinstance(child, nn.modules.batchnorm._BatchNorm)
                    and type(child).forward is nn.modules.batchnorm._BatchNorm.forward
                    and child.track_running_stats and child.running_mean is not None
                    and child.running_var is not None
                    and not any(f"{path}.{p}" in masked for p, _ in child.named_parameters())):
                setattr(parent, name, _FrozenBatchNorm(child))
    return copy_


def _check_rows(inputs: tuple[Any, ...]) -> None:
    """Every input of a mixed batch is a tensor with one row per context id: rows are what is routed."""
    bad = [type(t).__name__ for t in inputs if not isinstance(t, torch.Tensor)]
    if bad:
        raise ValueError(f"inputs must be tensors, one row per context id; got {', '.join(bad)}")
    shapes = [tuple(t.shape) for t in inputs]
    if any(len(shape) == 0 for shape in shapes) or len({shape[0] for shape in shapes}) > 1:
        raise ValueError(f"every input of a mixed-context batch must have the same number of rows (dimension 0), "
                         f"one per context id; got shapes {', '.join(map(str, shapes))}")


class _Misfit(Exception):
    """Raised by a shape check inside a diagnostic forward, to stop it at the first layer that cannot take its input."""


def _shape_problem(module: nn.Module, args: tuple[Any, ...]) -> str | None:
    """What the input of a layer whose expectations are known does not match, or ``None``."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None:
        return None
    got = f"got shape {tuple(x.shape)}"
    if isinstance(module, nn.Linear) and (x.dim() == 0 or x.shape[-1] != module.in_features):
        return f"expects a last dimension of in_features={module.in_features}, {got}"
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != module.in_channels:
            return (f"expects (N, {module.in_channels}, {', '.join(['*'] * dims)}) or ({module.in_channels}, "
                    f"{', '.join(['*'] * dims)}), {got}")
    if isinstance(module, nn.MultiheadAttention) and (x.dim() == 0 or x.shape[-1] != module.embed_dim):
        return f"expects a last dimension of embed_dim={module.embed_dim}, {got}"
    if isinstance(module, nn.LayerNorm):
        width = len(module.normalized_shape)
        if tuple(x.shape[x.dim() - width:]) != tuple(module.normalized_shape):
            return f"expects trailing dimensions {tuple(module.normalized_shape)}, {got}"
    if (isinstance(module, nn.modules.batchnorm._BatchNorm) and x.dim() >= 2
            and x.shape[1] != module.num_features):
        return f"expects num_features={module.num_features} channels in dimension 1, {got}"
    return None


class RoutedModel(nn.Module):
    """One shared module plus K masks; ``forward(x, context)`` routes each row to its mask.

    A batch may mix contexts, and there are two ways to run one (``mixed_path``):

    - ``"loop"``: each context's rows through its subnetwork in turn. Its outputs are bit for bit
      those of ``subnetwork(x[rows], k)`` on each context's rows.
    - ``"vmap"``: the groups padded to one size and all K subnetworks run as one
      ``torch.func.vmap`` call over the stacked masked weights -- one kernel per layer instead of
      K. Its outputs equal per-context forwards within :data:`VMAP_TOLERANCE`, not bit for bit
      (other kernels, other rounding). It runs only in evaluation mode (vmap cannot batch
      BatchNorm's statistics updates), on a single input tensor, when the largest group has fewer
      than ``vmap_below`` rows and padding at most doubles the work; otherwise the loop runs.
    - ``"auto"`` (the default): where the vmapped path may run, the first batch of each shape
      bucket (rows and largest group to a power of two, per-row shape, dtype, device, threads,
      autograd on or off, contexts present) times both paths on that batch in interleaved rounds
      (``timing.compare``) and keeps vmap only if it is :data:`PATH_MARGIN` times faster than the
      loop; the decision is cached (``path_decisions``). Which is faster depends on the model
      (attention models have favoured the loop; see ``benchmarks/bench_rtl.py`` for both paths
      against dense), so it is measured rather than assumed. Under ``"auto"`` two runs may take
      different paths and differ within :data:`VMAP_TOLERANCE`; ``"loop"`` is reproducible bit
      for bit.

    Outputs come back in input order whichever path runs. Before routing a mixed batch, the
    inputs are checked to have one row per context id; a shape the model cannot take is reported
    as a ValueError naming the layer, the shape it expects and the shape it got.

    It starts in evaluation mode (and puts ``model`` in it): routing an input must not move the
    shared BatchNorm statistics. Call ``.train()`` to train through it: in training mode every
    forward is ``w * m_k``, differentiable. In your own loop, ``with routed.use(k):`` makes
    ``routed(...)`` context k's subnetwork, called with the model's own arguments (keyword inputs
    included); pair it with ``training.context_optimizers`` for the per-context steps.

    Without an oracle for the contexts, give it a ``router`` (``router.py``): ``routed(x)`` then
    asks the router for one context per row and routes as usual.

    Parameters
    ----------
    model : the shared network; masks : its K masks (a MaskSet over some of its parameters).
    vmap_below : the vmapped path is considered only while the largest context group has fewer
        rows (its padded batch holds K times the largest group); ``1`` never vmaps.
    router : infers one context per row when ``forward`` gets none.
    materialize : keep the K masked weight sets at inference (see ``masked_weights``).
    mixed_path : ``"auto"``, ``"vmap"`` or ``"loop"``, as above; an attribute that may be changed later.
    timer : the clock in seconds ``"auto"`` measures with (``time.perf_counter``; tests pass a fake one).

    Examples
    --------
    >>> from routing_lottery import DetectorRouter
    >>> net = nn.Linear(16, 4)                          # any module; here one output per context
    >>> masks = MaskSet({"weight": torch.rand(4, 4, 16) < 0.5}, ["cats", "dogs", "cars", "ships"])
    >>> routed = RoutedModel(net, masks).eval()         # masks: a MaskSet with K = 4 tickets
    >>> images = torch.randn(4, 16)
    >>> logits = routed(images, torch.tensor([0, 3, 3, 1]))  # one context per row, mixed in one batch
    >>> routed.router = DetectorRouter()                # or LearnedRouter.fit(...), EntropyRouter()
    >>> logits = routed(images)                         # contexts chosen by the router
    >>> with routed.use("cats"):                        # one context's subnetwork, any call signature
    ...     out = routed(images)
    >>> tuple(out.shape)
    (4, 4)
    """

    def __init__(self, model: nn.Module, masks: MaskSet, vmap_below: int = 512, router: Router | None = None,
                 materialize: bool = True, mixed_path: str = "auto",
                 timer: timing.Timer = time.perf_counter) -> None:
        super().__init__()
        self.vmap_below = vmap_below
        self.router = router
        self.materialize = materialize
        self.mixed_path = mixed_path
        self.timer = timer
        self._vmappable = True
        self._active: list[int] = []  # contexts entered with use(), innermost last
        self._path_decisions: dict[tuple[Any, ...], PathDecision] = {}
        self._weights: dict[str, torch.Tensor] | None = None  # masked_weights' cache and what it was made from
        self._weights_key: tuple[tuple[int, ...], ...] = ()
        # _inference_copy of the model and the state it was made from; a tuple, so that the copy is not
        # registered as a submodule (it must stay out of state_dict(), parameters() and .to())
        self._batched: tuple[tuple[tuple[int, ...], ...], nn.Module] | None = None
        params = dict(model.named_parameters())
        missing = [n for n in masks.tensor_names if n not in params]
        if missing:
            raise ValueError(f"masks name tensors the model does not have: {missing}")
        masks.validate({n: params[n] for n in masks.tensor_names})
        self.model = model
        self.masks = masks
        # Float copies on the model's device: multiplying by a float mask is the fastest
        # elementwise path, and buffers follow .to(device).
        for i, name in enumerate(masks.tensor_names):
            self.register_buffer(f"mask_{i}", masks.stacked[name].to(device=params[name].device, dtype=params[name].dtype),
                                 persistent=False)
        # Routing is inference: in training mode a forward would move the shared BatchNorm statistics.
        # Training through the routed model is explicit: ``routed.train()``.
        self.eval()

    @property
    def num_contexts(self) -> int:
        return self.masks.num_contexts

    @property
    def mixed_path(self) -> str:
        """How a batch that mixes contexts runs: ``"auto"``, ``"vmap"`` or ``"loop"`` (see the class docstring)."""
        return self._mixed_path

    @mixed_path.setter
    def mixed_path(self, value: str) -> None:
        if value not in MIXED_PATHS:
            raise ValueError(f"mixed_path must be one of {MIXED_PATHS}, got {value!r}")
        self._mixed_path = value

    @property
    def path_decisions(self) -> dict[tuple[Any, ...], PathDecision]:
        """What ``mixed_path="auto"`` decided so far, per batch-shape bucket (a copy)."""
        return dict(self._path_decisions)

    def mask(self, k: int | str) -> Mask:
        """Float mask of context ``k`` (an index or a name; on the model's device)."""
        k = self.masks.check_context(k)
        return {name: stacked[k] for name, stacked in self.stacked_masks().items()}

    def stacked_masks(self) -> dict[str, torch.Tensor]:
        """Masked tensor name -> its K float masks stacked ``(K, *shape)``, on the model's device."""
        return {name: getattr(self, f"mask_{i}") for i, name in enumerate(self.masks.tensor_names)}

    def masked_weights(self) -> dict[str, torch.Tensor]:
        """Masked tensor name -> the K subnetworks' weights ``w * m_k`` stacked ``(K, *shape)``.

        At inference (evaluation mode, autograd off, ``materialize``) they are computed once and
        kept: the masks never change there, so multiplying them in at every call is wasted work.
        The copy is keyed on each weight's storage and version counter, which in-place changes
        through autograd bump (a standard optimizer step, ``load_state_dict``, ``apply_mask_``), and
        on the masks'; ``.train()`` and any call with autograd on drop it. Changes that bypass the
        version counter (``p.data`` edits, fused optimizers stepping a model used in evaluation
        mode) need ``refresh()``. It costs K copies of the masked weights in memory;
        ``materialize=False`` trades that back for a multiply per call.
        """
        if not self._cacheable():
            params = dict(self.model.named_parameters())
            return {n: params[n] * m for n, m in self.stacked_masks().items()}
        return self._materialized()

    def _materialized(self) -> dict[str, torch.Tensor]:
        """``masked_weights``' kept copy, remade when a weight or mask changed (callers checked ``_cacheable``)."""
        params = dict(self.model.named_parameters())
        stacked = self.stacked_masks()
        key = tuple((params[n].data_ptr(), params[n]._version, m.data_ptr(), m._version) for n, m in stacked.items())
        if self._weights is None or key != self._weights_key:
            self._weights = {n: params[n].detach() * m for n, m in stacked.items()}
            self._weights_key = key
        return self._weights

    def _cacheable(self) -> bool:
        """Whether this call may use (and keep) materialized copies: evaluation, autograd off, and no
        inference-mode tensors (they have no version counter to key a cache on)."""
        if self.training or torch.is_grad_enabled() or not self.materialize:
            self.refresh()  # weights may be about to change: never serve a copy made before
            return False
        if torch.is_inference_mode_enabled() or any(t.is_inference() for t in (*self.model.parameters(),
                                                                              *self.stacked_masks().values())):
            return False
        return True

    def refresh(self) -> None:
        """Drop the materialized weights and the folded inference copy; the next call remakes them."""
        self._weights, self._weights_key, self._batched = None, (), None

    def _batched_model(self) -> nn.Module:
        """The module the vmapped path calls: at inference, ``_inference_copy`` of the model, remade
        whenever any of its parameters or buffers changed (the same version keys as ``masked_weights``;
        callers checked ``_cacheable``)."""
        if any(t.is_inference() for t in self.model.buffers()):
            return self.model
        key = tuple((t.data_ptr(), t._version) for t in (*self.model.parameters(), *self.model.buffers()))
        if self._batched is None or self._batched[0] != key:
            self._batched = (key, _inference_copy(self.model, set(self.masks.tensor_names)))
        return self._batched[1]

    def train(self, mode: bool = True) -> RoutedModel:
        if mode:  # weights are about to change: do not hold stale copies
            self.refresh()
        return super().train(mode)

    def _run(self, k: int, *inputs: Any, **kwargs: Any) -> Any:
        """Context ``k``'s subnetwork on ``inputs``: its materialized weights at inference, else ``w * m_k``."""
        if self._cacheable():
            weights = {n: w[k] for n, w in self._materialized().items()}
        else:
            params = dict(self.model.named_parameters())
            weights = {n: params[n] * m[k] for n, m in self.stacked_masks().items()}
        return functional_call(self.model, weights, inputs, kwargs or None, strict=False)

    @contextlib.contextmanager
    def use(self, context: int | str) -> Iterator[RoutedModel]:
        """Inside the block, ``routed(*args, **kwargs)`` is context ``context``'s subnetwork: a masked
        forward for one context inside any training loop or ``Trainer``.

        Every argument goes to the model as it is (``routed(x)``, ``routed(input_ids=ids,
        labels=y)``); in training mode the forward is ``w * m_k``, differentiable, with gradients
        already masked. Blocks nest (the innermost wins) and the previous context comes back on
        leaving, an exception included. Outside any block, ``forward`` routes as usual.

        >>> from torch.nn import functional as F
        >>> masks = MaskSet({"weight": torch.rand(2, 3, 8) < 0.5}, ["cats", "dogs"])
        >>> routed = RoutedModel(nn.Linear(8, 3), masks).train()
        >>> x, y = torch.randn(5, 8), torch.tensor([0, 2, 1, 1, 0])
        >>> with routed.use("cats"):
        ...     loss = F.cross_entropy(routed(x), y)
        >>> loss.backward()                             # gradients reach only the weights m_cats keeps
        """
        k = self.masks.check_context(context)
        self._active.append(k)
        try:
            yield self
        finally:
            self._active.pop()

    @property
    def active_context(self) -> int | None:
        """The context a ``use`` block set (the innermost), or ``None`` outside every block."""
        return self._active[-1] if self._active else None

    def subnetwork(self, x: torch.Tensor, k: int | str) -> torch.Tensor:
        """Forward a batch whose rows all belong to context ``k``."""
        return self._run(self.masks.check_context(k), *as_tuple(x))

    def standalone(self, k: int | str) -> nn.Module:
        """Subnetwork ``k`` as an ordinary module: a copy of the model with ``weight * mask_k`` baked in.

        For deployment where each device serves one context: no masks, no routing, dense cost, and
        it exports like any module (``torch.export``, ONNX). The copy shares nothing with the
        routed model, so training either leaves the other unchanged.
        """
        module = copy.deepcopy(self.model)
        apply_mask_(module, self.mask(k))
        return module

    def context_ids(self, context: torch.Tensor | Sequence[int | str] | int | str, rows: int) -> torch.Tensor:
        """One context index per input row, from indices or context names; a clear error for anything else."""
        if isinstance(context, (list, tuple)):
            context = torch.tensor([self.masks.check_context(c) for c in context], dtype=torch.long)
        context = torch.as_tensor(context)
        if context.is_floating_point() or context.dtype == torch.bool:
            raise ValueError(f"context ids must be integers or names; got a {context.dtype} tensor")
        if context.dim() != 1 or context.shape[0] != rows:
            raise ValueError(f"context must be one id per input row: expected shape ({rows},) for {rows} input rows, "
                             f"got shape {tuple(context.shape)}")
        return context.long()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``forward(x, context=None, **inputs)``: outputs for ``x`` (a tensor, or a tuple of per-row
        tensors for multi-input models), each row through its context's subnetwork; ``context`` is
        one id or name for the batch, or one per row, or ``None`` to let ``self.router`` choose one
        per row. Keyword ``inputs`` (``input_ids=...``) go to the model; they need one context for
        the whole batch (``x`` may then be left out).

        Inside a ``use(k)`` block every argument goes to context k's subnetwork as it is.
        """
        if self.training != self.model.training:
            raise RuntimeError(f"the routed model is in {'training' if self.training else 'evaluation'} mode but the "
                               "shared model is not: call routed.train() or routed.eval(), not the model's")
        if self._active:
            return self._run(self._active[-1], *args, **kwargs)
        return self._route(*args, **kwargs)

    def _route(self, x: Inputs | None = None, context: torch.Tensor | Sequence[int | str] | int | str | None = None,
               **kwargs: Any) -> Any:
        """``forward`` outside a ``use`` block: one context, one per row, or the router's."""
        if x is None and not kwargs:
            raise TypeError("routed model called without inputs: routed(x, context) or routed(context=k, **inputs)")
        one = isinstance(context, (int, str)) or (isinstance(context, torch.Tensor) and context.dim() == 0)
        if kwargs and not one:
            raise ValueError(f"keyword inputs ({', '.join(kwargs)}) need one context for the whole batch: "
                             "routed(x, k, **inputs), routed(context=k, **inputs) or inside `with routed.use(k):`; "
                             f"got {'no context' if context is None else 'one context per row'} (mixed batches "
                             "take positional inputs)")
        if context is None:
            if self.router is None:
                raise ValueError("no context given and no router set: pass one context per row, routed(x, context), "
                                 "run one context's subnetwork inside `with routed.use(k):`, or set a router that "
                                 "infers them, e.g. routed.router = LearnedRouter.fit(train_x, train_contexts, K), "
                                 "DetectorRouter() or EntropyRouter() (routing_lottery.router)")
            context = self.router(self, x)
        inputs = () if x is None else as_tuple(x)
        if isinstance(context, (int, str)) or (isinstance(context, torch.Tensor) and context.dim() == 0):
            return self._run(self.masks.check_context(context), *inputs, **kwargs)
        _check_rows(inputs)
        context = self.context_ids(context, inputs[0].shape[0])
        present = torch.unique(context).tolist()
        for k in present:
            self.masks.check_context(k)
        if len(present) <= 1:  # one context, or no rows: an empty output of the model's own shape
            return self._run(present[0] if present else 0, *inputs)
        try:
            return self._mixed(inputs, context, present)
        except (RuntimeError, ValueError, AssertionError, IndexError) as err:
            # vmap reports a wrong input shape as an error about batch dimensions it made up itself:
            # find the layer that cannot take the input, running one group the plain way. Not in
            # training mode: that run would move BatchNorm statistics (and training never vmaps).
            if not self.training:
                self._diagnose(inputs, context, present[0], err)
            raise

    def _mixed(self, inputs: tuple[torch.Tensor, ...], context: torch.Tensor, present: list[int]) -> torch.Tensor:
        """A batch of several contexts, by the path ``mixed_path`` chooses."""
        counts = torch.bincount(context.cpu(), minlength=self.num_contexts)
        if self._may_vmap(inputs, counts):
            x = inputs[0]
            on_device = (context.to(x.device), counts.to(x.device))
            if self._choose_path(x, *on_device, present) == "vmap":
                try:
                    return self._vmapped(x, *on_device)
                except RuntimeError as err:
                    if not lacks_batching_rule(err):
                        raise
                    # An op without a vmap batching rule (recurrent layers, some custom kernels): run the
                    # groups one by one from now on.
                    self._vmappable = False
        return self._looped(inputs, context, present)

    def _may_vmap(self, inputs: tuple[torch.Tensor, ...], counts: torch.Tensor) -> bool:
        """Whether the vmapped path may run this batch at all (``mixed_path`` aside from ``"loop"``)."""
        largest = int(counts.max())
        return (self.mixed_path != "loop" and self._vmappable and len(inputs) == 1 and not self.training
                and largest < self.vmap_below and self.num_contexts * largest <= 2 * inputs[0].shape[0])

    def _choose_path(self, x: torch.Tensor, context: torch.Tensor, counts: torch.Tensor, present: list[int]) -> str:
        """``"vmap"`` or ``"loop"`` for this batch: forced, or measured once per bucket under ``"auto"``."""
        if self.mixed_path == "vmap":
            return "vmap"
        key = (tuple(d.bit_length() for d in x.shape), int(counts.max()).bit_length(), len(present), x.dtype,
               x.device, torch.get_num_threads(), torch.is_grad_enabled())
        decision = self._path_decisions.get(key)
        if decision is None:
            decision = self._measure_paths(x, context, counts, present)
            self._path_decisions[key] = decision
        return decision.path

    def _measure_paths(self, x: torch.Tensor, context: torch.Tensor, counts: torch.Tensor,
                       present: list[int]) -> PathDecision:
        """Time the loop against the vmapped path on this very batch (``timing.compare``): one
        untimed call of each, then :data:`PATH_REPEATS` single calls of each, interleaved. Single
        calls keep the one-time cost at 16 forwards; a batch too small to time well ends in a
        tie or in noise, and the rule then keeps the exact loop."""
        try:
            verdict = timing.compare(lambda: self._looped((x,), context, present),
                                     lambda: self._vmapped(x, context, counts),
                                     margin=PATH_MARGIN, repeats=PATH_REPEATS, timer=self.timer,
                                     sync=timing.device_sync(x.device), warmup=1, min_sample_seconds=0.0)
        except RuntimeError as err:
            if not lacks_batching_rule(err):
                raise
            self._vmappable = False
            return PathDecision("loop", None)
        return PathDecision("vmap" if verdict.faster else "loop", verdict)

    def _looped(self, inputs: tuple[torch.Tensor, ...], context: torch.Tensor, present: list[int]) -> torch.Tensor:
        """Each context's rows through its subnetwork in turn: bit for bit the per-context forwards."""
        out: torch.Tensor | None = None
        for k in present:
            rows = (context == k).nonzero(as_tuple=True)[0].to(inputs[0].device)
            y = self._run(k, *(t[rows] for t in inputs))
            if out is None:
                out = y.new_empty((inputs[0].shape[0], *y.shape[1:]))
            out[rows] = y
        assert out is not None
        return out

    def _diagnose(self, inputs: tuple[torch.Tensor, ...], context: torch.Tensor, k: int, err: Exception) -> None:
        """After ``err`` in a mixed batch: a ValueError naming the first layer that cannot take its
        input (for layers whose expectations are known: Linear, convolutions, attention, norms),
        else the model's own error on context ``k``'s rows run the plain way; returns when those
        rows run, i.e. the inputs are not the problem."""
        found: list[str] = []

        def check(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                problem = _shape_problem(module, args)
                if problem is not None:
                    found.append(f"layer {name!r} ({type(module).__name__}) {problem}")
                    raise _Misfit
            return hook

        handles = [m.register_forward_pre_hook(check(n)) for n, m in self.model.named_modules()]
        rows = (context == k).nonzero(as_tuple=True)[0].to(inputs[0].device)
        try:
            with torch.no_grad():
                self._run(k, *(t[rows] for t in inputs))
        except _Misfit:
            shapes = " and ".join(str(tuple(t.shape)) for t in inputs)
            raise ValueError(f"inputs of shape {shapes} do not fit the model: on the rows of context {k}, "
                             f"{found[0]}") from err
        finally:
            for h in handles:
                h.remove()

    def _vmapped(self, x: torch.Tensor, context: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All contexts at once: inputs padded to (K, B, ...), K masked weight sets, one vmapped forward."""
        order = torch.argsort(context, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(context), device=x.device) - torch.repeat_interleave(starts, counts)
        ctx = context[order]
        padded = x.new_zeros((self.num_contexts, int(counts.max()), *x.shape[1:]))
        padded[ctx, slot] = x[order]
        cacheable = self._cacheable()  # checked once per call: it walks every parameter
        weights = self._materialized() if cacheable else self.masked_weights()
        model = self._batched_model() if cacheable else self.model

        def run(w: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
            return functional_call(model, w, (rows,), strict=False)

        with _vmappable_attention():
            y = vmap(run)(weights, padded)
        out = y.new_empty((x.shape[0], *y.shape[2:]))
        out[order] = y[ctx, slot]
        return out
