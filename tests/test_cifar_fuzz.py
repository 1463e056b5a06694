"""Property: the CIFAR reader, handed byte-mutated pickles, loads well-formed data or raises
``DataError`` -- never another exception, never slowly (2 s deadline), never with a large
allocation (tracemalloc peak under 16 MB).

Two folders are written once: one byte-for-byte in the official Python 2 format and one re-pickled
by Python 3 (protocol 4, frames and implicit memo). Each example mutates one of their files
(bit flips, overwritten, inserted and deleted bytes, truncation), loads the folder and restores the
file. Positions lean towards the pickle's structure rather than the pixel bytes, where almost any
change is harmless. 1,000 examples, derandomized, so CI sees the same cases every run.
"""

import pickle
import pickletools
import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from routing_lottery.data.cifar import load_cifar10
from routing_lottery.errors import DataError
from test_data import CIFAR10_NAMES, write_py2_cifar10

FILES = ("batches.meta", "data_batch_1", "test_batch")
PEAK_BYTES = 16 << 20  # a clean load of these folders peaks near 0.2 MB
# bytes a mutation may write: anything, or opcodes that change how the rest is read
BYTE = st.one_of(st.integers(0, 255), st.sampled_from(list(b"rqjhgpTUBC\x8d\x8e\x95\x94\x93(tu]}aecRbNJKM.")))


def _write_py3(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, name in enumerate((*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")):
        batch = {b"labels": [(i + j) % 10 for j in range(2)], b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": CIFAR10_NAMES}, protocol=4))
    return folder


class Corpus:
    """The two folders, each target file's original bytes, and its structural positions."""

    def __init__(self, folders):
        self.folders, self.originals, self.structure = folders, {}, {}
        for style, folder in folders.items():
            for name in FILES:
                raw = (folder / name).read_bytes()
                # every byte except the payload of long strings (the pixels): where mutations bite
                structure = {p for op, arg, pos in pickletools.genops(raw)
                             for p in range(pos, pos + (13 if isinstance(arg, bytes) and len(arg) > 64 else 16))}
                self.originals[style, name] = raw
                self.structure[style, name] = sorted(p for p in structure if p < len(raw))

    def __repr__(self):  # keeps Hypothesis's report of a failing case short
        return f"Corpus({self.folders})"

    def mutate(self, style, name, edits):
        data, structure = bytearray(self.originals[style, name]), self.structure[style, name]
        for kind, (in_structure, where), value in edits:
            at = min(structure[where % len(structure)], len(data)) if in_structure else where % (len(data) + 1)
            if kind == "flip" and at < len(data):
                data[at] ^= 1 << value
            elif kind == "overwrite":
                data[at:at + 1] = bytes([value])
            elif kind == "insert":
                data[at:at] = value
            elif kind == "delete":
                del data[at:at + value]
            elif kind == "truncate":
                del data[at:]
        return bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    made = Corpus({"py2": write_py2_cifar10(tmp_path_factory.mktemp("py2")),
                   "py3": _write_py3(tmp_path_factory.mktemp("py3"))})
    tracemalloc.start()
    yield made
    tracemalloc.stop()


# a position: in the pickle's structure (opcodes, arguments) or anywhere, reduced modulo the length
WHERE = st.tuples(st.booleans(), st.integers(0, 1 << 16))
EDIT = st.one_of(
    st.tuples(st.just("flip"), WHERE, st.integers(0, 7)),
    st.tuples(st.just("overwrite"), WHERE, BYTE),
    st.tuples(st.just("insert"), WHERE, st.lists(BYTE, min_size=1, max_size=8).map(bytes)),
    st.tuples(st.just("delete"), WHERE, st.integers(1, 8)),
    st.tuples(st.just("truncate"), WHERE, st.none()),
)
CASES = st.tuples(st.sampled_from(FILES), st.lists(EDIT, min_size=1, max_size=3))


def _check(folder, name, mutated, original):
    path = folder / name
    path.write_bytes(mutated)
    tracemalloc.reset_peak()
    try:
        splits = load_cifar10(folder)
    except DataError as error:
        # a failed huge allocation would be caught and reported too: it must not have been tried
        assert not isinstance(error.__cause__, (MemoryError, RecursionError)), error
        assert name in str(error) and "cs.toronto.edu" in str(error), error
        event("DataError: " + re.sub(r"\d+", "N", str(error).split(": ", 1)[1])[:48])  # --hypothesis-show-statistics
    else:
        event("loaded")
        for split in (splits.train, splits.test):
            assert split.images.shape[1:] == (3, 32, 32) and split.labels.shape == (len(split.images),)
            assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 10
            assert split.class_names == splits.train.class_names and len(split.class_names) == 10
            assert bool(split.images.isfinite().all())
    finally:
        path.write_bytes(original)
    assert tracemalloc.get_traced_memory()[1] < PEAK_BYTES


def _property(style, examples):
    # deadline: each load (a meta file and six batches) must finish within 2 s; it takes ~5 ms
    @settings(max_examples=examples, derandomize=True, deadline=2000, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=CASES)
    def check(corpus, case):
        name, edits = case
        _check(corpus.folders[style], name, corpus.mutate(style, name, edits), corpus.originals[style, name])

    return check


test_mutated_official_format_pickles_load_or_raise_data_error = _property("py2", 600)
test_mutated_python3_pickles_load_or_raise_data_error = _property("py3", 400)
