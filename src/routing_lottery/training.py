"""Training: the pieces a user's own loop needs, and the paper's loops built on them.

The pieces: ``ContextOptimizer`` / ``context_optimizers`` make any torch optimizer per-context
(a step of context k moves nothing outside its mask m_k; state only at m_k), ``as_stream`` takes
a ``DataLoader`` or any re-iterable of batches, and the masked forward for context k is
``routed.RoutedModel.use(k)`` or ``routed.masked_forward``. The loops: masked training, per-context
IMP (stage 1) and joint retraining (stage 2, Algorithm 2).

Task-agnostic: a ``Stream`` says what one subnetwork trains on (its epoch of batches and its
loss). Every source of randomness is a generator seeded from the run seed and the loop's
position, so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import math

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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
    """What one subnetwork trains on: its batches (one epoch, ordered by a generator) and its loss.

    ``epoch(generator)`` returns one epoch of ``(inputs, targets)`` batches, inputs a tensor or a
    tuple of them: a list, or any iterable (a ``DataLoader``: see ``as_stream``).
    """

    name: str
    epoch: Callable[[torch.Generator], Iterable[Batch]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_batches: int


class _Epoch:
    """One epoch of a re-iterable source of batches (``as_stream``): iterated afresh, each batch checked
    to be ``(x, y)``, and the source's own draws from torch's global generator made from ``seed``."""

    def __init__(self, name: str, source: Iterable[Any], count: int | None, seed: int) -> None:
        self.name, self.source, self.count, self.seed = name, source, count, seed

    def __len__(self) -> int:
        return len(self.source) if self.count is None else self.count  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        # A DataLoader without a generator of its own draws its shuffle (and its workers' seeds) from
        # the global generator when iteration starts: seeded here, that order follows the epoch's
        # generator as every Stream's does. The fork ends before the first batch is handed out, so
        # the training step's own randomness (dropout) is not drawn from it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            batches = iter(self.source)
            first = next(batches, _END)
        if first is _END:
            return
        for i, batch in enumerate(itertools.chain([first], batches)):
            yield _as_batch(self.name, i, batch)

    def __getitem__(self, index: int) -> Batch:
        """Batch ``index`` of this epoch, by iterating up to it: for a first look (a trace), not a loop."""
        if not isinstance(index, int) or index < 0:
            raise TypeError(f"stream {self.name!r}: an epoch of an iterable is indexed by a non-negative int; "
                            f"got {index!r}")
        found = next(itertools.islice(iter(self), index, None), _END)
        if found is _END:
            raise IndexError(f"stream {self.name!r}: batch {index} of an epoch of {len(self)}")
        return found  # type: ignore[return-value]


_END = object()


def _as_batch(name: str, index: int, batch: Any) -> Batch:
    """``batch`` as ``(inputs, targets)``: a DataLoader's default collate gives lists where tuples were."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)):
        kind = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise TypeError(f"stream {name!r}: batch {index} must be (inputs, targets) with targets a tensor; got {kind}. "
                        "A dataset of several inputs should return ((x1, x2), y) per row")
    x, y = batch
    return (tuple(x) if isinstance(x, list) else x), y


def as_stream(name: str, batches: Iterable[Any], loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              num_batches: int | None = None) -> Stream:
    """A ``Stream`` over a ``torch.utils.data.DataLoader`` or any re-iterable of ``(x, y)`` batches.

    ``x`` is a tensor or a tuple of tensors (``model(*x)``; a list, as a DataLoader collates a
    tuple, is taken as one), ``y`` a tensor. Each epoch iterates ``batches`` afresh. A
    ``DataLoader`` with a ``generator=`` of its own reshuffles with it, continuing its sequence (a
    resumed run restarts it); one without draws its order from torch's global generator as
    iteration starts, which each epoch seeds from the generator it is given -- so an unseeded
    loader's order follows the run seed and the epoch like any Stream's, the same on resume.

    Parameters
    ----------
    name : the context's name.
    batches : a DataLoader, a list of batches, or any object whose ``__iter__`` starts over; not a
        generator or other one-shot iterator (a second epoch would find it empty).
    loss : ``loss(outputs, targets)``.
    num_batches : batches per epoch; default ``len(batches)``, or counted by one pass over
        ``batches`` when it has no length (a DataLoader over an ``IterableDataset``).

    Examples
    --------
    >>> from torch.nn import functional as F
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    >>> stream = as_stream("cats", loader, F.cross_entropy)   # wherever a Stream is taken (joint_retrain, ...)
    >>> stream.num_batches
    2
    """
    if isinstance(batches, Iterator):
        raise TypeError(f"stream {name!r}: batches is a one-shot iterator ({type(batches).__name__}), but every "
                        "epoch iterates it afresh: pass something re-iterable, e.g. a DataLoader or list(batches)")
    if not isinstance(batches, Iterable):
        raise TypeError(f"stream {name!r}: batches must be an iterable of (x, y) batches (a DataLoader, a list); "
                        f"got {type(batches).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"stream {name!r}: num_batches must be a positive integer; got {num_batches!r}")
    sized = _has_len(batches)
    if sized:
        count = len(batches)  # type: ignore[arg-type]
    elif num_batches is not None:
        count = num_batches
    else:
        with torch.random.fork_rng(devices=[]):  # the counting pass leaves the caller's global generator as it was
            count = sum(1 for _ in batches)
    if count == 0:
        raise ValueError(f"stream {name!r} has no batches: the {type(batches).__name__} is empty")

    def epoch(gen: torch.Generator) -> _Epoch:
        return _Epoch(name, batches, None if sized else count, int(torch.randint(0, 2**62, (), generator=gen)))

    return Stream(name, epoch, loss, num_batches if num_batches is not None else count)


def _has_len(obj: object) -> bool:
    """Whether ``len(obj)`` answers: a DataLoader over an IterableDataset without ``__len__`` raises TypeError."""
    try:
        len(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


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
        batches = stream.epoch(generator(seed, epoch))  # a list, or any iterable (a DataLoader's epoch)
        taken = 0
        with seeded_global_rng(device, seed, "global", epoch):
            for batch in batches:
                loss = masked_step(model, params, fmask, opt, stream.loss, *_to_device(batch, device))
                steps += 1
                taken += 1
                progress.advance(1, f"{stream.name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
                if max_steps is not None and steps >= max_steps:
                    return
        if taken == 0:  # training nothing and then pruning untrained weights would pass silently
            raise DataError(f"stream {stream.name!r} has no training batches (an empty context?)")


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


MakeOptimizer = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
"""Builds a torch optimizer over the parameters it is given, e.g. ``lambda p: torch.optim.AdamW(p, lr=3e-4)``."""


class ContextOptimizer:
    """Any torch optimizer, made per-context: a step of context k moves only m_k and the dense parameters.

    In joint retraining (Algorithm 2) the K subnetworks take turns on one shared θ, each with its
    own optimizer state. A plain optimizer over all parameters would fall into the Adam trap:
    context j's momentum and weight decay would move weights that only context i uses, and
    revive weights outside every mask. This wrapper closes it for any optimizer; use it in your
    own loop exactly as the optimizer it wraps (``zero_grad``, ``backward``, clipping, ``step``).

    ``compact=True`` (the default): each masked tensor is stood in for by a 1-D proxy leaf.
    Before a step it receives the weight and its gradient at the positions of m_k
    (``masked_select``), the wrapped optimizer steps it, and the result is written back
    (``masked_scatter_``); between steps the proxy holds no storage. Dense parameters (not
    masked: BatchNorm, biases, ...) are stepped in place, in full. The state then grows with the
    mask's density rather than being K copies of the model -- and the update is the full
    optimizer's with its step outside m_k undone *for elementwise optimizers* (Adam, AdamW, SGD
    with momentum, RMSprop, Adagrad, ...). Shape-aware optimizers (Adafactor's factored moments,
    Shampoo's preconditioners, LAMB's per-tensor trust ratio, anything taking a norm over a
    tensor) see the 1-D proxies instead of the tensors: use ``compact=False`` for them.

    ``compact=False``: the real parameters go to the wrapped optimizer (full-shape state; any
    optimizer), and after each step every masked tensor's positions outside m_k are put back
    to their values before the step.

    Gradients live on the real parameters until ``step()``, so ``clip_grad_norm_`` over
    ``model.parameters()`` works between ``backward`` and ``step``. Schedulers attach to the
    wrapped optimizer: ``CosineAnnealingLR(opt.optimizer, T)``. A ``closure`` is called once,
    before the step; with ``compact=True`` the wrapped optimizer never sees it, so optimizers
    that re-evaluate it (LBFGS) need ``compact=False``, where it is passed through. A
    ``GradScaler`` unscales through ``param_groups``, which holds the proxies when compact:
    use ``compact=False`` with it (bfloat16 autocast needs no scaler).

    Parameters
    ----------
    model : the shared network; mask : context k's boolean (or 0/1) mask per masked tensor name;
    make_optimizer : ``params -> torch.optim.Optimizer``, given the parameters in
        ``model.named_parameters()`` order (with ``compact=True``, a proxy in place of each masked
        tensor); compact : as above.

    Examples
    --------
    >>> from torch.nn import functional as F
    >>> from routing_lottery import RoutedModel
    >>> model = nn.Linear(8, 3)
    >>> masks = MaskSet({"weight": torch.rand(2, 3, 8) < 0.5}, ["cats", "dogs"])
    >>> routed = RoutedModel(model, masks).train()
    >>> opts = context_optimizers(model, masks, lambda p: torch.optim.AdamW(p, lr=3e-4, weight_decay=0.01))
    >>> x, y, k = torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), 1
    >>> before = model.weight.detach().clone()
    >>> with routed.use(k):
    ...     loss = F.cross_entropy(routed(x), y)
    >>> opts[k].zero_grad(); loss.backward(); opts[k].step()
    >>> outside = ~masks[k]["weight"]                  # weight decay and momentum did not move these
    >>> torch.equal(model.weight.detach()[outside], before[outside])
    True
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], make_optimizer: MakeOptimizer, *,
                 compact: bool = True) -> None:
        self._params = dict(model.named_parameters())
        self._mask = _bool_mask(mask, self._params)
        self.compact = compact
        self._proxies = {n: torch.empty(0, dtype=p.dtype, device=p.device)
                         for n, p in self._params.items() if n in self._mask} if compact else {}
        optimizer = make_optimizer([self._proxies.get(n, p) for n, p in self._params.items()])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"make_optimizer must return a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (learning rates and the rest live there)."""
        return self.optimizer.param_groups

    @property
    def mask(self) -> Mapping[str, torch.Tensor]:
        """This context's boolean mask m_k, on the model's device."""
        return self._mask

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter this context touches, masked shared weights included."""
        for n in self._proxies:  # compact: the wrapped optimizer knows only the proxies
            w = self._params[n]
            if set_to_none or w.grad is None:
                w.grad = None
            else:
                w.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step of this context: only positions inside m_k and dense parameters move.

        Returns the closure's loss (``None`` without one).
        """
        if not self.compact:
            return self._step_full(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_compact()
        return loss

    @torch.no_grad()
    def _step_compact(self) -> None:
        # The kept positions as flat indices, found once per step: gathering and writing back by index
        # was cheaper than masked_select / masked_scatter_ on SmolLM2's large layers, and takes the
        # same row-major order, so the values and the step are the same to the bit.
        # Not cached across steps: K domains' int64 indices would outweigh their optimizer state.
        positions = {}
        for n, proxy in self._proxies.items():
            w, m = self._params[n], self._mask[n]
            if w.is_contiguous() and (w.grad is None or w.grad.is_contiguous()):
                index = positions[n] = m.reshape(-1).nonzero().squeeze(1)
                proxy.data = w.view(-1).index_select(0, index)
                proxy.grad = None if w.grad is None else w.grad.view(-1).index_select(0, index)
            else:
                proxy.data = w.masked_select(m)
                proxy.grad = None if w.grad is None else w.grad.masked_select(m)
        self.optimizer.step()
        for n, proxy in self._proxies.items():
            if n in positions:
                self._params[n].view(-1).index_copy_(0, positions[n], proxy)
            else:
                self._params[n].masked_scatter_(self._mask[n], proxy)
            proxy.data, proxy.grad = torch.empty(0, dtype=proxy.dtype, device=proxy.device), None

    def _step_full(self, closure: Callable[[], Any] | None) -> Any:
        # Only the positions outside m_k are kept, not whole tensors: memory is what the step must not move.
        with torch.no_grad():
            outside = {n: (~m, self._params[n].masked_select(~m)) for n, m in self._mask.items()}
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        with torch.no_grad():
            for n, (out, before) in outside.items():
                self._params[n].masked_scatter_(out, before)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (with ``compact=True``, a proxy's state covers m_k only)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state saved by this wrapper; with ``compact=True`` also one saved by a full-model
        optimizer over ``model.parameters()`` (its state kept at the positions of m_k)."""
        self.optimizer.load_state_dict(self._compact(dict(state)) if self.compact else dict(state))

    def _compact(self, state: dict[str, Any]) -> dict[str, Any]:
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

    def __repr__(self) -> str:
        kept = sum(int(m.sum()) for m in self._mask.values())
        return f"ContextOptimizer({type(self.optimizer).__name__}, {kept} masked positions, compact={self.compact})"


class SubnetworkOptimizer(ContextOptimizer):
    """``ContextOptimizer`` built from an ``OptimizerConfig``, compact: its earlier name, kept so that code using it runs."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], config: OptimizerConfig) -> None:
        super().__init__(model, mask, config.build, compact=True)


def context_optimizers(model: nn.Module, masks: MaskSet, make_optimizer: MakeOptimizer, *,
                       compact: bool = True) -> list[ContextOptimizer]:
    """One ``ContextOptimizer`` per context of ``masks``, in context order (see ``ContextOptimizer``).

    >>> model = nn.Linear(8, 3)
    >>> masks = MaskSet({"weight": torch.rand(2, 3, 8) < 0.5}, ["cats", "dogs"])
    >>> opts = context_optimizers(model, masks, lambda p: torch.optim.AdamW(p, lr=3e-4))
    >>> schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o.optimizer, T_max=100) for o in opts]
    >>> len(opts)
    2
    """
    return [ContextOptimizer(model, masks[k], make_optimizer, compact=compact) for k in range(masks.num_contexts)]


def _bool_mask(mask: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``mask`` as boolean tensors on their parameters' devices; names and shapes checked against the model."""
    missing = [n for n in mask if n not in params]
    if missing:
        raise ValueError(f"mask names tensors the model does not have: {missing}")
    wrong = {n: (tuple(m.shape), tuple(params[n].shape)) for n, m in mask.items() if m.shape != params[n].shape}
    if wrong:
        raise ValueError(f"mask shapes differ from their parameters' (mask, parameter): {wrong}")
    return {n: m.to(device=params[n].device, dtype=torch.bool) for n, m in mask.items()}


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
    on_epoch: Callable[[int, Sequence[ContextOptimizer]], None] | None = None,
    data_parallel: DataParallel | None = None,
) -> None:
    """Stage 2, the paper's Algorithm 2: subnetworks take turns updating one shared θ.

    θ starts from ``init_state`` restricted to the union of the masks. Each epoch, for batch index
    m = 1..M (M: the largest context's batch count; smaller contexts cycle their batches) and for
    k = 1..K, subnetwork k takes one step on its own batch. Each subnetwork has its own optimizer
    state and its step is masked: Adam's momentum from context j must not move a weight that
    only context i uses, and positions outside every mask stay exactly zero. That state covers
    only the positions of its mask and the dense parameters (``ContextOptimizer``), so it grows
    with the masks' density rather than being K copies of the model. A batch's inputs may be a
    tensor or a tuple of tensors (``model(*x)``); a stream's epoch may be any iterable of batches
    (``as_stream``), read into a list each epoch because contexts with fewer batches cycle them.

    Built from the pieces a user's own loop has (``ContextOptimizer``, a masked forward such as
    ``RoutedModel.use(k)`` or ``masked_forward``): the same loop written by hand with them, the
    same generators and the same optimizer, gives the same weights bit for bit
    (tests/test_own_loop.py).

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
    optimizers = [ContextOptimizer(model, bmask, optimizer.build) for bmask in bmasks]
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
