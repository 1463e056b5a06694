"""Property: the CIFAR reader, handed byte-mutated pickles, loads well-formed data or raises
``DataError`` -- never another exception, never slowly (2 s deadline), never with a large
allocation (tracemalloc peak under 16 MB).

Two folders are written once: one byte-for-byte in the official Python 2 format and one re-pickled
by Python 3 (protocol 4, frames and implicit memo). Each example mutates one of their files
(bit flips, overwritten, inserted and deleted bytes, truncation), loads the folder and restores the
file. Positions lean towards the pickle's structure rather than the pixel bytes, where almost any
change is harmless. 1,000 examples, derandomized, so CI sees the same cases every run.

A second property writes whole files of random opcode streams (runs of one opcode, as memory bombs
are made), under the same bounds; a direct test feeds a batch of 4 MiB of ``}`` (EMPTY_DICT), which
the pre-scan's opcode budget refuses before anything is unpickled. Last, class names read from the
files: unusable ones (empty, unprintable, too long) are refused naming the file.
"""

import pickle
import pickletools
import random
import re
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from routing_lottery.data.cifar import load_cifar10
from routing_lottery.errors import DataError
from byte_edits import apply_edits, edit_lists
from test_data import CIFAR10_NAMES, py2_pickle, write_py2_cifar10

pytestmark = pytest.mark.slow  # every property runs 1,000 generated cases

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
        return apply_edits(self.originals[style, name], edits, self.structure[style, name])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus({"py2": write_py2_cifar10(tmp_path_factory.mktemp("py2")),
                   "py3": _write_py3(tmp_path_factory.mktemp("py3"))})


# positions in the pickle's structure (opcodes, arguments) or anywhere
CASES = st.tuples(st.sampled_from(FILES), edit_lists(BYTE))


def _check(folder, name, mutated, original):
    path = folder / name
    path.write_bytes(mutated)
    # traced only while loading: Hypothesis's own bookkeeping, traced, runs 4 times slower and counts too
    tracemalloc.start()
    try:
        splits = load_cifar10(folder)
    except DataError as error:
        splits = error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        path.write_bytes(original)
    if isinstance(splits, DataError):
        # a failed huge allocation would be caught and reported too: it must not have been tried
        assert not isinstance(splits.__cause__, (MemoryError, RecursionError)), splits
        assert name in str(splits) and "cs.toronto.edu" in str(splits), splits
        event("DataError: " + re.sub(r"\d+", "N", str(splits).split(": ", 1)[1])[:48])  # --hypothesis-show-statistics
    else:
        event("loaded")
        for split in (splits.train, splits.test):
            assert split.images.shape[1:] == (3, 32, 32) and split.labels.shape == (len(split.images),)
            assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 10
            assert split.class_names == splits.train.class_names and len(split.class_names) == 10
            assert bool(split.images.isfinite().all())
    assert peak < PEAK_BYTES, f"{peak / 2**20:.1f} MiB"


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


# -- random opcode streams: the pre-scan bounds how many objects a file may make the unpickler build ---------
_FIXED = {"uint1": 1, "uint2": 2, "int4": 4, "uint4": 4, "uint8": 8, "float8": 8}
_SIZED = {"string1": 1, "bytes1": 1, "unicodestring1": 1, "long1": 1, "string4": 4, "bytes4": 4,
          "unicodestring4": 4, "long4": 4, "bytes8": 8, "bytearray8": 8, "unicodestring8": 8}
_LINES = [b"0\n", b"7\n", b"99999999999999999999\n", b"'a'\n", b"x\n", b"1.5\n"]
_GLOBALS = [b"numpy\nndarray\n", b"numpy\ndtype\n", b"numpy.core.multiarray\n_reconstruct\n",
            b"numpy.core.multiarray\nscalar\n", b"os\nsystem\n", b"builtins\neval\n"]


def _argument(op, rng):
    """A random argument for ``op``, drawn from ``rng`` (a few Hypothesis draws per run, not one per byte)."""
    kind = op.arg.name if op.arg else None
    if kind is None:
        return b""
    if kind in _FIXED:  # numbers, memo slots, frame lengths: mostly small, sometimes anything
        width = _FIXED[kind]
        return rng.choice([0, 1, rng.randrange(64), rng.randrange(1 << 8 * width)]).to_bytes(width, "little")
    if kind in _SIZED:  # a length and that many bytes; sometimes the length lies (genops must catch it)
        data = rng.randbytes(rng.choice([0, 1, 5, 40]))
        size = max(0, len(data) + rng.choice([0, 0, 0, 1, -1, 1 << 20])) % (1 << 8 * _SIZED[kind])
        return size.to_bytes(_SIZED[kind], "little") + data
    return rng.choice(_GLOBALS if kind == "stringnl_noescape_pair" else _LINES)


def _run(op_index, seed, repeat):
    """One opcode with its argument, ``repeat`` times: long runs are what a memory bomb is made of."""
    op = pickletools.opcodes[op_index]
    return (op.code.encode("latin-1") + _argument(op, random.Random(seed))) * repeat


# eight runs of up to 300 pass the 1,192-opcode budget of batches.meta (the batches' larger budget is
# test_a_batch_of_empty_dict_opcodes_is_refused_quickly_and_small's)
_RUN = st.builds(_run, st.integers(0, len(pickletools.opcodes) - 1), st.integers(0, 1 << 32),
                 st.one_of(st.just(1), st.integers(1, 300)))
STREAMS = st.tuples(st.sampled_from(["batches.meta", "data_batch_1"]), st.booleans(),
                    st.lists(_RUN, min_size=1, max_size=8), st.booleans())


@settings(max_examples=1000, derandomize=True, deadline=2000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=STREAMS)
def test_random_opcode_streams_load_or_raise_data_error_in_bounded_memory(corpus, case):
    """Whole files of random opcodes (runs of up to 300 of one): DataError or a valid load, within
    the time and memory bounds of ``_check`` (2 s, a 16 MB tracemalloc peak)."""
    name, protocol, runs, stop = case
    stream = (b"\x80\x02" if protocol else b"") + b"".join(runs) + (b"." if stop else b"")
    _check(corpus.folders["py3"], name, stream[: 64 << 10], corpus.originals["py3", name])


def test_a_batch_of_empty_dict_opcodes_is_refused_quickly_and_small(tmp_path):
    """4 MiB of `}` (EMPTY_DICT), under the 64 MiB cap: once 4 million 64-byte dicts (about 300 MB);
    now refused by the pre-scan after its opcode budget, before anything is unpickled."""
    folder = write_py2_cifar10(tmp_path)
    bomb = b"\x80\x02" + b"}" * (4 << 20) + b"."
    (folder / "data_batch_1").write_bytes(bomb)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"data_batch_1: holds more than [\d,]+ pickle opcodes"):
            load_cifar10(folder)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(bomb) + (4 << 20), f"{peak / 2**20:.1f} MiB"  # the file itself and little more
    assert seconds < 10, seconds  # about 0.5 s


def test_official_files_fit_the_opcode_budget():
    """Full-size files in the official layout, at the size caps, stay within their opcode budget."""
    from routing_lottery.data.cifar import _BATCH_BYTES, _CIFAR100_TRAIN_BYTES, _META_BYTES, _opcode_budget

    rng = np.random.default_rng(0)
    # 3 opcodes per image in a CIFAR-10 batch (label, file name, memo), 4 in CIFAR-100's train file
    per_image = {"batch": 3, "cifar100 train": 4}
    for kind, cap, images in (("batch", _BATCH_BYTES, 10_000), ("cifar100 train", _CIFAR100_TRAIN_BYTES, 50_000)):
        assert per_image[kind] * images * 2 < _opcode_budget(cap), kind  # twice the official count fits
    small = {b"labels": [int(v) for v in rng.integers(0, 10, 1000)], b"data": np.zeros((1000, 3072), np.uint8),
             b"filenames": [f"leptodactylus_pentadactylus_s_{j:06d}.png".encode() for j in range(1000)]}
    assert sum(1 for _ in pickletools.genops(py2_pickle(small))) < 3.1 * 1000 + 100
    meta = {b"fine_label_names": [f"name{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    assert sum(1 for _ in pickletools.genops(py2_pickle(meta))) * 4 < _opcode_budget(_META_BYTES)


# -- class names read from the files ----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [b"", b" ", b"cat\x00", b"line\nbreak", "bidi\u202eevil".encode(), b"x" * 201])
def test_unusable_class_names_are_refused_naming_the_file(tmp_path, bad):
    folder = write_py2_cifar10(tmp_path)
    names = [*CIFAR10_NAMES[:9], bad]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names}))
    with pytest.raises(DataError, match=r"batches\.meta: class name 9 of 'label_names' .*(empty|whitespace|"
                                        r"unprintable|characters long)"):
        load_cifar10(folder)


def test_class_names_that_look_like_paths_are_read_as_names(tmp_path):
    """Slashes and dots are fair in a name (``sweet/pepper``); whatever files a name maps it (export.safe_filename)."""
    folder = write_py2_cifar10(tmp_path)
    names = [*CIFAR10_NAMES[:7], b"../../../x", b"/abs/path", b"sweet/pepper"]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names}))
    assert load_cifar10(folder).train.class_names[7:] == ("../../../x", "/abs/path", "sweet/pepper")


def test_a_users_dataset_with_unusable_class_names_is_a_data_error():
    from routing_lottery.data.labelled import LabelledDataset

    inputs, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(DataError, match=r"class_names: class name 1 \('a\\nb'\) holds the unprintable character U\+000A"):
        LabelledDataset(inputs, labels, ("ok", "a\nb"))
    with pytest.raises(DataError, match="appears twice"):
        LabelledDataset(inputs, labels, ("ok", "ok"))
    assert LabelledDataset(inputs, labels, ("sweet/pepper", "..")).class_names == ("sweet/pepper", "..")
