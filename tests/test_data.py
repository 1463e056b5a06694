"""Data loaders: the digits default, stratified subsets, and CIFAR pickles the test writes itself."""

import io
import pickle
import re
import struct
import time

import numpy as np
import pytest
import torch

from routing_lottery.data.cifar import load_cifar10, load_cifar100
from routing_lottery.data.digits import DIGIT_NAMES, load_digits_splits
from routing_lottery.data.images import DatasetNotFoundError, ImageDataset
from routing_lottery.data.labelled import stratified_subset
from routing_lottery.errors import DataError


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _batch(n, rng, **labels):
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), **{k.encode(): v for k, v in labels.items()}}


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write(folder / f"data_batch_{i}", _batch(4, rng, labels=[(i + j) % 10 for j in range(4)]))
    _write(folder / "test_batch", _batch(3, rng, labels=[0, 1, 9]))
    _write(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return tmp_path


def test_cifar10_reads_the_official_layout(cifar10_dir):
    splits = load_cifar10(cifar10_dir)
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.test.images.shape == (3, 3, 32, 32)
    assert splits.test.labels.tolist() == [0, 1, 9]
    assert splits.train.labels[:4].tolist() == [1, 2, 3, 4]
    assert splits.train.class_names[9] == "c9"
    # standardized with the training statistics
    assert splits.train.images.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    # the folder itself works as well as its parent
    assert torch.equal(load_cifar10(cifar10_dir / "cifar-10-batches-py").test.labels, splits.test.labels)


def test_cifar10_pixel_layout_is_channel_major(cifar10_dir):
    raw = pickle.load(open(cifar10_dir / "cifar-10-batches-py" / "test_batch", "rb"))[b"data"][0]
    splits = load_cifar10(cifar10_dir)
    image = splits.test.images[0]
    red = image[0]  # standardized, so compare rank order with the raw red plane
    assert np.array_equal(np.argsort(red.flatten().numpy(), kind="stable"), np.argsort(raw[:1024], kind="stable"))


def test_cifar10_missing_files_name_them_and_the_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data_batch_1.*cs.toronto.edu"):
        load_cifar10(tmp_path)


def test_cifar10_corrupt_file_is_a_clear_error(cifar10_dir):
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(cifar10_dir)


def test_cifar_pickle_cannot_run_code(cifar10_dir):
    _write(cifar10_dir / "cifar-10-batches-py" / "test_batch", {b"data": __import__("os").system})
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        load_cifar10(cifar10_dir)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _write(folder / "train", _batch(5, rng, fine_labels=[0, 1, 2, 3, 99], coarse_labels=[4, 1, 14, 8, 19]))
    _write(folder / "test", _batch(2, rng, fine_labels=[5, 6], coarse_labels=[0, 3]))
    _write(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                             b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    fine, coarse = load_cifar100(tmp_path), load_cifar100(tmp_path, label="coarse")
    assert fine.train.labels.tolist() == [0, 1, 2, 3, 99] and len(fine.train.class_names) == 100
    assert coarse.train.labels.tolist() == [4, 1, 14, 8, 19] and len(coarse.train.class_names) == 20
    assert torch.equal(fine.train.images, coarse.train.images)
    (folder / "meta").unlink()
    with pytest.raises(DatasetNotFoundError, match="meta"):
        load_cifar100(tmp_path)


def test_digits_split_is_stratified_disjoint_and_deterministic():
    a, b = load_digits_splits(seed=3, image_size=16), load_digits_splits(seed=3, image_size=16)
    assert torch.equal(a.train.images, b.train.images) and a.train.class_names == DIGIT_NAMES
    assert a.train.images.shape[1:] == (1, 16, 16)
    assert len(a.train) + len(a.test) == 1797
    per_class = torch.bincount(a.test.labels, minlength=10)
    assert per_class.min() >= 34 and per_class.max() <= 37
    # no test image appears in training
    train = {tuple(x.flatten().tolist()) for x in a.train.images}
    assert not any(tuple(x.flatten().tolist()) in train for x in a.test.images)


def test_stratified_subset_caps_each_class():
    data = ImageDataset(torch.zeros(30, 1, 2, 2), torch.arange(30) % 3, ("a", "b", "c"))
    sub = stratified_subset(data, 4, seed=0)
    assert torch.bincount(sub.labels).tolist() == [4, 4, 4]
    assert torch.equal(sub.labels, stratified_subset(data, 4, seed=0).labels)
    assert stratified_subset(data, None, seed=0) is data


def test_image_dataset_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 5]), ("a", "b"))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.zeros(2, 2, 2), torch.tensor([0, 1]), ("a", "b"))


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: protocol 2, text as BINSTRING,
    ``numpy.core`` names. (Python 3's own protocol 2 spells bytes as ``_codecs.encode`` calls.)"""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str(self, obj):
        data = obj.encode() if isinstance(obj, str) else obj
        self.write((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(b"c" + module.encode() + b"\n" + (name or obj.__qualname__).encode() + b"\n")
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_str
    dispatch[type] = save_global


def py2_pickle(obj):
    out = io.BytesIO()
    _Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


CIFAR10_NAMES = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
OFFICIAL_META = {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072}


def write_py2_cifar10(root, images_per_batch=2, seed=0):
    """A CIFAR-10 folder byte-for-byte in the official format (just fewer images)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, name in enumerate((*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")):
        labels = [(i + j) % 10 for j in range(images_per_batch)]
        (folder / name).write_bytes(py2_pickle({b"batch_label": f"batch {i}".encode(), b"labels": labels,
                                                b"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                                                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(images_per_batch)]}))
    (folder / "batches.meta").write_bytes(py2_pickle(OFFICIAL_META))
    return folder


def test_cifar10_reads_files_in_the_official_python2_format(tmp_path):
    folder = write_py2_cifar10(tmp_path)
    assert len((folder / "batches.meta").read_bytes()) == 158  # the official file's size
    splits = load_cifar10(tmp_path)
    assert splits.train.images.shape == (10, 3, 32, 32) and splits.test.labels.tolist() == [5, 6]
    assert splits.train.class_names[0] == "airplane"


def test_cifar_object_array_is_a_data_error(cifar10_dir):
    rng = np.random.default_rng(0)
    _write(cifar10_dir / "cifar-10-batches-py" / "test_batch",
           {b"data": rng.integers(0, 256, (3, 3072)).astype(object), b"labels": [0, 1, 9]})
    with pytest.raises(DataError, match=r"test_batch.*object arrays.*cs\.toronto\.edu"):
        load_cifar10(cifar10_dir)


def test_cifar_string_labels_are_a_data_error(cifar10_dir):
    rng = np.random.default_rng(0)
    _write(cifar10_dir / "cifar-10-batches-py" / "test_batch", _batch(3, rng, labels=[b"0", b"1", b"9"]))
    with pytest.raises(DataError, match=r"test_batch.*'labels' holds text, not integers"):
        load_cifar10(cifar10_dir)


def test_cifar_meta_without_names_is_a_data_error(cifar10_dir):
    _write(cifar10_dir / "cifar-10-batches-py" / "batches.meta", {b"num_vis": 3072})
    with pytest.raises(DataError, match=r"batches\.meta: has no 'label_names' entry"):
        load_cifar10(cifar10_dir)
    _write(cifar10_dir / "cifar-10-batches-py" / "batches.meta", {b"label_names": CIFAR10_NAMES[:9]})
    with pytest.raises(DataError, match=r"batches\.meta: 'label_names' must list the 10 class names; got 9"):
        load_cifar10(cifar10_dir)


def test_cifar100_meta_needs_every_class_name(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _write(folder / "train", _batch(2, rng, fine_labels=[0, 98], coarse_labels=[0, 1]))
    _write(folder / "test", _batch(1, rng, fine_labels=[5], coarse_labels=[3]))
    _write(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(99)],
                             b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    with pytest.raises(DataError, match=r"meta: 'fine_label_names' must list the 100 class names"):
        load_cifar100(tmp_path)
    assert len(load_cifar100(tmp_path, label="coarse").train.class_names) == 20


def test_cifar_label_out_of_range_names_the_file_and_the_value(cifar10_dir):
    rng = np.random.default_rng(0)
    _write(cifar10_dir / "cifar-10-batches-py" / "test_batch", _batch(3, rng, labels=[0, 1, 10]))
    with pytest.raises(DataError, match=r"test_batch: label 10 at position 2 of 'labels' is outside 0\.\.9"):
        load_cifar10(cifar10_dir)


def test_cifar_truncated_files_are_data_errors(tmp_path):
    folder = write_py2_cifar10(tmp_path)
    for name in ("batches.meta", "data_batch_1"):
        whole = (folder / name).read_bytes()
        for cut in sorted({*range(min(200, len(whole))), *range(0, len(whole), 97), len(whole) - 1}):
            (folder / name).write_bytes(whole[:cut])
            with pytest.raises(DataError, match=name):
                load_cifar10(tmp_path)
        (folder / name).write_bytes(whole)
    load_cifar10(tmp_path)


def test_cifar_memo_bomb_fails_fast(tmp_path):
    # Four bytes that once made the unpickler grow its memo to ~324 million slots (27 s, 5.4 GB):
    # BINPUT 0 became LONG_BINPUT, whose index swallows the next four bytes.
    folder = write_py2_cifar10(tmp_path)
    meta = (folder / "batches.meta").read_bytes()
    assert meta[3:5] == b"q\x00"
    (folder / "batches.meta").write_bytes(meta[:3] + b"r" + meta[4:])
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"batches\.meta: names memo slot \d+"):
        load_cifar10(tmp_path)
    assert time.perf_counter() - start < 0.5


def test_cifar_huge_declared_length_fails_fast(tmp_path):
    folder = write_py2_cifar10(tmp_path)
    # a bytes object that claims 2**62 bytes in a 30-byte file
    bomb = b"\x80\x04}\x94(C\x04data\x94\x8e" + struct.pack("<Q", 1 << 62) + b"abcd"
    (folder / "data_batch_1").write_bytes(bomb)
    start = time.perf_counter()
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(tmp_path)
    assert time.perf_counter() - start < 0.5


def test_cifar_malformed_dtype_state_is_a_data_error_not_a_crash(tmp_path):
    # Three bytes fewer in a dtype's state tuple made NumPy's dtype.__setstate__ crash the
    # interpreter (SIGSEGV); the reader now checks that state itself and never hands it to NumPy.
    folder = write_py2_cifar10(tmp_path)
    batch = (folder / "data_batch_1").read_bytes()
    state = re.search(rb"\(K\x03U\x01\|q.NNN", batch, re.DOTALL)
    (folder / "data_batch_1").write_bytes(batch[:state.start()] + b"(K\x03U\x01|N" + batch[state.end():])
    with pytest.raises(DataError, match=r"data_batch_1: .*unexpected dtype state"):
        load_cifar10(tmp_path)
