"""Serve a causal LM with one mask per domain: rows of one batch use different masks, one copy of W.

``RoutedModel`` (``routed.py``) materializes K masked copies of a small model; for a pretrained LM
that is K copies of hundreds of megabytes. Here every masked ``nn.Linear`` of the model is swapped
for a ``RoutedLinear`` that holds the *same* weight and bias parameters (no copy, the same
state-dict keys) and the domains' masks as bits, and computes each row's output with its own
domain's mask. ``MaskedCausalLM`` sets, per call, which rows belong to which domain (a routing
plan every ``RoutedLinear`` reads), so ``forward`` and ``generate`` (with its KV cache) of the
wrapped ``transformers`` model run unchanged.

Two designs compute ``x @ (W ⊙ m_k)^T`` for the rows of domain k:

- ``"grouped"``: for each domain present, ``W ⊙ m_k`` is built on the fly from K bit-packed masks
  and applied to that domain's rows only. Same arithmetic as running the domain alone, so the
  logits are bit-equal to per-domain forwards. State: K bits per masked weight.
- ``"split"``: the masks overlap heavily, so ``W ⊙ m_k = W ⊙ ∩m + W ⊙ (m_k \\ ∩m)``: one dense
  product with the intersection weight for all rows, plus a sparse (CSR) remainder per domain on
  its rows only, whose values are gathered from the shared W per call (only the positions are
  stored, int32). Sums in another order, so equal within ``SPLIT_TOLERANCE``.

``benchmarks/bench_lm_serving.py`` measures both; ``DEFAULT_DESIGN`` is what it found faster.
"""

from __future__ import annotations

import contextlib
from functools import partial
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..masks import MaskSet

DESIGNS: tuple[str, ...] = ("grouped", "split")
"""How a ``RoutedLinear`` applies K masks to one weight (see the module docstring)."""

DEFAULT_DESIGN = "grouped"
"""Chosen by ``benchmarks/bench_lm_serving.py``: on CPU, mixed batch of 4 domains at 50 % sparsity,
grouping costs little over the dense forward while the split's sparse remainder products cost
more than the matmul FLOPs they save (sparse CPU kernels run far below dense throughput)."""

SPLIT_TOLERANCE: dict[str, float] = {"rtol": 1e-4, "atol": 1e-5}
"""How far the ``"split"`` design's float32 logits may be from per-domain forwards
(``torch.testing.assert_close``): the intersection and the remainder are summed separately, so
only the summation order differs. The ``"grouped"`` design has no tolerance: it is bit-equal."""

Domains = int | str | Sequence[int | str] | torch.Tensor
"""One domain for every row (an index or a name), or one per row (a sequence or a 1-D tensor)."""

_BITS = (torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1
"""Byte -> its 8 bits, most significant first (``np.packbits``'s order, so masks pack once with
NumPy). Unpacking by one table lookup measured about twice as fast as shifting and masking."""

_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


# -- bits ------------------------------------------------------------------------------------------
def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor (K, *shape) as (K, ceil(numel/8)) uint8; a 1-D bool tensor as its bytes."""
    rows = mask.detach().cpu().numpy().reshape(mask.shape[0], -1) if mask.dim() > 1 else mask.numpy()[None]
    packed = torch.from_numpy(np.packbits(rows, axis=1))
    return packed if mask.dim() > 1 else packed[0]


def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _TABLES:
        _TABLES[key] = _BITS.to(device=device, dtype=dtype)
    return _TABLES[key]


def _unpack(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """0/1 tensor of ``shape`` and ``dtype`` from one packed row: ``W * _unpack(..., W.dtype)`` is ``W ⊙ m``."""
    bits = _table(dtype, packed.device).index_select(0, packed.int())
    return bits.reshape(-1)[: shape.numel()].reshape(shape)


def _masked_into(weight: torch.Tensor, packed: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """``weight ⊙ m`` written into the wrapper's scratch buffers: no allocation per call.

    A fresh tensor the size of a weight for every layer and domain costs the allocator's page faults
    (on CPU, more than unpacking and multiplying; the end-to-end effect is in ``bench_lm_serving.py``);
    the result is a view of the scratch, valid until the next layer asks for one. Not for autograd: the product
    saved for backward would be overwritten.
    """
    index = scratch.get(packed.numel(), torch.int32, packed.device)
    index.copy_(packed)
    bits = scratch.get(packed.numel() * 8, weight.dtype, weight.device)
    torch.index_select(_table(weight.dtype, weight.device), 0, index, out=bits.view(-1, 8))
    return bits[: weight.numel()].view(weight.shape).mul_(weight)


class _Scratch:
    """Flat buffers reused by every routed layer of one wrapper, one per (dtype, device), grown as needed.

    Layers run one after another, so one buffer the size of the largest masked weight serves them
    all: a few megabytes, against the hundreds a per-layer copy would hold."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


# -- the routing plan: which rows belong to which domain ------------------------------------------
@dataclass(frozen=True)
class RoutingPlan:
    """The domain of each row of the current batch, grouped once per call (not once per layer)."""

    domains: torch.Tensor  # (B,) int64
    groups: tuple[tuple[int, torch.Tensor], ...]  # (domain, row indices), domains ascending
    spans: tuple[tuple[int, int, int], ...] | None  # (domain, start, stop) when rows are sorted by domain
    _expanded: dict[int, RoutingPlan] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, domains: torch.Tensor) -> RoutingPlan:
        present = torch.unique(domains).tolist()
        groups = tuple((int(k), torch.nonzero(domains == k).flatten()) for k in present)
        contiguous = all(int(rows[-1] - rows[0]) + 1 == rows.numel() for _, rows in groups)
        spans = tuple((k, int(rows[0]), int(rows[-1]) + 1) for k, rows in groups) if contiguous else None
        return cls(domains, groups, spans)

    def for_rows(self, rows: int) -> RoutingPlan:
        """The plan for an input with ``rows`` leading rows.

        ``generate`` with ``num_beams`` (or ``num_return_sequences``) repeats each row r times in
        place (``repeat_interleave``), and a model that flattens (batch, time) puts each row's
        tokens together: both map row i to rows i*r .. i*r+r-1, so the domains repeat the same way.
        """
        batch = self.domains.numel()
        if rows == batch:
            return self
        if rows % batch:
            raise ValueError(
                f"a routed layer got an input with {rows} rows but the batch has {batch} rows with a domain each; "
                f"expected a multiple of {batch}"
            )
        repeat = rows // batch
        if repeat not in self._expanded:
            self._expanded[repeat] = RoutingPlan.of(self.domains.repeat_interleave(repeat))
        return self._expanded[repeat]


class _Route:
    """The plan of the call in progress, shared by every ``RoutedLinear`` of one wrapper."""

    def __init__(self) -> None:
        self.plan: RoutingPlan | None = None
        self.scratch = _Scratch()

    def current(self) -> RoutingPlan:
        if self.plan is None:
            raise RuntimeError(
                "a RoutedLinear was called outside MaskedCausalLM.forward/generate: it needs each row's domain; "
                "call the wrapper, or MaskedCausalLM.unwrap() to get the dense model back"
            )
        return self.plan


# -- one masked Linear, K masks --------------------------------------------------------------------
class RoutedLinear(nn.Module):
    """An ``nn.Linear`` whose rows of input use their own domain's mask over the one shared weight.

    ``weight`` and ``bias`` are the original module's parameters (the same objects: no copy, and
    the model's state-dict keys do not change). Masks are non-persistent buffers, so
    ``save_pretrained`` of the wrapped model writes exactly the dense model's files.
    """

    def __init__(self, linear: nn.Linear, masks: torch.Tensor, design: str, route: _Route) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.design = design
        self.num_domains = masks.shape[0]
        self._route = route
        if design == "grouped":
            self.register_buffer("packed", _pack(masks), persistent=False)
        else:
            self._build_split(masks)

    def _build_split(self, masks: torch.Tensor) -> None:
        """Intersection as bits; each domain's remainder as CSR positions into the flat weight."""
        shared = masks.all(dim=0)
        self.register_buffer("shared_packed", _pack(shared.reshape(-1)), persistent=False)
        remainder = masks & ~shared  # (K, out, in)
        per_row = remainder.sum(dim=2)  # (K, out): CSR row lengths
        crow = torch.zeros(self.num_domains, self.out_features + 1, dtype=torch.int32)
        crow[:, 1:] = per_row.cumsum(dim=1)
        # Row-major nonzero positions are already in CSR order; int32 halves their size.
        flat = torch.nonzero(remainder.reshape(self.num_domains, -1))  # (nnz, 2): domain, position
        self.register_buffer("remainder_crow", crow, persistent=False)
        self.register_buffer("remainder_flat", flat[:, 1].to(torch.int32), persistent=False)
        offsets = torch.zeros(self.num_domains + 1, dtype=torch.int64)
        offsets[1:] = per_row.sum(dim=1).cumsum(0)
        self.register_buffer("remainder_offsets", offsets, persistent=False)

    # -- the masks back, for export and checks --------------------------------------------------
    def mask(self, k: int) -> torch.Tensor:
        """Domain k's bool mask over ``weight``."""
        if self.design == "grouped":
            return _unpack(self.packed[k], self.weight.shape).bool()
        mask = _unpack(self.shared_packed, self.weight.shape).bool()
        mask.view(-1)[self._remainder_positions(k).long()] = True
        return mask

    def _remainder_positions(self, k: int) -> torch.Tensor:
        return self.remainder_flat[self.remainder_offsets[k] : self.remainder_offsets[k + 1]]

    def masked_weight(self, k: int, reuse: bool = False) -> torch.Tensor:
        """``W ⊙ m_k``, built per call and never kept, so K copies never exist.

        ``reuse``: written into the wrapper's scratch buffer (a view valid until the next routed
        layer runs); only where no gradient is recorded."""
        if reuse:
            return _masked_into(self.weight, self.packed[k], self._route.scratch)
        return self.weight * _unpack(self.packed[k], self.weight.shape, self.weight.dtype)

    def _remainder(self, k: int) -> torch.Tensor | None:
        """``W ⊙ (m_k \\ ∩m)`` as a CSR matrix holding values gathered from the shared W now."""
        positions = self._remainder_positions(k)
        if positions.numel() == 0:
            return None
        values = self.weight.reshape(-1)[positions]
        columns = positions % self.in_features
        return torch.sparse_csr_tensor(self.remainder_crow[k], columns, values, self.weight.shape,
                                       check_invariants=False)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._route.current().for_rows(x.shape[0])
        if self.design == "grouped":
            return self._grouped(x, plan)
        return self._split(x, plan)

    def _records_grad(self, x: torch.Tensor) -> bool:
        """Whether this call records a graph (a loss to train or probe with): then the masked weight
        must be a tensor of its own (not the scratch) and ``matmul(out=...)`` cannot be used."""
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)

    def _grouped(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        tracked = self._records_grad(x)
        reuse = not tracked
        if len(plan.groups) == 1:  # one domain in the batch: no gather or scatter
            return F.linear(x, self.masked_weight(plan.groups[0][0], reuse), self.bias)
        out = x.new_empty((*x.shape[:-1], self.out_features))
        if plan.spans is not None:  # rows sorted by domain: slices are views, no gather
            for k, start, stop in plan.spans:
                if self.bias is None and not tracked:  # written in place: no copy of the group's output
                    torch.matmul(x[start:stop], self.masked_weight(k, reuse).t(), out=out[start:stop])
                else:
                    out[start:stop] = F.linear(x[start:stop], self.masked_weight(k, reuse), self.bias)
            return out
        for k, rows in plan.groups:
            out.index_copy_(0, rows, F.linear(x.index_select(0, rows), self.masked_weight(k, reuse), self.bias))
        return out

    def _split(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        if self._records_grad(x):
            shared = self.weight * _unpack(self.shared_packed, self.weight.shape, self.weight.dtype)
        else:
            shared = _masked_into(self.weight, self.shared_packed, self._route.scratch)
        out = F.linear(x, shared, self.bias)
        del shared
        for k, rows in plan.groups:
            remainder = self._remainder(k)
            if remainder is None:
                continue
            part = x if len(plan.groups) == 1 else x.index_select(0, rows)
            flat = part.reshape(-1, self.in_features)
            extra = torch.sparse.mm(remainder, flat.T).T.reshape(*part.shape[:-1], self.out_features)
            if len(plan.groups) == 1:
                out += extra
            else:
                out.index_add_(0, rows, extra)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, domains={self.num_domains}, design={self.design!r}")


# -- checking what the masks name --------------------------------------------------------------
def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by tensor identity, with every alias (a tied lm_head shares the embedding)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def masked_linears(model: nn.Module, masks: MaskSet) -> dict[str, nn.Linear]:
    """Module name -> the ``nn.Linear`` whose weight each mask tensor names; a clear error otherwise.

    Refused: a name that is not a parameter, a parameter that is not the ``weight`` of an
    ``nn.Linear`` (embeddings, norms, biases), a mask of another shape, and a tied weight (a tied
    lm_head is the embedding too: masking it would mask the input side as well, so it stays dense).
    """
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a routing_lottery.masks.MaskSet; got {type(masks).__name__}")
    modules = dict(model.named_modules())
    aliases = _tied_names(model)
    linears = {}
    for name, shape in masks.shapes.items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight" or not isinstance(module, nn.Linear):
            kind = "no such parameter" if module is None or not hasattr(module, leaf) else type(module).__name__
            raise ValueError(
                f"mask tensor {name!r} is not the weight of an nn.Linear of the model ({kind}); "
                f"masks may name only Linear weights such as 'model.layers.0.self_attn.q_proj.weight'"
            )
        if tuple(module.weight.shape) != shape:
            raise ValueError(f"mask for {name!r} has shape {shape} but the weight has shape {tuple(module.weight.shape)}")
        tied = aliases[id(module.weight)]
        if len(tied) > 1:
            raise ValueError(f"mask tensor {name!r} is tied to {[t for t in tied if t != name]}: tied weights stay dense")
        linears[owner] = module
    return linears


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# -- the wrapper ---------------------------------------------------------------------------------
class MaskedCausalLM(nn.Module):
    """A causal LM whose batch rows each run under their own domain's mask, over one copy of the weights.

    Wrapping swaps the model's masked ``nn.Linear`` modules for ``RoutedLinear`` in place (like
    peft's ``get_peft_model``); ``unwrap()`` puts the originals back. Memory: the dense weights
    once plus K bits per masked weight (``"grouped"``), or one bit plus the remainders' int32
    positions (``"split"``); per call, at most one masked weight per layer at a time.

    Parameters
    ----------
    model: a ``transformers`` causal LM (anything whose ``forward``/``generate`` take
        ``input_ids`` and ``attention_mask`` works).
    masks: one bool mask per domain over some of the model's Linear weights, named by parameter
        name (``model.layers.0.mlp.up_proj.weight``); its context names are the domain names.
    design: ``"grouped"`` or ``"split"`` (module docstring); ``DEFAULT_DESIGN`` when omitted.

    Example
    -------
    >>> routed = MaskedCausalLM(model, masks)                      # doctest: +SKIP
    >>> logits = routed(input_ids, domains=["code", "mail"]).logits  # doctest: +SKIP
    >>> tokens = routed.generate(input_ids, domains="code", max_new_tokens=8)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, masks: MaskSet, design: str = DEFAULT_DESIGN) -> None:
        super().__init__()
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}; got {design!r}")
        linears = masked_linears(model, masks)
        self.model = model
        self.design = design
        self.domain_names: list[str] = list(masks.context_names)
        self._route = _Route()
        self._originals: dict[str, nn.Linear] = {}
        for name, linear in linears.items():
            _replace(model, name, RoutedLinear(linear, masks.stacked[f"{name}.weight"], design, self._route))
            self._originals[name] = linear
        # Only the names are kept (for MaskSet.check_context's errors): holding the MaskSet would
        # keep K bytes per masked weight alive, eight times the bits the layers hold.
        self._domains = MaskSet({"_": torch.zeros(len(self.domain_names), 1, dtype=torch.bool)}, self.domain_names)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    @property
    def num_contexts(self) -> int:
        """``num_domains`` under the name the core's routers check (``router.LearnedRouter.__call__``)."""
        return self.num_domains

    def routed_linears(self) -> dict[str, RoutedLinear]:
        """Module name -> its ``RoutedLinear``, in model order."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, RoutedLinear)}

    def domain_index(self, domain: int | str) -> int:
        """The index of ``domain`` (an index or a name); ``ValueError`` naming the domains otherwise."""
        return self._domains.check_context(domain)

    def domain_mask(self, domain: int | str) -> dict[str, torch.Tensor]:
        """One domain's mask as ``{parameter name: bool tensor}``, rebuilt from the bits held."""
        k = self.domain_index(domain)
        return {f"{n}.weight": m.mask(k) for n, m in self.routed_linears().items()}

    def domain_ids(self, domains: Domains, rows: int) -> torch.Tensor:
        """(rows,) int64 domain indices; names and ids are checked (an unknown name names the domains)."""
        if isinstance(domains, (str, int, np.integer)) and not isinstance(domains, bool):
            return torch.full((rows,), self._domains.check_context(domains), dtype=torch.int64)
        if isinstance(domains, torch.Tensor):
            if domains.dim() == 0:
                return self.domain_ids(int(domains), rows)
            if domains.dim() != 1 or domains.is_floating_point():
                raise ValueError(f"domains as a tensor must be 1-D integer; got {domains.dtype} of shape {tuple(domains.shape)}")
            domains = domains.tolist()
        if not isinstance(domains, Sequence) or isinstance(domains, bytes):
            raise TypeError(f"domains must be a domain (index or name) or one per row; got {type(domains).__name__}")
        if len(domains) != rows:
            raise ValueError(f"got {len(domains)} domains for a batch of {rows} rows; give one per row or one for all")
        return torch.tensor([self._domains.check_context(d) for d in domains], dtype=torch.int64)

    @contextlib.contextmanager
    def routing(self, domains: Domains, rows: int) -> Iterator[RoutingPlan]:
        """Within the block, every routed layer sends row i through the mask of ``domains[i]``."""
        with self._planned(RoutingPlan.of(self.domain_ids(domains, rows))) as plan:
            yield plan

    @contextlib.contextmanager
    def _planned(self, plan: RoutingPlan) -> Iterator[RoutingPlan]:
        if self._route.plan is not None:
            raise RuntimeError("MaskedCausalLM calls do not nest: a routing plan is already active")
        self._route.plan = plan
        try:
            yield plan
        finally:
            self._route.plan = None

    def forward(self, input_ids: torch.Tensor, domains: Domains, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The wrapped model's output (``.logits``) with row i computed under ``domains[i]``'s mask.

        A scoring call (no ``past_key_values`` given, ``use_cache`` not ``True``) runs its rows
        sorted by domain, so every routed layer slices its input instead of gathering rows (measured
        in ``bench_lm_serving.py``), and returns no cache; the outputs come back in the caller's order
        (for a model returning a dict, the rows go back at the output head's input, so the logits are
        never copied to reorder them, and ``labels`` meet the logits in the caller's order).
        """
        input_ids = _check_ids(input_ids)
        rows = input_ids.shape[0]
        ids = self.domain_ids(domains, rows)
        order = self._sorting(ids, "past_key_values" not in kwargs and kwargs.get("use_cache") is not True)
        if order is None:
            with self._planned(RoutingPlan.of(ids)):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        back = torch.argsort(order)
        head = self._head_to_reorder(kwargs.get("return_dict"))
        # With the head reordering its input, the logits come out in the caller's order, so labels
        # (for a loss computed inside the model) stay in the caller's order too.
        kept = {"labels": kwargs.pop("labels")} if head is not None and "labels" in kwargs else {}
        inputs = _take_rows(dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, use_cache=False), order, rows)
        with self._planned(RoutingPlan.of(ids[order])):
            if head is None:
                return _take_rows(self.model(**inputs, **kept), back, rows)
            handle = head.register_forward_pre_hook(partial(self._in_callers_order, back=back, plan=RoutingPlan.of(ids)))
            try:
                out = self.model(**inputs, **kept)
            finally:
                handle.remove()
        if not isinstance(out, Mapping) or "logits" not in out:
            raise RuntimeError(f"{type(self.model).__name__} returned no dict with a 'logits' entry although its "
                               "return_dict is set: its outputs cannot be put back in the caller's order")
        return _take_rows(out, back, rows, keep=("logits",))

    def _head_to_reorder(self, return_dict: bool | None) -> nn.Module | None:
        """The output head, when the rows can go back to the caller's order at its input.

        The head's output (the logits, batch x tokens x vocabulary) is by far the largest tensor of
        a scoring call: reordering it afterwards holds two copies at once (measured on SmolLM2-135M:
        403 MB more at the peak for 8 x 256 tokens); its input is a few MB. Only for a model that
        returns a dict (a ``transformers`` model), where the logits can be told from the rest.
        """
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        returns_dict = return_dict if return_dict is not None else getattr(getattr(self.model, "config", None), "return_dict", False)
        return head if isinstance(head, nn.Module) and returns_dict is True else None

    def _in_callers_order(self, module: nn.Module, args: tuple[Any, ...], back: torch.Tensor,
                          plan: RoutingPlan) -> tuple[Any, ...]:
        """Forward pre-hook of the head: its input's rows (or blocks of rows) back in the caller's order."""
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        rows = back.numel()
        if hidden is None or hidden.dim() == 0 or hidden.shape[0] % rows:
            raise RuntimeError(f"the output head of {type(self.model).__name__} got an input without the batch's "
                               f"{rows} rows leading; cannot put them back in the caller's order")
        repeat = hidden.shape[0] // rows  # a model that flattens (batch, time) keeps each row's tokens together
        index = _repeat_rows(back, repeat)
        self._route.plan = plan  # a routed (untied, masked) head sees the caller's rows
        return (hidden.index_select(0, index), *args[1:])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, domains: Domains, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        """``model.generate`` with each row decoded under its domain's mask (KV cache and all).

        The plan holds for every step; beam search and ``num_return_sequences`` repeat rows in place
        and the domains follow (``RoutingPlan.for_rows``). When the result is a tensor of token ids,
        rows run sorted by domain (as in ``forward``) and come back in the caller's order.
        """
        input_ids = _check_ids(input_ids)
        rows = input_ids.shape[0]
        ids = self.domain_ids(domains, rows)
        order = self._sorting(ids, not kwargs.get("return_dict_in_generate"))
        if order is None:
            with self._planned(RoutingPlan.of(ids)):
                return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inputs = _take_rows(dict(kwargs, input_ids=input_ids, attention_mask=attention_mask), order, rows)
        with self._planned(RoutingPlan.of(ids[order])):
            tokens = self.model.generate(**inputs)
        repeat = tokens.shape[0] // rows  # num_return_sequences / beams repeat each row in place
        return tokens[_repeat_rows(torch.argsort(order), repeat)]

    def _sorting(self, ids: torch.Tensor, allowed: bool) -> torch.Tensor | None:
        """A stable order of the rows by their domain ids, or ``None`` when they already are (or must not move)."""
        if not allowed or bool((ids[1:] >= ids[:-1]).all()):
            return None
        return torch.argsort(ids, stable=True)

    def unwrap(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back and return the dense model (the wrapper is spent)."""
        for name, linear in self._originals.items():
            _replace(self.model, name, linear)
        self._originals = {}
        return self.model

    def state_bytes(self) -> int:
        """Bytes of every parameter and buffer the wrapper holds (shared tensors counted once)."""
        seen: dict[int, int] = {}
        for t in [*self.parameters(), *self.buffers()]:
            seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())


def _repeat_rows(index: torch.Tensor, repeat: int) -> torch.Tensor:
    """``index`` over rows, for a tensor where each row is repeated ``repeat`` times in place (beams,
    ``num_return_sequences``, or a model that flattens each row's tokens together)."""
    return index if repeat == 1 else (index.unsqueeze(1) * repeat + torch.arange(repeat)).flatten()


def _take_rows(values: Any, order: torch.Tensor, rows: int, keep: tuple[str, ...] = ()) -> Any:
    """Every tensor with ``rows`` leading rows in ``values`` (a dict, a model output, tuples of
    tensors) reordered by ``order``; anything else (a scalar loss, ``None``) and a dict's ``keep``
    entries as they are."""
    if isinstance(values, torch.Tensor):
        return values.index_select(0, order) if values.dim() and values.shape[0] == rows else values
    if isinstance(values, tuple):
        return type(values)(_take_rows(v, order, rows) for v in values)
    if isinstance(values, dict):  # transformers' ModelOutput is an OrderedDict
        for key in list(values):
            if key not in keep:
                values[key] = _take_rows(values[key], order, rows)
        return values
    return values


def _check_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        found = f"a tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, tokens) tensor; got {found}")
    return input_ids


def dense_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied tensors once): the baseline of ``state_bytes``."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())

