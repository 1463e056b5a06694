"""A run over processes and machines: ``torchrun --nnodes N --nproc-per-node P -m routing_lottery.cli run CONFIG --out DIR``.

Every process (rank) runs the same command on a run directory that every node sees; torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) says which it is.
The process group is gloo on CPU and NCCL on CUDA (each rank on GPU ``LOCAL_RANK``).

- **Rank 0 holds the lock and decides.** It claims the directory, takes the lock for the whole
  run, writes θ₀ (and the rewind point), then tells the others to start -- or, when it cannot
  start (the directory is in use by another launch, holds another run, ...), sends them its error,
  so that every rank stops with the same message and none of them writes.
- **Stage 1 over the ranks.** The K per-context IMP streams and the single-mask stream are
  assigned by ``workers.balance`` (longest first to the least loaded), a plan every rank computes
  alike from the config. A rank writes only its own streams' round files (atomic, one per stream
  and round); with the same threads per process the masks are bit for bit those of one process,
  since every stream is seeded by its position. A killed rank (or node) costs only unfinished
  rounds: a re-launch, or torchrun's own restart (``--max-restarts``), resumes from the rest.
- **Stage 2, data parallel per context step** (``GradientAllReduce``). Rank 0 runs the methods
  and the evaluation as a one-process run would; each joint retraining it starts is announced to
  the other ranks (its arguments, θ and any optimizer state to resume from, broadcast once), and
  then every step of context k, in Algorithm 2's turns, is shared: each rank backpropagates its
  rows of the batch, its loss weighted by its share of the rows, BatchNorm layers normalize by
  the whole batch's statistics (synchronized, as ``nn.SyncBatchNorm`` would, which gloo lacks),
  the gradients are summed, and every rank takes the identical masked step with context k's own
  optimizer state. Every rank holds the same weights throughout.
- **Communication per context step**: one all-reduce of every parameter's gradient, ``4 × P``
  bytes in float32 for P parameters (plus one float per parameter tensor), and per BatchNorm
  layer of C channels two small all-reduces (its sums forward, their gradient backward: about
  ``16 × C`` bytes, latency rather than volume). A joint epoch makes
  K × M such steps (M: the largest context's batch count).
- **Tolerance.** For a loss that is a mean over the batch's rows (every built-in task's), each
  step's gradient and BatchNorm statistics are the full batch's up to float summation order
  (1e-7 on the tests' toy models, one step). Without BatchNorm, weights after joint retraining
  agree with one process's to about 1e-7. With BatchNorm, no float-level tolerance holds for the
  whole retraining, on one process either: where a gradient is zero in exact arithmetic or
  nearly so (the bias before a BatchNorm, which the normalization cancels; weights whose gradient
  is mostly cancellation), rounding decides its sign, Adam normalizes it into a step of up to the
  full learning rate, and the difference spreads from there. Scaling the
  loss of a one-process run by 1 + 1e-6 (which Adam's update ignores in exact arithmetic) moves
  its weights as far as running on two ranks does: on the digits smoke network (GhostNet, 20
  joint steps at lr 3e-3) by 1.9 % of the weights' norm (largest change 0.039), two ranks by
  2.0 % (0.054). The masks (stage 1) are bit for bit those of one process.
- **One progress view.** Other ranks write their step counts and log lines to
  ``DIR/.ranks/rank_R.json`` (atomically, at most twice a second); rank 0 polls them into its bar
  and log and prints everything; the others print nothing but errors.

Runs of several seeds or images are one experiment per directory: launch them one at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import shutil
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import errors
from ..config import ExperimentConfig
from ..errors import ConfigError, RoutingLotteryError
from ..io import atomic_write_json, read_json
from ..masks import MaskSet
from .builders import build_tasks
from .experiment import Experiment
from ..routed import Inputs
from ..tickets import Log
from ..training import SILENT, Loss, ProgressSink, data_parallel, joint_retrain
from .directory import resolve_device
from .workers import Job, Plan, WorkerFailed, balance, cpu_budget, run_jobs, stage_one_costs

PROGRESS_DIR = ".ranks"
# Ranks wait in collectives while rank 0 works alone (the baselines, an unbalanced stage 1): hours,
# not torch's default 30 minutes. A rank that dies is torchrun's to notice: it stops the others.
TIMEOUT = datetime.timedelta(days=7)
# The store gets TIMEOUT too: it is not only the start-up rendezvous. NCCL sets up its communicator at
# the first collective (and gloo too under TORCH_GLOO_LAZY_INIT), exchanging ids through the store
# while rank 0 may still be loading data and writing θ₀ before its first broadcast.


class RankStopped(RoutingLotteryError, RuntimeError):
    """Rank 0 could not start the run; the message is its error."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this node: they share its cores

    @property
    def leads(self) -> bool:
        return self.rank == 0


def launch_from_environment(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch torchrun describes in the environment; None for a single process (``WORLD_SIZE`` unset or 1)."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local_rank = int(environ["RANK"]), int(environ.get("LOCAL_RANK", "0"))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))  # unknown: assume one node, fewest threads
    except KeyError as err:
        raise ConfigError(f"WORLD_SIZE={environ.get('WORLD_SIZE')} but {err.args[0]} is unset: start several "
                          "processes with torchrun") from None
    except ValueError as err:
        raise ConfigError(f"the launcher's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE are not integers: {err}") from None
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise ConfigError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}")
    return Launch(rank, world, local_rank, local_world)


def rank_settings(config: ExperimentConfig, launch: Launch) -> ExperimentConfig:
    """The config one rank runs: its thread budget (``threads``, else this node's cores // its processes)
    and, on CUDA, its own GPU. What a launch cannot run is refused here, on every rank alike."""
    if config.workers > 1:
        raise ConfigError("--workers and torchrun both spread stage 1 over processes; use one of them "
                          "(under torchrun each rank is a worker)")
    if config.replicates > 1 or config.task == "inr":
        raise ConfigError("torchrun runs one experiment in one directory; a run of several seeds or images is "
                          "several experiments: launch each seed (--set seed=S --out DIR/seeds/S) on its own")
    changes: dict[str, Any] = {"threads": cpu_budget(launch.local_world_size, config.threads)}
    if resolve_device(config.device).type == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < launch.local_world_size:  # NCCL refuses two ranks on one GPU
            raise ConfigError(f"{launch.local_world_size} processes on this node but {gpus} GPU(s): use "
                              f"--nproc-per-node {gpus}, or --set device=cpu")
        changes["device"] = f"cuda:{launch.local_rank}"
    return config.replace(**changes)


def torchrun_session(config: ExperimentConfig) -> Session | None:
    """The session of this process when torchrun started several; None otherwise."""
    launch = launch_from_environment()
    return None if launch is None else Session(launch, rank_settings(config, launch))


def _init_process_group(backend: str, launch: Launch) -> None:
    """The process group, its keys under this restart's own prefix: after torchrun restarted the ranks
    (``--max-restarts``), the agent's store still holds the killed attempt's addresses, and ranks
    connecting to those fail."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        dist.init_process_group(backend, timeout=TIMEOUT)  # another launcher: its env:// settings
        return
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), launch.world_size,
                          is_master=not hosted_by_agent and launch.leads, timeout=TIMEOUT, multi_tenant=True)
    dist.init_process_group(backend, store=dist.PrefixStore(f"routing_lottery/attempt_{restart}", store),
                            rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT)


def plan_stage_one(experiment: Any, ranks: int) -> Plan:
    """Which rank runs which stage-1 streams: the same plan on every rank (a function of the config)."""
    return balance(stage_one_costs(experiment), ranks)


class Session:
    """One rank of a torchrun launch: the process group, and what this rank does in the run."""

    def __init__(self, launch: Launch, config: ExperimentConfig) -> None:
        self.launch, self.config = launch, config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's objects go through the current device
        if not dist.is_initialized():
            _init_process_group("nccl" if device.type == "cuda" else "gloo", launch)
        self.started = False

    @property
    def leads(self) -> bool:
        return self.launch.leads

    def _broadcast(self, message: Any) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group with the other ranks, every rank past its last collective.

        A rank's part of a collective returns once its own messages are sent, not once the others
        have received them: a rank tearing its connections down right after the last broadcast does
        so while another may still be inside it, and torch's shutdown guidance is to destroy a group
        only when no collective is in flight on any rank. The barrier makes that so, for one round
        trip per launch.
        """
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def abandon(self) -> None:
        """Leave the process group after an error, without waiting for the other ranks (they may never come).

        torch asks every process to destroy its groups before it exits: a gloo group still alive at
        interpreter exit can abort it (``terminate called without an active exception``, pytorch
        issue 190489), replacing the error and its exit status by SIGABRT. A gloo teardown is local
        (it closes this rank's sockets), safe whatever the others are doing; NCCL's is left to the
        launcher, as it may wait on the other ranks (ncclCommAbort was collective in some versions).
        """
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.destroy_process_group()

    # -- rank 0 -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """Rank 0: an error before ``start`` reaches every rank, which stop with the same message."""
        try:
            yield
        except BaseException as err:
            if self.leads and not self.started:
                self.started = True
                self._broadcast(("refused", type(err).__name__, str(err) or type(err).__name__))
                self.close()
            else:  # failed after the start (a rank's stage 1, a method): the others are stopped by torchrun
                self.abandon()
            raise

    def start(self, experiment: Any) -> None:
        """Rank 0, holding the lock: write what every stream starts from, then let the other ranks start."""
        if not isinstance(experiment, Experiment):
            raise ConfigError("torchrun runs one experiment in one directory; this config makes several "
                              f"({type(experiment).__name__}): launch each part on its own")
        experiment.tickets._rewind_point(experiment.classifier)  # written once, read by every rank
        if experiment.shared_tickets is not experiment.tickets:
            experiment.shared_tickets._rewind_point(experiment.classifier)
        shutil.rmtree(experiment.run.path / PROGRESS_DIR, ignore_errors=True)  # a previous launch's
        self.started = True
        self._broadcast(("go",))

    def stage_one(self, experiment: Any) -> Plan:
        """Rank 0: its own share of stage 1, drawing every rank's progress; returns once all are on disk."""
        plan = plan_stage_one(experiment, self.launch.world_size)
        experiment.log(f"stage 1 on {self.launch.world_size} ranks (torchrun), {self.config.threads} thread(s) per "
                       "process on this node: " + "; ".join(
                           f"rank {r}: {', '.join(_job_name(j) for j in jobs) or 'nothing'}"
                           for r, jobs in enumerate(plan.assignment)) + f" (expected speed-up {plan.speedup:.2f}x)")
        watcher = RankWatcher(experiment.run.path / PROGRESS_DIR, range(1, self.launch.world_size),
                              experiment.progress, experiment.log)
        polling = _Polling(experiment.progress, watcher)
        everyone = {id(t): t for t in (experiment.tickets, experiment.shared_tickets)}.values()
        for tickets in everyone:
            tickets.progress = polling
        try:
            run_jobs(experiment, plan.assignment[0])
        finally:
            for tickets in everyone:
                tickets.progress = experiment.progress
        watcher.wait()
        dist.barrier()
        shutil.rmtree(experiment.run.path / PROGRESS_DIR, ignore_errors=True)  # nobody writes there any more
        return plan

    def run_all(self, experiment: Any) -> list[dict[str, Any]]:
        """Rank 0: the rest of the run as one process does it, each joint retraining shared with the other ranks."""
        for tickets in (experiment.tickets, experiment.shared_tickets):
            tickets.progress = SILENT  # stage 1's rounds were counted as they were trained (run_all restores it)
        if self.config.distributed_retraining:
            with data_parallel(Coordinator(self.launch, experiment)):
                records = experiment.run_all()
        else:  # joint retraining on this rank alone; the others wait for the end, as during the baselines
            records = experiment.run_all()
        self._broadcast(None)  # no more joint retraining: the other ranks leave
        self.close()
        return records

    # -- the other ranks ----------------------------------------------------------------------
    def follow(self, out: str | Path) -> None:
        """A rank other than 0: wait for rank 0's start, run this rank's share of stage 1, then take
        part in every joint retraining rank 0 announces, until it says the run is over."""
        message = self._broadcast(None)
        if message[0] != "go":
            self.close()
            raise _rebuilt(*message[1:])
        progress = FileProgress(Path(out) / PROGRESS_DIR / f"rank_{self.launch.rank}.json")
        try:
            try:
                experiment = _joined_experiment(self.config, out, progress)
                run_jobs(experiment, plan_stage_one(experiment, self.launch.world_size).assignment[self.launch.rank])
            except BaseException as err:
                progress.fail(f"{type(err).__name__}: {err}" if str(err)
                              else traceback.format_exc().strip().splitlines()[-1])
                raise
            progress.finish()
            dist.barrier()
            communicator = GradientAllReduce(self.launch.rank, self.launch.world_size)
            model = experiment.tickets.model
            while (call := self._broadcast(None)) is not None:
                joint_retrain(model, **_unpacked(call, model, experiment.detectors), data_parallel=communicator)
        except BaseException:
            self.abandon()
            raise
        self.close()


def _job_name(job: Job) -> str:
    return "single-mask IMP" if job[0] == "single" else f"context {job[1]}"


def _rebuilt(name: str, message: str) -> BaseException:
    """Rank 0's error on this rank: the library's own type when it is one (the lock's ``RunLockedError``)."""
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, RoutingLotteryError):
        return kind(message)
    return RankStopped(f"rank 0 could not start the run: {name}: {message}")


def _joined_experiment(config: ExperimentConfig, out: str | Path, progress: FileProgress) -> Any:
    """The experiment as a rank other than 0 sees it: the directory rank 0 claimed, without its lock."""
    tasks = build_tasks(config)
    if len(tasks) != 1:  # rank 0 refused it already
        raise ConfigError("torchrun runs one experiment in one directory")
    return Experiment(config, out, tasks[0], progress=progress, log=progress.log, lock=False)


# -- stage 2: a joint-retraining step over the ranks -------------------------------------------
def _rows(x: Inputs, lo: int, hi: int) -> Inputs:
    if isinstance(x, (tuple, list)):
        return tuple(t[lo:hi] for t in x)
    return x[lo:hi]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: batch statistics over every rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


def _synced_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """A training-mode BatchNorm forward over the rows of every rank: the full batch's mean and variance.

    One small all-reduce forward and one backward (its gradient): the sums of ``x - c`` and of its
    square, with ``c`` the running mean (the same on every rank), so that the variance
    ``E[(x-c)²] - E[x-c]²`` does not lose digits to cancellation. The running statistics are
    updated as ``F.batch_norm`` does (unbiased variance; ``momentum``, or the cumulative average).
    """
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = [1, channels] + [1] * (x.dim() - 2)
    tracking = module.track_running_stats and module.running_mean is not None and module.running_var is not None
    shift = module.running_mean.detach().to(x.dtype) if tracking else x.new_zeros(channels)  # type: ignore[union-attr]
    shifted = x - shift.view(shape)
    local = torch.cat([shifted.sum(dims), (shifted * shifted).sum(dims), x.new_tensor([x.numel() / channels])])
    total = _SumOverRanks.apply(local)
    count = total[-1].detach()
    offset = total[:channels] / count
    var = (total[channels:2 * channels] / count - offset * offset).clamp_min(0)
    mean = shift + offset
    y = (x - mean.view(shape)) * torch.rsqrt(var + module.eps).view(shape)
    if module.affine:
        y = y * module.weight.view(shape) + module.bias.view(shape)
    if tracking:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
            factor = (1.0 / float(module.num_batches_tracked) if module.momentum is None  # type: ignore[arg-type]
                      else module.momentum)
            unbiased = var.detach() * (count / (count - 1)) if count > 1 else var.detach()
            module.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)  # type: ignore[union-attr]
            module.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)  # type: ignore[union-attr]
    return y


def _batch_norms(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Training-mode BatchNorms: those with torch's own forward (synchronized over the ranks) and the
    others (their forward is their own: each rank normalizes its rows, the running statistics are averaged)."""
    synced, own = [], []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            standard = type(module).forward is nn.modules.batchnorm._BatchNorm.forward
            (synced if standard and "forward" not in vars(module) else own).append(module)
    return synced, own


class GradientAllReduce:
    """Each context step over the ranks: this rank's rows of the batch, the gradients summed (``training.DataParallel``).

    Rank r backpropagates rows ``[r·B/W, (r+1)·B/W)`` of a batch of B rows, its loss weighted by
    its share of the rows, so the sum over the ranks is the gradient of the full batch's mean loss.
    BatchNorm layers normalize by the whole batch's statistics (``_synced_batch_norm``). After the
    backward pass, one flat all-reduce carries the gradients, a flag per parameter (whether any
    rank has a gradient for it: one no rank reached stays ``None``, as in one process, so Adam
    leaves it alone) and the running statistics of BatchNorms with a forward of their own
    (weighted alike).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def begin(self, model: nn.Module, arguments: Mapping[str, object]) -> None:
        """Nothing: rank 0 announced this call before this rank made it."""

    @contextlib.contextmanager
    def step(self, model: nn.Module, loss: Loss, x: Inputs,
             y: torch.Tensor) -> Iterator[tuple[Loss, Inputs, torch.Tensor]]:
        n = y.shape[0]
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        share = (hi - lo) / n

        def weighted(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # no rows here: a zero that still runs the backward pass (its all-reduces are every rank's)
            return loss(output, target) * share if hi > lo else output.sum() * 0.0

        synced, own = _batch_norms(model)
        for module in synced:
            module.forward = functools.partial(_synced_batch_norm, module)  # type: ignore[method-assign]
        try:
            yield weighted, _rows(x, lo, hi), y[lo:hi]
        finally:
            for module in synced:
                del module.forward
        self._sum(model, own, share)

    def _sum(self, model: nn.Module, norms: Sequence[nn.Module], share: float) -> None:
        params = list(model.parameters())
        statistics = [b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                      if isinstance(b, torch.Tensor)]
        dtype = params[0].dtype if all(p.dtype == params[0].dtype for p in params) else torch.float32
        parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=dtype, device=p.device) for p in params]
        parts.append(torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=params[0].device))
        parts += [b.reshape(-1).to(dtype) * share if share else torch.zeros(b.numel(), dtype=dtype, device=b.device)
                  for b in statistics]  # no rows here: not updated (or updated from nothing)
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        for p, flag in zip(params, flat[offset:offset + len(params)].tolist()):
            if flag == 0:
                p.grad = None
        offset += len(params)
        with torch.no_grad():
            for b in statistics:
                value = flat[offset:offset + b.numel()].view_as(b)
                b.copy_(value if b.is_floating_point() else value.round())
                offset += b.numel()


class Coordinator(GradientAllReduce):
    """Rank 0's side: announces every joint retraining of the experiment's tickets to the other ranks."""

    def __init__(self, launch: Launch, experiment: Any) -> None:
        super().__init__(launch.rank, launch.world_size)
        self.experiment = experiment

    def begin(self, model: nn.Module, arguments: Mapping[str, Any]) -> None:
        if model is not self.experiment.tickets.model:
            raise RuntimeError("joint retraining over ranks shares the RTL network only; this call retrains another")
        detectors = self.experiment.detectors
        indices = [next((i for i, d in enumerate(detectors) if d is s), None) for s in arguments["streams"]]
        if None in indices:
            raise RuntimeError("joint retraining over ranks needs the experiment's own context streams")
        masks: MaskSet = arguments["masks"]
        dist.broadcast_object_list([{
            "model": _on_cpu(model.state_dict()), "init_state": _on_cpu(arguments["init_state"]),
            "masks": (_on_cpu(masks.packed()), masks.shapes, list(masks.context_names)), "streams": indices,
            "epochs": arguments["epochs"], "optimizer": arguments["optimizer"], "seed": arguments["seed"],
            "resume": _on_cpu(arguments["resume"])}], src=0)


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it copied to the CPU (another rank's GPU has another index)."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _unpacked(call: Mapping[str, Any], model: nn.Module, detectors: Sequence[Any]) -> dict[str, Any]:
    """Rank 0's announced call as this rank's ``joint_retrain`` arguments (its model loaded with rank 0's θ)."""
    model.load_state_dict(call["model"])
    packed, shapes, names = call["masks"]
    return {"init_state": call["init_state"], "masks": MaskSet.from_packed(packed, shapes, names),
            "streams": [detectors[i] for i in call["streams"]], "epochs": call["epochs"],
            "optimizer": call["optimizer"], "seed": call["seed"], "resume": call["resume"]}


# -- one progress view -------------------------------------------------------------------------
class FileProgress:
    """A rank's progress and log lines, in one small JSON file that rank 0 polls (written atomically)."""

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path, self.interval = path, interval
        self.state: dict[str, Any] = {"trained": 0, "on_disk": 0, "status": "", "lines": [], "done": False,
                                      "error": None}
        self.written = -float("inf")

    def advance(self, steps: int, status: str) -> None:
        self.state["on_disk" if "on disk" in status else "trained"] += steps
        self.state["status"] = status
        self._write()

    def log(self, message: str) -> None:
        self.state["lines"].append(message)
        self._write(force=True)

    def finish(self) -> None:
        self.state["done"] = True
        self._write(force=True)

    def fail(self, message: str) -> None:
        self.state["error"] = message
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.written >= self.interval:
            atomic_write_json(self.path, self.state)
            self.written = now


class RankWatcher:
    """Rank 0's view of the other ranks' stage 1: their steps on its bar, their log lines in its log."""

    def __init__(self, directory: Path, ranks: Iterable[int], progress: ProgressSink, log: Log) -> None:
        self.directory, self.progress, self.log = directory, progress, log
        self.seen = {r: {"trained": 0, "on_disk": 0, "lines": 0} for r in ranks}
        self.done: set[int] = set()

    def poll(self) -> None:
        """Draw what the other ranks did since the last poll. Raises RuntimeError when one of them failed."""
        for rank, seen in self.seen.items():
            if rank in self.done:
                continue
            try:
                state = read_json(self.directory / f"rank_{rank}.json")
            except (OSError, ValueError):  # not written yet
                continue
            for line in state["lines"][seen["lines"]:]:
                self.log(f"[rank {rank}] {line}")
            seen["lines"] = len(state["lines"])
            if state["on_disk"] > seen["on_disk"]:
                self.progress.advance(state["on_disk"] - seen["on_disk"], f"[rank {rank}] rounds on disk")
                seen["on_disk"] = state["on_disk"]
            if state["trained"] > seen["trained"]:
                self.progress.advance(state["trained"] - seen["trained"], f"[rank {rank}] {state['status']}")
                seen["trained"] = state["trained"]
            if state["error"]:
                raise WorkerFailed(f"rank {rank} failed in stage 1: {state['error']}; the rounds it finished are on "
                                   "disk, re-launching resumes")
            if state["done"]:
                self.done.add(rank)

    def wait(self, interval: float = 0.2) -> None:
        """Poll until every other rank has finished its share."""
        while True:
            self.poll()
            if len(self.done) == len(self.seen):
                return
            time.sleep(interval)


class _Polling:
    """Rank 0's own progress, polling the other ranks' now and then as it goes."""

    def __init__(self, progress: ProgressSink, watcher: RankWatcher, interval: float = 0.5) -> None:
        self.progress, self.watcher, self.interval = progress, watcher, interval
        self.polled = time.monotonic()

    def advance(self, steps: int, status: str) -> None:
        self.progress.advance(steps, status)
        if time.monotonic() - self.polled >= self.interval:
            self.watcher.poll()
            self.polled = time.monotonic()
