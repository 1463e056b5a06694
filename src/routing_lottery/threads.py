"""A machine-wide torch thread budget, shared by the ``rtl`` runs of one user on one machine.

Torch starts one intra-op thread per core in every process. Two such processes on the same cores
do not share them gracefully: OpenMP's threads wait for each other at every parallel region, and a
thread whose partner is descheduled waits a scheduler slice, so two runs at torch's default can
each take several times as long as one alone (measured: the documentation's Benchmarks page,
"Processes, threads and machines"). A pool shrunk by ``torch.set_num_threads`` runs as fast as a
process started with that many threads (the surplus OpenMP threads sleep), so a running pool can
be shrunk; ``benchmarks/bench_workers.py`` measures two runs side by side under this budget.

The budget, on by default for runs started by the command line:

- **Registry.** Each run writes ``<tmp>/routing-lottery-<uid>/procs/<pid>`` (atomically) and
  removes it on exit (``close``, also at exit); entries of dead processes are ignored and deleted,
  so a killed run costs nothing. The temp directory is shared, so the registry trusts nothing in
  it (``Registry``): it follows no link, opens no FIFO or device, uses the directory only when it is
  the user's own and private, and deletes only entries in exactly the format it writes.
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
- **Never fatal.** A registry that cannot be used (unwritable, a link, another user's, writable by
  others) leaves torch's default threads with a one-line note; a fault during the run (or any
  unexpected error of the budget) keeps the count it had, says why in one line, and stops re-checking.

Inter-op threads are left alone: the library never forks inter-op work (no ``torch.jit.fork``, no
``DataLoader`` workers), so torch never starts that pool (checked: ``set_num_interop_threads``
still succeeds after training, which it refuses once the pool exists); its threads would block
on a condition variable, not spin.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

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
    """``<tmp>/routing-lottery-<uid>/procs``: per user, so runs of different users never meet."""
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
    except (OSError, OverflowError):
        return False
    return start is None or _start_ticks(pid) in (None, start)


PID_NAME = re.compile(r"[1-9][0-9]{0,9}")
"""An entry's name: a pid in ASCII digits as ``str(pid)`` writes it. Not ``str.isdigit``, which also
accepts ``'²'`` and other scripts' digits that ``int`` then refuses."""
MAX_PID = 2**22
"""Linux's largest possible pid (``PID_MAX_LIMIT``); other systems stay below it. A larger name is no
process's, and would overflow ``os.kill``."""
MAX_ENTRY_BYTES = 4096
"""An entry is about 50 bytes; a larger file is not one."""
_ENTRY_KEYS = frozenset({"pid", "start", "threads"})
# Never through a link, never waiting on a FIFO; getattr: the flags POSIX lacks elsewhere (the
# registry is then off, see _links_avoidable)
_SAFE = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_PRIVATE_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _SAFE
_ENTRY_READ_FLAGS = os.O_RDONLY | _SAFE
_ENTRY_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE


def _links_avoidable() -> bool:
    """Whether this platform can reach files relative to an open directory without following links.

    Without it (Windows) a registry in a shared temp directory cannot be used safely, and there
    ``os.kill(pid, 0)`` would even end the process it probes: the budget stays off.
    """
    return (hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY") and hasattr(os, "getuid")
            and {os.open, os.stat, os.mkdir, os.unlink, os.rename} <= os.supports_dir_fd
            and os.listdir in os.supports_fd)


def _entry_start(data: bytes, pid: int) -> tuple[int | None] | None:
    """``(start,)`` when ``data`` is exactly what ``register`` writes for ``pid``, else None.

    Only such files are ever deleted: anything else in the registry was not written by a run.
    """
    try:
        entry = json.loads(data.decode("ascii"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(entry, dict) or entry.keys() != _ENTRY_KEYS:
        return None
    start = entry["start"]
    # ``type(...) is int``: not bool, whose type is a subclass of int
    if not (type(entry["pid"]) is int and entry["pid"] == pid and (start is None or type(start) is int)
            and (entry["threads"] is None or type(entry["threads"]) is int)):
        return None
    return (start,)


class Registry:
    """The directory of live ``rtl`` runs: one JSON file per process, named by its pid.

    It lives in a shared temp directory, so anything in it may have been prepared by someone else.
    The directory and its parent are opened without following links and used only when they are
    directories of this user (``uid``) that no group or other user can write; every entry is then
    reached relative to that open directory, read only when it is a regular file of this user
    (opened without following links or blocking), and deleted only when its content is exactly
    what ``register`` writes and its process is gone. Anything else is ignored and left as is.
    Problems with the directory itself raise ``OSError`` naming it; ``ThreadBudget`` then falls
    back. ``uid`` is the owner required (this process's; tests pass another to play a stranger).
    """

    def __init__(self, path: str | Path | None = None, uid: int | None = None) -> None:
        self.path = Path(path) if path is not None else default_registry()
        self.uid = uid if uid is not None else (os.getuid() if hasattr(os, "getuid") else -1)

    def register(self, pid: int | None = None, threads: int | None = None) -> None:
        """Add (or update) ``pid``'s entry; raises OSError when the directory cannot be used safely."""
        pid = os.getpid() if pid is None else pid
        data = json.dumps({"pid": pid, "start": _start_ticks(pid), "threads": threads}).encode("ascii")
        with self._directory(create=True) as directory:
            assert directory is not None  # created
            with contextlib.suppress(FileNotFoundError):
                found = os.stat(str(pid), dir_fd=directory, follow_symlinks=False)
                if not self._ours(found):
                    raise FileExistsError(f"{self.path / str(pid)} exists and is not this library's entry "
                                          "(not a regular file of yours); remove it")
            _write_entry(directory, str(pid), data)

    def deregister(self, pid: int | None = None) -> None:
        """Remove ``pid``'s entry (this process's by default) if it is one; never raises."""
        pid = os.getpid() if pid is None else pid
        try:
            with self._directory(create=False) as directory:
                if directory is not None and self._read(directory, str(pid), pid) is not None:
                    os.unlink(str(pid), dir_fd=directory)
        except OSError:
            pass

    def live(self) -> list[int]:
        """The registered pids still running (sorted); entries of dead processes are deleted.

        A registry that does not exist yet has none; one that cannot be used raises OSError.
        """
        pids = []
        with self._directory(create=False) as directory:
            if directory is None:
                return []
            for name in os.listdir(directory):
                if not PID_NAME.fullmatch(name) or int(name) > MAX_PID:
                    continue
                pid = int(name)
                entry = self._read(directory, name, pid)
                if entry is None:
                    continue  # not written by a run: neither counted nor touched
                if _alive(pid, entry[0]):
                    pids.append(pid)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=directory)
        return sorted(pids)

    def _ours(self, found: os.stat_result) -> bool:
        return stat.S_ISREG(found.st_mode) and found.st_uid == self.uid

    def _read(self, directory: int, name: str, pid: int) -> tuple[int | None] | None:
        """``_entry_start`` of the entry ``name`` when it is a regular file of ours; None otherwise."""
        try:
            if not self._ours(os.stat(name, dir_fd=directory, follow_symlinks=False)):
                return None  # a FIFO or device is never opened, a link never followed
            handle = os.open(name, _ENTRY_READ_FLAGS, dir_fd=directory)
        except OSError:
            return None
        try:
            if not self._ours(os.fstat(handle)):  # replaced between the two looks
                return None
            chunks, size = [], 0
            while size <= MAX_ENTRY_BYTES and (chunk := os.read(handle, MAX_ENTRY_BYTES + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
        except OSError:
            return None
        finally:
            os.close(handle)
        return _entry_start(b"".join(chunks), pid) if size <= MAX_ENTRY_BYTES else None

    @contextlib.contextmanager
    def _directory(self, create: bool) -> Iterator[int | None]:
        """The registry directory, open and checked (None when missing and not ``create``)."""
        if not _links_avoidable():
            raise OSError(f"this platform cannot open {self.path} without following links")
        try:
            parent = self._open_private(str(self.path.parent), None, self.path.parent, create)
        except FileNotFoundError:
            if create:
                raise
            yield None
            return
        try:
            directory = self._open_private(self.path.name, parent, self.path, create)
        except FileNotFoundError:
            if create:
                raise
            directory = None
        finally:
            os.close(parent)
        try:
            yield directory
        finally:
            if directory is not None:
                os.close(directory)

    def _open_private(self, name: str, at: int | None, path: Path, create: bool) -> int:
        """Open the directory ``name`` (relative to ``at``), not through a link, and check it is private."""
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=at)
        try:
            handle = os.open(name, _PRIVATE_DIR_FLAGS, dir_fd=at)
        except OSError as err:
            raise self._explain(name, at, path) or err from None
        try:
            found = os.fstat(handle)
            if stat.S_ISDIR(found.st_mode) and found.st_uid == self.uid and found.st_mode & 0o022:
                # Ours, but made under a permissive umask (earlier versions created the parent so):
                # closing it to others is safe, since every entry is checked on its own anyway.
                os.fchmod(handle, stat.S_IMODE(found.st_mode) & ~0o022)
                found = os.fstat(handle)
            self._check_private(found, path)
        except BaseException:
            os.close(handle)
            raise
        return handle

    @staticmethod
    def _explain(name: str, at: int | None, path: Path) -> OSError | None:
        """Why opening ``path`` as a directory failed, when it is a link or no directory."""
        try:
            found = os.stat(name, dir_fd=at, follow_symlinks=False)
        except OSError:
            return None
        if stat.S_ISLNK(found.st_mode):
            return PermissionError(f"{path} is a symbolic link, and the thread registry never follows links; "
                                   "remove it")
        if not stat.S_ISDIR(found.st_mode):
            return NotADirectoryError(f"{path} is not a directory; remove it")
        return None

    def _check_private(self, found: os.stat_result, path: Path) -> None:
        if not stat.S_ISDIR(found.st_mode):
            raise NotADirectoryError(f"{path} is not a directory; remove it")
        if found.st_uid != self.uid:
            raise PermissionError(f"{path} belongs to uid {found.st_uid}, not to you (uid {self.uid}): someone "
                                  "else may have prepared it; remove it or set TMPDIR to a directory of yours")
        if found.st_mode & 0o022:
            raise PermissionError(f"{path} can be written by group or others (mode {stat.S_IMODE(found.st_mode):o}); "
                                  "run chmod go-w on it or remove it")


def _write_entry(directory: int, name: str, data: bytes) -> None:
    """Write ``name`` in the open ``directory`` atomically (readers see the old entry or the new one).

    ``io.atomic_write_bytes`` works on paths, which would be resolved again (and any link in them
    followed) after the directory was checked; this one stays inside the checked directory.
    """
    temp = f".{name}.{secrets.token_hex(4)}.tmp"  # never an entry's name (entries are digits only)
    handle = os.open(temp, _ENTRY_WRITE_FLAGS, 0o600, dir_fd=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view):]
        finally:
            os.close(handle)
        os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        raise


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
        self.threads: int | None = None  # None: not managing (off, or fell back at the start)
        self.off: str | None = None  # why the budget stopped (a fault of the registry), if it did
        self.runs, self.busy, self.next_check = 1, 0, 0.0
        self.previous: int | None = None  # torch's threads before the budget took over (restored by close)

    def start(self) -> str:
        """Register, take the share, and return the line to log.

        Any fault of the registry leaves torch's threads as they are, and the line says why.
        """
        self.previous = torch.get_num_threads()
        try:
            self.registry.register()
            atexit.register(self.close)
            if self.warmup > 0:
                self.meter.sample(self.registry.live())
                time.sleep(self.warmup)
            self.next_check = time.monotonic() + self.interval
            self._update()
        except Exception as err:  # noqa: BLE001 -- the budget is an optimisation: it must never stop a run
            self.close()
            self.off = _why(err)
            return (f"threads: {torch.get_num_threads()}, torch's default (no shared thread budget at "
                    f"{self.registry.path}: {self.off}{CHOOSE})")
        return f"threads: {self.threads} ({self.describe()})"

    def check(self, force: bool = False) -> int | None:
        """Recompute the share (at most every ``interval`` seconds unless ``force``); apply a change.

        Returns the threads in use, None when the budget does not manage them. A fault stops the
        budget for good: the count stays as it is, and one line says so (not one per re-check).
        """
        now = time.monotonic()
        if self.off is not None or (not force and (self.threads is None or now < self.next_check)):
            return self.threads
        self.next_check = now + self.interval
        try:
            return self._update()
        except Exception as err:  # noqa: BLE001 -- as in start: never fatal
            self.off = _why(err)
            self.log(f"threads: {self.threads}, fixed from now on (shared thread budget at {self.registry.path} "
                     f"stopped: {self.off}{CHOOSE})")
            return self.threads

    def _update(self) -> int:
        pids = self.registry.live()
        if os.getpid() not in pids:  # deleted by someone: register again (the next one to look must count us)
            self.registry.register(threads=self.threads)
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


CHOOSE = ". To choose the count yourself: OMP_NUM_THREADS or --set threads=N"


def _why(err: Exception) -> str:
    """What went wrong, with which file, on one line (a budget that stops says why exactly once)."""
    if isinstance(err, OSError) and err.filename is not None:
        what = f"{err.filename}: {err.strerror or err}"
    elif isinstance(err, OSError):
        what = str(err)
    else:
        what = f"{type(err).__name__}: {err}"
    return " ".join(what.split()) or type(err).__name__


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
