"""The command line on hostile or mistaken input: one line that names the culprit, before any work.

Every refusal here happens while the config loads or the task is built, before the run directory
is claimed, so each test costs a config load (in-process, with ``CliRunner``), not a run.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from routing_lottery.cli import app, error_line
from routing_lottery.config import ExperimentConfig
from routing_lottery.run import workers as workers_module

ENV = {"OMP_NUM_THREADS": "1"}  # an explicit thread count: no shared thread budget in these tests


@pytest.fixture
def no_run(monkeypatch):
    """Fail fast where a refusal came too late: without the bounds, these inputs claim the directory and
    then take tens of gigabytes (a billion workers' loads, a billion seeds, an expanded alias bomb)."""
    import routing_lottery.run

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run was planned: the input was not refused while the config loaded")

    monkeypatch.setattr(routing_lottery.run, "make_runner", reached)


def rtl(*args: str) -> str:
    """``rtl ARGS`` in-process: it must fail with exit code 2 and one ``error:`` line; that line."""
    result = CliRunner().invoke(app, list(args), env=ENV)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return " ".join(result.output[result.output.index("error:"):].split())  # rich wraps long lines


def test_a_bad_device_is_blamed_on_device_not_on_set(tmp_path):
    line = rtl("demo", "--scale", "smoke", "--device", "tpu9", "--out", str(tmp_path / "run"))
    assert line.startswith("error: --device (over ") and "device must be auto, cpu" in line and "'tpu9'" in line
    assert "--set" not in line and not (tmp_path / "run").exists()
    both = rtl("demo", "--scale", "smoke", "--set", "training.epochs=1", "--device", "tpu9",
               "--out", str(tmp_path / "r"))
    assert both.startswith("error: --set, --device (over ")


def test_a_seed_torch_cannot_take_is_refused_at_load(tmp_path, no_run):
    line = rtl("demo", "--scale", "smoke", "--set", "seed=99999999999999999999999", "--out", str(tmp_path / "run"))
    assert "seed must be in 0..2**63-1" in line and "Overflow" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--workers", "1000000000", "workers must be >= 1 and <= 1024"),
    ("--seeds", "1000000000", "replicates must be >= 1 and <= 1000 (--seeds"),
    ("--set", "threads=1000000", "threads must be >= 1 and <= 1024"),
])
def test_upper_bounds_are_refused_before_the_directory_is_claimed(tmp_path, no_run, option, value, message):
    start = time.perf_counter()
    line = rtl("demo", "--scale", "smoke", option, value, "--out", str(tmp_path / "run"))
    assert line.startswith(f"error: {option} (over ") and message in line
    assert not (tmp_path / "run").exists()  # before the fix: claimed, then 64 GB or a billion seeds
    assert time.perf_counter() - start < 30


def test_an_alias_bomb_in_set_is_refused(tmp_path, no_run):
    lists = ["&l0 [" + ", ".join(["lol"] * 10) + "]"]
    lists += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    start = time.perf_counter()
    line = rtl("demo", "--scale", "smoke", "--set", f"data.options.x=[{', '.join(lists)}]",
               "--out", str(tmp_path / "r"))
    assert line.startswith("error: --set data.options.x=[&l0 [lol") and "line 1, column" in line and "more than 10,000 values" in line
    assert time.perf_counter() - start < 30 and not (tmp_path / "r").exists()


def test_a_negative_context_index_is_refused_as_an_index(tmp_path):
    line = rtl("export", str(tmp_path), "--context", "-1")
    assert "--context '-1': context indices run from 0 to K-1" in line and "unknown context" not in line


USER_CODE = '''
def loader(data, seed):
    raise KeyError("label_column")


def builder(config):
    return 1 / 0


def model(num_outputs, input_shape, **options):
    raise AttributeError("no attribute 'hidden'")
'''


@pytest.mark.parametrize("setting, entry, message", [
    ("data:\n  name: {module}:loader\n", "data.name '{module}:loader'", "raised KeyError: 'label_column'"),
    ("task: {module}:builder\n", "task '{module}:builder'", "raised ZeroDivisionError: division by zero"),
    ("task: classification\ndata:\n  name: digits\nmodel:\n  name: {module}:model\n", "model.name '{module}:model'",
     "raised AttributeError: no attribute 'hidden'"),
])
def test_an_error_in_a_users_code_names_the_setting_that_chose_it(tmp_path, monkeypatch, setting, entry, message):
    module = f"hostile_user_code_{len(setting)}"  # a module of its own per case: imports are cached
    (tmp_path / f"{module}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "user.yaml"
    config.write_text("name: user\n" + setting.format(module=module))
    line = rtl("run", str(config), "--out", str(tmp_path / "run"))
    assert line == f"error: {entry.format(module=module)} {message}"  # not "(unexpected; ...)"
    assert not (tmp_path / "run").exists()


class _KilledProcess:
    """A stage-1 worker the kernel killed (SIGKILL: the out-of-memory killer's signal)."""

    exitcode = -9

    def __init__(self, **_: object) -> None:
        pass

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass


class _EmptyQueue:
    def get(self, timeout: float) -> None:
        raise queue.Empty

    def empty(self) -> bool:
        return True


def test_a_killed_worker_is_reported_as_the_library_error_it_is(tmp_path, monkeypatch):
    fake = SimpleNamespace(Queue=_EmptyQueue, Process=_KilledProcess)
    monkeypatch.setattr(torch.multiprocessing, "get_context", lambda method: fake)
    monkeypatch.setattr(workers_module, "stage_one_costs", lambda experiment: {("context", 0): 5, ("single", 0): 3})
    tickets = SimpleNamespace(_rewind_point=lambda stream: None)
    experiment = SimpleNamespace(config=ExperimentConfig(), tickets=tickets, shared_tickets=tickets, classifier=None,
                                 log=lambda message: None, run=SimpleNamespace(path=tmp_path))
    with pytest.raises(workers_module.WorkerFailed) as err:
        workers_module.run_stage_one(experiment, 2)
    assert isinstance(err.value, RuntimeError)  # as before: callers that caught RuntimeError still do
    line = error_line(err.value)
    assert line.startswith("stage-1 worker 0 failed: killed by SIGKILL (out of memory?);")
    assert "re-launching resumes" in line and "unexpected" not in line


@pytest.mark.slow
def test_the_installed_rtl_names_the_option_in_one_line(tmp_path):
    """The real entry point, as a user types it (one subprocess: startup and a config load, no run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rtl_script = Path(sys.executable).with_name("rtl")
    result = subprocess.run([str(rtl_script), "demo", "--scale", "smoke", "--device", "tpu9", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert " ".join(result.stdout.split()).startswith("error: --device (over ")
    assert not (tmp_path / "run").exists()
