"""Routing: run each input through the subnetwork of its context.

Masks are applied by passing masked weights to ``torch.func.functional_call`` -- no forward hooks,
no ``weight_orig``/``weight_mask`` state-dict keys -- so the wrapped module stays an ordinary
module with ordinary parameters, and the mask multiply is the only extra work in the hot path.
Because the effective weight is ``w * m``, gradients reaching ``w`` are already masked.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, vmap

from .masks import Mask, MaskSet

if TYPE_CHECKING:  # for annotations only: router.py imports this module at run time, so no import cycle
    from .router import Router

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
"""A model's inputs: one tensor, or several (token ids and a padding mask, say) passed as ``model(*x)``."""


def as_tuple(x: Inputs | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The input tensors of a batch as a tuple (a list is accepted too: torch's default collate turns a
    sample's tuple of inputs into one)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def lacks_batching_rule(err: RuntimeError) -> bool:
    """Whether ``err`` is vmap meeting an op it cannot batch (recurrent layers, some custom kernels),
    where running one item at a time still works -- unlike out-of-memory and other errors."""
    return "atching rule" in str(err)


def masked_forward(model: nn.Module, mask: Mapping[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``model(*inputs)`` with every masked tensor replaced by ``weight * mask``."""
    params = dict(model.named_parameters())
    return functional_call(model, {n: params[n] * m for n, m in mask.items()}, inputs, strict=False)


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


class RoutedModel(nn.Module):
    """One shared module plus K masks; ``forward(x, context)`` routes each row to its mask.

    A batch may mix contexts. In evaluation mode, when the context groups are small (fewer than
    ``vmap_below`` rows in the largest), they are padded to one size and all K subnetworks run as
    one ``torch.func.vmap`` call over the stacked masked weights -- one kernel per layer instead of
    K, which is what keeps routed inference near dense cost on small groups. Large groups, training
    mode (BatchNorm updates running statistics, which vmap cannot batch), or padding that would
    more than double the work run each group through its subnetwork in turn. The default
    crossover, 512 rows, is where the per-group loop caught up with vmap in
    ``benchmarks/bench_rtl.py`` on 2 CPU cores; outputs are the same either way, in input order.

    It starts in evaluation mode (and puts ``model`` in it): routing an input must not move the
    shared BatchNorm statistics. Call ``.train()`` to train through it.

    Without an oracle for the contexts, give it a ``router`` (``router.py``): ``routed(x)`` then
    asks the router for one context per row and routes as usual.

    Example
    -------
    >>> routed = RoutedModel(net, masks)                # masks: MaskSet with K tickets
    >>> logits = routed(images, torch.tensor([0, 3, 3, 1]))
    >>> routed.router = DetectorRouter()                # or LearnedRouter.fit(...), EntropyRouter()
    >>> logits = routed(images)                         # contexts chosen by the router
    """

    def __init__(self, model: nn.Module, masks: MaskSet, vmap_below: int = 512, router: Router | None = None,
                 materialize: bool = True) -> None:
        super().__init__()
        self.vmap_below = vmap_below
        self.router = router
        self.materialize = materialize
        self._vmappable = True
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

    def _run(self, k: int, *inputs: torch.Tensor) -> torch.Tensor:
        """Context ``k``'s subnetwork on ``inputs``: its materialized weights at inference, else ``w * m_k``."""
        if self._cacheable():
            weights = {n: w[k] for n, w in self._materialized().items()}
        else:
            params = dict(self.model.named_parameters())
            weights = {n: params[n] * m[k] for n, m in self.stacked_masks().items()}
        return functional_call(self.model, weights, inputs, strict=False)

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
            raise ValueError(f"context must be one id per input row: got shape {tuple(context.shape)} for {rows} rows")
        return context.long()

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...],
                context: torch.Tensor | Sequence[int | str] | int | str | None = None) -> torch.Tensor:
        """Outputs for ``x`` (a tensor, or a tuple of per-row tensors for multi-input models), each row
        through its context's subnetwork; ``context`` is one id or name for the batch, or one per row,
        or ``None`` to let ``self.router`` choose one per row."""
        if self.training != self.model.training:
            raise RuntimeError(f"the routed model is in {'training' if self.training else 'evaluation'} mode but the "
                               "shared model is not: call routed.train() or routed.eval(), not the model's")
        if context is None:
            if self.router is None:
                raise ValueError("no context given and no router set: pass one context per row, routed(x, context), "
                                 "or set a router that infers them, e.g. routed.router = LearnedRouter.fit(train_x, "
                                 "train_contexts, K), DetectorRouter() or EntropyRouter() (routing_lottery.router)")
            context = self.router(self, x)
        inputs = as_tuple(x)
        if isinstance(context, (int, str)) or (isinstance(context, torch.Tensor) and context.dim() == 0):
            return self._run(self.masks.check_context(context), *inputs)
        context = self.context_ids(context, inputs[0].shape[0])
        present = torch.unique(context).tolist()
        for k in present:
            self.masks.check_context(k)
        if len(present) == 1:
            return self._run(present[0], *inputs)
        counts = torch.bincount(context.cpu(), minlength=self.num_contexts)
        largest = int(counts.max())
        if (self._vmappable and len(inputs) == 1 and not self.training and largest < self.vmap_below
                and self.num_contexts * largest <= 2 * inputs[0].shape[0]):
            try:
                return self._vmapped(inputs[0], context.to(inputs[0].device), counts.to(inputs[0].device))
            except RuntimeError as err:
                if not lacks_batching_rule(err):
                    raise
                # An op without a vmap batching rule (recurrent layers, some custom kernels): run the
                # groups one by one from now on.
                self._vmappable = False
        out: torch.Tensor | None = None
        for k in present:
            rows = (context == k).nonzero(as_tuple=True)[0].to(inputs[0].device)
            y = self._run(k, *(t[rows] for t in inputs))
            if out is None:
                out = y.new_empty((inputs[0].shape[0], *y.shape[1:]))
            out[rows] = y
        assert out is not None
        return out

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
