"""Fashion-MNIST (issue 26): the IDX reader and the loader on files the test writes byte by byte, and the
packaged config at smoke scale end to end through the command line."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routing_lottery.cli import app, packaged_config
from routing_lottery.config import load_config
from routing_lottery.data.fashion_mnist import FASHION_MNIST_NAMES, FILES, load_fashion_mnist
from routing_lottery.data.idx import read_idx, read_idx_header
from routing_lottery.data.images import DatasetNotFoundError
from routing_lottery.errors import DataError
from routing_lottery.run import build_tasks

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, spelled out here rather than borrowed from the reader under test."""
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, raw: bytes, compressed: bool = False):
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    return path


def one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


# -- the IDX reader ----------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True])
def test_idx_header_sizes_and_bytes_round_trip(tmp_path, compressed):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = write(tmp_path / "images-idx3-ubyte", idx_bytes(images), compressed)
    header = read_idx_header(path)
    assert (header.dtype, header.shape, header.header_bytes, header.data_bytes) == (np.uint8, (7, 28, 28), 16, 7 * 784)
    read = read_idx(path)
    assert read.dtype == np.uint8 and read.shape == (7, 28, 28) and np.array_equal(read, images)


def test_idx_multi_byte_types_are_big_endian_on_disk_and_native_when_read(tmp_path):
    for array in (np.array([[-1, 2**20], [3, -(2**31)]], dtype=np.int32), np.array([1.5, -0.25], dtype=np.float32),
                  np.array([-7, 300], dtype=np.int16), np.array([2.0**60], dtype=np.float64)):
        raw = idx_bytes(array)
        assert raw[4 + 4 * array.ndim:] == array.astype(array.dtype.newbyteorder(">")).tobytes()
        read = read_idx(write(tmp_path / "a-idx", raw))
        assert read.dtype.isnative and read.dtype == array.dtype and np.array_equal(read, array)


def test_truncated_file_is_one_clear_error(tmp_path):
    raw = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    short = write(tmp_path / "short-idx2-ubyte", raw[:-5])
    with pytest.raises(DataError, match=r"truncated: its header promises shape \(3, 4\) \(12 bytes of values\) "
                                        r"but only 7 bytes follow") as error:
        read_idx(short)
    one_line_naming(error, short)
    header_cut = write(tmp_path / "header-idx2-ubyte", raw[:6])
    with pytest.raises(DataError, match=r"truncated: the header declares 2 dimensions") as error:
        read_idx(header_cut)
    one_line_naming(error, header_cut)
    noise = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)  # incompressible
    gz_cut = tmp_path / "stream-idx3-ubyte.gz"
    gz_cut.write_bytes(gzip.compress(idx_bytes(noise))[:20_000])  # a download cut off inside the gzip stream
    with pytest.raises(DataError, match="truncated: the gzip stream ends early") as error:
        read_idx(gz_cut)
    one_line_naming(error, gz_cut)


def test_wrong_magic_and_unknown_type_are_one_clear_error_each(tmp_path):
    text = write(tmp_path / "notes-idx1-ubyte", b"label,image\n1,2\n")
    with pytest.raises(DataError, match=r"not an IDX file: wrong magic number 0x6c616265") as error:
        read_idx(text)
    one_line_naming(error, text)
    odd = write(tmp_path / "odd-idx1-ubyte", bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 9]))
    with pytest.raises(DataError, match=r"unsupported IDX type code 0x07") as error:
        read_idx(odd)
    one_line_naming(error, odd)


@pytest.mark.parametrize("compressed", [False, True])
def test_trailing_bytes_are_one_clear_error(tmp_path, compressed):
    path = write(tmp_path / "long-idx1-ubyte", idx_bytes(np.arange(5, dtype=np.uint8)) + b"xyz", compressed)
    with pytest.raises(DataError, match=r"holds 3 bytes after the 5 its header promises") as error:
        read_idx(path)
    one_line_naming(error, path)


def test_absurd_header_is_refused_before_anything_is_allocated(tmp_path):
    # 16 bytes asking for 2**48 values: refused from the header alone, whatever the memory
    path = write(tmp_path / "bomb-idx3-ubyte", bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**16, 2**16, 2**16))
    refused = r"declares shape \(65536, 65536, 65536\).*more than the 2,147,483,648"
    with pytest.raises(DataError, match=refused) as error:
        read_idx(path)
    one_line_naming(error, path)


# -- the loader ----------------------------------------------------------------------------------
def make_fashion_folder(folder, train_per_class=6, test_per_class=3, seed=0, compressed=(True, False)):
    """The four files of a tiny Fashion-MNIST, labels cycling 0..9; train gzip-compressed, test plain."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for (split, (images_name, labels_name)), per_class, gz in zip(FILES.items(), (train_per_class, test_per_class),
                                                                 compressed):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20  # a pixel that tells the classes apart, so learning is possible
        suffix = ".gz" if gz else ""
        write(folder / f"{images_name}{suffix}", idx_bytes(images), gz)
        write(folder / f"{labels_name}{suffix}", idx_bytes(labels), gz)
        arrays[split] = images, labels
    return arrays


def test_loader_serves_ten_named_classes_with_their_pixels_and_labels(tmp_path):
    arrays = make_fashion_folder(tmp_path)
    splits = load_fashion_mnist(tmp_path)
    assert splits.train.class_names == FASHION_MNIST_NAMES == splits.test.class_names
    assert splits.train.class_names[0] == "T-shirt/top" and splits.train.class_names[9] == "Ankle boot"
    for dataset, (images, labels) in zip((splits.train, splits.test), (arrays["train"], arrays["test"])):
        assert dataset.inputs.shape == (len(labels), 1, 28, 28) and dataset.inputs.dtype == torch.float32
        assert torch.equal(dataset.labels, torch.as_tensor(labels, dtype=torch.long))
    # standardized with the training set's statistics, in the files' order
    train_pixels = torch.as_tensor(arrays["train"][0], dtype=torch.float32) / 255
    mean, std = train_pixels.mean(), train_pixels.std()
    expected_test = (torch.as_tensor(arrays["test"][0], dtype=torch.float32) / 255 - mean) / std
    assert torch.allclose(splits.test.inputs[:, 0], expected_test, atol=1e-5)
    small = load_fashion_mnist(tmp_path, image_size=16)
    assert small.train.inputs.shape == (60, 1, 16, 16) and torch.equal(small.train.labels, splits.train.labels)


def test_missing_files_are_named_with_where_to_get_them(tmp_path):
    make_fashion_folder(tmp_path)
    for name in FILES["test"]:
        (tmp_path / name).unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        load_fashion_mnist(tmp_path)
    message = one_line_naming(error, tmp_path)
    assert "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message and "train-images" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "github.com/zalandoresearch/fashion-mnist" in message
    with pytest.raises(DatasetNotFoundError, match="no such folder.*lacks train-images-idx3-ubyte, train-labels"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_files_that_do_not_belong_together_are_named(tmp_path):
    make_fashion_folder(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write(labels, idx_bytes(np.zeros(29, dtype=np.uint8)))
    with pytest.raises(DataError, match="not the 30 unsigned-byte labels") as error:
        load_fashion_mnist(tmp_path)
    one_line_naming(error, labels)
    write(labels, idx_bytes(np.full(30, 10, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"label 10 at position 0 is outside 0..9"):
        load_fashion_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    write(images, idx_bytes(np.zeros((30, 32, 32), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"shape \(30, 32, 32\), not the \(N, 28, 28\)") as error:
        load_fashion_mnist(tmp_path)
    one_line_naming(error, images)


# -- the config -------------------------------------------------------------------------------
TINY = {"data": {"train_per_class": 8, "test_per_class": 4}, "pruning": {"sparsities": [0.5], "step": 0.5}}


def test_config_scales_keep_the_method_and_full_is_the_papers_setting():
    path = packaged_config("fashion_mnist")
    embedded, smoke, full = load_config(path), load_config(path, "smoke"), load_config(path, "full")
    paper = load_config(packaged_config("cifar10"), "full")
    for config in (embedded, smoke, full):
        assert (config.task, config.data.name, config.data.contexts) == ("classification", "fashion_mnist", "classes")
        assert config.methods == paper.methods
    assert (full.data.image_size, full.data.train_per_class, full.data.test_per_class) == (28, None, None)
    assert (full.model, full.pruning, full.training) == (paper.model, paper.pruning, paper.training)
    assert smoke.data.image_size < embedded.data.image_size <= 28


@pytest.mark.slow
def test_smoke_config_runs_end_to_end_on_hand_made_files(tmp_path):
    make_fashion_folder(tmp_path / "data", train_per_class=9, test_per_class=4)
    out = tmp_path / "run"
    settings = [f"data.{k}={v}" for k, v in TINY["data"].items()] + ["pruning.sparsities=[0.5]", "pruning.step=0.5"]
    result = CliRunner().invoke(app, ["run", "fashion_mnist", "--scale", "smoke", "--data", str(tmp_path / "data"),
                                      "--out", str(out), *sum((["--set", s] for s in settings), [])])
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in records} >= {"dense", "single_imp", "multi_imp", "rtl", "random"}
    rtl = next(r for r in records if r["method"] == "rtl")
    assert rtl["sparsity"] == 0.5 and all(0 <= rtl[f"balanced_accuracy_context_{k}"] <= 1 for k in range(10))


def test_subsets_are_seeded_and_the_fingerprint_covers_the_files(tmp_path):
    make_fashion_folder(tmp_path / "a", train_per_class=12, test_per_class=5, seed=0)
    make_fashion_folder(tmp_path / "b", train_per_class=12, test_per_class=5, seed=1)

    def task(root, seed=0):
        config = load_config(packaged_config("fashion_mnist"), "smoke", {**TINY, "seed": seed, "data": {
            **TINY["data"], "root": str(root)}})
        return build_tasks(config)[0]

    first, again = task(tmp_path / "a"), task(tmp_path / "a")
    assert torch.equal(first.train_set.inputs, again.train_set.inputs)
    assert first.data_fingerprint() == again.data_fingerprint()
    assert first.context_names == list(FASHION_MNIST_NAMES)
    assert torch.bincount(first.train_set.labels, minlength=10).sum() == len(first.train_set)
    assert task(tmp_path / "a", seed=1).data_fingerprint() != first.data_fingerprint()  # another subset
    assert task(tmp_path / "b").data_fingerprint() != first.data_fingerprint()  # other pixels in the files
