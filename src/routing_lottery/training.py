"""Training loops: masked training, per-context IMP (stage 1) and joint retraining (stage 2).

Task-agnostic: a ``Stream`` says what one subnetwork trains on (its epoch of batches and its
loss). Every source of randomness is a generator seeded from the run seed and the loop's
position, so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, DataError
from .masks import Mask, MaskSet
from .pruning import Scope, magnitude_prune
from .routed import Inputs, as_tuple, masked_forward
Batch = tuple[Inputs, torch.Tensor]
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer for every training phase. The paper: Adam, lr 1e-4, no weight decay.

    The default learning rate is for a small model of the user's: the paper's 1e-4 left a
    breast-cancer MLP's detectors near chance (balanced accuracy 0.52) where 3e-3 reached 0.98. The
    paper's configs (configs/cifar10.yaml, ...) write their 1e-4 out, so this default never reaches them.
    """

    name: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only

    def __post_init__(self) -> None:
        if self.name not in ("adam", "sgd"):
            raise ConfigError(f"optimizer.name must be 'adam' or 'sgd'; got {self.name!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ConfigError(f"optimizer.lr must be a positive finite number; got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ConfigError(f"optimizer.weight_decay must be >= 0 and finite; got {self.weight_decay!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"optimizer.momentum must be in [0, 1); got {self.momentum!r}")

    def build(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {self.name!r}")


@dataclass(frozen=True)
class Stream:
    """What one subnetwork trains on: its batches (one epoch, ordered by a generator) and its loss."""

    name: str
    epoch: Callable[[torch.Generator], Sequence[Batch]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_batches: int


class ProgressSink(Protocol):
    """Receives training progress (the CLI draws it; the library stays silent)."""

    def advance(self, steps: int, status: str) -> None: ...


class _Silent:
    def advance(self, steps: int, status: str) -> None:
        pass


SILENT: ProgressSink = _Silent()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the run seed and a position (context, round, epoch, ...)."""
    # Strings are hashed whole: "context_00" and "context_01" must give different seeds.
    words = [p if isinstance(p, int) else int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
             for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextlib.contextmanager
def seeded_global_rng(device: torch.device, *parts: int | str) -> Iterator[None]:
    """Torch's global generator seeded from ``parts`` inside the block, and given back afterwards.

    A model's own randomness (dropout, stochastic depth) draws from the global generator, which a
    resumed run cannot restore from a checkpoint; seeding it per epoch makes an epoch depend only
    on where it starts, so a run killed and resumed takes the same steps as one that was not.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(derive_seed(*parts))
        yield


def snapshot(model: nn.Module) -> State:
    """A detached copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rewound(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None) -> State:
    """``state`` with every masked tensor multiplied by its mask: survivors rewound, pruned set to zero."""
    out = {k: v.clone() for k, v in state.items()}
    for name, m in (mask or {}).items():
        out[name] = out[name] * m.to(device=out[name].device, dtype=out[name].dtype)
    return out


def _float_mask(mask: Mapping[str, torch.Tensor] | None, model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: m.to(device=params[n].device, dtype=params[n].dtype) for n, m in (mask or {}).items()}


def _to_device(batch: Batch, device: torch.device) -> Batch:
    x, y = batch
    inputs = tuple(t.to(device, non_blocking=True) for t in as_tuple(x))
    return (inputs if isinstance(x, (tuple, list)) else inputs[0]), y.to(device, non_blocking=True)


def _forward(model: nn.Module, fmask: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
    """The subnetwork ``fmask`` (empty: the dense model) on one input tensor or a tuple of them."""
    inputs = as_tuple(x)
    return masked_forward(model, fmask, *inputs) if fmask else model(*inputs)


class _ZeroGrad(Protocol):
    def zero_grad(self, set_to_none: bool = True) -> None: ...


def _backward(model: nn.Module, fmask: Mapping[str, torch.Tensor], opt: _ZeroGrad,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: Inputs, y: torch.Tensor) -> torch.Tensor:
    """Forward the subnetwork, clear the old gradients and backpropagate; returns the loss."""
    loss = loss_fn(_forward(model, fmask, x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def train(
    model: nn.Module,
    mask: Mapping[str, torch.Tensor] | None,
    stream: Stream,
    epochs: int,
    optimizer: OptimizerConfig,
    seed: int,
    progress: ProgressSink = SILENT,
    max_steps: int | None = None,
) -> None:
    """Train ``model`` in place as the subnetwork ``mask`` (``None``: dense) on ``stream``.

    Pruned positions stay exactly zero: they get no gradient through ``w * m``, and the step is
    re-masked afterwards so weight decay or momentum cannot revive them.
    """
    fmask = _float_mask(mask, model)
    params = dict(model.named_parameters())
    opt = optimizer.build(list(model.parameters()))
    device = next(model.parameters()).device
    model.train()
    steps = 0
    for epoch in range(epochs):
        batches = stream.epoch(generator(seed, epoch))
        if len(batches) == 0:  # training nothing and then pruning untrained weights would pass silently
            raise DataError(f"stream {stream.name!r} has no training batches (an empty context?)")
        with seeded_global_rng(device, seed, "global", epoch):
            for batch in batches:
                loss = masked_step(model, params, fmask, opt, stream.loss, *_to_device(batch, device))
                steps += 1
                progress.advance(1, f"{stream.name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
                if max_steps is not None and steps >= max_steps:
                    return


def masked_step(model: nn.Module, params: Mapping[str, torch.Tensor], fmask: Mapping[str, torch.Tensor],
                opt: torch.optim.Optimizer, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x: Inputs, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step of the subnetwork ``fmask`` (float masks; empty: dense); returns the loss.

    The step is re-masked afterwards: ``w * m`` already keeps gradient off pruned positions, but
    weight decay or momentum would still move them. ``x`` is one input tensor or a tuple of them.
    """
    loss = _backward(model, fmask, opt, loss_fn, x, y)
    opt.step()
    with torch.no_grad():
        for n, m in fmask.items():
            params[n].mul_(m)
    return loss


def extract_ticket(
    model: nn.Module,
    rewind_state: Mapping[str, torch.Tensor],
    prunable: Sequence[str],
    stream: Stream,
    schedule: Sequence[int],
    epochs_per_round: int,
    optimizer: OptimizerConfig,
    seed: int,
    scope: Scope = "global",
    progress: ProgressSink = SILENT,
    resume: tuple[int, Mask] | None = None,
    on_round: Callable[[int, Mask], None] | None = None,
    prune: Callable[[Mapping[str, torch.Tensor], Mask, int, Scope], Mask] = magnitude_prune,
    start_mask: Mask | None = None,
) -> list[Mask]:
    """Stage 1: iterative magnitude pruning on one stream, rewinding survivors every round.

    Round r trains ``rewind_state ⊙ mask`` for ``epochs_per_round`` epochs, then prunes the
    lowest-magnitude survivors until ``schedule[r]`` units are pruned in all: weights with the
    default ``prune``, whole channels with ``ChannelStructure.prune`` (starting from
    ``start_mask``, its all-ones mask over every tensor a channel touches). Masks are nested
    by construction. ``resume=(r, mask)`` continues after finished round ``r`` (0-based) whose
    mask was ``mask``; ``on_round(r, mask)`` is called after every round (to checkpoint it).

    Returns the mask after each round this call ran (all of them unless resumed).
    """
    params = dict(model.named_parameters())
    mask: Mask = start_mask if start_mask is not None else {
        n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable}
    mask = {n: m.to(params[n].device) for n, m in mask.items()}
    start = 0
    if resume is not None:
        start, mask = resume[0] + 1, resume[1]
    masks: list[Mask] = []
    pruned = schedule[start - 1] if start > 0 else 0
    for r in range(start, len(schedule)):
        model.load_state_dict(rewound(rewind_state, mask))
        train(model, mask, stream, epochs_per_round, optimizer, derive_seed(seed, r), progress)
        trained = {n: params[n].detach() for n in prunable}
        mask = prune(trained, mask, schedule[r] - pruned, scope)
        pruned = schedule[r]
        masks.append(mask)
        if on_round is not None:
            on_round(r, mask)
    return masks


class SubnetworkOptimizer:
    """One context's optimizer in joint retraining, with state only for what that context can change.

    K full optimizers over the shared θ would hold K copies of every moment, although context k
    only ever changes the positions inside its mask m_k (and the dense parameters). So each masked
    tensor is stood in for by a 1-D proxy leaf: before a step it receives the weight and its
    gradient at the positions of m_k (``masked_select``), the real torch optimizer steps it, and
    the result is written back (``masked_scatter_``); between steps the proxy holds no storage.
    Dense parameters (not masked: BatchNorm, biases, ...) are stepped in place, in full. Adam and
    SGD are elementwise, so this is the update a full optimizer gives when its step outside m_k is
    undone -- same weights, with state that grows with the masks' density.

    ``state_dict()`` is the inner optimizer's, parameters in model order with a proxy in place of
    each masked tensor; ``load_state_dict`` also takes one saved by a full-model optimizer in that
    order (before this class existed) and keeps its state at the positions of m_k.
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], config: OptimizerConfig) -> None:
        self._params = dict(model.named_parameters())
        self._mask = {n: m.to(device=self._params[n].device, dtype=torch.bool) for n, m in mask.items()}
        self._proxies = {n: torch.empty(0, dtype=p.dtype, device=p.device)
                         for n, p in self._params.items() if n in self._mask}
        self.optimizer = config.build([self._proxies.get(n, p) for n, p in self._params.items()])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter this context touches, masked shared weights included."""
        for n in self._proxies:
            w = self._params[n]
            if set_to_none or w.grad is None:
                w.grad = None
            else:
                w.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step of this context: only positions inside its mask and dense parameters move."""
        for n, proxy in self._proxies.items():
            w, m = self._params[n], self._mask[n]
            proxy.data = w.masked_select(m)
            proxy.grad = None if w.grad is None else w.grad.masked_select(m)
        self.optimizer.step()
        for n, proxy in self._proxies.items():
            self._params[n].masked_scatter_(self._mask[n], proxy)
            proxy.data, proxy.grad = torch.empty(0, dtype=proxy.dtype, device=proxy.device), None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(self._compact(state))

    def _compact(self, state: dict) -> dict:
        """``state`` with full-shape state of a masked tensor gathered at the mask; refuses foreign masks."""
        per_param = dict(state["state"])
        for i, n in enumerate(self._params):
            if n not in self._mask or i not in per_param:
                continue
            m, shape, kept = self._mask[n], self._params[n].shape, int(self._mask[n].sum())
            entry = {key: v.masked_select(m.to(v.device)) if torch.is_tensor(v) and v.dim() and v.shape == shape else v
                     for key, v in per_param[i].items()}
            wrong = [key for key, v in entry.items() if torch.is_tensor(v) and v.dim() and v.numel() != kept]
            if wrong:
                raise ValueError(f"optimizer state {wrong} of {n!r} does not fit this context's mask "
                                 f"({kept} positions); was it saved with other masks?")
            per_param[i] = entry
        return {**state, "state": per_param}


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DataParallel(Protocol):
    """Joint retraining's steps split over processes by rows of each batch (``run.distributed``).

    ``begin`` sees every ``joint_retrain`` call's arguments before it starts (the process that
    decides announces them to the others). ``with step(model, loss, x, y) as (loss, x, y)`` gives
    this process's rows and their loss, weighted by their share of the batch; the backward pass
    runs inside, and on leaving every gradient is the full batch's, summed over the processes, so
    that every process then takes the identical step.
    """

    def begin(self, model: nn.Module, arguments: Mapping[str, object]) -> None: ...

    def step(self, model: nn.Module, loss: Loss, x: Inputs,
             y: torch.Tensor) -> contextlib.AbstractContextManager[tuple[Loss, Inputs, torch.Tensor]]: ...


_DATA_PARALLEL: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar("data_parallel", default=None)


@contextlib.contextmanager
def data_parallel(communicator: DataParallel) -> Iterator[None]:
    """Every ``joint_retrain`` in this block that is not given one uses ``communicator``: how a runner
    reaches the retraining that ``AdaptiveTickets.retrain`` starts deep inside a method."""
    token = _DATA_PARALLEL.set(communicator)
    try:
        yield
    finally:
        _DATA_PARALLEL.reset(token)


def joint_retrain(
    model: nn.Module,
    init_state: Mapping[str, torch.Tensor],
    masks: MaskSet,
    streams: Sequence[Stream],
    epochs: int,
    optimizer: OptimizerConfig,
    seed: int,
    progress: ProgressSink = SILENT,
    resume: tuple[int, Sequence[dict]] | None = None,
    on_epoch: Callable[[int, Sequence[SubnetworkOptimizer]], None] | None = None,
    data_parallel: DataParallel | None = None,
) -> None:
    """Stage 2, the paper's Algorithm 2: subnetworks take turns updating one shared θ.

    θ starts from ``init_state`` restricted to the union of the masks. Each epoch, for batch index
    m = 1..M (M: the largest context's batch count; smaller contexts cycle their batches) and for
    k = 1..K, subnetwork k takes one step on its own batch. Each subnetwork has its own optimizer
    state and its step is masked: Adam's momentum from context j must not move a weight that
    only context i uses, and positions outside every mask stay exactly zero. That state covers
    only the positions of its mask and the dense parameters (``SubnetworkOptimizer``), so it grows
    with the masks' density rather than being K copies of the model. A batch's inputs may be a
    tensor or a tuple of tensors (``model(*x)``).

    ``resume=(e, optimizer_states)`` continues after finished epoch ``e`` with the model already
    holding that epoch's weights; ``on_epoch(e, optimizers)`` is called after every epoch.
    ``data_parallel`` (default: the one a ``data_parallel`` block set) splits every context's step
    over processes by rows of its batch, the turns and masked steps unchanged (``run.distributed``).
    """
    if len(streams) != masks.num_contexts:
        raise ValueError(f"{len(streams)} streams for {masks.num_contexts} masks")
    parallel = data_parallel if data_parallel is not None else _DATA_PARALLEL.get()
    if parallel is not None:  # the other processes take the same call
        parallel.begin(model, {"init_state": init_state, "masks": masks, "streams": streams, "epochs": epochs,
                               "optimizer": optimizer, "seed": seed, "resume": resume})
    device = next(model.parameters()).device
    # Bool masks are views of the MaskSet on the model's device; each step makes its float mask
    # on the fly, so no context keeps a float copy of the model's size.
    bmasks = [{n: m.to(device) for n, m in masks[k].items()} for k in range(masks.num_contexts)]
    optimizers = [SubnetworkOptimizer(model, bmask, optimizer) for bmask in bmasks]
    start = 0
    if resume is None:
        model.load_state_dict(rewound(init_state, masks.union()))
    else:
        start = resume[0] + 1
        for opt, state in zip(optimizers, resume[1]):
            opt.load_state_dict(state)
    model.train()
    for epoch in range(start, epochs):
        batches = [list(s.epoch(generator(seed, k, epoch))) for k, s in enumerate(streams)]
        empty = [s.name for s, b in zip(streams, batches) if not b]
        if empty:
            raise ValueError(f"contexts with no training batches: {empty}")
        rounds = max(len(b) for b in batches)
        with seeded_global_rng(device, seed, "global", epoch):
            for m in range(rounds):
                for k, stream in enumerate(streams):
                    x, y = _to_device(batches[k][m % len(batches[k])], device)
                    if parallel is None:
                        _backward(model, _float_mask(bmasks[k], model), optimizers[k], stream.loss, x, y)
                    else:  # this process's rows; the gradients summed over the processes
                        with parallel.step(model, stream.loss, x, y) as (loss, x, y):
                            _backward(model, _float_mask(bmasks[k], model), optimizers[k], loss, x, y)
                    optimizers[k].step()
                progress.advance(len(streams), f"joint epoch {epoch + 1}/{epochs} batch {m + 1}/{rounds}")
        if on_epoch is not None:
            on_epoch(epoch, optimizers)
