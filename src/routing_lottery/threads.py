"""A machine-wide torch thread budget, shared by the ``rtl`` runs of one user on one machine.

Torch starts one intra-op thread per core in every process. Two such processes on the same cores
do not share them gracefully: OpenMP's threads wait for each other at every parallel region, and a
thread whose partner is descheduled waits a scheduler slice. Measured on a 2-core machine beside
other jobs: ``rtl demo --scale smoke`` took 124 s with torch's 2 threads against 36 s with one, and
two of them at 2 threads each had not finished after 300 s (37 s alone). A 2-thread pool shrunk to
one thread by ``torch.set_num_threads`` ran as fast as a process started with one (the surplus
OpenMP thread sleeps), so a running pool can be shrunk; ``benchmarks/bench_workers.py`` measures
two runs side by side under this budget.

The budget, on by default for runs started by the command line:

- **Registry.** Each run writes ``<tmp>/routing-lottery-<uid>/procs/<pid>`` (atomically) and
  removes it on exit (``close``, also at exit); entries of dead processes are ignored and deleted,
  so a killed run costs nothing.
- **Share.** A run takes ``max(1, (cores - busy) // runs)`` threads: ``cores`` its usable cores
  (``os.sched_getaffinity``), ``runs`` the live registered runs (itself included), ``busy`` the
  cores that other work (anything but registered runs) kept busy, measured from ``/proc/stat``
  (Linux; 0 elsewhere) with some hysteresis (``busy_cores``).
- **Re-check.** ``watch(sink)`` wraps the run's progress sink; at most every ``interval`` seconds an
  ``advance`` recomputes the share and calls ``torch.set_num_threads`` when it changed: a run
  started alone on 2 threads drops to 1 when a second starts, and goes back to 2 when it ends
  (each change is logged: ``threads: 2 -> 1 (...)``).
- **Explicit settings win.** ``threads`` in the config (``--set threads=T``), ``OMP_NUM_THREADS`` or
  ``MKL_NUM_THREADS`` turn the budget off for that run (it neither registers nor adapts; others
  still see its load through ``/proc/stat``).
- **Left as found.** ``close`` restores the thread count the process had, for callers that run the
  command line in their own process (tests through ``CliRunner``).
- **Never fatal.** An unwritable registry leaves torch's default threads with a one-line note.

Inter-op threads are left alone: the library never forks inter-op work (no ``torch.jit.fork``, no
``DataLoader`` workers), so torch never starts that pool (checked: ``set_num_interop_threads``
still succeeds after training, which it refuses once the pool exists); its threads would block
on a condition variable, not spin.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_json, read_json

INTERVAL = 2.0  # seconds between re-checks of the share
WARMUP = 0.25  # seconds over which a run measures the other work before it starts
EXPLICIT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share(cores: int, runs: int, busy: int = 0) -> int:
    """Threads for each of ``runs`` runs on ``cores`` cores of which ``busy`` are taken by other work."""
    return max(1, (cores - max(0, busy)) // max(1, runs))


def busy_cores(used: float, previous: int = 0) -> int:
    """Cores counted busy with other work when it used ``used`` cores and ``previous`` were counted.

    A core counts once it is 70 % used and stops counting below 30 %: a neighbour hovering around
    half a core does not flip the share at every re-check.
    """
    if used >= previous + 0.7:
        return int(used + 0.3)
    if used <= previous - 0.7:
        return int(used + 0.7)
    return previous


def explicit_setting(threads: int | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """What the user set that turns the budget off (``"threads=2"``, ``"OMP_NUM_THREADS=1"``), else None."""
    if threads is not None:
        return f"threads={threads}"
    for name in EXPLICIT_ENV:
        if environ.get(name, "").strip():
            return f"{name}={environ[name].strip()}"
    return None


def default_registry() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"routing-lottery-{uid}" / "procs"


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell a reused pid from the registered one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_ticks(pid: int) -> int | None:
    """CPU time (user + system, clock ticks) ``pid`` has used, or None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has this pid now
        return False
    except OSError:
        return False
    return start is None or _start_ticks(pid) in (None, start)


class Registry:
    """The directory of live ``rtl`` runs: one JSON file per process, named by its pid."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_registry()

    def register(self, pid: int | None = None, threads: int | None = None) -> None:
        """Add (or update) ``pid``'s entry; raises OSError when the directory cannot be used."""
        pid = os.getpid() if pid is None else pid
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if hasattr(os, "getuid") and self.path.stat().st_uid != os.getuid():
            raise PermissionError(f"{self.path} belongs to another user")
        atomic_write_json(self.path / str(pid), {"pid": pid, "start": _start_ticks(pid), "threads": threads})

    def deregister(self, pid: int | None = None) -> None:
        try:
            (self.path / str(os.getpid() if pid is None else pid)).unlink(missing_ok=True)
        except OSError:
            pass

    def live(self) -> list[int]:
        """The registered pids still running (sorted); entries of dead processes are deleted."""
        try:
            names = [p for p in self.path.iterdir() if p.name.isdigit()]
        except OSError:
            return []
        pids = []
        for entry in names:
            try:
                start = read_json(entry, max_bytes=4096).get("start")
            except Exception:  # noqa: BLE001 -- an unreadable entry is treated as a process with no start time
                start = None
            if _alive(int(entry.name), start if isinstance(start, int) else None):
                pids.append(int(entry.name))
            else:
                try:
                    entry.unlink(missing_ok=True)
                except OSError:
                    pass
        return sorted(pids)


class LoadMeter:
    """Cores kept busy by other work than the registered runs, between two calls (``/proc/stat``)."""

    def __init__(self, cores: set[int] | None = None, stat: str | Path = "/proc/stat") -> None:
        try:
            self.cpus = cores if cores is not None else set(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = set()
        self.stat = Path(stat)
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last: tuple[float, int, dict[int, int]] | None = None

    def _busy_ticks(self) -> int | None:
        """Busy time (all but idle, iowait and steal) of this process's CPUs, in clock ticks."""
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        total = 0
        for line in lines:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in self.cpus:
                continue
            user, nice, system, idle, iowait, irq, softirq, *rest = (int(v) for v in values)
            total += user + nice + system + irq + softirq  # guest time is already in user
        return total

    def sample(self, pids: list[int]) -> float | None:
        """Cores used by other work since the last sample (None on the first, or if pids changed)."""
        busy = self._busy_ticks()
        ticks = {pid: _cpu_ticks(pid) for pid in pids}
        now = time.monotonic()
        if busy is None or any(t is None for t in ticks.values()):
            self.last = None
            return None
        previous, self.last = self.last, (now, busy, ticks)  # type: ignore[assignment]
        if previous is None or previous[2].keys() != ticks.keys() or now <= previous[0]:
            return None  # a run came or went: its CPU time in the interval is not known
        ours = sum(ticks[p] - previous[2][p] for p in ticks)
        return max(0.0, (busy - previous[1] - ours) / self.tick / (now - previous[0]))


class ThreadBudget:
    """This process's share of the machine, kept up to date while it trains (see the module docstring).

    ``set_threads`` is ``torch.set_num_threads``; tests hand in their own, and a ``Registry`` on
    their own directory. ``warmup`` is the first measurement of other work (0: none at start).
    """

    def __init__(self, registry: Registry | None = None, cores: int | None = None, interval: float = INTERVAL,
                 warmup: float = WARMUP, meter: LoadMeter | None = None,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 log: Callable[[str], None] = lambda message: None) -> None:
        self.registry = registry or Registry()
        self.cores = cores or usable_cores()
        self.interval, self.warmup = interval, warmup
        self.meter = meter if meter is not None else LoadMeter()
        self.set_threads, self.log = set_threads, log
        self.threads: int | None = None  # None: not managing (off, or fell back)
        self.runs, self.busy, self.next_check = 1, 0, 0.0
        self.previous: int | None = None  # torch's threads before the budget took over (restored by close)

    def start(self) -> str:
        """Register, take the share, and return the line to log."""
        try:
            self.registry.register()
        except OSError as err:
            return (f"threads: {torch.get_num_threads()}, torch's default (no shared thread budget: "
                    f"{self.registry.path} is not writable: {err.strerror or err})")
        atexit.register(self.close)
        self.previous = torch.get_num_threads()
        if self.warmup > 0:
            self.meter.sample(self.registry.live())
            time.sleep(self.warmup)
        self.check(force=True)
        return f"threads: {self.threads} ({self.describe()})"

    def check(self, force: bool = False) -> int | None:
        """Recompute the share (at most every ``interval`` seconds unless ``force``); apply a change."""
        now = time.monotonic()
        if not force and (self.threads is None or now < self.next_check):
            return self.threads
        self.next_check = now + self.interval
        pids = self.registry.live()
        if os.getpid() not in pids:  # deleted by someone: register again (the next one to look must count us)
            try:
                self.registry.register(threads=self.threads)
            except OSError:
                pass
            pids = sorted({*pids, os.getpid()})
        used = self.meter.sample(pids)
        if used is not None:
            self.busy = busy_cores(used, self.busy)
        self.runs = len(pids)
        threads = share(self.cores, self.runs, self.busy)
        if threads != self.threads:
            if self.threads is not None:
                self.log(f"threads: {self.threads} -> {threads} ({self.describe()})")
            self.set_threads(threads)
            self.threads = threads
        return threads

    def describe(self) -> str:
        busy = f", {self.busy} busy with other work" if self.busy else ""
        return f"{self.runs} rtl process{'es' if self.runs != 1 else ''} on {self.cores} cores{busy}"

    def watch(self, sink: Any) -> Any:
        """``sink`` with a re-check before each ``advance`` (other attributes, like ``plan``, pass through)."""
        return _Watched(sink, self)

    def close(self) -> None:
        """Deregister, and give the process back the threads it had (a caller in the same process goes on)."""
        atexit.unregister(self.close)
        self.registry.deregister()
        if self.threads is not None and self.previous is not None and self.previous != self.threads:
            self.set_threads(self.previous)
        self.threads = None

    def __enter__(self) -> ThreadBudget:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Watched:
    def __init__(self, sink: Any, budget: ThreadBudget) -> None:
        self.sink, self.budget = sink, budget

    def advance(self, steps: int, status: str) -> None:
        self.budget.check()
        self.sink.advance(steps, status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


class _Off:
    """The budget when the user chose the threads: nothing registered, nothing changed."""

    threads = None

    def watch(self, sink: Any) -> Any:
        return sink

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def thread_budget(threads: int | None, log: Callable[[str], None],
                  environ: Mapping[str, str] = os.environ, **options: Any) -> ThreadBudget | _Off:
    """Start the budget for a run whose config sets ``threads`` (None: unset); log one line.

    Off (``threads`` or the environment decide) when ``explicit_setting`` names something. The
    result's ``watch(sink)`` is the progress sink to train with; ``close()`` (or leaving its
    ``with`` block, or exiting) deregisters.
    """
    explicit = explicit_setting(threads, environ)
    if explicit is not None:
        log(f"threads: {threads or torch.get_num_threads()} ({explicit}; no shared thread budget)")
        return _Off()
    budget = ThreadBudget(log=log, **options)
    log(budget.start())
    return budget
