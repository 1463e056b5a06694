"""torchrun on localhost (gloo, CPU): the masks of one process, one lock for all ranks, a killed rank
resumes, one progress view, and joint retraining's steps shared over ranks."""

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.errors import ConfigError
from routing_lottery.masks import MaskSet
from routing_lottery.models import ghostnet
from routing_lottery.run import RunDirectory, make_runner
from routing_lottery.run.distributed import (
    FileProgress, GradientAllReduce, Launch, RankWatcher, launch_from_environment, rank_settings,
)
from routing_lottery.run.workers import cpu_budget
from routing_lottery.training import OptimizerConfig, joint_retrain, snapshot
from toy import toy_stream

TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = {"data": {"train_per_class": 10, "test_per_class": 4, "image_size": 8, "calibration": 0.0},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.7], "step": 0.2},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}, "methods": ["single_imp", "rtl"],
        "deploy": {"routers": []}, "threads": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Guards against a hang, not budgets: a launch of TINY takes 10-45 s on this 2-core machine (the
# killed-and-restarted one the longest), about the same beside a CPU-bound process; at 300 s a
# loaded machine has 6x the slowest, and a hung launch still ends the test in minutes.
LAUNCH_TIMEOUT = 300
# Each rank of the mp.spawn test waits at the rendezvous for the other's start-up (a fresh
# interpreter importing torch and this module: 5-15 s here under load) and in each collective for
# the other's share of a toy step (milliseconds): 300 s is 20x that, where torch's default 30 min
# would leave a hung rank silent for half an hour.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


def tiny(**changes):
    return load_config(packaged_config("digits"), "smoke", {**TINY, **changes})


def settings(tree: dict, prefix: str = "") -> list[str]:
    """TINY as ``--set KEY=VALUE`` arguments (values as JSON, which YAML reads)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += settings(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return out


def torchrun(out: Path, logs: Path, restarts: int = 0, **changes) -> list[str]:
    """Two ranks on this machine, each rank's stdout and stderr in LOGS/<run>/attempt_N/<rank>/."""
    sets = settings({**TINY, **changes})
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts), "--log-dir",
            str(logs), "-r", "3", "-m", "routing_lottery.cli", "run", "digits", "--scale", "smoke", "--out", str(out),
            *sets]


def rank_output(logs: Path, rank: int, attempt: int = 0) -> str:
    return "".join(p.read_text() for p in sorted(logs.glob(f"*/attempt_{attempt}/{rank}/std*.log")))


def rounds(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): load_file(p) for p in sorted((run / "imp").rglob("*.safetensors"))}


def same_rounds(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.keys() == b[f].keys() and all((x[k] == b[f][k]).all() for k in x)
                                        for f, x in a.items())


def records(run: Path, method: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_seconds"}
            for r in json.loads((run / "results.json").read_text()) if r["method"] == method]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("one")
    make_runner(tiny(), path).run_all()
    return path


# -- the launch, the thread budget, the progress view: no processes ------------------------------
def test_the_launch_is_read_from_torchruns_environment():
    assert launch_from_environment({}) is None and launch_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_from_environment(env) == Launch(rank=3, world_size=4, local_rank=1, local_world_size=2)
    with pytest.raises(ConfigError, match="RANK is unset"):
        launch_from_environment({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="do not fit"):
        launch_from_environment({**env, "RANK": "4"})


def test_each_rank_gets_its_share_of_the_nodes_cores():
    launch = Launch(rank=1, world_size=4, local_rank=1, local_world_size=2)
    assert rank_settings(tiny(threads=None), launch).threads == cpu_budget(2, None) == max(1, len(os.sched_getaffinity(0)) // 2)
    assert rank_settings(tiny(threads=3), launch).threads == 3
    with pytest.raises(ConfigError, match="use one of them"):
        rank_settings(tiny(workers=2), launch)
    with pytest.raises(ConfigError, match="launch each seed"):
        rank_settings(tiny(replicates=2), launch)


def test_rank_zero_draws_the_other_ranks_steps_and_lines(tmp_path):
    class Bar:
        def __init__(self):
            self.calls = []

        def advance(self, steps, status):
            self.calls.append((steps, status))

    rank1 = FileProgress(tmp_path / "rank_1.json", interval=0.0)
    bar, lines = Bar(), []
    watcher = RankWatcher(tmp_path, [1], bar, lines.append)
    watcher.poll()  # nothing written yet: nothing drawn
    rank1.advance(7, "context_03: 1 rounds on disk")
    rank1.log("IMP context_03: rounds 2..7")
    rank1.advance(5, "three epoch 1/1 loss 0.5")
    watcher.poll()
    rank1.advance(2, "three epoch 1/1 loss 0.4")
    rank1.finish()
    watcher.wait(interval=0.0)
    assert bar.calls == [(7, "[rank 1] rounds on disk"), (5, "[rank 1] three epoch 1/1 loss 0.5"),
                         (2, "[rank 1] three epoch 1/1 loss 0.4")]
    assert lines == ["[rank 1] IMP context_03: rounds 2..7"] and watcher.done == {1}
    failed = FileProgress(tmp_path / "rank_2.json", interval=0.0)
    failed.fail("OSError: disk full")
    with pytest.raises(RuntimeError, match="rank 2 failed in stage 1: OSError: disk full; .* re-launching resumes"):
        RankWatcher(tmp_path, [2], bar, lines.append).wait(interval=0.0)


# -- torchrun, two ranks --------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_ranks_give_the_masks_of_one_process_and_rank_zero_speaks_for_both(one_process, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    done = subprocess.run(torchrun(out, logs), env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, rank_output(logs, 0) + rank_output(logs, 1) + done.stderr[-3000:]
    assert same_rounds(rounds(one_process), rounds(out))  # bit for bit, every round of every stream
    assert records(out, "single_imp") == records(one_process, "single_imp")  # rank 0 alone, from the same masks
    assert len(records(out, "rtl")) == 1  # retrained over both ranks (weights: see test_joint_retraining_*)
    leader = rank_output(logs, 0)
    assert "stage 1 on 2 ranks" in leader and "[rank 1] IMP context_" in leader and "finished in" in leader
    assert rank_output(logs, 1) == ""  # the other rank prints nothing
    assert json.loads((out / "environment.json").read_text())["threads"] == 1
    assert not (out / ".ranks").exists()


@pytest.mark.distributed
def test_joint_retraining_can_stay_on_rank_zero_and_then_equals_one_process(one_process, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    done = subprocess.run(torchrun(out, logs, distributed_retraining=False), env=ENV, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, rank_output(logs, 0) + rank_output(logs, 1) + done.stderr[-3000:]
    assert same_rounds(rounds(one_process), rounds(out))
    assert records(out, "rtl") == records(one_process, "rtl")  # retrained by rank 0 alone: bit for bit


@pytest.mark.distributed
def test_a_second_launch_is_refused_on_every_rank(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    with RunDirectory(out).locked():  # as a launch running in it holds it
        done = subprocess.run(torchrun(out, logs), env=ENV, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"{out} is in use by pid {os.getpid()}" in " ".join(rank_output(logs, rank).split()), rank
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # neither rank wrote anything (the owner file was ours)


def ghostnet_but_not_on_rank_one(num_outputs: int, input_shape, width: float = 1.0) -> nn.Module:
    """The digits network on rank 0; on rank 1 an error, as a disk or a data file could give after the start."""
    if os.environ.get("RANK") == "1":
        raise OSError("disk full (on rank 1 only)")
    return ghostnet(num_outputs, input_shape, width)


@pytest.mark.distributed
def test_a_rank_that_fails_after_the_start_ends_the_launch_with_its_own_error(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    model = {"name": "test_distributed:ghostnet_but_not_on_rank_one", "options": TINY["model"]["options"]}
    done = subprocess.run(torchrun(out, logs, model=model), env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert done.returncode != 0
    failed = rank_output(logs, 1)
    assert "disk full (on rank 1 only)" in failed and "Traceback" not in failed, failed  # one line, as one process
    assert "terminate called" not in failed + rank_output(logs, 0), failed  # no abort hiding it
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*2 ", done.stderr), done.stderr[-3000:]  # its own status


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _rank_process(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return pid
    return None


@pytest.mark.distributed
def test_a_rank_killed_in_stage_one_is_restarted_and_resumes_to_the_same_masks(one_process, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    launcher = subprocess.Popen(torchrun(out, logs, restarts=1), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # rank 1 runs contexts 0-7 and 9 (plan_stage_one): kill it once it has saved a few rounds, waiting
        # as long as a launch may take rather than killing it wherever a shorter wait happens to end
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(list((out / "imp").glob("context_0[0-3]/round_*.safetensors"))) < 3:
            assert launcher.poll() is None, f"the launch ended (status {launcher.returncode}) before rank 1 saved 3 rounds"
            assert time.monotonic() < deadline, f"rank 1 saved fewer than 3 rounds in {LAUNCH_TIMEOUT} s"
            time.sleep(0.05)
        victim = _rank_process(launcher.pid, 1)
        assert victim is not None, "rank 1 not found"
        saved, finished = len(list((out / "imp").rglob("round_*.safetensors"))), (out / "results.json").exists()
        os.kill(victim, signal.SIGKILL)  # mid-stage-1: torchrun stops rank 0 and starts both again
        assert launcher.wait(timeout=LAUNCH_TIMEOUT) == 0, rank_output(logs, 0, 1) + rank_output(logs, 1, 1)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert 0 < saved < len(rounds(one_process)) and not finished
    assert list(logs.glob("*/attempt_1/1"))  # torchrun's restart ran
    assert same_rounds(rounds(one_process), rounds(out))


# -- joint retraining over two ranks (torch.multiprocessing, gloo) --------------------------------
def _network(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    if batch_norm:
        return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _retraining(batch_norm: bool):
    model = _network(batch_norm)
    params = dict(model.named_parameters())
    names = ["0.weight", "3.weight" if batch_norm else "2.weight"]
    masks = MaskSet.from_tickets([{n: torch.rand(params[n].shape, generator=torch.Generator().manual_seed(10 * k + i)) > 0.4
                                   for i, n in enumerate(names)} for k in range(3)])
    # batches of 7 rows, the last of each epoch a single row: one rank has nothing of it
    streams = [toy_stream(k, n=29 + 7 * k, batch=7) for k in range(3)]
    return model, snapshot(model), masks, streams


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # as every rank of a launch here (rank_settings), and the reference in the test process
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    communicator = GradientAllReduce(rank, world)
    model, theta0, masks, streams = _retraining(batch_norm=False)
    joint_retrain(model, theta0, masks, streams, 2, OptimizerConfig(lr=1e-2), seed=3, data_parallel=communicator)
    result = {"plain": snapshot(model)}
    # one step of a network with BatchNorm: gradients and running statistics of the whole batch
    model, reference = _network(True), _network(True)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=data), torch.randn(7, 3, generator=data)
    nn.functional.mse_loss(reference(x), y).backward()
    with communicator.step(model, nn.functional.mse_loss, x, y) as (loss, xs, ys):
        loss(model(xs), ys).backward()
    result["step"] = max([(p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())]
                         + [(a - b).abs().max().item() for a, b in zip(model.buffers(), reference.buffers())])
    model, theta0, masks, streams = _retraining(batch_norm=True)
    joint_retrain(model, theta0, masks, streams, 1, OptimizerConfig(lr=1e-2), seed=3, data_parallel=communicator)
    result["batch_norm"] = snapshot(model)
    torch.save(result, f"{out}_{rank}.pt")
    dist.barrier()  # as Session.close: no rank leaves while the other may still be in the last all-reduce
    dist.destroy_process_group()


@pytest.mark.distributed
def test_joint_retraining_over_two_ranks_takes_the_full_batch_step(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank_{r}.pt") for r in (0, 1)]
    # Exactly equal on every rank: each gets the same all-reduced bits and takes the same step.
    for key in ("plain", "batch_norm"):
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in ranks[0][key])
    # One step is the full batch's up to float summation order: two half-batch sums added instead of
    # one sum, a few float32 roundings (6e-8 relative) of gradients of size ~1: 9e-8 measured. Unweighted
    # shares are off by 0.42 here, BatchNorm over each rank's own rows by 1.05.
    assert ranks[0]["step"] < 1e-6 and ranks[1]["step"] < 1e-6
    model, theta0, masks, streams = _retraining(batch_norm=False)
    joint_retrain(model, theta0, masks, streams, 2, OptimizerConfig(lr=1e-2), seed=3)
    one = snapshot(model)
    # 42 Adam steps (2 epochs of 3 x 7) from such gradients: 1.2e-7 measured on weights of size ~0.5 (no
    # BatchNorm, so no near-zero gradient whose rounding decides a full Adam step: run.distributed's docstring)
    assert max((ranks[0]["plain"][k] - one[k]).abs().max().item() for k in one) < 1e-5
