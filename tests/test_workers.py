"""Stage 1 over worker processes: the same masks as one process, a killed run resumes, the plan balances."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.errors import ConfigError
from routing_lottery.run import RunDirectory, make_runner
from routing_lottery.run.workers import balance, cpu_budget

TINY = {"data": {"train_per_class": 10, "test_per_class": 4, "image_size": 8, "calibration": 0.0},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.4, 0.7], "step": 0.2},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 32}, "methods": ["single_imp", "rtl"],
        "deploy": {"routers": []}, "threads": 1}


def tiny(**changes):
    return load_config(packaged_config("digits"), "smoke", {**TINY, **changes})


def rounds(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): load_file(p) for p in sorted((run / "imp").rglob("*.safetensors"))}


def same_rounds(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.keys() == b[f].keys() and all((x[k] == b[f][k]).all() for k in x)
                                        for f, x in a.items())


def test_longest_jobs_first_to_the_least_loaded_worker():
    costs = {("single", 0): 8, ("context", 0): 5, ("context", 1): 4, ("context", 2): 3, ("context", 3): 2}
    plan = balance(costs, 2)
    # 8 -> w0; 5 -> w1; 4 -> w1 (9); 3 -> w0 (11); 2 -> w1 (11)
    assert plan.assignment == ((("single", 0), ("context", 2)), (("context", 0), ("context", 1), ("context", 3)))
    assert plan.steps == (11, 11) and plan.speedup == pytest.approx(22 / 11)
    # contexts of very different sizes: the largest bounds the speed-up, whatever the worker count
    skewed = balance({("context", 0): 90, ("context", 1): 5, ("context", 2): 5}, 3)
    assert skewed.makespan == 90 and skewed.speedup == pytest.approx(100 / 90)
    assert balance({("context", k): 1 for k in range(10)}, 4).speedup == pytest.approx(10 / 3)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        balance(costs, 0)


def test_the_thread_budget_shares_the_cores_unless_set():
    assert cpu_budget(4, 3) == 3
    cores = len(os.sched_getaffinity(0))
    assert cpu_budget(1, None) == cores and cpu_budget(10 * cores, None) == 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    path = tmp_path_factory.mktemp("one")
    records = make_runner(tiny(), path).run_all()
    return path, records


@pytest.mark.distributed
def test_two_workers_give_the_masks_and_results_of_one_process(one_process, tmp_path):
    path, records = one_process
    parallel = make_runner(tiny(workers=2), tmp_path).run_all()
    assert same_rounds(rounds(path), rounds(tmp_path))  # bit for bit, every round of every stream
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]  # noqa: E731
    assert strip(parallel) == strip(records)
    assert "workers: 2" in (tmp_path / "config.yaml").read_text()  # the parent's config, not a worker's


@pytest.mark.distributed
def test_a_run_killed_in_stage_one_resumes_to_the_same_masks(one_process, tmp_path):
    path, _ = one_process
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "routing_lottery.cli", "run", "digits", "--scale", "smoke", "--out", str(out),
               "--workers", "2"] + [arg for key, value in (("data.train_per_class", 10), ("data.test_per_class", 4),
                                                         ("data.image_size", 8), ("data.calibration", 0.0),
                                                         ("model.options.width", 0.25), ("pruning.sparsities", "[0.4,0.7]"),
                                                         ("pruning.step", 0.2), ("training.imp_epochs", 1),
                                                         ("training.epochs", 1), ("training.batch_size", 32),
                                                         ("methods", "[single_imp,rtl]"), ("deploy.routers", "[]"),
                                                         ("threads", 1))
                                    for arg in ("--set", f"{key}={value}")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "imp").rglob("round_001.safetensors"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the parent and both workers, mid-stage-1
    process.wait()
    assert list((out / "imp").rglob("*.safetensors")), "no round was saved before the kill"
    assert not (out / "results.json").exists()
    make_runner(tiny(workers=2), out).run_all()
    assert same_rounds(rounds(path), rounds(out))


def test_a_worker_cannot_claim_a_directory_its_parent_did_not(tmp_path):
    with pytest.raises(ConfigError, match="a worker joins a run its parent claimed"):
        RunDirectory(tmp_path, lock=False).claim({"version": 4})


def test_workers_refuse_a_task_they_cannot_rebuild(tmp_path):
    from routing_lottery.run import build_tasks

    config = tiny(workers=2)
    with pytest.raises(ConfigError, match="cannot be rebuilt there"):
        make_runner(config, tmp_path, tasks=build_tasks(config)[0])


def test_one_run_and_a_run_of_seeds_do_not_share_a_directory(tmp_path):
    from routing_lottery.run.directory import IDENTITY_VERSION

    RunDirectory(tmp_path).claim({"version": IDENTITY_VERSION, "replicates_of": {"seed": 0}})
    with pytest.raises(ConfigError, match="holds a run of several seeds; one run needs another output directory"):
        RunDirectory(tmp_path).claim({"version": IDENTITY_VERSION, "config": {}})
