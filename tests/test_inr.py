"""INR task: coordinate networks, region maps (embedded and ADE20K layouts), routing and PSNR."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from routing_lottery.data.images import DatasetNotFoundError
from routing_lottery.data.regions import (
    RegionImage,
    absorb_small_components,
    load_ade20k_folder,
    load_embedded_image,
    merge_regions,
)
from routing_lottery.masks import MaskSet
from routing_lottery.models.inr import CoordinateMLP, FourierFeatures, RegionEmbeddingMLP, region_ids_of
from routing_lottery.pruning import prunable_names, random_mask_like
from routing_lottery.routed import RoutedModel
from routing_lottery.tasks.inr import InrTask, pixel_grid, psnr, save_grid
from routing_lottery.training import OptimizerConfig, train


def _toy_image(h: int = 6, w: int = 9) -> RegionImage:
    """Three regions: left third, right two thirds top, right two thirds bottom."""
    regions = np.zeros((h, w), dtype=np.int64)
    regions[: h // 2, w // 3:] = 1
    regions[h // 2:, w // 3:] = 2
    rng = np.random.default_rng(0)
    pixels = rng.random((h, w, 3)).astype(np.float32)
    return RegionImage("toy", pixels, regions, ("left", "top right", "bottom right"))


# -- PSNR and the coordinate grid -------------------------------------------------------------------

def test_psnr_known_values():
    a = torch.zeros(4, 5, 3)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-5)  # MSE 0.01
    assert psnr(np.zeros((2, 2)), np.full((2, 2), 0.01)) == pytest.approx(40.0, abs=1e-9)
    assert psnr(a * 255, a * 255 + 25.5, peak=255.0) == pytest.approx(20.0, abs=1e-9)
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(3), torch.zeros(4))


def test_pixel_grid_centres_range_and_order():
    grid = pixel_grid(4, 6)
    assert grid.shape == (24, 2)
    assert float(grid.min()) > -1 and float(grid.max()) < 1
    assert grid[0].tolist() == pytest.approx([-1 + 1 / 6, -1 + 1 / 4])
    assert grid[1, 0] > grid[0, 0] and grid[1, 1] == grid[0, 1]  # row-major: x moves first
    assert grid[6, 1] > grid[0, 1] and grid[6, 0] == grid[0, 0]
    assert torch.allclose(grid.mean(dim=0), torch.zeros(2), atol=1e-6)


# -- routing pixels to regions ---------------------------------------------------------------------------

def test_reconstruct_routes_every_pixel_once_to_its_own_region():
    task = InrTask(_toy_image(), eval_batch_size=5)  # small chunks: a region spans several calls
    seen = torch.zeros(task.num_pixels, dtype=torch.long)

    def predict(k: int, inputs: torch.Tensor) -> torch.Tensor:
        assert torch.all(region_ids_of(inputs) == k)
        rows = ((inputs[:, None, :2] - task.coords[None]).abs().sum(-1) < 1e-6).nonzero()[:, 1]
        seen.index_add_(0, rows, torch.ones_like(rows))
        return torch.full((len(inputs), 3), float(k))

    image = task.reconstruct(predict, clamp=False)
    assert torch.all(seen == 1)
    assert torch.equal(image[..., 0].long(), torch.as_tensor(task.image.regions))
    assert task.context_sizes == task.image.region_sizes() == [18, 18, 18]


def test_region_psnr_and_streams():
    task = InrTask(_toy_image())
    exact = task.original().clone()
    exact[torch.as_tensor(task.image.regions) == 2] += 0.1
    per_region = task.region_psnr(exact)
    assert per_region[0] == per_region[1] == math.inf and per_region[2] == pytest.approx(20.0, abs=1e-4)
    full = task.region_stream(1)
    (batch,) = full.epoch(torch.Generator())
    assert full.num_batches == 1 and batch[0].shape == (18, 3) and torch.all(batch[0][:, 2] == 1)
    mini = task.region_stream(2, batch_size=4)
    batches = mini.epoch(torch.Generator().manual_seed(0))
    assert mini.num_batches == len(batches) == 5 and sum(len(x) for x, _ in batches) == 18
    every = task.all_pixels_stream()
    (x, y), = every.epoch(torch.Generator())
    assert torch.equal(region_ids_of(x), task.region_ids) and torch.equal(y, task.targets)
    with pytest.raises(ValueError, match="outside 0..2"):
        task.region_stream(3)


def test_routed_model_on_region_inputs_matches_reconstruct():
    torch.manual_seed(0)
    net = CoordinateMLP(hidden=16, depth=2)
    task = InrTask(_toy_image())
    g = torch.Generator().manual_seed(0)
    full = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters() if n in net.prunable_names()}
    masks = MaskSet.from_tickets([random_mask_like({n: torch.rand(m.shape, generator=g) > 0.5 for n, m in full.items()}, g)
                                  for _ in range(3)])
    routed = RoutedModel(net, masks)
    with torch.no_grad():
        mixed = routed(task.inputs, region_ids_of(task.inputs)).clamp(0, 1)
    image = task.reconstruct(lambda k, x: routed.subnetwork(x, k))
    assert torch.allclose(image.reshape(-1, 3), mixed, atol=1e-6)


# -- networks ---------------------------------------------------------------------------------------------

def test_fourier_features_layout_and_values():
    enc = FourierFeatures(8)
    coords = torch.tensor([[0.0, 0.0], [0.5, -0.25]])
    out = enc(coords)
    assert out.shape == (2, 34) and enc.out_features == 34
    assert torch.equal(out[0], torch.cat([torch.zeros(18), torch.ones(16)]))
    for i in range(8):
        for j in range(2):
            c = float(coords[1, j])
            assert float(out[1, 2 + 2 * i + j]) == pytest.approx(math.sin(2**i * math.pi * c), abs=1e-5)
            assert float(out[1, 18 + 2 * i + j]) == pytest.approx(math.cos(2**i * math.pi * c), abs=1e-5)
    assert out[1, :2].tolist() == [0.5, -0.25]
    assert float(out[1, 2]) == pytest.approx(1.0) and float(out[1, 4]) == pytest.approx(0.0, abs=1e-6)  # sin(pi/2), sin(pi)


def test_coordinate_mlp_prunable_count_is_the_papers():
    net = CoordinateMLP()
    params = dict(net.named_parameters())
    names = prunable_names(net)
    assert names == [f"layers.{i}.weight" for i in range(5)]
    assert [tuple(params[n].shape) for n in names] == [(128, 34), (128, 128), (128, 128), (128, 128), (3, 128)]
    assert sum(params[n].numel() for n in names) == 53_888
    assert net(torch.zeros(7, 2)).shape == (7, 3)
    x3 = torch.tensor([[0.1, 0.2, 0.0], [0.1, 0.2, 5.0]])
    out = net(x3)
    assert torch.allclose(out[0], out[1], atol=1e-6)  # the region column is ignored


def test_region_embedding_mlp_shares_the_coordinate_init():
    torch.manual_seed(3)
    base = CoordinateMLP()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = RegionEmbeddingMLP.from_coordinate_mlp(base, num_regions=5, generator=torch.Generator().manual_seed(1))
    assert tuple(net.layers[0].weight.shape) == (128, 50) and net.shared_columns == 34
    assert torch.equal(net.layers[0].weight[:, :34], base.layers[0].weight)
    assert net.layers[0].weight[:, 34:].abs().sum() > 0
    for i in range(5):
        assert torch.equal(net.layers[i].bias, base.layers[i].bias)
        if i > 0:
            assert torch.equal(net.layers[i].weight, base.layers[i].weight)
    params = dict(net.named_parameters())
    assert prunable_names(net) == [f"layers.{i}.weight" for i in range(5)]
    assert sum(params[n].numel() for n in prunable_names(net)) == 53_888 + 16 * 128
    assert "embedding.weight" not in prunable_names(net)
    # Zero initial embedding: at init the baseline computes exactly what the RTL network computes.
    coords = pixel_grid(3, 4)
    inputs = torch.cat([coords, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1.0])[:, None]], dim=1)
    assert torch.allclose(net(inputs), base(inputs), atol=1e-6)
    assert torch.allclose(net(coords, torch.arange(12) % 5), net(inputs))
    # No shared storage: training one leaves the other alone.
    with torch.no_grad():
        net.layers[1].weight.add_(1.0)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="region ids"):
        net(torch.tensor([[0.0, 0.0, 5.0]]))


# -- region maps --------------------------------------------------------------------------------------------

def test_merge_regions_smallest_first_into_nearest_colour():
    labels = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 3, 1],
                       [2, 2, 2, 1]])
    pixels = np.zeros((4, 4, 3), dtype=np.float32)
    pixels[labels == 0] = [1, 0, 0]
    pixels[labels == 1] = [0, 0, 1]
    pixels[labels == 2] = [0.9, 0.1, 0]
    pixels[labels == 3] = [0, 0.1, 0.9]
    merged = merge_regions(pixels, labels, 2)
    # Region 3 (1 px) joins blue region 1; then region 0 (4 px, red) joins reddish region 2.
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert np.array_equal(merged, expected)


def test_absorb_small_components_fills_specks_from_neighbours():
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:, 4:] = 1
    labels[2, 1] = 7            # a speck inside region 0
    labels[5, 5:7] = 0          # a sliver of 0 inside region 1 (2 px)
    out = absorb_small_components(labels, min_pixels=3)
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[:, 4:] = 1
    assert np.array_equal(out, expected)


def test_embedded_regions_have_the_asked_count_deterministically():
    a = load_embedded_image("chelsea", size=40, num_regions=5, min_pixels=30)
    b = load_embedded_image("chelsea", size=40, num_regions=5, min_pixels=30)
    assert a.pixels.shape == (40, 60, 3) and a.pixels.dtype == np.float32
    assert a.num_regions == 5 and np.array_equal(a.regions, b.regions)
    assert min(a.region_sizes()) >= 30
    assert 0 <= a.pixels.min() and a.pixels.max() <= 1
    gray = load_embedded_image("camera", size=24, num_regions=3, segmenter="slic")
    assert gray.num_regions == 3 and gray.pixels.shape == (24, 24, 3)
    assert np.array_equal(gray.pixels[..., 0], gray.pixels[..., 2])  # grayscale broadcast


def test_region_image_validates():
    px = np.zeros((2, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="exactly 0..1"):
        RegionImage("x", px, np.array([[0, 0], [2, 2]]), ("a", "b"))
    with pytest.raises(ValueError, match="float32"):
        RegionImage("x", px.astype(np.float64), np.zeros((2, 2), dtype=np.int64), ("a",))


# -- ADE20K layouts ------------------------------------------------------------------------------------------

def _classes_map(h: int = 12, w: int = 10) -> np.ndarray:
    classes = np.full((h, w), 300, dtype=np.int64)  # a class above 255 exercises the R/G encoding
    classes[:, : w // 2] = 4
    classes[0, -1] = 9                               # a one-pixel speck: absorbed
    return classes


def _write_jpg(path, h: int = 12, w: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8)).save(path)


def test_ade20k_full_layout(tmp_path):
    classes = _classes_map()
    seg = np.zeros((*classes.shape, 3), dtype=np.uint8)
    seg[..., 0] = classes // 256 * 10
    seg[..., 1] = classes % 256
    seg[..., 2] = 7  # instance channel, ignored: all instances of a category form one region
    _write_jpg(tmp_path / "scene" / "ADE_0001.jpg")
    Image.fromarray(seg).save(tmp_path / "scene" / "ADE_0001_seg.png")
    (img,) = load_ade20k_folder(tmp_path, size=None, min_pixels=3)
    assert img.name == "ADE_0001" and img.pixels.shape == (12, 10, 3)
    assert img.region_names == ("class 4", "class 300") and img.region_sizes() == [60, 60]
    (small,) = load_ade20k_folder(tmp_path, size=6, min_pixels=2, class_names={300: "wall"})
    assert small.pixels.shape == (7, 6, 3) and small.region_names == ("class 4", "wall")


def test_ade20k_scene_parsing_layout_and_names(tmp_path):
    classes = _classes_map()
    classes[classes == 300] = 1
    _write_jpg(tmp_path / "images" / "training" / "ADE_train_1.jpg")
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(classes.astype(np.uint8), mode="L").save(tmp_path / "annotations" / "training" / "ADE_train_1.png")
    with open(tmp_path / "objectInfo150.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        w.writerow([1, 0.1, 1, 1, "wall"])
        w.writerow([4, 0.1, 1, 1, "floor;flooring"])
    (img,) = load_ade20k_folder(tmp_path, size=None, min_pixels=3)
    assert img.region_names == ("floor", "wall")
    assert np.array_equal(img.regions[:, :5], np.zeros((12, 5))) and np.all(img.regions[:, 5:] == 1)


def test_ade20k_missing_and_mismatched_label_maps(tmp_path):
    _write_jpg(tmp_path / "a.jpg")
    with pytest.raises(DatasetNotFoundError, match="no label map"):
        load_ade20k_folder(tmp_path)
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "a_seg.png")
    with pytest.raises(ValueError, match="same size"):
        load_ade20k_folder(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_ade20k_folder(tmp_path / "no_such_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_ade20k_folder(tmp_path / "empty")


# -- fitting and the figure ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_fit_one_region_loss_falls(tmp_path):
    torch.manual_seed(0)
    task = InrTask(load_embedded_image("astronaut", size=32, num_regions=4))
    net = CoordinateMLP()
    stream = task.region_stream(0)
    (x, y), = stream.epoch(torch.Generator())
    with torch.no_grad():
        before = float(stream.loss(net(x), y))
    train(net, None, stream, epochs=100, optimizer=OptimizerConfig(lr=1e-2), seed=0)
    with torch.no_grad():
        after = float(stream.loss(net(x), y))
    assert after < 0.5 * before
    image = task.reconstruct(lambda k, inputs: net(inputs))
    per_region = task.region_psnr(image)
    assert per_region[0] > max(per_region[1:])  # fitted on region 0 only
    path = tmp_path / "grid.png"
    save_grid(path, task.original(), {"dense 0%": image}, regions=task.image.regions)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind


@pytest.mark.slow
def test_inr_config_runs_per_image_and_averages(tmp_path):
    from routing_lottery.cli import packaged_config
    from routing_lottery.config import load_config
    from routing_lottery.run import make_runner

    config = load_config(packaged_config("inr"), "smoke", {
        "data": {"images": ["coffee", "camera"], "image_size": 16, "regions": 3},
        "pruning": {"sparsities": [0.5, 0.75]}, "training": {"imp_epochs": 5, "epochs": 5}})
    records = make_runner(config, tmp_path).run_all()
    images = {r["image"] for r in records}
    assert images == {"coffee", "camera", "mean"}
    per_image = [r for r in records if r["image"] != "mean"]
    assert len(per_image) == 2 * (1 + 3 * 2)  # dense + (single, multi, RTL) x 2 levels, per image
    means = {(r["method"], r["sparsity"]): r["psnr"] for r in records if r["image"] == "mean"}
    rtl = [r["psnr"] for r in per_image if r["method"] == "rtl" and r["sparsity"] == 0.5]
    assert means[("rtl", 0.5)] == pytest.approx(sum(rtl) / 2)
    assert all(math.isfinite(r["psnr"]) and "psnr_context_2" in r for r in per_image)
    assert "of 2 images" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "images" / "coffee" / "reconstructions.png").stat().st_size > 1000


def test_check_task_passes_the_inr_task():
    from routing_lottery.experiments import check_task

    check_task(InrTask(_toy_image(), hidden=8, depth=2, octaves=2))


def test_reconstruction_grid_has_one_row_per_level_and_one_column_per_method(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.random((8, 10, 3))
    noisy = lambda scale: np.clip(original + rng.normal(0, scale, original.shape), 0, 1)
    images = {("dense", 0.0): noisy(0.01)}
    for level in (0.8, 0.5):  # given out of order: rows still ascend
        images.update({(method, level): noisy(level / 10) for method in ("rtl", "single_imp", "multi_imp")})
    fig = save_grid(tmp_path / "grid.png", original, images, regions=np.arange(80).reshape(8, 10) // 40)
    cells = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start): ax.get_title() for ax in fig.axes}
    assert [cells[(0, c)].split("\n")[0] for c in range(3)] == ["original", "regions (2)", "dense 0%"]
    for row, level in ((1, "50%"), (2, "80%")):  # methods side by side, in the table's order
        assert [cells[(row, c)].split("\n")[0] for c in range(3)] == [f"single IMP {level}", f"multiple IMP {level}", f"RTL {level}"]
    assert cells[(1, 2)].split("\n")[1] == f"{psnr(images[('rtl', 0.5)], original):.2f} dB"
    assert len(cells) == 3 + 2 * 3
    with Image.open(tmp_path / "grid.png") as png:
        assert png.format == "PNG"

    fig = save_grid(tmp_path / "one.png", original, {("rtl", 0.5): original})  # one method, one level
    assert sorted((ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in fig.axes) == [(0, 0), (1, 0)]
