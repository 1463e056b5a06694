"""The contract between an experiment's data and the runner: streams to train on, models, scores.

Every experiment (classification, implicit neural representations, speech enhancement) is a
``Task``: K contexts, a training ``Stream`` per context (what RTL, multiple IMP and the random
control train on), one stream over all data (dense and single-mask IMP), the networks, and two
scorers that turn predictions into flat result rows. The runner (``experiment.Experiment``) owns
everything else -- θ₀, IMP rounds, joint retraining, resuming, accounting -- identically for all.

Beyond the required ``Task``, a task declares optional capabilities by having their members
(scikit-learn's tags, written as ``Protocol`` s): ``SupportsRouting``, ``SupportsDetectors``,
``ArgmaxRows`` and the others in ``CAPABILITIES``. The runner asks ``supports(task, "routing")``
or ``capabilities(task)`` instead of probing attributes, and ``check_task`` (``tasks.checks``)
reports a capability declared by one member whose partners are missing.

This module sits at the bottom of the experiment framework and imports nothing of the runner, the
methods or the reports: a task is written against it alone, and the methods and the runner read
it (``tasks.base`` re-exports it beside the helpers tasks share).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .training import Stream

SharedPredict = Callable[[torch.Tensor], torch.Tensor]
"""The dense or single-mask network: inputs (as the shared stream builds them) -> outputs."""

RoutedPredict = Callable[[int, torch.Tensor], torch.Tensor]
"""Context k's subnetwork: ``predict(k, inputs)`` -> outputs."""

Row = dict[str, Any]


# -- the required contract ------------------------------------------------------------------------------
class Task(Protocol):
    """What the runner needs of every experiment's data; ``check_task(task)`` tests a task against it.

    The runner builds the model under a seeded generator state (``build_model`` must not seed
    anything itself) and hands every scorer the directory where it may keep example outputs.
    Optional capabilities are the ``Protocol`` s below (``CAPABILITIES``).
    """

    context_names: Sequence[str]
    """The K contexts' names in context-id order. Read when the runner is built: K is its length (one
    mask, one stream, one detector per context), and the names key the tickets, tables and figures."""

    shared_epoch_factor: int
    """How many times the context streams' epoch count the shared stream trains for (classification: 2,
    because a detector epoch shows each sample about twice -- once positive, once as a negative)."""

    def context_stream(self, k: int) -> Stream:
        """Context k's training data (``ValueError`` for k outside 0..K-1). Built once per context when the
        runner starts; its epochs train multiple IMP's and RTL's rounds, joint retraining and the random control."""

    def shared_stream(self) -> Stream:
        """All contexts' training data in one stream. Built once when the runner starts; trains the dense
        network and single-mask IMP (for ``shared_epoch_factor`` times the context streams' epochs)."""

    def data_fingerprint(self) -> str:
        """A hash of the data this task serves (``fingerprint.fingerprint``): part of a run's identity.

        Called when a run directory is claimed; a resume with other data is refused, so it must be
        the same on every call and every machine for the same data."""

    def build_model(self) -> nn.Module:
        """The network whose weights the K context masks share (and multiple IMP copies).

        Called once per run (and per worker process) under the run's seeded generator, so its
        initialization is the run's θ₀; ``export`` and ``calibrate`` call it again to load tickets into."""

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        """The dense / single-mask network; ``model`` itself unless the baseline differs (INR).

        Called right after ``build_model`` with its result, so both start from the same θ₀."""

    def score_shared(self, predict: SharedPredict, label: str, outputs: Path | None = None) -> list[Row]:
        """Rows of metrics for the dense / single-mask network (one row, or one per sub-group).

        Called once per (method, level) the shared network is scored at, under ``torch.no_grad``.
        ``label`` names the method and level (``"single_imp_0.5000"``); tasks that keep example
        outputs for figures write them into ``outputs`` under that name.
        """

    def score_routed(self, predict: RoutedPredict, label: str, outputs: Path | None = None) -> list[Row]:
        """Rows of metrics when every test input is handled by its own context's subnetwork (oracle routing).

        Called once per (method, level) of a routed method (multiple IMP, RTL, random control),
        under ``torch.no_grad``; ``label`` and ``outputs`` as for ``score_shared``. A task that can
        score a routing it did not choose also takes ``chosen=`` (``SupportsRouting``)."""


REQUIRED_ATTRIBUTES = ("context_names", "shared_epoch_factor")
"""The ``Task`` members that are values."""

REQUIRED_METHODS = ("context_stream", "shared_stream", "data_fingerprint", "build_model", "build_shared_model",
                    "score_shared", "score_routed")
"""The ``Task`` members that the runner calls."""


# -- optional capabilities ----------------------------------------------------------------------------
class HasContextExamples(Protocol):
    """Inputs with their true contexts: what routers fit on and are scored against, and what ``export``
    verifies a compact model on."""

    def context_examples(self, split: str) -> tuple[Any, torch.Tensor]:
        """``(inputs, contexts)`` of ``split``: ``"train"`` and ``"test"``, and ``"calibration"`` (held out
        of the training data, for detectors to calibrate) where the task has one -- a ``ValueError``
        (e.g. ``DataError``) where it has not. ``contexts`` holds one context id per input row."""


class SupportsRouting(HasContextExamples, Protocol):
    """Deployment without an oracle (``run.deploy``): the runner routes test inputs with each router the task
    names in ``routers`` (default ``("learned",)``; see ``task_setting``) and with injected routing errors,
    and has the task score those routings. Called once per routed (method, level), inside ``torch.no_grad``."""

    def score_routed(self, predict: RoutedPredict, label: str, outputs: Path | None = None,
                     chosen: torch.Tensor | None = None) -> list[Row]:
        """As ``Task.score_routed``; given ``chosen`` (one context id per ``context_examples("test")`` row),
        input i goes to subnetwork ``chosen[i]``. ``chosen`` equal to the true contexts must score as oracle
        routing does, except where the context is the label (``ContextIsLabel``): there the router's choice is
        the answer."""


class SupportsDetectors(HasContextExamples, Protocol):
    """One-vs-rest detectors, one per context (classification): the detector router reads their logits
    instead of running K more passes, ``rtl calibrate`` fits their thresholds on the calibration split,
    and with ``ArgmaxRows`` they are scored as one K-way classifier."""

    def detector_scores(self, predict: RoutedPredict, split: str = "test") -> torch.Tensor:
        """(N, K) float logits on ``context_examples(split)``'s N inputs: column k is detector k's."""


class ReusesScores(Protocol):
    """A cache over one (method, level)'s scoring: the runner scores the oracle routing, the argmax rows and
    the calibrated detectors of the same weights inside one ``reusing_scores()`` block."""

    def reusing_scores(self) -> AbstractContextManager[None]:
        """A context manager inside which the weights do not change, so repeated scores may be kept;
        outside it nothing is kept."""


class RouterFeatures(SupportsRouting, Protocol):
    """What the learned router sees of an input (default: the flattened input, ``router.flatten_features``).
    The runner fits the router on ``router_features(context_examples("train")[0])`` and checks a saved
    router against the same function."""

    def router_features(self, inputs: Any) -> torch.Tensor:
        """(N, F) float features of N inputs (``speech``: the noisy clip's spectrum)."""


class ContextIsLabel(Protocol):
    """The context is the answer (classification): a router is itself a K-way classifier, so the runner
    injects no routing errors (a wrong context is a wrong answer by definition)."""

    context_is_label: bool
    """True declares the capability; False (or absent) says that routing errors cost quality."""


class ArgmaxRows(SupportsDetectors, ContextIsLabel, Protocol):
    """Where the context is the label, the K detectors as one K-way classifier (the most confident
    detector's context is the answer): rows ``<method>+argmax``, scored like the dense classifier."""

    def score_predictions(self, predicted: torch.Tensor) -> Row:
        """Metrics of one context id per ``context_examples("test")`` row, as the shared classifier is scored."""


class WritesFigures(Protocol):
    """Figures from the example outputs the scorers kept; called once when every method is finished."""

    def write_figures(self, outputs: Path) -> list[Path]:
        """Draw what is in ``outputs``; return the files written."""


class ChecksOutputs(Protocol):
    """The example outputs a task keeps are verified on resume: a finished (method, level) whose output is
    missing or damaged is recomputed, so a resumed run's figures match an uninterrupted one's."""

    def output_problem(self, outputs: Path, label: str) -> str | None:
        """Why the output kept for ``label`` in ``outputs`` is missing or unusable; None when it verifies."""


class HasPartition(Protocol):
    """Contexts that group classes: the runner saves the grouping with the results and refuses to resume
    with another."""

    partition: Any
    """A ``contexts.partitions.Partition`` (``names``, ``assignment``, ``save``); None: contexts are classes."""


class HasContextMembers(Protocol):
    """The class names in each context, saved with the tickets so ``diagnose`` can relate masks to classes."""

    context_members: Sequence[Sequence[str]]
    """One list of class names per context (None: none to tell)."""


class Named(Protocol):
    """One part of a run of several tasks (INR: one task per image): the part's directory is its name."""

    name: str


# A piece of a capability is a member, present when callable, except these three kinds.
CHOSEN = "score_routed(chosen=)"
"""The piece ``score_routed`` accepting ``chosen=``."""

VALUES = ("partition", "context_members", "name")
"""Pieces that are values: present when not None."""

FLAGS = ("context_is_label",)
"""Pieces that are flags: present when true."""


@dataclass(frozen=True)
class Capability:
    """One optional capability: the member that declares it and the members it cannot work without.

    A task with ``declared_by`` but not every piece of ``needs`` has half a capability: the runner
    would skip it silently (or fail mid-run), so ``check_task`` names the missing pieces instead."""

    name: str
    protocol: type
    declared_by: str
    needs: tuple[str, ...] = ()

    @property
    def pieces(self) -> tuple[str, ...]:
        return (self.declared_by, *self.needs)


CAPABILITIES: Mapping[str, Capability] = {c.name: c for c in (
    Capability("examples", HasContextExamples, "context_examples"),
    Capability("routing", SupportsRouting, CHOSEN, ("context_examples",)),
    Capability("detectors", SupportsDetectors, "detector_scores", ("context_examples",)),
    Capability("reusing_scores", ReusesScores, "reusing_scores"),
    Capability("router_features", RouterFeatures, "router_features", ("context_examples", CHOSEN)),
    Capability("context_is_label", ContextIsLabel, "context_is_label"),
    Capability("argmax", ArgmaxRows, "score_predictions", ("context_is_label", "detector_scores", "context_examples")),
    Capability("figures", WritesFigures, "write_figures"),
    Capability("output_check", ChecksOutputs, "output_problem"),
    Capability("partition", HasPartition, "partition"),
    Capability("context_members", HasContextMembers, "context_members"),
    Capability("name", Named, "name"),
)}
"""Every optional capability by name."""

SETTINGS: Mapping[str, Any] = {"routers": ("learned",), "eval_batch_size": 1000}
"""Optional task settings and the default the runner uses where a task sets none: ``routers`` (the
routers that apply to a ``SupportsRouting`` task) and ``eval_batch_size`` (test rows per router pass)."""


def has_piece(task: Any, piece: str) -> bool:
    """Whether ``task`` has one piece of a capability, as the runner decides: a flag that is true, a value
    that is not None, ``score_routed`` with a ``chosen`` parameter, or else a callable member."""
    if piece == CHOSEN:
        return _accepts(getattr(task, "score_routed", None), "chosen")
    value = getattr(task, piece, None)
    if piece in FLAGS:
        return bool(value)
    if piece in VALUES:
        return value is not None
    return callable(value)


def _accepts(function: Any, parameter: str) -> bool:
    if not callable(function):
        return False
    try:
        return parameter in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature takes no keyword we know of
        return False


def _capability(capability: str | type) -> Capability:
    for known in CAPABILITIES.values():
        if capability in (known.name, known.protocol):
            return known
    name = getattr(capability, "__name__", capability)
    raise ValueError(f"capability must be one of {sorted(CAPABILITIES)} or their Protocols; got {name!r}")


def supports(task: Any, capability: str | type) -> bool:
    """Whether ``task`` has every piece of ``capability`` (a name in ``CAPABILITIES`` or its Protocol).

    >>> class Plain: context_is_label = False
    >>> supports(Plain(), "context_is_label"), supports(Plain(), SupportsRouting)
    (False, False)
    """
    return all(has_piece(task, piece) for piece in _capability(capability).pieces)


def capabilities(task: Any) -> frozenset[str]:
    """The names of every optional capability ``task`` has in full (see ``CAPABILITIES``)."""
    return frozenset(c.name for c in CAPABILITIES.values() if supports(task, c.name))


def half_capabilities(task: Any) -> dict[str, tuple[str, ...]]:
    """Capabilities ``task`` declares (has the declaring member of) without all the pieces they need:
    capability name -> the missing pieces. What ``check_task`` reports."""
    half = {}
    for c in CAPABILITIES.values():
        missing = tuple(p for p in c.needs if not has_piece(task, p))
        if has_piece(task, c.declared_by) and missing:
            half[c.name] = missing
    return half


def task_setting(task: Any, name: str) -> Any:
    """The task's optional setting ``name`` (``SETTINGS``), or its default where the task sets none."""
    if name not in SETTINGS:
        raise ValueError(f"name must be one of the task settings {sorted(SETTINGS)}; got {name!r}")
    value = getattr(task, name, None)
    return SETTINGS[name] if value is None else value


__all__ = [
    "CAPABILITIES", "CHOSEN", "FLAGS", "REQUIRED_ATTRIBUTES", "REQUIRED_METHODS", "SETTINGS", "VALUES", "ArgmaxRows",
    "Capability", "ChecksOutputs", "ContextIsLabel", "HasContextExamples", "HasContextMembers", "HasPartition",
    "Named", "ReusesScores", "RoutedPredict", "RouterFeatures", "Row", "SharedPredict", "SupportsDetectors",
    "SupportsRouting", "Task", "WritesFigures", "capabilities", "half_capabilities", "has_piece", "supports",
    "task_setting",
]
