"""Data loaders: the digits default, stratified subsets, and CIFAR pickles the test writes itself."""

import pickle

import numpy as np
import pytest
import torch

from routing_lottery.data.cifar import load_cifar10, load_cifar100
from routing_lottery.data.digits import DIGIT_NAMES, load_digits_splits
from routing_lottery.data.images import DatasetNotFoundError, ImageDataset
from routing_lottery.data.labelled import stratified_subset


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
