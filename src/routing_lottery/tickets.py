"""The front door: adaptive tickets over any ``nn.Module``, from extraction to a saved routed model.

``AdaptiveTickets(model, config)`` remembers the model's weights as the shared initialization θ₀
and answers the three stages of the paper in order:

1. ``extract(streams)`` -- per-context iterative magnitude pruning, one nested ticket per
   configured sparsity level (``{level: MaskSet}``);
2. ``retrain(streams, masks)`` -- joint retraining of the K subnetworks over one θ (Algorithm 2),
   returning the ``RoutedModel``;
3. ``save(dir)`` / ``AdaptiveTickets.load(dir, model)`` -- shared weights, packed masks and the
   recipe that made them, so a checkpoint alone says how it was made.

``fit(streams)`` runs 1 and 2 at one level. Given a ``store`` (a run directory, see
``run.directory``), every IMP round, θ₀ and every retraining epoch is checkpointed and a second
call resumes from the last finished one; the experiment runner and the command line drive this
same object, with the baselines beside it.

Example
-------
>>> import torch
>>> from torch import nn
>>> from torch.nn import functional as F
>>> from routing_lottery import AdaptiveTickets, RTLConfig, PruningConfig, TrainingConfig, tensor_stream
>>> data = {name: (torch.randn(64, 4), torch.randn(64, 1)) for name in ("cat", "dog")}
>>> streams = {name: tensor_stream(name, x_k, y_k, F.mse_loss, batch_size=32) for name, (x_k, y_k) in data.items()}
>>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
>>> recipe = RTLConfig(pruning=PruningConfig(sparsities=(0.5,), step=0.2), training=TrainingConfig(imp_epochs=1, epochs=1))
>>> rtl = AdaptiveTickets(model, recipe).fit(streams)
>>> rtl.routed(torch.randn(3, 4), ["cat", "dog", "cat"]).shape  # contexts by name (or index), mixed in one batch
torch.Size([3, 1])
>>> rtl.save("tickets/").name                                  # shared weights, packed masks, the recipe
'tickets'
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .fingerprint import fingerprint
from .calibration import Thresholds
from .channels import ChannelStructure
from .errors import ConfigError
from .io import CheckpointError, load_tickets, model_fingerprint, save_tickets
from .masks import Mask, MaskSet
from .pruning import (
    TensorFilter, WeightStructure, emptied, levels_reached, parameter_aliases, prunable_names, pruning_schedule,
    weight_norm_directions,
)
from .recipe import PruningConfig, RTLConfig
from .scores import compute_scores, input_norms, needs_activations, one_shot_mask, resolve_score
from .settings import build
from .store import IDENTITY_VERSION, CheckpointDirectory
from .routed import RoutedModel, as_tuple
from .router import Router, load_router, save_router
from .training import (
    SILENT, Loss, ProgressSink, State, Stream, as_stream, derive_seed, extract_ticket, generator, joint_retrain,
    snapshot, train,
)


Log = Callable[[str], None]


class Structure(Protocol):
    """A pruning granularity's units over one model (``pruning.WeightStructure``, ``channels.ChannelStructure``)."""

    granularity: str
    names: list[str]
    total: int

    def ones(self) -> Mask: ...

    def count(self, mask: Mapping[str, torch.Tensor]) -> int: ...

    def prune(self, weights: Mapping[str, torch.Tensor], mask: Mask, num_to_prune: int, scope: Any = "global") -> Mask: ...

    def random_like(self, mask: Mapping[str, torch.Tensor], generator: torch.Generator) -> Mask: ...

    def describe(self, model: nn.Module) -> str: ...


def quiet(message: str) -> None:
    """The default log: the library prints nothing unless asked."""


class TicketStore(Protocol):
    """Where stage 1 and stage 2 keep their progress so that a run resumes (``run.RunDirectory``)."""

    def load_state(self, name: str) -> State | None: ...

    def save_state(self, name: str, state: State) -> None: ...

    def load_round(self, stream: str, r: int, pruned: int, order: Sequence[str]) -> Mask | None:
        """Round ``r``'s mask if saved for the same cumulative count ``pruned``, else None."""

    def save_round(self, stream: str, r: int, mask: Mask, pruned: int) -> None: ...

    def load_training(self, key: str, basis: Any) -> dict[str, Any] | None:
        """A retraining state saved under ``key`` for the same ``basis`` (its masks' rounds), else None."""

    def save_training(self, key: str, basis: Any, state: dict[str, Any]) -> None: ...

    def drop_training(self, key: str) -> None: ...


class AdaptiveTickets:
    """K binary masks (tickets) over one model's shared weights, one per data context.

    Parameters
    ----------
    model
        Any ``nn.Module``; its current weights are the shared initialization θ₀ (or, with a
        ``store`` that already holds θ₀, those are loaded into it).
    config
        The recipe (``RTLConfig``): sparsity levels, pruning step and scope, rewinding, epochs,
        optimizer, which tensors to mask (``pruning.include`` / ``exclude`` glob patterns).
    select
        Optional filter ``select(name, tensor) -> bool`` applied after the patterns.
    out
        A run directory to checkpoint into and resume from (None: everything stays in memory).
        It is keyed by the recipe, the masked tensors and a fingerprint of the streams' data:
        other data or settings in the same directory are refused, naming what differs.
    store
        Instead of ``out``, a ``TicketStore`` the caller has already claimed (the experiment runner's).
    name
        Prefix of this object's entries in ``store`` (two networks may share one run directory).
    loss
        ``loss(outputs, targets)`` for contexts given as a ``DataLoader`` (or any re-iterable of ``(x, y)``
        batches) instead of a ``Stream`` (``training.as_stream``).
    example_inputs
        Channel tickets only (``pruning.granularity: channel``): inputs to trace the model's
        channel dependencies on (default: the first batch of the first stream given).
    """

    def __init__(self, model: nn.Module, config: RTLConfig | None = None, *, select: TensorFilter | None = None,
                 out: str | Path | None = None, store: TicketStore | None = None, name: str = "",
                 progress: ProgressSink = SILENT, log: Log = quiet, example_inputs: Any = None,
                 loss: Loss | None = None) -> None:
        if out is not None and store is not None:
            raise ValueError("give out (a directory) or store, not both")
        self.model = model
        self.config = (config or RTLConfig()).recipe
        self.store, self.out, self.name, self.progress, self.log = store, out, name, progress, log
        self.loss = loss  # what a DataLoader given in place of a Stream trains with
        pruning = self.config.pruning
        # Weight tickets mask these tensors; channel tickets root their channel groups at them.
        self.selected = prunable_names(model, pruning.include, pruning.exclude, select)
        self.example_inputs = example_inputs
        self._structure: Structure | None = None
        self.levels = sorted(set(pruning.sparsities))
        if pruning.granularity == "weight":
            self._structure = weight_structure(model, self.selected, pruning)
            check_floors(self._structure, max(self.levels))
        # tied weights: another name of a masked tensor, rewound with it (see _retrain)
        self._aliases = parameter_aliases(model)
        self._pruned_away: list[str] = []  # what the last extraction pruned away whole (describe, warnings)
        self._initial: State | None = snapshot(model)  # θ₀ unless the store already holds one (no I/O before first use)
        self._theta0: State | None = None
        self._rewind: State | None = None
        self.masks: MaskSet | None = None
        self.level: float | None = None
        self.metadata: dict[str, Any] = {}
        self.thresholds: Thresholds | None = None  # calibrated detector thresholds, saved with the tickets
        self._router: Router | None = None
        self._routed: RoutedModel | None = None  # ``routed``, kept while the masks and the model stay the same

    # -- what is masked ----------------------------------------------------------------------
    @property
    def structure(self) -> Structure:
        """The pruning granularity's units over this model: weights, or channel groups (traced once)."""
        if self._structure is None:
            if self.example_inputs is None:
                raise RuntimeError("channel tickets trace the model's channel dependencies on example inputs: "
                                   "pass example_inputs=..., or call extract() or retrain() with streams first")
            self._structure = ChannelStructure.trace(self.model, self.example_inputs, self.selected)
        return self._structure

    @property
    def prunable(self) -> list[str]:
        """The masked tensors, in the model's parameter order."""
        return self.structure.names

    @property
    def total(self) -> int:
        """Prunable units: weights, or channels for channel tickets (a sparsity level is a fraction of them)."""
        return self.structure.total

    def _pruning_levels(self) -> list[float]:
        """The configured levels that prune at least one unit."""
        return [s for s in self.levels if round(s * self.total) > 0]

    @property
    def schedule(self) -> list[int]:
        """Cumulative units pruned after each IMP round."""
        levels = self._pruning_levels()
        return pruning_schedule(self.total, levels, self.config.pruning.step) if levels else []

    @property
    def level_round(self) -> dict[float, int]:
        """Each pruning level's IMP round."""
        return levels_reached(self.schedule, self.total, self._pruning_levels())

    def describe(self) -> str:
        """Which tensors get masks and how many weights: printed at the start of every run; after an
        extraction, also what its tickets pruned away whole (tensors, output rows)."""
        text = self.structure.describe(self.model)
        return "\n".join([text, *(f"warning: {line}" for line in self._pruned_away)])

    def _warn(self, message: str) -> None:
        """A problem the results would hide: one log line, or a Python warning when nothing logs."""
        if self.log is quiet:
            warnings.warn(message, stacklevel=3)
        else:
            self.log(f"warning: {message}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _state_name(self, what: str) -> str:
        return f"{what}_{self.name}" if self.name else what

    def _to_device(self, state: State) -> State:
        return {k: v.to(self.device) for k, v in state.items()}

    def _open(self, streams: Sequence[Stream]) -> None:
        """Claim the run directory ``out`` (first use): recorded identity, or refusal when it differs."""
        if self.example_inputs is None and self._structure is None:
            self.example_inputs = first_inputs(streams[0])
        if self.out is None or self.store is not None:
            return
        directory = CheckpointDirectory(self.out, log=self.log)
        recipe = self.config.to_dict()
        recipe["pruning"].pop("sparsities")  # adding a level reuses the nested rounds on disk
        # θ₀'s fingerprint is part of the identity: another initialization is refused, and a corrupt
        # θ₀ file can only be rewritten from a model that has the recorded weights.
        directory.claim({"version": IDENTITY_VERSION, "recipe": recipe, "masked": self.prunable,
                         "model": model_identity(self.model), "theta0": fingerprint(self._initial),
                         "data_fingerprint": stream_fingerprint(streams)})
        self.store = directory

    @property
    def theta0(self) -> State:
        """The shared initialization: from the store when a run started before, else the model's weights
        when this object was made (and saved to the store)."""
        if self._theta0 is None:
            self._theta0 = self._initial_state()
        return self._theta0

    def _initial_state(self) -> State:
        stored = self.store.load_state(self._state_name("theta0")) if self.store is not None else None
        if stored is None:
            if self._initial is None:
                raise RuntimeError("tickets loaded from a checkpoint hold trained weights, not θ₀: extract or "
                                   "retrain with a new AdaptiveTickets over the initial model")
            stored = self._initial
            if self.store is not None:
                self.store.save_state(self._state_name("theta0"), stored)
        # Reading θ₀ never loads it into the model: a resumed retraining reads it after loading its
        # checkpoint, and a load here put the weights back to θ₀ under the saved optimizer states.
        return self._to_device(stored)

    def _rewind_point(self, stream: Stream | None = None) -> State:
        """Where survivors rewind to: θ₀ (the paper), or θ_j after ``pruning.rewind_steps`` dense steps
        on ``stream`` (all data)."""
        j = self.config.pruning.rewind_steps
        if j == 0:
            return self.theta0
        if self._rewind is None:
            stored = self.store.load_state(self._state_name("rewind")) if self.store is not None else None
            if stored is not None:
                self.progress.advance(j, "rewind point (resumed)")
            else:
                if stream is None:
                    raise ValueError(f"pruning.rewind_steps={j} needs a stream over all data to take them on "
                                     "(pass rewind_stream=...)")
                self.log(f"rewind point: {j} dense steps on all data")
                self.model.load_state_dict(self.theta0)
                train(self.model, None, stream, 10**9, self.config.training.optimizer,
                      derive_seed(self.config.seed, "rewind"), self.progress, max_steps=j)
                stored = snapshot(self.model)
                if self.store is not None:
                    self.store.save_state(self._state_name("rewind"), stored)
            self._rewind = self._to_device(stored)
        return self._rewind

    # -- stage 1 -----------------------------------------------------------------------------
    def _imp_rounds(self, stream_id: str, stream: Stream, epochs: int | None = None,
                   rewind_stream: Stream | None = None, context: str | None = None) -> list[Mask]:
        """Every IMP round's mask on one stream; rounds already in the store (for the same schedule) are reused.

        When the first round this call trains barely moves the training loss, a warning names the
        stream (``context``: its name for people) and the settings to raise.
        """
        epochs = self.config.training.imp_epochs if epochs is None else epochs
        done: list[Mask] = []
        if self.store is not None:
            for r, pruned in enumerate(self.schedule):
                mask = self.store.load_round(stream_id, r, pruned, self.prunable)
                if mask is None:
                    break
                done.append({n: m.to(self.device) for n, m in mask.items()})  # saved on CPU, resumed anywhere
        if done:
            self.progress.advance(len(done) * epochs * stream.num_batches, f"{stream_id}: {len(done)} rounds on disk")
        if len(done) < len(self.schedule):
            self.log(f"IMP {stream_id}: rounds {len(done) + 1}..{len(self.schedule)}")
            save = None if self.store is None else (
                lambda r, m: self.store.save_round(stream_id, r, m, self.schedule[r]))  # type: ignore[union-attr]
            trace = LossTrace(stream, epochs)
            first = len(done)
            done += extract_ticket(
                self.model, self._rewind_point(rewind_stream), self.prunable, trace.stream, self.schedule, epochs,
                self.config.training.optimizer, derive_seed(self.config.seed, "imp", stream_id),
                self.config.pruning.scope, self.progress, resume=(len(done) - 1, done[-1]) if done else None,
                on_round=save, prune=self.structure.prune, start_mask=self.structure.ones())
            stalled = trace.stalled()
            if stalled is not None:
                who = stream_id if context is None else f"{stream_id} ({context!r})"
                self._warn(f"{who}: training barely moved the loss in IMP round {first + 1} ({stalled[0]:.4g} -> "
                           f"{stalled[1]:.4g} over {epochs} epoch(s), first to last quarter): unless the model started "
                           f"trained, it is undertrained; raise training.optimizer.lr (now "
                           f"{self.config.training.optimizer.lr:g}) or training.imp_epochs")
        return done

    def _mask_at(self, rounds: Sequence[Mask], level: float) -> Mask:
        """The ticket at ``level`` from a stream's rounds (all ones at a level that prunes nothing)."""
        if round(level * self.total) == 0:
            return {n: m.to(self.device) for n, m in self.structure.ones().items()}
        if level not in self.level_round:
            raise ValueError(f"sparsity {level} is not one of this recipe's levels {self.levels}")
        return rounds[self.level_round[level]]

    def _basis(self, level: float) -> list[int]:
        """What a ticket at ``level`` depends on in stage 1: the cumulative pruned count of every round up to it.

        Rounds saved for another plan (a level inserted below changes the later rounds) are
        recomputed; those of the same plan are reused when a level is added above.
        """
        return [] if level not in self.level_round else self.schedule[: self.level_round[level] + 1]

    def _locked(self) -> contextlib.AbstractContextManager[Any]:
        """The store's lock while this object writes into it (a directory opened through ``out``)."""
        locked = getattr(self.store, "locked", None) if self.out is not None else None
        return locked() if callable(locked) else contextlib.nullcontext()

    def extract(self, streams: Sequence[Stream] | Mapping[str, Stream],
                rewind_stream: Stream | None = None) -> dict[float, MaskSet]:
        """Stage 1 for every context: ``{level: MaskSet}`` of K nested tickets at every configured level.

        By iterative magnitude pruning (the paper), or, with ``pruning.score`` set, one-shot: each
        context's score (``scores.SCORES``, e.g. Wanda) of the model's current (pretrained) weights
        from one epoch of its stream as calibration data, cut at every level (``scores.one_shot_mask``).
        """
        names, streams = _named(streams, self.loss)
        self._open(streams)
        with self._locked():
            return self._extract(names, streams, rewind_stream)

    def _extract(self, names: list[str], streams: list[Stream], rewind_stream: Stream | None) -> dict[float, MaskSet]:
        if len(streams) == 1:
            warnings.warn("one context: its ticket is single-mask IMP on that context's data, and there is "
                          "nothing to route between", stacklevel=2)
            self.log("warning: one context, so RTL reduces to single-mask IMP")
        if self.config.pruning.score is not None:
            tickets = {level: MaskSet.from_tickets(masks, names)
                       for level, masks in self._one_shot(names, streams).items()}
        else:
            rounds = [self._imp_rounds(f"context_{k:02d}", s, rewind_stream=rewind_stream, context=names[k])
                      for k, s in enumerate(streams)]
            tickets = {level: MaskSet.from_tickets([self._mask_at(r, level) for r in rounds], names)
                       for level in self.levels}
        self._pruned_away = [line for level, masks in tickets.items()
                             if (line := pruned_away(masks, level, self.config.pruning))]
        for line in self._pruned_away:
            self._warn(line)
        return tickets

    def _one_shot(self, names: list[str], streams: list[Stream]) -> dict[float, list[Mask]]:
        """Every level's one-shot mask of every context: the score of the weights the model holds now (θ₀,
        pretrained), from one epoch of the context's stream as calibration batches. Deterministic (the
        epoch is drawn from the recipe's seed), so a resumed run recomputes the same masks."""
        pruning = self.config.pruning
        score = resolve_score(pruning.score)
        prunable = set(self.prunable)
        weights = {n: p.detach() for n, p in self.model.named_parameters() if n in prunable}
        per_level: dict[float, list[Mask]] = {level: [] for level in self.levels}
        for k, stream in enumerate(streams):
            batches = stream.epoch(generator(self.config.seed, "calibration", k))
            activations = None
            if needs_activations(score):  # a score of the weights alone needs no forward pass
                activations = input_norms(self.model, self.prunable, (x for x, _ in batches),
                                          forward=lambda model, x: model(*as_tuple(x)))
            scored = compute_scores(score, weights, activations)
            for level in self.levels:
                per_level[level].append(one_shot_mask(scored, None if pruning.n_m else level,
                                                      granularity=pruning.score_group, n_m=pruning.n_m))
            self.log(f"one-shot {pruning.score} masks of {names[k]!r} at {', '.join(f'{v:.0%}' for v in self.levels)}")
        return per_level

    # -- stage 2 -----------------------------------------------------------------------------
    def retrain(self, streams: Sequence[Stream] | Mapping[str, Stream], masks: MaskSet, method: str = "rtl",
                level: float | None = None, rewind_stream: Stream | None = None) -> RoutedModel:
        """Stage 2 (Algorithm 2): the K subnetworks take turns training the shared θ; returns the routed model.

        Streams are paired with the masks of the same context names (a sequence of streams with
        other names pairs by position). ``method`` and ``level`` name this retraining: its seed and
        its checkpoint in the store, which is tied to the masks it trains, so a state saved for
        other masks is never resumed.
        """
        by_name = isinstance(streams, Mapping)
        names, streams = _named(streams, self.loss)
        if len(streams) != masks.num_contexts:
            raise ValueError(f"{len(streams)} streams for {masks.num_contexts} masks")
        if sorted(names) == sorted(masks.context_names):  # each mask with its own context's data
            streams = [streams[names.index(n)] for n in masks.context_names]
        elif by_name:
            raise ValueError(f"streams {names} do not match the masks' contexts {list(masks.context_names)}")
        self._open(streams)
        with self._locked():
            return self._retrain(streams, masks, method, level, rewind_stream)

    def _retrain(self, streams: list[Stream], masks: MaskSet, method: str, level: float | None,
                 rewind_stream: Stream | None) -> RoutedModel:
        training = self.config.training
        seed_parts = (method,) if level is None else (method, str(level))  # the runner's seeds since v0.1
        key = method if level is None else f"{method}_{level:.4f}"
        basis = fingerprint(masks.packed())
        # The rewind point first: taking it may train the model (θ_j), so it must come before a
        # saved epoch's weights are loaded, never after.
        init_state = self._rewound_aliases(self._rewind_point(rewind_stream), masks)
        saved = self.store.load_training(key, basis) if self.store is not None else None
        resume = None
        finished = False
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            resume = (saved["epoch"], saved["optimizers"])
            finished = saved["epoch"] + 1 >= training.epochs
            per_epoch = masks.num_contexts * max(s.num_batches for s in streams)
            self.progress.advance((saved["epoch"] + 1) * per_epoch, f"{key}: epoch {saved['epoch'] + 1} on disk")

        keep_last = self.out is not None  # see below: only then is the last epoch's state read again

        def checkpoint(epoch: int, optimizers: Sequence[Any]) -> None:
            if self.store is not None and (keep_last or epoch + 1 < training.epochs):
                self.store.save_training(key, basis, {"epoch": epoch, "model": snapshot(self.model),
                                                      "optimizers": [o.state_dict() for o in optimizers]})

        if not finished:  # a finished retraining's last epoch is the result: loaded above, bit for bit
            joint_retrain(self.model, init_state, masks, streams, training.epochs,
                          training.optimizer, derive_seed(self.config.seed, *seed_parts), self.progress,
                          resume=resume, on_epoch=checkpoint)
        # The runner keeps a finished level in its records and ticket checkpoint; a directory given as
        # ``out`` keeps the last epoch instead, so that fit() called again loads the result.
        if self.store is not None and not keep_last:
            self.store.drop_training(key)
        self.masks, self.level = masks, level
        return self.routed

    def _rewound_aliases(self, state: State, masks: MaskSet) -> State:
        """``state`` with every other name of a tied, masked tensor already rewound to the union of the masks.

        ``model.load_state_dict`` copies each name in turn into the one tensor, so an alias left
        unmasked would put back the weights that no ticket keeps (harmless to every subnetwork's
        output, but no longer exact zeros).
        """
        union = masks.union()
        tied = {a: c for a, c in self._aliases.items() if c in union and a in state}
        return {**state, **{a: state[c] * union[c].to(device=state[c].device, dtype=state[c].dtype)
                            for a, c in tied.items()}}

    def fit(self, streams: Sequence[Stream] | Mapping[str, Stream], level: float | None = None,
            rewind_stream: Stream | None = None) -> AdaptiveTickets:
        """Extract the tickets and retrain them jointly at ``level`` (default: the highest configured);
        returns ``self``, as scikit-learn's ``fit`` does: ``rtl.fit(streams).routed(x, contexts)``.

        With ``out``, a second call on a finished directory loads the result (the same masks and
        weights, bit for bit) without training; an interrupted one resumes from its last epoch.
        """
        level = max(self.levels) if level is None else float(level)
        if level not in self.levels:
            raise ValueError(f"sparsity {level} is not one of this recipe's levels {self.levels}")
        masks = self.extract(streams, rewind_stream)[level]
        self.retrain(streams, masks, level=level, rewind_stream=rewind_stream)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Deprecated (0.2's ``fit`` returned the routed model): ``rtl.routed(...)``."""
        warnings.warn("AdaptiveTickets.fit() returns the AdaptiveTickets since 0.3 (as scikit-learn's fit); route "
                      "inputs with .routed(x, context)", DeprecationWarning, stacklevel=2)
        return self.routed(*args, **kwargs)

    # -- inference and files -----------------------------------------------------------------
    @property
    def routed(self) -> RoutedModel:
        """The routed model over the current masks (``RoutedModel``), made in evaluation mode on first use and
        kept -- with what it caches (materialized weights, the mixed path it chose) -- until the masks or
        the model change. Its router is ``self.router``."""
        if self.masks is None:
            raise RuntimeError("no tickets yet: call fit() or extract() + retrain(), or AdaptiveTickets.load()")
        if self._routed is None or self._routed.masks is not self.masks or self._routed.model is not self.model:
            self._routed = RoutedModel(self.model, self.masks, router=self._router).eval()
        return self._routed

    @property
    def router(self) -> Router | None:
        """Routes inputs given without a context (``routed(x)``); saved with the tickets (``router.save_router``)."""
        return self._router

    @router.setter
    def router(self, value: Router | None) -> None:
        self._router = value
        if self._routed is not None:
            self._routed.router = value

    # Stage-1 internals, named publicly in 0.2; the runner reads them as the tickets' friend.
    def rewind_point(self, stream: Stream | None = None) -> State:
        """Deprecated alias of a private method (0.2); kept for one release."""
        _deprecated("rewind_point", "theta0 (or rtl.fit / retrain, which rewind for you)")
        return self._rewind_point(stream)

    def imp_rounds(self, *args: Any, **kwargs: Any) -> list[Mask]:
        """Deprecated alias of a private method (0.2); kept for one release."""
        _deprecated("imp_rounds", "extract(streams)")
        return self._imp_rounds(*args, **kwargs)

    def mask_at(self, rounds: Sequence[Mask], level: float) -> Mask:
        """Deprecated alias of a private method (0.2); kept for one release."""
        _deprecated("mask_at", "extract(streams)[level]")
        return self._mask_at(rounds, level)

    def basis(self, level: float) -> list[int]:
        """Deprecated alias of a private method (0.2); kept for one release."""
        _deprecated("basis", "nothing: it is bookkeeping of the run directory")
        return self._basis(level)

    def save(self, directory: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """The shared weights, packed masks and recipe in ``directory`` (see ``io.save_tickets``)."""
        if self.masks is None:
            raise RuntimeError("nothing to save: call fit() or retrain() first")
        recipe = {"recipe": self.config.to_dict(), "masked": self.prunable, "sparsity": self.level}
        if self._structure is not None and hasattr(self._structure, "roots"):  # channel tickets: read by diagnostics
            recipe["channel_groups"] = {g: [t, d] for g, (t, d) in self._structure.roots().items()}
        if self.thresholds is not None:
            recipe["thresholds"] = self.thresholds.to_dict()
        path = save_tickets(directory, self.model, self.masks, {**recipe, **(metadata or {})})
        save_router(self.router, path / "router")  # any registered router, by its name (router.ROUTERS)
        return path

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, features: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> AdaptiveTickets:
        """Tickets saved by ``save`` loaded into ``model`` (same architecture), with the recipe that made them,
        their calibrated thresholds and their learned router (``features``: the router's feature map when it
        was not the default flattening) when they were saved."""
        masks, metadata = load_tickets(directory, model)
        try:
            config = _recipe_from_dict(metadata["recipe"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{directory}: no usable recipe in its metadata ({err}); was it written by "
                                  "AdaptiveTickets.save?") from None
        saved = set(masks.tensor_names)
        if config.pruning.granularity == "weight":
            tickets = cls(model, config, select=lambda name, tensor: name in saved)
            if set(tickets.prunable) != saved:
                raise CheckpointError(f"{directory}: its masks cover {sorted(saved)[:4]}..., which the recipe's "
                                      f"patterns do not select in this model")
        else:  # loaded tickets route; they are not pruned further, so their masks are all the structure needed
            tickets = cls(model, config)
            params = dict(model.named_parameters())
            tickets._structure = WeightStructure({n: params[n] for n in masks.tensor_names})
        tickets.masks, tickets.level, tickets.metadata = masks, metadata.get("sparsity"), metadata
        if metadata.get("thresholds") is not None:
            try:
                tickets.thresholds = Thresholds.from_dict(metadata["thresholds"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{directory}: its calibrated thresholds are unreadable ({err})") from None
            if tickets.thresholds.num_contexts != masks.num_contexts:
                raise CheckpointError(f"{directory}: {tickets.thresholds.num_contexts} thresholds for "
                                      f"{masks.num_contexts} contexts")
        tickets.router = load_router(Path(directory) / "router", features=features, thresholds=tickets.thresholds)
        tickets._initial = None  # the checkpoint holds trained weights, not the shared initialization
        return tickets


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(f"AdaptiveTickets.{name} is internal since 0.3 and will be removed; use {instead}",
                  DeprecationWarning, stacklevel=3)


def _named(streams: Sequence[Stream] | Mapping[str, Any], loss: Loss | None = None) -> tuple[list[str], list[Stream]]:
    """Context names and streams, from a mapping name -> stream or a sequence (names from the streams).

    In a mapping, a ``DataLoader`` (or any re-iterable of ``(x, y)`` batches) stands for a stream:
    ``training.as_stream`` wraps it with ``loss`` (``AdaptiveTickets(..., loss=...)``).
    """
    if isinstance(streams, Mapping):
        names = [str(n) for n in streams]
        items = [s if isinstance(s, Stream) or loss is None else as_stream(n, s, loss) for n, s in zip(names, streams.values())]
    else:
        items = list(streams)
        names = [s.name for s in items]
    if not items:
        raise ValueError("no contexts: give at least one stream")
    if len(set(names)) != len(names):
        raise ValueError(f"context names must be distinct; got {names}")
    bad = [type(s).__name__ for s in items if not isinstance(s, Stream)]
    if bad:
        raise ValueError(f"every context needs a Stream, or a DataLoader with AdaptiveTickets(..., loss=...) to train "
                         f"it with (training.as_stream); got {bad}")
    return names, items


def weight_structure(model: nn.Module, names: Sequence[str], pruning: PruningConfig) -> WeightStructure:
    """The weight units of ``names`` with the recipe's floor, one weight per slice of a weight-normed
    direction, and what else each tensor is (for ``describe``)."""
    params = dict(model.named_parameters())
    directions = {v: (w, dim) for w, (v, dim) in weight_norm_directions(model).items()}
    notes: dict[str, str] = {}
    for alias, name in parameter_aliases(model).items():
        notes[name] = f"{notes[name]}, {alias}" if name in notes else f"tied: also {alias}"
    for v, (w, dim) in directions.items():
        kept = "the whole tensor" if dim < 0 else f"every slice along dim {dim}"
        notes[v] = f"weight_norm direction v of {w}; {kept} keeps a weight"
    return WeightStructure({n: params[n] for n in names}, pruning.min_keep_per_tensor,
                           {n: directions[n][1] for n in names if n in directions}, notes)


def check_floors(structure: WeightStructure, level: float) -> None:
    """``ConfigError`` when the highest level would prune into what the floors keep."""
    keep = sum(structure.floor(n) for n in structure.names)
    left = structure.total - round(level * structure.total)
    if keep > left:
        raise ConfigError(f"pruning.sparsities: {level:.0%} leaves {left:,} of {structure.total:,} weights, fewer "
                          f"than every ticket must keep ({keep:,}: pruning.min_keep_per_tensor "
                          f"{structure.min_keep:g} of each tensor, and one weight per slice of a weight-normed "
                          "tensor); lower the level or the floor")


def pruned_away(masks: MaskSet, level: float, pruning: PruningConfig) -> str:
    """One line on what tickets at ``level`` prune away whole ("" when nothing): any tensor, and rows
    of the last masked layer (the model's outputs, when that layer is its head).

    A hidden unit left without inputs is an ordinary effect of unstructured pruning; a layer left
    without weights, or an output without inputs, makes what follows a constant.
    """
    out_layer = next((n for n in reversed(masks.tensor_names) if len(masks.shapes[n]) >= 2), None)
    tensors: dict[str, int] = {}
    rows: tuple[int, int, int] = (0, 0, 0)  # most output rows emptied in one ticket, rows, tickets
    for k in range(masks.num_contexts):
        whole, empty_rows = emptied(masks[k])
        for n in whole:
            tensors[n] = tensors.get(n, 0) + 1
        if out_layer in empty_rows:
            dead, total = empty_rows[out_layer]
            rows = (max(rows[0], dead), total, rows[2] + 1)
    k = masks.num_contexts
    parts, remedies = [], []
    if tensors:
        parts.append("every weight of " + ", ".join(f"{n} (in {c} of {k} tickets)" for n, c in tensors.items()))
        remedies.append("pruning.min_keep_per_tensor keeps a share of every tensor" + (
            " (global ranking compares magnitudes across tensors, so one of smaller weights goes first; "
            "pruning.scope: layerwise prunes each alike)" if pruning.scope == "global" else ""))
    if rows[2]:
        parts.append(f"whole output rows of {out_layer}, the last masked layer (up to {rows[0]} of {rows[1]} "
                     f"rows, in {rows[2]} of {k} tickets)")
        remedies.append(f"pruning.exclude: [{out_layer!r}] leaves that layer dense")
    if not parts:
        return ""
    return (f"at {level:.0%} sparsity the tickets prune away {'; and '.join(parts)}: what those compute is then "
            f"a constant (a bias at most); {'; '.join(remedies)}, or lower the level")


class LossTrace:
    """The training losses of the first IMP round trained on a stream: whether training moved them at all.

    A model trained with too small a learning rate (the paper's 1e-4 on a small model) gives
    tickets and figures that look like any others; the only sign is a loss that did not move.
    The stream is wrapped, not changed: the same batches, the same loss values.
    """

    def __init__(self, stream: Stream, epochs: int) -> None:
        self.epochs, self.seen = epochs, 0
        self.losses: list[torch.Tensor] = []

        def epoch(gen: torch.Generator) -> Sequence[Any]:
            self.seen += 1
            return stream.epoch(gen)

        def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            value = stream.loss(outputs, targets)
            if self.seen <= self.epochs:  # detached, no sync: read once, at the end
                self.losses.append(value.detach())
            return value

        self.stream = Stream(stream.name, epoch, loss, stream.num_batches)

    def stalled(self, min_drop: float = 0.05) -> tuple[float, float] | None:
        """(first, last) quarter's mean loss when the last is not ``min_drop`` (relative) below the first,
        else None; None too with fewer than 8 steps, too few to tell.

        Measured on the first round (dense, from θ₀): a breast-cancer MLP's detectors dropped 92 % at
        lr 3e-3, 6-8 % at 1e-4 (balanced accuracy 0.58), 0 % at 1e-6; wine's 2-3 % at 1e-4 (0.63);
        the INR smoke run 98 %; the digits smoke run's classifier, two epochs a round, 7 %.
        """
        if len(self.losses) < 8:
            return None
        values = torch.stack([v.float().reshape(()) for v in self.losses]).cpu()
        quarter = len(values) // 4
        first, last = values[:quarter].mean().item(), values[-quarter:].mean().item()
        if not (math.isfinite(first) and math.isfinite(last)):
            return first, last
        return (first, last) if first - last < min_drop * abs(first) else None


def first_inputs(stream: Stream) -> Any:
    """The inputs of ``stream``'s first batch (fixed order): what a channel trace runs on."""
    batches = stream.epoch(torch.Generator().manual_seed(0))
    if not batches:
        raise ValueError(f"stream {stream.name!r} has no batches to trace the model on")
    return batches[0][0]


def stream_fingerprint(streams: Sequence[Stream]) -> str:
    """A fingerprint of the data behind ``streams``: names and the batches of one epoch each, fixed seed
    (one stream's epoch in memory at a time)."""
    return fingerprint([fingerprint(s.name, s.num_batches, list(s.epoch(torch.Generator().manual_seed(0))))
                        for s in streams])


def model_identity(model: nn.Module) -> dict[str, str]:
    """What a run's identity records of its network: its class and its state_dict layout."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "signature": model_fingerprint(model),
            "structure": fingerprint(repr(model))}


def tensor_stream(name: str, inputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor,
                  loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int = 64) -> Stream:
    """A context's ``Stream`` over in-memory tensors, reshuffled every epoch by the generator it is given.

    ``inputs`` is a tensor ``(N, ...)`` or a tuple of them (a model taking several inputs).
    """
    parts = as_tuple(inputs)
    n = len(targets)
    if n == 0:
        raise ValueError(f"context {name!r} has no examples")
    if any(len(p) != n for p in parts):
        raise ValueError(f"context {name!r}: inputs have {[len(p) for p in parts]} rows for {n} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    def epoch(gen: torch.Generator) -> list[tuple[Any, torch.Tensor]]:
        order = torch.randperm(n, generator=gen)
        batches = []
        for index in order.split(batch_size):
            x = tuple(p[index] for p in parts)
            batches.append((x if len(x) > 1 else x[0], targets[index]))
        return batches

    return Stream(name, epoch, loss, -(-n // batch_size))


def _recipe_from_dict(raw: Mapping[str, Any]) -> RTLConfig:
    return build(RTLConfig, json.loads(json.dumps(raw)))
