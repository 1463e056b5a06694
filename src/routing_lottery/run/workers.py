"""Stage 1 over worker processes: ``rtl run CONFIG --workers N``.

The K per-context IMP runs and the single-mask IMP run are independent of one another, and each
is seeded by its position (``derive_seed(seed, "imp", stream)``), so where it runs changes
nothing: with the same thread count per process, the masks of N workers are bit for bit those of
one process. Each worker builds the experiment from the config, runs the IMP streams given to
it and saves every round into the run directory (atomically, one file per stream and round);
the parent then continues as a single-process run would, finding stage 1 on disk. A killed
worker costs only its unfinished round: re-launching resumes from the saved rounds.

- **Thread budget.** Each worker gets ``threads`` when the config sets it, else ``cores // N``
  (at least one): N processes never start N full thread pools on the same cores.
- **Load balance.** Streams are assigned longest first to the least loaded worker (LPT), by their
  training steps; ``balance`` says how close the plan comes to the ideal ``total / N``.
- **One progress view.** Workers send their steps and log lines to the parent, which draws one bar.
- **The lock.** The parent holds the run directory's lock for the whole run; workers write under
  it (``RunDirectory(lock=False)``) and never claim the directory themselves.
"""

from __future__ import annotations

import os
import queue as queue_module
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig
from ..errors import RoutingLotteryError
from ..settings import build
from .builders import build_tasks

Job = tuple[str, int]  # ("single", 0) or ("context", k)


class WorkerFailed(RoutingLotteryError, RuntimeError):
    """A stage-1 worker failed or was killed; the message names it, its error and that re-launching resumes.

    The library's own type, so the command line prints it as the one line it is, not as "unexpected".
    """


@dataclass(frozen=True)
class Plan:
    """Which worker runs which stage-1 streams, and what that costs in training steps."""

    assignment: tuple[tuple[Job, ...], ...]
    steps: tuple[int, ...]  # per worker
    total: int

    @property
    def makespan(self) -> int:
        return max(self.steps, default=0)

    @property
    def speedup(self) -> float:
        """Expected stage-1 speed-up over one worker if steps cost the same everywhere: total / makespan."""
        return self.total / self.makespan if self.makespan else 1.0


def balance(costs: dict[Job, int], workers: int) -> Plan:
    """Longest-processing-time-first assignment of jobs (by cost) to ``workers`` (ties: job order)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    loads = [0] * workers
    assigned: list[list[Job]] = [[] for _ in range(workers)]
    for job in sorted(costs, key=lambda j: (-costs[j], list(costs).index(j))):
        w = loads.index(min(loads))
        assigned[w].append(job)
        loads[w] += costs[job]
    return Plan(tuple(tuple(a) for a in assigned), tuple(loads), sum(costs.values()))


def cpu_budget(workers: int, threads: int | None) -> int:
    """Torch threads per worker: ``threads`` when set, else this process's cores shared out (at least 1)."""
    if threads is not None:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def stage_one_costs(experiment: Any) -> dict[Job, int]:
    """Training steps of every stage-1 stream the experiment's methods need (what ``balance`` weighs)."""
    t = experiment.config.training
    rounds = len(experiment.tickets.schedule)
    costs: dict[Job, int] = {}
    if any(m.needs_single for m in experiment.methods):
        costs[("single", 0)] = (len(experiment.shared_tickets.schedule) * experiment.factor * t.imp_epochs
                                * experiment.classifier.num_batches)
    if any(m.needs_contexts for m in experiment.methods):
        for k, stream in enumerate(experiment.detectors):
            costs[("context", k)] = rounds * t.imp_epochs * stream.num_batches
    return costs


def run_jobs(experiment: Any, jobs: Sequence[Job]) -> None:
    """Run (or find on disk) the IMP rounds of the given stage-1 streams: a worker's or a rank's share."""
    for kind, k in jobs:
        if kind == "single":
            experiment.single_rounds()
        else:
            experiment.tickets._imp_rounds(f"context_{k:02d}", experiment.detectors[k],
                                          rewind_stream=experiment.classifier)


def run_stage_one(experiment: Any, workers: int) -> Plan:
    """Run the experiment's stage-1 streams in ``workers`` processes; return the plan they followed.

    Raises ``WorkerFailed`` naming the worker and its error when one fails (the rounds it finished stay
    on disk: a re-launch resumes).
    """
    plan = balance(stage_one_costs(experiment), workers)
    # What every stream starts from, written once by the parent (no two workers race to write it).
    experiment.tickets._rewind_point(experiment.classifier)
    if experiment.shared_tickets is not experiment.tickets:
        experiment.shared_tickets._rewind_point(experiment.classifier)
    threads = cpu_budget(workers, experiment.config.threads)
    experiment.log(f"stage 1 on {workers} workers, {threads} thread(s) each: "
                   + "; ".join(f"worker {w}: {', '.join(_job_name(j) for j in jobs) or 'nothing'}"
                               for w, jobs in enumerate(plan.assignment))
                   + f" (expected speed-up {plan.speedup:.2f}x)")
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()
    config = experiment.config.replace(threads=threads, workers=1)
    processes = [context.Process(target=_worker, args=(type(experiment), config.to_dict(), str(experiment.run.path), list(jobs), w,
                                                       messages), daemon=True)
                 for w, jobs in enumerate(plan.assignment) if jobs]
    for p in processes:
        p.start()
    errors: dict[int, str] = {}
    try:
        while any(p.is_alive() for p in processes) or not messages.empty():
            try:
                kind, rank, *payload = messages.get(timeout=0.2)
            except queue_module.Empty:
                continue
            if kind == "advance":
                experiment.progress.advance(payload[0], f"[worker {rank}] {payload[1]}")
            elif kind == "log":
                experiment.log(f"[worker {rank}] {payload[0]}")
            elif kind == "error":
                errors[rank] = payload[0]
    finally:
        for p in processes:
            p.join(timeout=1.0)
            if p.is_alive():
                p.terminate()
    failed = {w: p.exitcode for w, p in enumerate(processes) if p.exitcode not in (0, None)}
    if errors or failed:
        rank = next(iter(errors or failed))
        detail = errors[rank].strip().splitlines()[-1] if rank in errors else _exit_reason(failed[rank])
        raise WorkerFailed(f"stage-1 worker {rank} failed: {detail}; the rounds it finished are on disk, "
                           "re-launching resumes")
    return plan


def _exit_reason(code: int) -> str:
    """What a worker's exit code says: a signal by name (SIGKILL is most often the out-of-memory killer)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit code {code}"


def _job_name(job: Job) -> str:
    return "single-mask IMP" if job[0] == "single" else f"context {job[1]}"


class _QueueProgress:
    """A worker's progress, sent to the parent's bar."""

    def __init__(self, messages: Any, rank: int) -> None:
        self.messages, self.rank = messages, rank

    def advance(self, steps: int, status: str) -> None:
        self.messages.put(("advance", self.rank, steps, status))


def _worker(experiment_class: Any, config: dict[str, Any], out: str, jobs: Sequence[Job], rank: int,
            messages: Any) -> None:
    """One worker: build the experiment (``experiment_class``, the parent's runner class: it reaches the
    child by reference, as any class pickles) without claiming the directory, and run its IMP streams."""
    try:
        settings = build(ExperimentConfig, config)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        tasks = build_tasks(settings)  # an image set: this part is the one named like its directory
        task = tasks[0] if len(tasks) == 1 else next((t for t in tasks if getattr(t, "name", None) == Path(out).name),
                                                     None)
        if task is None:
            raise ValueError(f"no part of the config's task is named {Path(out).name!r}; parts of a run over "
                             "several parts need names for workers to find theirs")
        experiment = experiment_class(settings, Path(out), task, progress=_QueueProgress(messages, rank),
                                log=lambda m: messages.put(("log", rank, m)), lock=False)
        run_jobs(experiment, jobs)
    except BaseException:  # noqa: BLE001 -- everything reaches the parent, which raises it by name
        messages.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None
