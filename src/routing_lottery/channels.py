"""Channel tickets: masks that remove whole output channels, with every tensor that depends on them.

A weight ticket (the paper's) zeroes single weights; only sparse kernels can turn that into speed.
A channel ticket removes whole output channels, so one context's subnetwork can be *sliced* into a
smaller dense network that is faster on any hardware. Removing a channel touches more than its
filter: the bias and normalization entries of that channel, the matching input slices of every
layer that reads it, and every layer coupled to it by a residual addition, a concatenation or a
depthwise convolution. torch-pruning's dependency graph (``torch_pruning.DependencyGraph``, MIT)
finds these couplings by tracing the model once; this module turns each coupled *group* into the
positions it occupies in the model's parameters.

Masks stay what they are everywhere else: one bool tensor per masked parameter. A channel mask
is a weight mask that is constant over each channel's positions in all of its group's tensors,
so training, routing, storage and checkpoints need nothing new; this module answers the
channel-level questions (which channels a mask keeps, which to prune next, a random control with
the same counts per group) and slices a context's subnetwork (``slice_model``).

Exactness is checked, not assumed: ``ChannelStructure.trace`` slices a copy of the model with
half the channels of every group removed and compares its output with the masked model's. A
group for which they differ (an operation the graph does not model) is left dense, and so is
any group that
- reaches the model's output (its channels are the output: removing them changes its shape);
- holds a layer whose outputs mix channels by statistics over them (LayerNorm, GroupNorm with
  several channels per group), or a grouped (not depthwise) convolution, an embedding, a
  recurrent or an attention layer: masking a channel there is not the same as removing it.
``describe`` says which groups were left dense and why.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .masks import Mask, MaskSet
from .pruning import Scope

Inputs = Any  # a tensor or a tuple of tensors: the model's positional inputs


@dataclass(frozen=True)
class Slice:
    """The positions one group occupies along one dimension of one parameter."""

    tensor: str  # parameter name
    dim: int
    index: torch.Tensor  # long: positions along ``dim``
    channel: torch.Tensor  # long: the group channel of each position
    producer: bool  # a convolution or linear weight whose outputs are the channels (magnitudes rank them)


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are removed together, and every parameter slice they own."""

    name: str  # the root layer's weight
    channels: int
    slices: tuple[Slice, ...]

    @property
    def root(self) -> Slice:
        """The root layer's weight along its output dimension (position i is channel i)."""
        return self.slices[0]


class Unsupported(Exception):
    """A group this module cannot turn into masks that equal slicing (the reason is its message)."""


_NORM_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _module_slices(name: str, module: nn.Module, handler: Any, idxs: Sequence[int],
                   root_idxs: Sequence[int]) -> list[Slice]:
    """The parameter slices of one group item (``module`` pruned by ``handler`` at ``idxs``).

    Raises ``Unsupported`` for a module whose masked form would differ from its sliced form.
    """
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if not own:
        return []  # a parameter-free operation (addition, concatenation, activation, reshape)
    out = getattr(handler, "__name__", "") == "prune_out_channels"
    index = torch.as_tensor(list(idxs), dtype=torch.long)
    channel = torch.as_tensor(list(root_idxs), dtype=torch.long)

    def piece(param: str, dim: int, producer: bool = False) -> Slice:
        return Slice(f"{name}.{param}" if name else param, dim, index, channel, producer)

    def with_bias(slices: list[Slice]) -> list[Slice]:
        return slices + ([piece("bias", 0)] if getattr(module, "bias", None) is not None else [])

    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise Unsupported(f"{name} is a grouped convolution ({module.groups} groups)")
        if depthwise:  # input and output channels are the same channels
            return with_bias([piece("weight", 0, producer=True)])
        if out:
            return with_bias([piece("weight", 1 if module.transposed else 0, producer=True)])
        return [piece("weight", 0 if module.transposed else 1)]
    if isinstance(module, nn.Linear):
        return with_bias([piece("weight", 0, producer=True)]) if out else [piece("weight", 1)]
    if isinstance(module, _NORM_PER_CHANNEL):
        return with_bias([piece("weight", 0)]) if getattr(module, "weight", None) is not None else []
    if isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels:
        return with_bias([piece("weight", 0)]) if module.affine else []
    if isinstance(module, nn.PReLU):
        return [piece("weight", 0)] if module.num_parameters > 1 else []
    raise Unsupported(f"{name} ({type(module).__name__}) mixes or stores channels in a way masks cannot remove")


class ChannelStructure:
    """The channel groups of one model: what a channel ticket masks, counts and prunes.

    Built by ``trace`` (one forward pass on example inputs). Counts are in channels:
    ``total`` is the number of prunable channels and a sparsity level is the fraction of them
    removed. Every group keeps at least one channel, so no layer is ever emptied.
    """

    granularity = "channel"

    def __init__(self, groups: Sequence[ChannelGroup], shapes: Mapping[str, tuple[int, ...]],
                 skipped: Mapping[str, str] | None = None) -> None:
        if not groups:
            reasons = "; ".join(f"{n}: {why}" for n, why in (skipped or {}).items()) or "no layer to root a group"
            raise ValueError(f"no prunable channel group in this model ({reasons})")
        self.groups = list(groups)
        self.shapes = dict(shapes)
        self.skipped = dict(skipped or {})
        used = {s.tensor for g in self.groups for s in g.slices}
        self.names = [n for n in self.shapes if n in used]  # model parameter order
        self.total = sum(g.channels for g in self.groups)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def trace(cls, model: nn.Module, example_inputs: Inputs, roots: Sequence[str], verify: bool = True) -> ChannelStructure:
        """The channel groups rooted at the layers whose weights are ``roots``, on ``example_inputs``.

        ``roots`` are parameter names (``prunable_names``: the model's convolution and linear
        weights unless the recipe chooses); a layer whose output channels are coupled to an
        earlier root's joins that root's group. The model itself is not touched (the trace runs
        on a copy in evaluation mode).
        """
        traced = copy.deepcopy(model).eval()
        graph = _dependency_graph(traced, example_inputs)
        module_names = {m: n for n, m in traced.named_modules()}
        modules = dict(traced.named_modules())
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        groups: list[ChannelGroup] = []
        skipped: dict[str, str] = {}
        covered: set[nn.Module] = set()
        for root in roots:
            module_name, _, leaf = root.rpartition(".")
            module = modules.get(module_name)
            if leaf != "weight" or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                skipped[root] = "only convolution and linear weights root channel groups"
                continue
            if module in covered:
                continue  # its channels are pruned with an earlier root's group
            if module not in graph.module2node:
                skipped[root] = "not called as a layer in the forward pass on the example inputs (used through its parent?)"
                continue
            if _reaches_output(graph.module2node[module]):
                # Checked before asking for the group: torch-pruning's walk from a layer feeding the
                # output through reshapes (an inverse STFT, say) can take minutes.
                skipped[root] = "its channels reach the model's output"
                continue
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(module))))
            try:
                producers, consumed = [], False
                for item in group:
                    target = item.dep.target.module
                    if isinstance(target, nn.Parameter) or not isinstance(target, nn.Module):
                        raise Unsupported("it is coupled to a bare parameter")
                    if type(target).__name__ == "_OutputOp":
                        raise Unsupported("its channels reach the model's output")
                    found = _module_slices(module_names.get(target, ""), target, item.dep.handler, item.idxs, item.idxs)
                    # A layer that reads the channels (a depthwise convolution only passes them on).
                    consumed |= isinstance(target, (nn.Linear, nn.modules.conv._ConvNd)) and not any(
                        s.producer for s in found)
                    if any(s.producer for s in found):
                        producers.append(target)
                if not consumed:
                    raise Unsupported("no layer reads its channels: they are the model's output")
                slices, units = _unit_slices(graph, module, pruner, module_names)
                for sl in slices:
                    if sl.dim >= len(shapes[sl.tensor]) or int(sl.index.max()) >= shapes[sl.tensor][sl.dim]:
                        raise Unsupported(f"the graph maps its channels past the size of {sl.tensor} "
                                          "(a concatenation torch-pruning cannot follow?)")
            except Unsupported as why:
                skipped[root] = str(why)
                continue
            covered.update(producers)
            groups.append(ChannelGroup(root, units, tuple(slices)))
        structure = cls(groups, shapes, skipped)
        if verify:
            structure = structure._exact(model, example_inputs)
        return structure

    def _exact(self, model: nn.Module, example_inputs: Inputs) -> ChannelStructure:
        """This structure without the groups whose removal changes the outputs (checked by slicing)."""
        keep = self._half(torch.Generator().manual_seed(0))
        if _matches(model, self, keep, example_inputs):
            return self
        good, skipped = [], dict(self.skipped)
        for group in self.groups:
            alone = ChannelStructure([group], self.shapes)
            if _matches(model, alone, {group.name: keep[group.name]}, example_inputs):
                good.append(group)
            else:
                skipped[group.name] = "removing its channels changes the outputs (an operation the graph does not model)"
        checked = ChannelStructure(good, self.shapes, skipped)
        if not _matches(model, checked, {g.name: keep[g.name] for g in good}, example_inputs):
            raise ValueError("channel tickets: the groups are exact one by one but not together; "
                             "use pruning.granularity: weight for this model")
        return checked

    def _half(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Every group with a random half of its channels removed (at least one kept)."""
        keep = {}
        for g in self.groups:
            k = torch.zeros(g.channels, dtype=torch.bool)
            k[torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 2)]] = True
            keep[g.name] = k
        return keep

    # -- masks <-> channels ------------------------------------------------------------------
    def ones(self) -> Mask:
        """The mask that keeps every channel (over every tensor a group touches)."""
        return {n: torch.ones(self.shapes[n], dtype=torch.bool) for n in self.names}

    def expand(self, keep: Mapping[str, torch.Tensor]) -> Mask:
        """The weight-level mask of per-group channel masks ``keep`` (group name -> bool of its channels)."""
        mask = self.ones()
        for g in self.groups:
            kept = keep[g.name]
            if kept.shape != (g.channels,) or kept.dtype != torch.bool:
                raise ValueError(f"channel mask of {g.name!r} must be a bool tensor of {g.channels} channels")
            for s in g.slices:
                dropped = s.index[~kept.cpu()[s.channel]]
                mask[s.tensor].index_fill_(s.dim, dropped, False)
        return mask

    def channels(self, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group name -> which of its channels ``mask`` keeps (read from the root layer's filters)."""
        out = {}
        for g in self.groups:
            s = g.root
            rows = mask[s.tensor].detach().cpu().movedim(s.dim, 0).index_select(0, s.index)
            kept = torch.zeros(g.channels, dtype=torch.bool)
            kept[s.channel] = rows.reshape(len(s.index), -1).any(dim=1)
            out[g.name] = kept
        return out

    def count(self, mask: Mapping[str, torch.Tensor]) -> int:
        """Channels kept."""
        return int(sum(int(k.sum()) for k in self.channels(mask).values()))

    def scores(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per group, each channel's root-mean-square filter magnitude over its producing layers.

        The mean (not the sum) makes channels of layers with different fan-in comparable when
        ``scope`` is global; a residual group's channel is scored over all its coupled filters.
        """
        out = {}
        for g in self.groups:
            total = torch.zeros(g.channels, dtype=torch.float64)
            numel = torch.zeros(g.channels, dtype=torch.float64)
            for s in g.slices:
                if not s.producer:
                    continue
                w = weights[s.tensor].detach().cpu().double().movedim(s.dim, 0).index_select(0, s.index)
                w = w.reshape(len(s.index), -1)
                total.index_add_(0, s.channel, w.square().sum(dim=1))
                numel.index_add_(0, s.channel, torch.full((len(s.index),), float(w.shape[1]), dtype=torch.float64))
            out[g.name] = (total / numel.clamp(min=1)).sqrt()
        return out

    # -- pruning -----------------------------------------------------------------------------
    def prune(self, weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], num_to_prune: int,
              scope: Scope = "global") -> Mask:
        """Remove the ``num_to_prune`` surviving channels of lowest filter magnitude; the new mask is nested.

        ``global`` ranks every group's channels together; ``layerwise`` removes the same fraction
        of each group's survivors. Each group keeps its strongest channel. Ties break by group
        order, then channel index.
        """
        if scope not in ("global", "layerwise"):
            raise ValueError(f"scope must be 'global' or 'layerwise'; got {scope!r}")
        keep = self.channels(mask)
        removable = {n: int(k.sum()) - 1 for n, k in keep.items()}
        if not 0 <= num_to_prune <= sum(removable.values()):
            raise ValueError(f"cannot prune {num_to_prune} channels: {sum(removable.values())} can go "
                             f"(each of the {len(self.groups)} groups keeps one)")
        diverged = [n for n, w in weights.items() if n in self.names and not torch.isfinite(w.detach()).all()]
        if diverged:
            raise ValueError(f"weights of {diverged} are not finite (training diverged?); lower the learning rate")
        scores = self.scores(weights)
        # Each group's strongest survivor is never a candidate (a group always keeps a channel).
        ranked = {}
        for n, k in keep.items():
            s = torch.where(k, scores[n], torch.tensor(math.inf, dtype=torch.float64))
            best = int(torch.argmin(torch.where(k, -scores[n], torch.tensor(math.inf, dtype=torch.float64))))
            s[best] = math.inf
            ranked[n] = s
        if scope == "layerwise":
            shares = _shares(removable, num_to_prune)
            for n, share in shares.items():
                keep[n][torch.argsort(ranked[n], stable=True)[:share]] = False
        else:
            flat = torch.cat([ranked[g.name] for g in self.groups])
            owner = torch.cat([torch.full((g.channels,), i) for i, g in enumerate(self.groups)])
            offsets = torch.cumsum(torch.tensor([0] + [g.channels for g in self.groups]), 0)
            for j in torch.argsort(flat, stable=True)[:num_to_prune].tolist():
                i = int(owner[j])
                keep[self.groups[i].name][j - int(offsets[i])] = False
        return self.expand(keep)

    def random_like(self, mask: Mapping[str, torch.Tensor], generator: torch.Generator) -> Mask:
        """Random channels with ``mask``'s count in every group (the random-ticket control)."""
        keep = {}
        for g, kept in zip(self.groups, self.channels(mask).values()):
            k = torch.zeros(g.channels, dtype=torch.bool)
            k[torch.randperm(g.channels, generator=generator)[: int(kept.sum())]] = True
            keep[g.name] = k
        return self.expand(keep)

    # -- reporting ---------------------------------------------------------------------------
    def roots(self) -> dict[str, tuple[str, int]]:
        """Group name -> (root tensor, its output dimension): what reads channel masks from saved masks."""
        return {g.name: (g.root.tensor, g.root.dim) for g in self.groups}

    def describe(self, model: nn.Module) -> str:
        """Which channel groups get masks and what they touch: printed at the start of every run."""
        params = dict(model.named_parameters())
        lines = []
        for g in self.groups:
            tensors = list(dict.fromkeys(s.tensor for s in g.slices))
            lines.append(f"  {g.name}: {g.channels} channels over {len(tensors)} tensors")
        lines += [f"  left dense: {n}: {why}" for n, why in self.skipped.items()]
        masked = sum(params[n].numel() for n in self.names)
        total = sum(p.numel() for p in params.values())
        lines.append(f"channel groups: {len(self.groups)}, {self.total:,} prunable channels; their tensors hold "
                     f"{masked:,} of {total:,} parameters ({masked / max(total, 1):.1%})")
        return "\n".join(lines)


def _unit_slices(graph: Any, module: nn.Module, pruner: Any, module_names: Mapping[nn.Module, str]
                 ) -> tuple[list[Slice], int]:
    """A group's slices with each position labelled by its unit, and the number of units.

    Each root channel's closure is asked for alone: the group of all channels merges items of
    one layer reached along two paths and keeps one of their root indices. Root channels whose
    closures share a position are one unit: in a ghost module a depthwise convolution's output
    ``j`` is computed from the primary output ``j`` and concatenated at ``init + j``, so removing
    either root channel removes both. Units are numbered by their lowest root channel.
    """
    channels = pruner.get_out_channels(module)
    owners: dict[tuple[str, int, bool], dict[int, set[int]]] = {}
    for c in range(channels):
        for item in graph.get_pruning_group(module, pruner.prune_out_channels, [c]):
            target = item.dep.target.module
            for s in _module_slices(module_names.get(target, ""), target, item.dep.handler, item.idxs, item.idxs):
                positions = owners.setdefault((s.tensor, s.dim, s.producer), {})
                for i in s.index.tolist():
                    positions.setdefault(i, set()).add(c)
    parent = list(range(channels))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for positions in owners.values():
        for cs in positions.values():
            first, *rest = sorted(cs)
            for c in rest:
                a, b = find(first), find(c)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = sorted({find(c) for c in range(channels)})
    unit_of = {r: u for u, r in enumerate(roots)}
    slices = []
    for (tensor, dim, producer), positions in owners.items():
        index = sorted(positions)
        unit = [unit_of[find(min(positions[i]))] for i in index]
        slices.append(Slice(tensor, dim, torch.tensor(index, dtype=torch.long), torch.tensor(unit, dtype=torch.long),
                            producer))
    return slices, len(roots)


def _reaches_output(node: Any) -> bool:
    """Whether a layer's outputs reach the model's output without passing a layer that reads channels."""
    from torch_pruning import ops

    seen, stack = {id(node)}, list(node.outputs)
    if not stack:
        return True
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        module = current.module
        if current.type == ops.OPTYPE.OUTPUT:
            return True
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not depthwise:
            continue  # a layer that reads the channels: they stop here
        if not current.outputs:
            return True  # a sink that is not a layer: the model's output
        stack.extend(current.outputs)
    return False


def _shares(removable: Mapping[str, int], n: int) -> dict[str, int]:
    """Share ``n`` removals over groups in proportion to what each can lose (largest remainder, capped)."""
    total = sum(removable.values())
    if total == 0 or n == 0:
        return {g: 0 for g in removable}
    exact = {g: n * r / total for g, r in removable.items()}
    share = {g: min(math.floor(v), removable[g]) for g, v in exact.items()}
    order = sorted(exact, key=lambda g: (share[g] - exact[g], list(exact).index(g)))
    while sum(share.values()) < n:
        for g in order:
            if sum(share.values()) == n:
                break
            if share[g] < removable[g]:
                share[g] += 1
    return share


def _dependency_graph(model: nn.Module, example_inputs: Inputs) -> Any:
    """torch-pruning's dependency graph of ``model``, traced with autograd on (it follows grad_fn),
    whatever the caller's grad mode."""
    import torch_pruning as tp

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else example_inputs
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)


def _run(model: nn.Module, example: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*example) if isinstance(example, (tuple, list)) else model(example)


def slice_model(model: nn.Module, structure: ChannelStructure, keep: Mapping[str, torch.Tensor],
                example_inputs: Inputs) -> nn.Module:
    """A physically smaller copy of ``model`` without the channels ``keep`` removes.

    The copy's weights are ``model``'s own at the kept channels; when ``model`` holds a channel
    ticket's masked weights (removed channels exactly zero), its outputs equal the masked model's.
    """
    sliced = copy.deepcopy(model).eval()
    graph = _dependency_graph(sliced, example_inputs)
    modules = dict(sliced.named_modules())
    for g in structure.groups:
        removed = torch.nonzero(~keep[g.name].cpu()).flatten().tolist()
        if not removed:
            continue
        root = modules[g.name.rpartition(".")[0]]
        pruner = graph.get_pruner_of_module(root)
        graph.get_pruning_group(root, pruner.prune_out_channels, removed).prune()
    return sliced


def _matches(model: nn.Module, structure: ChannelStructure, keep: Mapping[str, torch.Tensor],
             example_inputs: Inputs) -> bool:
    """Whether slicing ``keep`` out of ``model`` gives the masked model's outputs on ``example_inputs``."""
    masked = copy.deepcopy(model).eval()
    try:
        mask = structure.expand(keep)
        with torch.no_grad():
            for n, p in masked.named_parameters():
                if n in mask:
                    p.mul_(mask[n].to(p.device, p.dtype))
        sliced = slice_model(masked, structure, keep, example_inputs)
        want, got = _run(masked, example_inputs), _run(sliced, example_inputs)
    except Exception:  # slicing broke the graph: the group is not exact
        return False
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def channel_view(masks: MaskSet, roots: Mapping[str, Sequence[Any]]) -> MaskSet:
    """K channel masks (group name -> (K, channels)) read from K saved channel tickets.

    ``roots`` is ``ChannelStructure.roots()`` as saved with the tickets: the Jaccard of channel
    tickets is taken over channels, not over the weights they happen to span.
    """
    out = {}
    for group, (tensor, dim) in roots.items():
        stacked = masks.stacked[tensor]
        rows = stacked.movedim(int(dim) + 1, 1)
        out[group] = rows.reshape(rows.shape[0], rows.shape[1], -1).any(dim=2)
    return MaskSet(out, masks.context_names)


__all__ = ["ChannelGroup", "ChannelStructure", "Slice", "channel_view", "slice_model"]
