"""The thread registry lives in a shared temp directory: what another user (or a stray file) puts there
must never stop, hang or steer a run, nor make it delete or write anything it did not create.

Regression tests for each way in that worked before (issue 23, item 7), then two properties over
1,000 cases each: hostile entries in a private registry (names, file types, contents), and hostile
registry directories (links, files, FIFOs, other owners, loose modes), before the start or mid-run.
Everything happens under ``tmp`` directories; the user's real registry is never touched.
"""

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_lottery.threads import MAX_PID, PID_NAME, LoadMeter, Registry, ThreadBudget, _start_ticks, share
from test_threads import NoLoad, Recorder

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(os, "getuid"), reason="POSIX registry")

FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else None
"""Where the properties make their 2,000 small trees: a RAM file system where there is one (removing a
directory on a journaled disk can take milliseconds), else the usual temp directory."""
HANG_S = 10.0  # a registry call that takes this long is blocked (an open FIFO, a lock)
SLOW_S = 3.0  # generous for a loaded CI machine; a healthy example takes milliseconds


def budget(registry, cores=2, **options):
    threads, lines = Recorder(), []
    options = {"interval": 0.0, "warmup": 0.0, "meter": NoLoad(), "set_threads": threads, "log": lines.append,
               **options}
    run = ThreadBudget(registry, cores=cores, **options)
    return run, threads, lines


@contextlib.contextmanager
def never_blocks(seconds=HANG_S):
    """Fail (instead of hanging the test run) when the body blocks, e.g. opening a FIFO."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root, prefix=""):
    """Every name under ``root`` (not following links) with its type, mode, owner and content."""
    found = {}
    with os.scandir(root) as names:
        for item in names:
            info = item.stat(follow_symlinks=False)
            kind = stat.S_IFMT(info.st_mode)
            content = (os.readlink(item.path) if kind == stat.S_IFLNK
                       else Path(item.path).read_bytes() if kind == stat.S_IFREG else None)
            found[prefix + item.name] = (kind, stat.S_IMODE(info.st_mode), info.st_uid, info.st_mtime_ns, content)
            if kind == stat.S_IFDIR:
                found.update(snapshot(item.path, f"{prefix}{item.name}/"))
    return found


def entry(pid, start=None):
    """An entry exactly as ``Registry.register`` writes it."""
    return json.dumps({"pid": pid, "start": start, "threads": None}).encode()


@pytest.fixture(scope="module")
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def dead():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def outside_tree(root, dead_pid):
    """A directory the registry must never touch: all-digit files, one in the entry format of a dead pid."""
    outside = root / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / str(dead_pid)).write_bytes(entry(dead_pid))
    (outside / "12345").write_text("a user's own file named like a pid")
    (outside / "sub" / "42").write_text("another")
    (outside / "file").write_text("plain")
    return outside


def private_registry(root):
    (root / "reg").mkdir(mode=0o700)
    (root / "reg" / "procs").mkdir(mode=0o700)
    return root / "reg" / "procs"


# -- each way in that worked before ---------------------------------------------------------

@pytest.mark.parametrize("name", ["²", "٣", "١٢٣", "99999999999999999999", "0", "007", str(MAX_PID + 1)])
def test_entries_not_named_like_a_pid_are_ignored_and_kept(tmp_path, name):
    procs = private_registry(tmp_path)
    (procs / name).write_bytes(entry(12))
    run, threads, _ = budget(Registry(procs))
    assert run.start() == "threads: 2 (1 rtl process on 2 cores)"  # before: ValueError, OverflowError
    assert run.check(force=True) == 2
    run.close()
    assert sorted(os.listdir(procs)) == [name]


def test_a_fifo_named_like_a_pid_neither_blocks_nor_counts(tmp_path, dead):
    procs = private_registry(tmp_path)
    os.mkfifo(procs / str(dead))
    run, _, _ = budget(Registry(procs))
    began = time.monotonic()
    with never_blocks():
        assert run.start() == "threads: 2 (1 rtl process on 2 cores)"  # before: blocked in open()
        run.check(force=True)
        run.close()
    assert time.monotonic() - began < SLOW_S
    assert stat.S_ISFIFO(os.lstat(procs / str(dead)).st_mode)  # not ours: not deleted either


def test_files_that_are_not_entries_are_never_deleted(tmp_path, dead):
    procs = private_registry(tmp_path)
    foreign = {str(dead): b"a user's notes", str(dead + 1): json.dumps({"pid": dead + 1}).encode(),
               str(dead + 2): b'{"pid": %d, "start": null, "threads": null, "more": 1}' % (dead + 2)}
    for name, data in foreign.items():
        (procs / name).write_bytes(data)
    (procs / str(dead + 3)).mkdir()
    (procs / str(dead + 3) / "1").write_text("inside")
    (procs / str(dead + 4)).write_bytes(entry(dead + 4))  # a real entry of a dead run: removed
    before = snapshot(procs)
    run, _, _ = budget(Registry(procs))
    run.start()
    run.close()
    del before[str(dead + 4)]
    assert snapshot(procs) == before


@pytest.mark.parametrize("link", ["procs", "parent"])
def test_a_linked_registry_is_never_followed(tmp_path, dead, link):
    """Before: the target of a ``procs`` link lost its all-digit files; a linked parent was written into."""
    outside = outside_tree(tmp_path, dead)
    (outside / "procs").mkdir(mode=0o700)
    (outside / "procs" / str(dead)).write_bytes(entry(dead))
    before = snapshot(outside)
    (tmp_path / "reg").mkdir(mode=0o700)
    if link == "procs":
        (tmp_path / "reg" / "procs").symlink_to(outside)
    else:
        (tmp_path / "reg").rmdir()
        (tmp_path / "reg").symlink_to(outside)
    run, threads, lines = budget(Registry(tmp_path / "reg" / "procs"))
    line = run.start()
    assert "no shared thread budget" in line and "symbolic link" in line and "\n" not in line
    assert run.check(force=True) is None and threads.calls == [] and lines == []
    run.close()
    assert snapshot(outside) == before


def test_a_registry_of_another_user_is_refused(tmp_path):
    procs = private_registry(tmp_path)
    run, threads, _ = budget(Registry(procs, uid=os.getuid() + 1))
    line = run.start()
    assert "belongs to uid" in line and str(tmp_path / "reg") in line and threads.calls == []
    assert os.listdir(procs) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_a_parent_of_another_user_is_refused(tmp_path):
    procs = private_registry(tmp_path)
    os.chown(tmp_path / "reg", 4242, 4242)  # before: only procs itself was checked
    line = budget(Registry(procs))[0].start()
    assert "belongs to uid 4242" in line and os.listdir(procs) == []


@pytest.mark.parametrize("which, mode", [("procs", 0o770), ("procs", 0o703), ("parent", 0o777)])
def test_a_registry_of_ours_others_can_write_is_closed_to_them(tmp_path, which, mode):
    """A permissive umask made it so (earlier versions created the parent with the default mode)."""
    procs = private_registry(tmp_path)
    opened = procs if which == "procs" else procs.parent
    os.chmod(opened, mode)
    run, threads, _ = budget(Registry(procs))
    assert run.start() == "threads: 2 (1 rtl process on 2 cores)" and threads.calls == [2]
    assert stat.S_IMODE(os.stat(opened).st_mode) == mode & ~0o022


@pytest.mark.parametrize("which", ["procs", "parent"])
def test_a_registry_others_can_write_and_do_not_own_is_refused(tmp_path, which):
    procs = private_registry(tmp_path)
    os.chmod(procs if which == "procs" else procs.parent, 0o777)
    registry = Registry(procs, uid=os.getuid() + 1)  # a stranger's directory: never changed, never used
    run, threads, _ = budget(registry)
    assert "not to you" in run.start() and threads.calls == []
    assert stat.S_IMODE(os.stat(procs if which == "procs" else procs.parent).st_mode) == 0o777
    assert os.listdir(procs) == []


def test_a_foreign_file_in_place_of_our_own_entry_is_not_overwritten(tmp_path):
    procs = private_registry(tmp_path)
    os.mkfifo(procs / str(os.getpid()))
    run, threads, _ = budget(Registry(procs))
    with never_blocks():
        line = run.start()
    assert "not this library's entry" in line and threads.calls == []
    assert stat.S_ISFIFO(os.lstat(procs / str(os.getpid())).st_mode)


def test_a_fault_during_the_run_keeps_the_count_and_says_so_once(tmp_path, dead):
    outside = outside_tree(tmp_path, dead)
    before = snapshot(outside)
    procs = private_registry(tmp_path)
    run, threads, lines = budget(Registry(procs))
    assert run.start() == "threads: 2 (1 rtl process on 2 cores)"
    procs.rename(tmp_path / "old")
    procs.symlink_to(outside)  # swapped for a link while the run trains
    for _ in range(5):
        assert run.check(force=True) == 2
    assert len(lines) == 1 and lines[0].startswith("threads: 2, fixed from now on") and "symbolic link" in lines[0]
    run.close()
    assert threads.calls == [2, 1] and snapshot(outside) == before  # threads given back; nothing written there


def test_any_error_of_the_budget_falls_back_with_one_line(tmp_path):
    class Broken(LoadMeter):
        def sample(self, pids):
            raise ValueError("cpu9x is no number")

    run, threads, lines = budget(Registry(private_registry(tmp_path)), meter=Broken())
    line = run.start()
    assert "ValueError: cpu9x is no number" in line and threads.calls == [] and run.threads is None
    run.check(force=True)
    assert lines == [] and os.listdir(tmp_path / "reg" / "procs") == []  # deregistered on the way out


# -- properties -----------------------------------------------------------------------------

ODD_NAMES = ["²", "٣", "१२", "１２", "99999999999999999999", "0", "00", "007", "-1", "+1", "1.5", " 1", "1 ",
             "1\n", "4194305", "9999999999", "12345678901", "1e3", "0x10", ".1.abcdefgh.tmp", "DEAD.tmp"]
NAMES = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.integers(0, 2**70).map(str),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6),
    st.sampled_from(["DEAD", "LIVE"]),  # replaced by a dead pid and a live process's pid
)
KINDS = ["bytes", "big", "fifo", "link_file", "link_dir", "link_entry", "dir", "dangling", "stranger"]
STRANGER = 4242  # a uid that is not ours (files are given to it where the tests run as root)
HOSTILE = st.tuples(NAMES, st.sampled_from(KINDS), st.binary(max_size=64))
ENTRY = st.tuples(st.sampled_from(["DEAD", "LIVE"]), st.just("entry"), st.sampled_from(["right", "none", "wrong"]))


def make(procs, outside, name, kind, payload):
    path = procs / name
    if kind == "bytes":
        path.write_bytes(payload)
    elif kind == "big":
        path.write_bytes(b" " * 5000 + payload)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_file":
        path.symlink_to(outside / "file")
    elif kind in ("link_dir", "link_entry"):
        path.symlink_to(outside if kind == "link_dir" else next(p for p in outside.iterdir() if p.name.isdigit()))
    elif kind == "dir":
        path.mkdir()
        (path / "77").write_bytes(b"x")
    elif kind == "dangling":
        path.symlink_to(outside / "nothing here")
    elif kind == "stranger":  # an entry in our exact format, of a dead run, but another user's file
        if os.getuid() != 0:  # cannot give a file away: an ordinary foreign file instead
            path.write_bytes(payload)
            return
        path.write_bytes(entry(int(name)) if PID_NAME.fullmatch(name) else payload)
        os.chown(path, STRANGER, STRANGER)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.one_of(HOSTILE, ENTRY), max_size=4), cores=st.integers(1, 8))
def test_hostile_entries_never_stop_steer_or_lose_anything(sleeper, dead, entries, cores):
    """Only real entries of live runs count; only real entries of dead runs are deleted; nothing else moves."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as temp:
        root = Path(temp)
        outside, procs = outside_tree(root, dead), private_registry(root)
        made, counted, removed = {}, 0, set()
        for name, kind, detail in entries:
            name = {"DEAD": str(dead), "LIVE": str(sleeper)}.get(name, name)
            if name in made or name == str(os.getpid()) or "/" in name or "\0" in name or name in ("", ".", ".."):
                continue
            made[name] = kind
            if kind == "entry":
                pid = int(name)
                start = {"right": _start_ticks(pid), "none": None, "wrong": -1}[detail]
                (procs / name).write_bytes(entry(pid, start))
                if pid == sleeper and detail != "wrong":
                    counted += 1
                else:
                    removed.add(name)  # a dead run's, or a reused pid's
            else:
                make(procs, outside, name, kind, detail)
        before_outside, before = snapshot(outside), snapshot(procs)
        run, threads, lines = budget(Registry(procs), cores=cores)
        began = time.monotonic()
        with never_blocks():
            line = run.start()
            result = run.check(force=True)
            run.close()
        assert time.monotonic() - began < SLOW_S
        expected = share(cores, 1 + counted)
        assert 1 <= result <= cores and result == expected and threads.calls[0] == expected and lines == []
        assert line == f"threads: {expected} ({run.describe()})"
        assert snapshot(outside) == before_outside
        assert snapshot(procs) == {name: value for name, value in before.items() if name.split("/")[0] not in removed}


REGISTRY_KINDS = ["ok", "missing", "missing_parent", "link_procs", "link_parent", "dangling", "file", "fifo",
                  "group_writable", "world_writable", "parent_writable", "other_owner"]


def spoil(root, outside, procs, kind):
    """Turn the (absent) registry at ``procs`` into ``kind``."""
    if kind == "missing_parent":
        return
    procs.parent.mkdir(mode=0o700, exist_ok=True)
    if kind == "missing":
        return
    if kind == "link_procs":
        procs.symlink_to(outside)
    elif kind == "link_parent":
        procs.parent.rmdir()
        procs.parent.symlink_to(outside)
    elif kind == "dangling":
        procs.symlink_to(root / "nowhere")
    elif kind == "file":
        procs.write_text("12")
    elif kind == "fifo":
        os.mkfifo(procs)
    else:
        procs.mkdir(mode=0o700)
        if kind == "group_writable":
            os.chmod(procs, 0o770)
        elif kind == "world_writable":
            os.chmod(procs, 0o777)
        elif kind == "parent_writable":
            os.chmod(procs.parent, 0o777)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(REGISTRY_KINDS), mid_run=st.booleans(), checks=st.integers(1, 4),
       cores=st.integers(1, 8))
def test_a_hostile_registry_falls_back_once_and_touches_nothing(dead, kind, mid_run, checks, cores):
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as temp:
        root = Path(temp)
        outside = outside_tree(root, dead)
        before_outside = snapshot(outside)
        procs = root / "reg" / "procs"
        registry = Registry(procs)
        run, threads, lines = budget(registry, cores=cores)
        ours = ("ok", "missing", "missing_parent", "group_writable", "world_writable", "parent_writable")
        hostile = kind not in ours  # a directory of ours others can write is closed to them, then used
        began = time.monotonic()
        with never_blocks():
            if mid_run:
                assert run.start() == f"threads: {cores} (1 rtl process on {cores} cores)"
                procs.rename(root / "was")
                (root / "reg").rename(root / "was-reg")
            spoil(root, outside, procs, kind)
            if kind == "other_owner":
                registry.uid = os.getuid() + 1
            if not mid_run:
                line = run.start()
            results = [run.check(force=True) for _ in range(checks)]
            run.close()
        assert time.monotonic() - began < SLOW_S
        assert snapshot(outside) == before_outside
        if not hostile:
            assert results == [cores] * checks and lines == []
            assert all(not os.stat(d).st_mode & 0o022 for d in (procs, procs.parent))
        elif mid_run:
            assert results == [cores] * checks  # the count it had, fixed
            assert len(lines) == 1 and lines[0].startswith(f"threads: {cores}, fixed from now on (shared thread "
                                                           f"budget at {procs} stopped: ")
        else:
            assert "no shared thread budget" in line and "\n" not in line
            assert results == [None] * checks and threads.calls == [] and lines == []
        if hostile and kind not in ("link_procs", "link_parent", "dangling", "file", "fifo"):
            assert os.listdir(procs) == []  # nothing written into a registry it refused
