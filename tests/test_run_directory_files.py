"""The run directory's own files against hostile or damaged ones (issue 23: items 6, 10 and part of 21).

* ``.lock.owner`` (and ``.lock``) as a symbolic link to a file elsewhere: never written through;
* ``--out`` that cannot be a directory (a link looping to itself, a link to nothing, a file on the
  way): one ``ConfigError`` naming the path and why, not ``File exists``;
* ``identity.json`` damaged or deleted: rewritten from ``identity.copy.json`` when that proves the
  run is this one, else one ``ConfigError`` naming ``identity.json`` with a remedy -- a Hypothesis
  property over byte mutations, and each case by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from routing_lottery.cli import app
from routing_lottery.errors import ConfigError, RunLockedError
from routing_lottery.run import RunDirectory, run_identity
from routing_lottery.run.directory import IDENTITY_COPY, IDENTITY_FILE, LOCK_FILE, LOCK_OWNER_FILE, sign_identity
from test_experiment import tiny_config

CASES = 1000
PROPERTY = settings(max_examples=CASES, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def identity():
    """A real run's identity (the config's settings and a data fingerprint): the size and shape a run writes."""
    return run_identity(tiny_config(methods=["rtl"]), "5" * 64)


def _outside(tmp_path: Path, text: str = "someone else's file\n") -> Path:
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir(exist_ok=True)
    target.write_text(text)
    return target


# -- 6: the lock's files ----------------------------------------------------------------------------
def test_a_symlinked_lock_owner_is_replaced_never_written_through(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = _outside(tmp_path)
    (run / LOCK_OWNER_FILE).symlink_to(target)  # as unpacked from someone else's archive
    directory = RunDirectory(run)
    with directory.locked():
        owner = run / LOCK_OWNER_FILE
        assert not owner.is_symlink() and owner.read_text().startswith(f"pid {os.getpid()} on ")
        assert target.read_text() == "someone else's file\n"
    directory.claim({"version": 4})  # and the whole claim, from a fresh link
    (run / LOCK_OWNER_FILE).symlink_to(target)
    RunDirectory(run).claim({"version": 4})
    assert target.read_text() == "someone else's file\n"
    assert not os.path.lexists(run / LOCK_OWNER_FILE)  # the holder's line is gone with the lock


def test_a_refusal_never_reads_the_owner_through_a_link_nor_blocks_on_a_fifo(tmp_path):
    secret = _outside(tmp_path, "password hunter2\n")
    holder = RunDirectory(tmp_path / "run")
    with holder.locked():
        owner = tmp_path / "run" / LOCK_OWNER_FILE
        owner.unlink()
        owner.symlink_to(secret)
        with pytest.raises(RunLockedError, match="in use by another process") as refused:
            RunDirectory(tmp_path / "run").claim({"version": 4})
        assert "hunter2" not in str(refused.value)
        owner.unlink()
        os.mkfifo(owner)
        outcome: list[BaseException] = []
        thread = threading.Thread(target=lambda: outcome.append(_refusal(tmp_path / "run")), daemon=True)
        thread.start()
        thread.join(10)
        assert outcome and isinstance(outcome[0], RunLockedError), "reading a FIFO .lock.owner blocked"
        owner.unlink()
        owner.write_bytes(b"pid 1\x1b[2J\non evil\x00 " + b"x" * 10_000)  # escapes, newlines, a flood
        message = str(_refusal(tmp_path / "run"))
        assert "\x1b" not in message and "\n" not in message and len(message) < 500


def _refusal(path: Path) -> BaseException:
    try:
        RunDirectory(path).claim({"version": 4})
    except BaseException as err:  # noqa: BLE001 -- the test inspects it
        return err
    raise AssertionError("the lock was not refused")


def test_a_symlinked_lock_file_is_refused_clearly_and_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = _outside(tmp_path)
    (run / LOCK_FILE).symlink_to(target)
    with pytest.raises(ConfigError, match=r"\.lock is a symbolic link, not a lock file.*delete the link"):
        RunDirectory(run).claim({"version": 4})
    assert target.read_text() == "someone else's file\n"


# -- 21: an --out that cannot be a directory -----------------------------------------------------------
@pytest.mark.parametrize("case", ["loop", "loop/run", "dangling", "file", "link-to-file", "file/run"])
def test_an_out_that_cannot_be_a_directory_is_one_clear_error(tmp_path, case):
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link-to-file").symlink_to(tmp_path / "file")
    expected = {"loop": "loop is a symbolic link that loops back to itself",
                "loop/run": "cannot be created: .*loop is a symbolic link that loops back to itself",
                "dangling": "dangling is a symbolic link to .*nowhere, which does not exist",
                "file": "file is a file, not a run directory",
                "link-to-file": "link-to-file is a symbolic link to a file",
                "file/run": "cannot be created: .*file is a file, not a directory"}[case]
    with pytest.raises(ConfigError, match=expected):
        RunDirectory(tmp_path / case).claim({"version": 4})
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "file").read_text() == "x"


def test_cli_out_naming_a_symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    result = CliRunner().invoke(app, ["demo", "--scale", "smoke", "--out", str(tmp_path / "loop")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "loop is a symbolic link that loops back to itself" in output, output
    assert "File exists" not in output and "Traceback" not in output


# -- 10: identity.json damaged or deleted -------------------------------------------------------------
def _flip(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def _claimed(path: Path, identity) -> bytes:
    RunDirectory(path).claim(identity)
    (path / "config.yaml").write_text("a run was here\n")
    return (path / IDENTITY_FILE).read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "empty", "not utf-8", "unsigned"])
def test_a_damaged_identity_is_rewritten_from_its_copy(tmp_path, identity, damage):
    pristine = _claimed(tmp_path, identity)
    primary = tmp_path / IDENTITY_FILE
    if damage == "flip":
        _flip(primary)
    elif damage == "truncate":
        primary.write_bytes(pristine[:-30])
    elif damage == "delete":
        primary.unlink()
    elif damage == "empty":
        primary.write_bytes(b"")
    elif damage == "not utf-8":
        primary.write_bytes(pristine[:20] + b"\xff\xfe" + pristine[22:])
    else:  # the checksum cut off: beside a copy, that is damage too
        primary.write_text(json.dumps(identity))
    log: list[str] = []
    assert RunDirectory(tmp_path, log=log.append).claim(identity) is True
    assert primary.read_bytes() == pristine == (tmp_path / IDENTITY_COPY).read_bytes()
    assert len(log) == 1 and log[0].startswith(f"{IDENTITY_FILE} was ") and f"rewritten from {IDENTITY_COPY}" in log[0]


def test_a_damaged_copy_is_rewritten_from_identity_json(tmp_path, identity):
    pristine = _claimed(tmp_path, identity)
    _flip(tmp_path / IDENTITY_COPY)
    log: list[str] = []
    assert RunDirectory(tmp_path, log=log.append).claim(identity) is True
    assert (tmp_path / IDENTITY_COPY).read_bytes() == pristine
    assert log == [f"{IDENTITY_COPY} was corrupt (its sha256 does not match its content): rewritten from "
                   f"{IDENTITY_FILE}, which records this run's settings and data"]


def test_the_copy_still_refuses_another_run(tmp_path, identity):
    _claimed(tmp_path, identity)
    _flip(tmp_path / IDENTITY_FILE)
    other = {**identity, "config": {**identity["config"], "seed": identity["config"]["seed"] + 1}}
    with pytest.raises(ConfigError, match=rf"different data or settings \(seed: .*read from {IDENTITY_COPY}, as "
                                          rf"{IDENTITY_FILE} is corrupt"):
        RunDirectory(tmp_path).claim(other)


def test_both_identity_files_damaged_is_refused_with_a_remedy(tmp_path, identity):
    _claimed(tmp_path, identity)
    _flip(tmp_path / IDENTITY_FILE)
    (tmp_path / IDENTITY_COPY).unlink()
    with pytest.raises(ConfigError, match=rf"{IDENTITY_FILE} is corrupt \(.*\) and its copy {IDENTITY_COPY} is "
                                          r"missing: .*choose another output directory, or delete"):
        RunDirectory(tmp_path).claim(identity)


def test_a_deleted_identity_is_diagnosed_as_missing_not_as_an_older_version(tmp_path, identity):
    _claimed(tmp_path, identity)
    (tmp_path / IDENTITY_FILE).unlink()
    (tmp_path / IDENTITY_COPY).unlink()
    with pytest.raises(ConfigError, match=rf"{IDENTITY_FILE} is missing, yet .* holds a run's files \(config.yaml\)"
                                          r": it was deleted.*or delete"):
        RunDirectory(tmp_path).claim(identity)


@pytest.mark.slow
def test_a_front_door_run_without_its_identity_is_not_taken_for_a_new_one(tmp_path):
    """AdaptiveTickets writes no config.yaml: its stage-1 rounds and θ₀ show a run was there."""
    import torch

    from routing_lottery import AdaptiveTickets, tensor_stream
    from toy import toy_model

    x = torch.randn(16, 4)
    streams = {n: tensor_stream(n, x, x[:, :3], torch.nn.functional.mse_loss, 8) for n in ("a", "b")}
    AdaptiveTickets(toy_model(), None, out=tmp_path).extract(streams)
    (tmp_path / IDENTITY_FILE).unlink()
    (tmp_path / IDENTITY_COPY).unlink()
    with pytest.raises(ConfigError, match=rf"{IDENTITY_FILE} is missing, yet .* holds a run's files \(theta0"):
        AdaptiveTickets(toy_model(), None, out=tmp_path).extract(streams)


def test_an_identity_from_before_checksums_resumes_and_gets_one(tmp_path, identity):
    (tmp_path / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")  # as the previous version wrote it
    (tmp_path / "config.yaml").write_text("a run was here\n")
    log: list[str] = []
    assert RunDirectory(tmp_path, log=log.append).claim(identity) is True and log == []
    signed = (json.dumps(sign_identity(identity), indent=2) + "\n").encode()
    assert (tmp_path / IDENTITY_FILE).read_bytes() == signed == (tmp_path / IDENTITY_COPY).read_bytes()


def test_a_worker_reads_the_copy_and_writes_nothing(tmp_path, identity):
    _claimed(tmp_path, identity)
    (tmp_path / IDENTITY_FILE).unlink()
    assert RunDirectory(tmp_path, lock=False).claim(identity) is True
    assert not (tmp_path / IDENTITY_FILE).exists()  # the parent, holding the lock, repairs


# -- 10: the property ---------------------------------------------------------------------------------
@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """1-3 edits of ``data``: bit flips, bytes set (any value: invalid UTF-8 too), cuts, insertions, truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[at:at + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b" ", b"\n", b"{", b'"', b"0"]))
        else:
            del out[at:]
    return bytes(out)


@pytest.fixture()
def scratch(tmp_path):
    """A directory in memory where there is one (``/dev/shm``): a thousand cases of small writes then take
    seconds, not the disk's journal time; the behaviour under test is the same on any file system."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir=shm, prefix="rtl-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_any_mutation_of_identity_json_resumes_correctly_or_names_it(scratch, identity, monkeypatch):
    """Issue 23 (10): a byte-mutated identity.json either resumes (both files then hold exactly the identity) or
    raises ``ConfigError`` naming identity.json -- never a raw JSON, Unicode or Key error, never another run's
    resume. Beside an intact copy, every mutation resumes; without one (an older run's directory, or the copy
    deleted too), refusing is allowed. No training: one identity, its files rewritten for each case."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test here; 1,000 cases in seconds
    run = scratch / "run"
    pristine = _claimed(run, identity)
    unsigned = (json.dumps(identity, indent=2) + "\n").encode()  # identity.json before checksums
    other = {**identity, "data_fingerprint": "6" * 64}
    ran: list[str] = []

    @PROPERTY
    @given(st.data(), st.sampled_from(["copy intact", "copy deleted", "copy damaged", "before checksums"]),
           st.booleans())
    def check(data, copy_state, same_run):
        original = unsigned if copy_state == "before checksums" else pristine
        (run / IDENTITY_FILE).write_bytes(data.draw(byte_mutations(original)))
        if copy_state == "copy intact":
            (run / IDENTITY_COPY).write_bytes(pristine)
        elif copy_state == "copy damaged":
            (run / IDENTITY_COPY).write_bytes(data.draw(byte_mutations(pristine)))
        else:
            (run / IDENTITY_COPY).unlink(missing_ok=True)
        wanted = identity if same_run else other
        start = time.perf_counter()
        try:
            resumed = RunDirectory(run).claim(wanted)
        except ConfigError as err:
            assert IDENTITY_FILE in str(err), str(err)
            assert not (same_run and copy_state == "copy intact"), f"an intact copy proves the run: {err}"
            outcome = "refused"
        else:
            assert resumed is True and same_run, "a run of other data resumed"
            signed = (json.dumps(sign_identity(wanted), indent=2) + "\n").encode()
            assert (run / IDENTITY_FILE).read_bytes() == signed == (run / IDENTITY_COPY).read_bytes()
            outcome = "resumed"
        assert time.perf_counter() - start < 5.0  # a few small files: bounded however they are mangled
        assert sorted(os.listdir(run)) == sorted(["config.yaml", IDENTITY_FILE, LOCK_FILE]
                                                 + ([IDENTITY_COPY] if outcome == "resumed" or copy_state in
                                                    ("copy intact", "copy damaged") else []))  # no litter
        ran.append(f"{copy_state} {same_run} {outcome}")

    check()
    assert len(ran) >= CASES
    assert any(r.endswith("refused") for r in ran) and any(r.endswith("resumed") for r in ran)
    assert any(r == "copy deleted True resumed" for r in ran)  # a mutation that kept the document resumes
