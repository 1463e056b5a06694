"""One configured comparison in a run directory: stage 1 once, then every method at every level.

The RTL stages are ``AdaptiveTickets``' own (the front door); this runner adds what a comparison
needs around them -- the task's streams, the baselines (``methods.METHODS``), records and tables
-- and resumes whatever already finished (see ``run.directory`` for the layout). Every loop is
seeded by its position, so a killed run restarted on the same directory ends with the same masks
as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, build
from ..contexts.partitions import Partition, format_partition, reference_scores
from ..io import atomic_write_json, atomic_write_text
from ..fingerprint import fingerprint
from ..errors import ConfigError
from ..masks import Mask, MaskSet
from ..methods import METHODS, Method, Row
from ..report import write_deployment, write_results
from ..contract import Task, supports
from ..tickets import AdaptiveTickets, Log, first_inputs, quiet
from ..training import SILENT, ProgressSink, derive_seed
from .builders import TASKS
from .workers import run_stage_one
from .directory import RunDirectory, resolve_device, run_identity, software_environment

PYTHON_OBJECT = "python_object"
"""The ``task`` that the ``config.yaml`` of a run made from a Python ``Task`` object names."""


@TASKS.register(PYTHON_OBJECT)
def python_object(config: ExperimentConfig) -> Task:
    """A run made from a Python ``Task`` object (``run_experiment(config, out, tasks=task)``): no file can
    rebuild that object, so what rebuilds a run's task from its ``config.yaml`` (``rtl export``, ``rtl
    calibrate``, ``rtl run``) stops here with the way that works, instead of building another task."""
    raise ConfigError(f"this run was made from a Python Task object ({config.data.name}, model {config.model.name}), "
                      "which its config.yaml cannot rebuild for rtl export, calibrate or run; in Python, load the "
                      "tickets into your task's model: tickets = AdaptiveTickets.load('RUN/checkpoints/rtl_<level>', "
                      "task.build_model()); routing_lottery.export.export_context(tickets.routed, context, 'OUT', "
                      "example_inputs) exports one context")


def _import_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def described_config(config: ExperimentConfig, task: Task, model: torch.nn.Module) -> ExperimentConfig:
    """What ``config.yaml`` says of a run made from a Python Task object: the task's and the model's classes
    in place of the task, data and model settings, which built nothing (the rest ran as written)."""
    return build(ExperimentConfig, {**config.to_dict(), "task": PYTHON_OBJECT,
                                    "data": {"name": _import_path(type(task))},
                                    "model": {"name": _import_path(type(model))}})


def seeded_models(task: Task, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The task's network and its baselines' network, built with the global generator seeded (and
    restored afterwards): θ₀ of both is a function of the run's seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.build_model()
        return model, task.build_shared_model(model)


def _on(inputs: Any, device: torch.device) -> Any:
    """``inputs`` (a tensor, a tuple of them or None) on ``device``."""
    if inputs is None or isinstance(inputs, torch.Tensor):
        return None if inputs is None else inputs.to(device)
    return tuple(t.to(device) for t in inputs)


class Experiment:
    """Dense, single IMP, multiple IMP, RTL and the random control (or the configured subset) on one task."""

    def __init__(self, config: ExperimentConfig, out: str | Path, task: Task, progress: ProgressSink = SILENT,
                 log: Log = quiet, lock: bool = True, task_object: bool = False) -> None:
        # task_object: the task was handed in (run_experiment(tasks=...)), not built from the config, whose
        # default name ("digits") then does not name it in the records
        if task_object and config.name == ExperimentConfig.__dataclass_fields__["name"].default:
            config = config.replace(name=type(task).__qualname__)  # the name is not part of the identity
        self.config, self.task, self.progress, self.log = config, task, progress, log
        self.run = RunDirectory(out, log=log, lock=lock)
        self.device = resolve_device(config.device)
        self.methods: list[Method] = [METHODS.get(m) for m in config.methods]
        model, shared = seeded_models(task, derive_seed(config.seed, "init"))
        if shared is not model and config.pruning.rewind_steps:
            raise ConfigError("pruning.rewind_steps needs the baselines to share the RTL network; this task's differ")
        model = model.to(self.device)
        shared = model if shared is model else shared.to(self.device)
        # Everything that can refuse a setting (the masked tensors: pruning.include/exclude) is built
        # before the directory is claimed; AdaptiveTickets does no I/O until it is used.
        self.classifier = task.shared_stream()
        # Channel tickets trace the network on a batch of its inputs; weight tickets need none.
        example = first_inputs(self.classifier) if config.pruning.granularity == "channel" else None
        self.tickets = AdaptiveTickets(model, config, store=self.run, progress=progress, log=log,
                                       example_inputs=_on(example, self.device))
        self.shared_tickets = self.tickets if shared is model else AdaptiveTickets(
            shared, config, store=self.run, name="shared", progress=progress, log=log,
            example_inputs=_on(example, self.device))
        self.check_partition()
        self.run.claim(run_identity(config, task.data_fingerprint(), task, model),
                       described_config(config, task, model) if task_object else config)
        if lock:  # not part of the identity (a run may move between machines), but what its figures depend on
            atomic_write_json(self.run.path / "environment.json", software_environment(self.device))
        self.detectors = [task.context_stream(k) for k in range(self.num_contexts)]
        self.factor = task.shared_epoch_factor
        self.outputs = self.run.path / "outputs"
        self._single: list[Mask] | None = None
        self._contexts: dict[float, MaskSet] | None = None
        self.deployment: list[Row] = []  # rows without an oracle (methods.deployment), apart from the results
        self.learned_router: Any = None  # fitted once per run by methods.deployment.learned_router
        self.directory = self.run.path

    @property
    def num_contexts(self) -> int:
        return len(self.task.context_names)

    @property
    def levels(self) -> list[float]:
        return self.tickets.levels

    @property
    def model(self) -> torch.nn.Module:
        return self.tickets.model

    @property
    def description(self) -> str:
        units = "prunable channels" if self.config.pruning.granularity == "channel" else "masked weights"
        return (f"{self.num_contexts} contexts, {self.tickets.total:,} {units}, sparsities "
                f"{', '.join(f'{s:.0%}' for s in self.levels)}, {len(self.tickets.schedule)} IMP rounds, "
                f"device {self.device}")

    # -- planning, for progress bars --------------------------------------------------------
    def planned_steps(self) -> int:
        """Training steps the whole run takes (the progress bar's total)."""
        t = self.config.training
        steps = self.config.pruning.rewind_steps
        if any(m.needs_single for m in self.methods):
            steps += len(self.shared_tickets.schedule) * self.factor * t.imp_epochs * self.classifier.num_batches
        if any(m.needs_contexts for m in self.methods):
            steps += len(self.tickets.schedule) * t.imp_epochs * sum(s.num_batches for s in self.detectors)
        return steps + sum(m.steps(self) * (len(self.levels) if m.per_level else 1) for m in self.methods)

    # -- stage 1, once per run ----------------------------------------------------------------
    def single_rounds(self) -> list[Mask]:
        """Every round of single-mask IMP on all data (from disk where finished)."""
        if self._single is None:
            self._single = self.shared_tickets._imp_rounds(
                "single", self.classifier, self.factor * self.config.training.imp_epochs, rewind_stream=self.classifier)
        return self._single

    def context_masks(self) -> dict[float, MaskSet]:
        """The K per-context tickets at every level (from disk where finished)."""
        if self._contexts is None:
            streams = dict(zip(self.task.context_names, self.detectors))  # named by the task, whatever the streams say
            self._contexts = self.tickets.extract(streams, rewind_stream=self.classifier)
        return self._contexts

    def checkpoint_dir(self, method: str, level: float) -> Path:
        """Where ``method`` keeps its tickets at ``level`` (``methods.context.RunContext``)."""
        return self.run.checkpoint_dir(method, level)

    # -- the comparison -----------------------------------------------------------------------
    def run_all(self) -> list[Row]:
        """Every method at every level (resuming what is on disk), then results and figures; under the lock."""
        with self.run.locked():
            return self._run_all()

    def _run_all(self) -> list[Row]:
        self.log("masks:\n" + self.tickets.describe())
        if self.config.workers > 1:  # stage 1 in worker processes (their steps drawn as they go); then from disk
            run_stage_one(self, self.config.workers)
            for tickets in {id(t): t for t in (self.tickets, self.shared_tickets)}.values():
                tickets.progress = SILENT  # loading the workers' rounds must not count their steps twice
        try:
            if any(m.needs_single for m in self.methods):
                self.single_rounds()
            if any(m.needs_contexts for m in self.methods):
                self.context_masks()
        finally:
            self.tickets.progress = self.shared_tickets.progress = self.progress
        contexts_note = self.save_partition()
        records: list[Row] = []
        for method in self.methods:
            if not method.per_level:
                records += self.finished(method, 0.0)
        for level in self.levels:
            for method in self.methods:
                if method.per_level:
                    records += self.finished(method, level)
        self.deployment = [r for r in records if "routing" in r]
        records = [r for r in records if "routing" not in r]
        write_results(self.run.path, records, self.config, summary=contexts_note)
        write_deployment(self.run.path, self.deployment, records, self.config)
        if supports(self.task, "figures"):
            self.task.write_figures(self.outputs)
        return records

    def _basis(self, method: Method, level: float) -> Any:
        """The stage-1 masks a record of ``method`` at ``level`` was computed from (their fingerprint):
        a record is reused only for exactly those masks."""
        if method.needs_single:
            mask = self.shared_tickets._mask_at(self.single_rounds(), level)
            return {"single": fingerprint(MaskSet.from_tickets([mask]).packed())}
        if method.needs_contexts:  # routed methods: their deployment rows depend on the deploy settings too
            return {"contexts": fingerprint(self.context_masks()[level].packed()),
                    "deploy": self.config.to_dict()["deploy"]}
        return None

    def finished(self, method: Method, level: float) -> list[Row]:
        """The rows of (method, level): from disk when a previous run finished them, else computed."""
        basis = self._basis(method, level)
        rows = self.run.load_record(method.name, level, basis)
        problem = None if rows is None else method.damaged(self, level) or self.output_problem(method, level)
        if problem:
            self.log(f"{method.name} at {level:.0%}: {problem}; recomputing it")
            rows = None
        if rows is not None:
            self.progress.advance(method.steps(self), f"{method.name} {level:.0%} (on disk)")
            # the name is not part of the identity; the seed is (records written before it was recorded lack it)
            return [{**r, "experiment": self.config.name, "seed": self.config.seed} for r in rows]
        self.log(f"{method.name} at {level:.0%} sparsity")
        start = time.perf_counter()
        rows, accounting = method.fit(self, level)
        seconds = round(time.perf_counter() - start, 2)
        records = [{"experiment": self.config.name, "seed": self.config.seed, "method": method.name, "sparsity": level, **row,
                    **vars(accounting), "train_seconds": seconds} for row in rows]
        self.run.save_record(method.name, level, basis, records)
        return records

    def output_problem(self, method: Method, level: float) -> str | None:
        """Why the example output the task kept while scoring (method, level) is missing or corrupt (the task's
        optional ``output_problem(outputs, label)``); None when it verifies or the task keeps none."""
        if not supports(self.task, "output_check"):
            return None
        return self.task.output_problem(self.outputs, f"{method.name}_{level:.4f}")

    def check_partition(self) -> None:
        """Refuse to resume with other class contexts than the run started with (named before the identity check,
        which would only say that the data fingerprint differs)."""
        partition = self.task.partition if supports(self.task, "partition") else None
        path = self.run.path / "partition.json"
        if partition is None or not path.exists():
            return
        started = Partition.load(path)
        if (started.names, started.assignment) != (partition.names, partition.assignment):
            raise ValueError(f"the class contexts differ from {path}, which this run started with "
                             "(clustering on another machine or library version?); use data.contexts: "
                             f"{path} to resume with the original contexts")

    def save_partition(self) -> str:
        """When contexts group classes: ``partition.json``/``.txt`` and its agreement with the shipped references.

        Returns the text for the results' report ("" when contexts are single classes)."""
        partition = self.task.partition if supports(self.task, "partition") else None
        if partition is None:
            return ""
        partition.save(self.run.path / "partition.json")
        scores = reference_scores(partition)
        text = format_partition(partition) + "".join(f"\nadjusted Rand index vs {k}: {v:.3f}" for k, v in scores.items())
        atomic_write_text(self.run.path / "partition.txt", text + "\n")
        self.log("contexts:\n" + text)
        return f"Contexts (members; * = HDBSCAN noise reassigned to the nearest cluster centroid):\n\n```\n{text}\n```"
