"""The machine-wide thread budget: its arithmetic, the registry of runs, and the share as runs come and go."""

import os
import subprocess
import sys

import pytest
import torch

from routing_lottery.threads import (LoadMeter, Registry, ThreadBudget, busy_cores, explicit_setting, share,
                                     thread_budget)


class NoLoad(LoadMeter):
    """No other work on the machine: the share depends on the registry alone."""

    def sample(self, pids):
        return None


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, threads):
        self.calls.append(threads)


class Sink:
    def __init__(self):
        self.steps, self.planned = 0, None

    def advance(self, steps, status):
        self.steps += steps

    def plan(self, total):
        self.planned = total


def budget(registry, **options):
    threads, lines = Recorder(), []
    options = {"cores": 2, "interval": 0.0, "warmup": 0.0, "meter": NoLoad(), "set_threads": threads,
               "log": lines.append, **options}
    return ThreadBudget(registry, **options), threads, lines


@pytest.fixture
def sleeper():
    """Another live process to register as a second run."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_share_divides_the_free_cores_among_the_runs():
    assert share(2, 1) == 2 and share(2, 2) == 1 and share(8, 3) == 2 and share(16, 4) == 4
    assert share(2, 5) == 1 and share(1, 1) == 1  # never below one thread
    assert share(4, 1, busy=1) == 3 and share(4, 2, busy=2) == 1 and share(2, 1, busy=7) == 1
    assert share(2, 0) == 2  # no run registered (the registry fell silent): this process alone


def test_a_core_counts_busy_from_70_percent_and_stops_below_30():
    assert busy_cores(0.0) == 0 and busy_cores(0.69) == 0 and busy_cores(0.75) == 1 and busy_cores(1.8) == 2
    assert busy_cores(0.5, previous=1) == 1 and busy_cores(0.25, previous=1) == 0  # hysteresis
    assert busy_cores(1.6, previous=1) == 1 and busy_cores(1.75, previous=1) == 2


def test_an_explicit_setting_turns_the_budget_off(tmp_path):
    assert explicit_setting(None, {}) is None and explicit_setting(None, {"OMP_NUM_THREADS": " "}) is None
    assert explicit_setting(3, {"OMP_NUM_THREADS": "1"}) == "threads=3"  # the config wins, named first
    assert explicit_setting(None, {"OMP_NUM_THREADS": "1"}) == "OMP_NUM_THREADS=1"
    assert explicit_setting(None, {"MKL_NUM_THREADS": "2"}) == "MKL_NUM_THREADS=2"
    registry, threads, lines = Registry(tmp_path / "procs"), Recorder(), []
    for setting, environ in ((2, {}), (None, {"OMP_NUM_THREADS": "1"})):
        off = thread_budget(setting, lines.append, environ=environ, registry=registry, set_threads=threads)
        sink = Sink()
        assert off.watch(sink) is sink and off.threads is None
        off.close()
    assert lines[0].startswith("threads: 2 (threads=2;") and "OMP_NUM_THREADS=1" in lines[1]
    assert threads.calls == [] and not registry.path.exists()  # nothing registered, nothing changed


def test_a_run_registers_takes_its_share_and_deregisters(tmp_path):
    registry, lines = Registry(tmp_path / "procs"), []
    started = thread_budget(None, lines.append, environ={}, registry=registry, cores=2, warmup=0.0, meter=NoLoad(),
                            set_threads=(threads := Recorder()))
    with started:
        assert registry.live() == [os.getpid()]
        assert threads.calls == [2] and lines == ["threads: 2 (1 rtl process on 2 cores)"]
    assert registry.live() == [] and not list(registry.path.iterdir())
    assert threads.calls == [2, torch.get_num_threads()]  # the process gets its threads back (1 in the tests)


def test_a_second_run_lowers_the_share_and_its_end_restores_it(tmp_path, sleeper):
    registry = Registry(tmp_path / "procs")
    run, threads, lines = budget(registry)
    sink = Sink()
    watched = run.watch(sink)
    assert run.start() == "threads: 2 (1 rtl process on 2 cores)"
    watched.advance(1, "step")
    assert threads.calls == [2]  # unchanged: set once
    registry.register(pid=sleeper.pid)
    watched.advance(1, "step")
    assert threads.calls == [2, 1] and run.runs == 2 and lines == ["threads: 2 -> 1 (2 rtl processes on 2 cores)"]
    sleeper.kill()
    sleeper.wait()
    watched.advance(1, "step")
    assert threads.calls == [2, 1, 2] and lines[-1] == "threads: 1 -> 2 (1 rtl process on 2 cores)"
    assert sink.steps == 3  # the sink still gets every step
    watched.plan(7)  # what else the sink does passes through
    assert sink.planned == 7
    run.close()


def test_other_work_on_the_machine_lowers_the_share(tmp_path):
    class Busy(LoadMeter):
        def sample(self, pids):
            return 1.0  # one core kept busy by a job that is no rtl run

    run, threads, _ = budget(Registry(tmp_path / "procs"), meter=Busy())
    assert run.start() == "threads: 1 (1 rtl process on 2 cores, 1 busy with other work)" and threads.calls == [1]
    run.close()


def test_re_checks_wait_for_the_interval(tmp_path, sleeper):
    registry = Registry(tmp_path / "procs")
    run, threads, _ = budget(registry, interval=3600.0)
    run.start()
    registry.register(pid=sleeper.pid)
    run.watch(Sink()).advance(1, "step")
    assert threads.calls == [2]  # not re-checked within the interval
    assert run.check(force=True) == 1 and threads.calls == [2, 1]
    run.close()


def test_entries_of_dead_processes_are_ignored_and_deleted(tmp_path, sleeper):
    registry = Registry(tmp_path / "procs")
    registry.register()
    registry.register(pid=sleeper.pid)
    gone = dead_pid()
    registry.register(pid=gone)
    # a live pid whose recorded start time is not its own: the registered process died and the pid was reused
    (registry.path / "1").write_text('{"pid": 1, "start": -5, "threads": null}')
    (registry.path / ".9.abcdefgh.tmp").write_text("{")  # an atomic write's litter is not an entry
    assert registry.live() == sorted([os.getpid(), sleeper.pid])
    assert sorted(p.name for p in registry.path.iterdir()) == sorted([".9.abcdefgh.tmp", str(os.getpid()),
                                                                       str(sleeper.pid)])
    registry.deregister()
    registry.deregister(sleeper.pid)
    assert registry.live() == []


def test_a_deleted_entry_is_written_again_at_the_next_check(tmp_path):
    registry = Registry(tmp_path / "procs")
    run, _, _ = budget(registry)
    run.start()
    (registry.path / str(os.getpid())).unlink()
    run.check(force=True)
    assert registry.live() == [os.getpid()]
    run.close()


def test_an_unwritable_registry_leaves_torch_alone_with_a_note(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run, threads, _ = budget(Registry(blocker / "procs"))
    line = run.start()
    assert line.startswith("threads: ") and "torch's default" in line and str(blocker / "procs") in line
    assert "\n" not in line
    sink = Sink()
    run.watch(sink).advance(1, "step")  # training goes on, unmanaged
    assert threads.calls == [] and run.threads is None and sink.steps == 1
    run.close()  # nothing to remove, no error


def test_the_load_meter_counts_other_work_between_samples(tmp_path):
    stat = tmp_path / "stat"

    def write(busy0, idle0, busy1=0):
        stat.write_text(f"cpu  {busy0 + busy1} 0 0 {2 * idle0} 0 0 0 0 0 0\n"
                        f"cpu0 {busy0} 0 0 {idle0} 0 0 0 0 0 0\ncpu1 {busy1} 0 0 {idle0} 0 0 0 0 0 0\n"
                        "intr 1 2 3\n")

    meter = LoadMeter(cores={0}, stat=stat)
    write(100, 100)
    assert meter.sample([os.getpid()]) is None  # the first sample only sets the baseline
    write(100 + 10**6, 100, busy1=10**9)  # cpu1 is not this process's: not counted
    used = meter.sample([os.getpid()])
    assert used is not None and used > 0
    write(100 + 10**6, 100)
    assert meter.sample([os.getpid()]) == 0.0  # nothing busy since (our own time is never other work)
    assert meter.sample([os.getpid(), 1]) is None  # a run came: this interval is not known
    assert LoadMeter(stat=tmp_path / "missing").sample([]) is None
