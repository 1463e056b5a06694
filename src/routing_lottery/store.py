"""A directory that tickets checkpoint into: its identity, its lock, and every file a run resumes from.

``AdaptiveTickets(..., out=DIR)`` and the experiment runner (``run.directory.RunDirectory``, which
adds the config and the result records) both keep their state here, so an interrupted extraction
or retraining resumes exactly. Layout (the runner adds config.yaml, records/, results.*)::

    identity.json                   what determines the results and its sha256; a run whose identity
                                    differs is refused, naming the settings that differ
    identity.copy.json              the same file again: a damaged or deleted identity.json is rewritten
                                    from it when this run's identity matches it (see ``claim``)
    .lock, .lock.owner              held by the process running in the directory (pid, host, since)
    theta0.safetensors              the shared initialization θ₀ (rewind.safetensors when rewinding to θ_j)
    imp/<stream>/round_NNN.safetensors   the bit-packed mask after every IMP round, its pruned count, a checksum
    train/<method>_<level>.pt       joint-retraining state after the last finished epoch
    checkpoints/rtl_<level>/        the tickets: shared weights + packed masks + recipe (see ``io``)

Round files carry the cumulative pruned counts they were made for, so a round that another schedule
would have made differently is recomputed rather than trusted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import safetensors
import safetensors.torch

from .fingerprint import fingerprint
from .errors import CheckpointError, ConfigError, RunLockedError
from .io import (
    atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, remove_stale_temp_files,
    torch_load,
)
from .masks import Mask, MaskSet
from .training import State

IDENTITY_FILE, IDENTITY_COPY = "identity.json", "identity.copy.json"
LOCK_FILE, LOCK_OWNER_FILE = ".lock", ".lock.owner"
IDENTITY_VERSION = 4  # 1: config.yaml alone; 2: without the model and θ₀; 3: before data.calibration
IDENTITY_CHECKSUM = "sha256"
"""The identity files' field holding ``fingerprint`` of the rest; files written before it have none (still read)."""
MAX_IDENTITY_BYTES = 16 * 2**20
"""Largest identity file read: a config's settings take a few KB."""
MAX_OWNER_BYTES = 256
"""Most of ``.lock.owner`` shown in a refusal: one line, whatever a copied directory holds there."""
RUN_FILES = ("config.yaml", "environment.json", "theta0*.safetensors", "rewind*.safetensors",
             "imp/*/round_*.safetensors", "records/*.json", "train/*.pt", "checkpoints/*/tickets.json",
             "seeds/*/identity.json")
"""Patterns of what a claimed run writes beside its identity: a directory holding any of them but no
identity file lost its identity; it is not a new run. Specific enough that a user's project folder
with a ``checkpoints/`` of its own is not taken for one; ``images/`` is not among them because an
image set's parts are claimed before the set."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def identity_diff(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Dotted settings that differ, each with both values (``training.epochs: 3 -> 4``)."""
    a, b = _flatten(found), _flatten(wanted)

    def show(value: Any) -> str:  # fingerprints are long hex strings: their start tells them apart
        return repr(value[:12] + "...") if isinstance(value, str) and len(value) == 64 else repr(value)

    return [f"{k.removeprefix('config.')}: {show(a.get(k, '(unset)'))} -> {show(b.get(k, '(unset)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def sign_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as its files hold it: the JSON form, and ``sha256``, the ``fingerprint`` of that form."""
    body = json.loads(json.dumps(identity))
    if IDENTITY_CHECKSUM in body:
        raise ValueError(f"a run identity cannot have a {IDENTITY_CHECKSUM!r} entry: its files keep the checksum there")
    return {**body, IDENTITY_CHECKSUM: fingerprint(body)}


def read_identity(path: Path, unsigned_ok: bool = True) -> tuple[dict[str, Any] | None, str]:
    """The identity recorded in ``path`` and ``''``, or None and what is wrong with the file.

    The problem reads after "is": ``missing``, ``not a regular file``, ``corrupt (...)``. A file
    without a checksum (written before identity files had one) is taken as it is when
    ``unsigned_ok``; nothing then tells a changed byte from a changed setting.
    """
    if not os.path.lexists(path):
        return None, "missing"
    if not path.is_file():  # a FIFO would block the read, a directory cannot be read
        return None, "not a regular file"
    if path.stat().st_size > MAX_IDENTITY_BYTES:
        return None, f"corrupt (larger than {MAX_IDENTITY_BYTES} bytes, which no identity is)"
    try:
        found = read_json(path, max_bytes=MAX_IDENTITY_BYTES)
    except CheckpointError:
        return None, "corrupt (not valid JSON)"
    if not isinstance(found, dict):
        return None, "corrupt (not a JSON object)"
    recorded = found.pop(IDENTITY_CHECKSUM, None)
    if recorded is None:
        return (found, "") if unsigned_ok else (None, f"corrupt (no {IDENTITY_CHECKSUM} field)")
    try:
        intact = recorded == fingerprint(found)
    except RecursionError:  # JSON nested deeper than the fingerprint recurses: not a file this library wrote
        intact = False
    return (found, "") if intact else (None, "corrupt (its sha256 does not match its content)")


def _read_owner(path: Path) -> str:
    """Who holds the lock as ``.lock.owner`` says, made printable: never through a link, never blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_OWNER_BYTES) if stat.S_ISREG(os.fstat(handle.fileno()).st_mode) else b""
    except OSError:  # gone since (the holder finished), a link, unreadable: the holder is not named
        data = b""
    text = " ".join("".join(c if c.isprintable() else " " for c in data.decode("utf-8", "replace")).split())
    return text or "another process"


def _not_a_directory(path: Path) -> str | None:
    """Why ``path`` cannot be made a run directory: the nearest of it and its parents that exists and is not a
    directory (a file, or a symbolic link to nothing, to a file or to itself), described; None if there is none."""
    for candidate in (path, *path.parents):
        if not os.path.lexists(candidate):  # also a path that passes through a looping link
            continue
        if candidate.is_dir():
            return None
        if candidate.is_symlink():
            target = os.readlink(candidate)
            try:
                candidate.stat()
                kind, remedy = f"a symbolic link to a file ({target})", "choose another output directory"
            except FileNotFoundError:
                kind, remedy = (f"a symbolic link to {target}, which does not exist",
                                "create that directory or choose another output directory")
            except OSError as err:
                loops = err.errno == errno.ELOOP
                kind = (f"a symbolic link that loops back to itself ({candidate} -> {target})" if loops
                        else f"a symbolic link to {target}, which cannot be reached ({err.strerror})")
                remedy = "remove the link or choose another output directory"
        else:
            kind, remedy = "a file", "choose another output directory"
        if candidate == path:
            return f"{path} is {kind}, not a run directory; {remedy}"
        return f"{path} cannot be created: {candidate} is {kind}, not a directory; {remedy}"
    return None


class CheckpointDirectory:
    """Paths and resumable state of one run; the ``TicketStore`` that ``AdaptiveTickets`` checkpoints into.

    ``run.directory.RunDirectory`` extends it with the experiment's config.yaml.

    Every file a resume reads carries a checksum (safetensors metadata, a JSON field, or
    ``io.atomic_torch_save``'s header). A file that fails it, or cannot be parsed, is reported
    through ``log``, deleted and recomputed: corruption costs time, never a wrong result.
    """

    def __init__(self, path: str | Path, log: Callable[[str], None] = lambda message: None, lock: bool = True) -> None:
        self.path = Path(path)
        self.log = log
        self.lock = lock  # False: a worker process writing under the lock its parent holds (run.workers)
        self._lock: filelock.FileLock | None = None

    # -- ownership -------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (re-entrant): two runs on one directory cannot interleave their writes.

        Raises ``RunLockedError`` naming the holder (pid, host, since when) when another process has it,
        and ``ConfigError`` when the path cannot be a run directory (a file, a link to nothing or to itself).
        """
        self._make_directory()
        if not self.lock:
            yield
            return
        if self._lock is None:
            self._lock = filelock.FileLock(str(self.path / LOCK_FILE), timeout=0)
        owner = self.path / LOCK_OWNER_FILE
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise RunLockedError(f"{self.path} is in use by {_read_owner(owner)}; wait for it to finish or choose "
                                 "another output directory") from None
        except OSError:
            lock = self.path / LOCK_FILE
            if not lock.is_symlink():
                raise
            raise ConfigError(f"{lock} is a symbolic link, not a lock file (a run directory copied from elsewhere?); "
                              "no run holds it: delete the link and run again") from None
        try:
            if self._lock.lock_counter == 1:
                # Replaced, never written through: a directory unpacked from elsewhere may hold a link here.
                atomic_write_text(owner, f"pid {os.getpid()} on {socket.gethostname()} since "
                                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            yield
        finally:
            try:
                if self._lock.lock_counter == 1:
                    owner.unlink(missing_ok=True)
            finally:
                self._lock.release()

    def _make_directory(self) -> None:
        """Create the run directory (and its parents); a path that cannot be one is a ``ConfigError`` saying why."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError:
            problem = _not_a_directory(self.path)
            if problem is None:
                raise  # permissions, a full disk: the OS's own words name the path
            raise ConfigError(problem) from None

    def claim(self, identity: Mapping[str, Any], files: Mapping[str, str] | None = None) -> bool:
        """Record ``identity`` (or check it matches the one already there); True when resuming.

        ``files`` (name -> text) are written beside it under the lock (the runner's config.yaml).
        Raises ``ConfigError`` naming every differing setting when the directory holds another run.
        Runs under the lock, so two runs cannot both pass the check and then mix their files.

        The identity is kept twice, in ``identity.json`` and ``identity.copy.json``, each with the
        sha256 of its content. A damaged or deleted one is rewritten from the other when that one
        matches ``identity``: its checksum proves which run the directory holds. When neither can be
        read but run files are there, nothing proves it, and the run is refused with the remedy
        (files from before the checksum are read as they are and get one on the next resume).
        """
        with self.locked():
            found, source, problems = self._recorded_identity()
            resuming = found is not None
            if resuming:
                self._check_identity(found, identity, source)
                if self.lock:  # a worker reads; its parent, which holds the lock, has repaired the files
                    self._write_identity(identity, problems)
                # only the lock holder may clean up: a worker would delete a sibling's half-written file
                for litter in (remove_stale_temp_files(self.path) if self.lock else []):
                    self.log(f"removed {litter.relative_to(self.path)}, left by a run killed while writing it")
            elif not self.lock:
                raise ConfigError(f"{self.path}: a worker joins a run its parent claimed; there is none here")
            else:
                self._write_identity(identity)
            if self.lock:  # files for people (config.yaml); a worker's differ in execution settings only
                for name, text in (files or {}).items():
                    atomic_write_text(self.path / name, text)
        return resuming

    def _recorded_identity(self) -> tuple[dict[str, Any] | None, str, dict[str, str]]:
        """The identity this directory records (None: none, a new run), the file it was read from, and each
        identity file's problem (``''`` for none).

        Raises ``ConfigError`` naming ``identity.json`` when neither file can be read but there is a
        run here (``RUN_FILES``) or a damaged identity file: which run it is cannot be told.
        """
        primary, copy = self.path / IDENTITY_FILE, self.path / IDENTITY_COPY
        # Every signed identity.json is written with a copy: beside one, a file without a checksum is damaged.
        found, problem = read_identity(primary, unsigned_ok=not os.path.lexists(copy))
        backup, copy_problem = read_identity(copy, unsigned_ok=False)
        problems = {IDENTITY_FILE: problem, IDENTITY_COPY: copy_problem}
        if found is not None:
            return found, IDENTITY_FILE, problems
        if backup is not None:
            return backup, f"{IDENTITY_COPY}, as {IDENTITY_FILE} is {problem}", problems
        remedy = (f"nothing shows which settings and data the files in {self.path} belong to, so they cannot be "
                  f"reused; choose another output directory, or delete {self.path} to start this run there anew")
        if problem != "missing" or copy_problem != "missing":
            raise ConfigError(f"{primary} is {problem} and its copy {copy.name} is {copy_problem}: {remedy}")
        files = [str(f.relative_to(self.path)) for pattern in RUN_FILES for f in sorted(self.path.glob(pattern))]
        if files:
            raise ConfigError(f"{primary} is missing, yet {self.path} holds a run's files ({', '.join(files[:3])}"
                              f"{', ...' if len(files) > 3 else ''}): it was deleted, or the run was made by a "
                              f"routing-lottery from before identity files; {remedy}")
        return None, "", problems

    def _check_identity(self, found: Mapping[str, Any], identity: Mapping[str, Any], source: str) -> None:
        """Refuse a recorded identity (read from ``source``) that is not ``identity``, naming what differs."""
        if found.get("version") != IDENTITY_VERSION:
            raise ConfigError(f"{self.path} holds a run from another routing-lottery version (identity version "
                              f"{found.get('version')!r}, read from {source}; this one writes {IDENTITY_VERSION}); "
                              "choose another output directory")
        if ("replicates_of" in found) != ("replicates_of" in identity):
            held, wanted = (("a run of several seeds", "one run") if "replicates_of" in found
                            else ("one run", "a run of several seeds"))
            raise ConfigError(f"{self.path} holds {held}; {wanted} needs another output directory "
                              "(a single run's seed can be one of the seeds: copy it to DIR/seeds/<seed>)")
        if found != json.loads(json.dumps(identity)):
            diff = "; ".join(identity_diff(found, identity)[:8])
            raise ConfigError(f"{self.path} holds a run of different data or settings ({diff}; read from "
                              f"{source}); choose another output directory to start a new run")

    def _write_identity(self, identity: Mapping[str, Any], problems: Mapping[str, str] | None = None) -> None:
        """Write both identity files, each only if it does not already hold exactly this; say which were damaged."""
        data = (json.dumps(sign_identity(identity), indent=2) + "\n").encode()
        for name, other in ((IDENTITY_FILE, IDENTITY_COPY), (IDENTITY_COPY, IDENTITY_FILE)):
            path = self.path / name
            with contextlib.suppress(OSError):  # unreadable: rewritten
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode) and info.st_size == len(data) and path.read_bytes() == data:
                    continue
            problem = (problems or {}).get(name, "")
            if problem and (problem != "missing" or name == IDENTITY_FILE):  # a missing copy: an older run's
                self.log(f"{name} was {problem}: rewritten from {other}, which records this run's settings and data")
            atomic_write_bytes(path, data)

    def _discard(self, path: Path, problem: str) -> None:
        """A corrupt file: say so, and delete it so that what it held is recomputed."""
        self.log(f"{path.relative_to(self.path)} is corrupt ({problem}): recomputing it")
        path.unlink(missing_ok=True)

    # -- paths -----------------------------------------------------------------------------
    def state_dict_file(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def round_file(self, stream: str, r: int) -> Path:
        return self.path / "imp" / stream / f"round_{r:03d}.safetensors"

    def record_file(self, method: str, level: float) -> Path:
        return self.path / "records" / f"{method}_{level:.4f}.json"

    def train_state_file(self, key: str) -> Path:
        return self.path / "train" / f"{key}.pt"

    def checkpoint_dir(self, method: str, level: float) -> Path:
        return self.path / "checkpoints" / f"{method}_{level:.4f}"

    # -- state dicts -----------------------------------------------------------------------
    def save_state(self, name: str, state: State) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        meta = {"sha256": fingerprint(tensors)}
        atomic_write_bytes(self.state_dict_file(name), safetensors.torch.save(tensors, metadata=meta))

    def load_state(self, name: str) -> State | None:
        """A saved state dict, or None when absent or corrupt (then deleted: it is made again)."""
        path = self.state_dict_file(name)
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get("sha256")
                state = {k: f.get_tensor(k) for k in f.keys()}
        except OSError:
            raise  # the disk or the process, not the file: never delete a file for it
        except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for corrupt files
            self._discard(path, f"{type(err).__name__}: {err}")
            return None
        if recorded != fingerprint(state):
            self._discard(path, "checksum mismatch" if recorded else "no checksum")
            return None
        return state

    # -- IMP rounds ------------------------------------------------------------------------
    def save_round(self, stream: str, r: int, mask: Mask, pruned: int) -> None:
        ms = MaskSet.from_tickets([mask])
        tensors = {n: p.contiguous() for n, p in ms.packed().items()}
        meta = {"shapes": json.dumps({n: list(s) for n, s in ms.shapes.items()}), "pruned": str(pruned),
                "sha256": fingerprint(tensors, ms.shapes, pruned)}
        atomic_write_bytes(self.round_file(stream, r), safetensors.torch.save(tensors, metadata=meta))

    def load_round(self, stream: str, r: int, pruned: int | None = None, order: Sequence[str] | None = None) -> Mask | None:
        """The mask saved after round ``r`` (its tensors in ``order``, the model's, when given).

        None when there is none, when it was made for another cumulative count than ``pruned`` (an
        earlier plan with other levels), or when it is corrupt (then deleted): that round is recomputed.
        """
        path = self.round_file(stream, r)
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                packed = {n: f.get_tensor(n) for n in f.keys()}
            shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
            saved_pruned = int(meta["pruned"])
            if meta.get("sha256") != fingerprint(packed, shapes, saved_pruned):
                raise CheckpointError("checksum mismatch")
            mask = MaskSet.from_packed(packed, shapes, ["ticket"])[0]
            if order is not None and set(order) != set(mask):
                raise CheckpointError(f"it masks {sorted(mask)[:3]}..., the model's tensors are {sorted(order)[:3]}...")
        except OSError:
            raise  # the disk or the process, not the file: never delete a file for it
        except Exception as err:  # noqa: BLE001 -- any unreadable round is recomputed
            self._discard(path, f"{type(err).__name__}: {err}")
            return None
        if pruned is not None and saved_pruned != pruned:
            return None
        return mask if order is None else {n: mask[n] for n in order}

    # -- joint retraining ------------------------------------------------------------------
    def load_training(self, key: str, basis: Any) -> dict[str, Any] | None:
        path = self.train_state_file(key)
        if not path.exists():
            return None
        try:
            saved = torch_load(path)
        except CheckpointError as err:
            self._discard(path, str(err))
            return None
        return saved if isinstance(saved, dict) and saved.get("basis") == basis else None

    def save_training(self, key: str, basis: Any, state: dict[str, Any]) -> None:
        atomic_torch_save(self.train_state_file(key), {**state, "basis": basis})

    def drop_training(self, key: str) -> None:
        self.train_state_file(key).unlink(missing_ok=True)

    # -- records ---------------------------------------------------------------------------
    def load_record(self, method: str, level: float, basis: Any) -> list[dict[str, Any]] | None:
        """The finished rows of (method, level) if computed from the same stage-1 rounds, else None."""
        path = self.record_file(method, level)
        if not path.exists():
            return None
        try:
            saved = read_json(path)
            if not isinstance(saved, dict) or saved.get("sha256") != fingerprint(saved.get("basis"), saved.get("rows")):
                raise CheckpointError("checksum mismatch")
        except (CheckpointError, TypeError) as err:
            self._discard(path, str(err))
            return None
        return saved["rows"] if saved.get("basis") == basis else None

    def save_record(self, method: str, level: float, basis: Any, rows: list[dict[str, Any]]) -> None:
        rows = json.loads(json.dumps(rows))  # the form it is read back in, so the checksum matches
        atomic_write_json(self.record_file(method, level), {"basis": basis, "rows": rows,
                                                            "sha256": fingerprint(basis, rows)})
