"""Images split into regions: the contexts of the INR experiment (one ticket per image region).

A ``RegionImage`` is one photograph plus a map that gives every pixel a region id. Two sources:

Embedded default (no download)
    Ten photographs shipped inside the scikit-image wheel (``EMBEDDED_IMAGES``), resized with
    anti-aliasing to a settable short side, with regions from an unsupervised segmentation
    (Felzenszwalb's graph segmentation, or SLIC superpixels) merged down to a settable count.
Full scale: ADE20K
    A folder in one of ADE20K's two layouts (see ``load_ade20k_folder``); the category label map
    gives the regions, and all instances of one category form one region, as in the paper.

Both sources go through the same two deterministic rules, kept as pure functions so they can be
tested on hand-made arrays:

``absorb_small_components(labels, min_pixels)``
    Noise and boundary specks: every 4-connected component of one label with fewer than
    ``min_pixels`` pixels is dissolved, and each of its pixels takes the label of the *nearest*
    pixel (Euclidean distance) that lies in a component of at least ``min_pixels``. So a speck
    goes to the region(s) that surround it, and a thin sliver along a boundary is split between
    the two regions it separates.
``merge_regions(pixels, labels, num_regions, min_pixels)``
    Down to a count: repeatedly take the smallest region (ties: the lower id) and merge it into
    the adjacent region (4-neighbourhood) whose mean colour is closest in CIELAB (ties: the lower
    id), until ``num_regions`` remain and none is smaller than ``min_pixels``.

Final region ids are renumbered ``0 .. R-1`` in raster order of each region's first pixel.
"""

from __future__ import annotations

import csv
import heapq
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .images import DatasetNotFoundError

__all__ = [
    "EMBEDDED_IMAGES", "RegionImage", "absorb_small_components", "merge_regions", "renumber",
    "resize_pixels", "resize_labels", "segment", "load_embedded_image", "load_embedded_images",
    "load_ade20k_image", "load_ade20k_folder", "ade20k_full_classes",
]

EMBEDDED_IMAGES: tuple[str, ...] = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle",
    "hubble_deep_field", "immunohistochemistry", "retina", "coins",
)
"""The embedded default: photographs whose files are inside the scikit-image wheel (no pooch download).

``motorcycle`` is the left view of ``skimage.data.stereo_motorcycle()`` (scikit-image 0.26 has no
``motorcycle_left`` function). ``camera`` and ``coins`` are grayscale and are repeated over 3 channels.
"""

Segmenter = Literal["felzenszwalb", "slic"]
Layout = Literal["auto", "ade20k", "sceneparsing"]


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields explicitly
class RegionImage:
    """One image and its region map: the data of one INR experiment.

    Attributes
    ----------
    name : what the image is called in reports.
    pixels : float32 ``(H, W, 3)`` in [0, 1].
    regions : int64 ``(H, W)``; ids ``0 .. R-1``, every id present (a ticket per id must have pixels).
    region_names : ``R`` distinct names, one per id.
    """

    name: str
    pixels: np.ndarray
    regions: np.ndarray
    region_names: tuple[str, ...]

    def __post_init__(self) -> None:
        p, r = self.pixels, self.regions
        if not isinstance(p, np.ndarray) or p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(f"{self.name}: pixels must be an (H, W, 3) array; got {getattr(p, 'shape', type(p))}")
        if p.dtype != np.float32:
            raise ValueError(f"{self.name}: pixels must be float32; got {p.dtype}")
        if p.size and not (0.0 <= float(p.min()) and float(p.max()) <= 1.0):
            raise ValueError(f"{self.name}: pixels must lie in [0, 1]; got {float(p.min())}..{float(p.max())}")
        if not isinstance(r, np.ndarray) or r.shape != p.shape[:2]:
            raise ValueError(f"{self.name}: regions must be an {p.shape[:2]} array; got {getattr(r, 'shape', type(r))}")
        if r.dtype != np.int64:
            raise ValueError(f"{self.name}: regions must be int64; got {r.dtype}")
        present = np.unique(r)
        expected = np.arange(len(self.region_names))
        if not np.array_equal(present, expected):
            raise ValueError(f"{self.name}: region ids must be exactly 0..{len(self.region_names) - 1} (one per "
                             f"region name, each present); got ids {present.tolist()[:20]}")
        if len(set(self.region_names)) != len(self.region_names):
            raise ValueError(f"{self.name}: region names must be distinct; got {list(self.region_names)}")

    @property
    def num_regions(self) -> int:
        return len(self.region_names)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def region_sizes(self) -> list[int]:
        """Pixels per region, by id."""
        return np.bincount(self.regions.ravel(), minlength=self.num_regions).tolist()


# -- the two region rules ---------------------------------------------------------------------

def renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``0 .. R-1`` in raster order of first appearance; also returns the old id of each new id."""
    flat = labels.ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # old-sorted index -> rank by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    old_ids = flat[np.sort(first)]
    return rank[inverse.ravel()].reshape(labels.shape).astype(np.int64), old_ids


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal label, numbered from 0."""
    from skimage.measure import label as connected

    # background=-1 with labels >= 0 shifted by one: no value is treated as background.
    return connected(labels.astype(np.int64) + 1, background=0, connectivity=1).astype(np.int64) - 1


def absorb_small_components(labels: np.ndarray, min_pixels: int) -> np.ndarray:
    """Dissolve every 4-connected component smaller than ``min_pixels`` into its nearest large neighbour.

    Each pixel of a small component takes the label of the nearest pixel (Euclidean; ties as
    ``scipy.ndimage.distance_transform_edt`` breaks them, deterministically) that lies in a
    component of at least ``min_pixels`` pixels. The fill can, rarely, leave a new small sliver, so
    the rule repeats until none is left. If no component reaches ``min_pixels``, the largest one
    (ties: the first in raster order) is kept as the seed. Labels are returned as given (not renumbered).
    """
    from scipy.ndimage import distance_transform_edt

    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D; got shape {labels.shape}")
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1; got {min_pixels}")
    out = labels.astype(np.int64, copy=True)
    for _ in range(16):
        comp = _components(out)
        sizes = np.bincount(comp.ravel())
        small = sizes < min_pixels
        if not small.any():
            return out
        if small.all():
            small[int(np.argmax(sizes))] = False
        unassigned = small[comp]
        _, (rows, cols) = distance_transform_edt(unassigned, return_indices=True)
        out = out[rows, cols]
    return out


def merge_regions(pixels: np.ndarray, labels: np.ndarray, num_regions: int, min_pixels: int = 1) -> np.ndarray:
    """Merge regions until ``num_regions`` remain and each has at least ``min_pixels`` pixels.

    The rule, applied one merge at a time: take the smallest region (ties: the lower current id)
    and merge it into the 4-adjacent region whose mean colour (CIELAB, size-weighted over the
    merged pixels) is closest (ties: the lower id). Smallest-first removes the regions least
    worth a ticket; nearest-colour keeps the merged regions visually coherent. If ``min_pixels``
    cannot be met with ``num_regions`` regions, merging goes on below ``num_regions`` (with a
    warning) rather than keep a region too small to train on. A map that already has at most
    ``num_regions`` regions is only checked against ``min_pixels``.

    Returns ids ``0 .. R-1`` renumbered in raster order (see ``renumber``).
    """
    from skimage.color import rgb2lab

    if pixels.shape[:2] != labels.shape or pixels.ndim != 3:
        raise ValueError(f"pixels (H, W, 3) and labels (H, W) must match; got {pixels.shape} and {labels.shape}")
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1; got {num_regions}")
    ids, _ = renumber(labels)
    n = int(ids.max()) + 1
    flat = ids.ravel()
    size = np.bincount(flat, minlength=n).astype(np.int64)
    lab = rgb2lab(np.clip(pixels, 0.0, 1.0)).reshape(-1, 3)
    colour_sum = np.stack([np.bincount(flat, weights=lab[:, c], minlength=n) for c in range(3)], axis=1)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    pairs = np.concatenate([
        np.stack([ids[:, :-1].ravel(), ids[:, 1:].ravel()], axis=1),
        np.stack([ids[:-1, :].ravel(), ids[1:, :].ravel()], axis=1),
    ])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    for a, b in np.unique(np.sort(pairs, axis=1), axis=0).tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)

    parent = np.arange(n)
    alive = n
    heap = [(int(size[r]), r) for r in range(n)]
    heapq.heapify(heap)
    while alive > 1 and heap:
        s_size, s = heap[0]
        if parent[s] != s or s_size != size[s]:
            heapq.heappop(heap)  # stale: merged away, or grown since pushed
            continue
        if alive <= num_regions and s_size >= min_pixels:
            break
        heapq.heappop(heap)
        if not neighbours[s]:
            continue  # cannot happen on a connected pixel grid with more than one region
        mean_s = colour_sum[s] / size[s]
        t = min(neighbours[s], key=lambda r: (float(np.sum((colour_sum[r] / size[r] - mean_s) ** 2)), r))
        parent[s] = t
        size[t] += size[s]
        colour_sum[t] += colour_sum[s]
        for r in neighbours[s]:
            neighbours[r].discard(s)
            if r != t:
                neighbours[r].add(t)
                neighbours[t].add(r)
        neighbours[s] = set()
        alive -= 1
        heapq.heappush(heap, (int(size[t]), t))
    if alive < num_regions:
        warnings.warn(f"merge_regions: only {alive} regions of at least {min_pixels} pixels fit, "
                      f"fewer than the {num_regions} asked for", stacklevel=2)
    root = parent.copy()
    while True:  # path compression by repeated lookup: parent chains are short
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return renumber(root[ids])[0]


# -- resizing -----------------------------------------------------------------------------------

def _target_shape(shape: tuple[int, int], short_side: int | None) -> tuple[int, int]:
    h, w = shape
    if short_side is None:
        return h, w
    if short_side < 1:
        raise ValueError(f"size (short side) must be >= 1 or None; got {short_side}")
    scale = short_side / min(h, w)
    return (short_side, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), short_side)


def resize_pixels(pixels: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize an ``(H, W, 3)`` float image so its short side is ``short_side`` (anti-aliased when shrinking)."""
    from skimage.transform import resize

    shape = _target_shape(pixels.shape[:2], short_side)
    if shape == pixels.shape[:2]:
        return pixels.astype(np.float32, copy=True)
    out = resize(pixels, shape, order=1, anti_aliasing=shape[0] < pixels.shape[0], preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def resize_labels(labels: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize a label map by nearest neighbour (labels are categories: never interpolated or blurred)."""
    from skimage.transform import resize

    shape = _target_shape(labels.shape, short_side)
    if shape == labels.shape:
        return labels.astype(np.int64, copy=True)
    out = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True)
    return np.rint(out).astype(np.int64)


def _default_min_pixels(shape: tuple[int, ...]) -> int:
    """0.2 % of the image: specks below this are segmentation noise, not regions worth a ticket."""
    return max(1, math.ceil(0.002 * shape[0] * shape[1]))


# -- embedded default -----------------------------------------------------------------------------

def _embedded_rgb(name: str) -> np.ndarray:
    import skimage.data

    if name not in EMBEDDED_IMAGES:
        raise ValueError(f"unknown embedded image {name!r}; choose from {list(EMBEDDED_IMAGES)}")
    raw = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(raw)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def segment(pixels: np.ndarray, segmenter: Segmenter = "felzenszwalb") -> np.ndarray:
    """An unsupervised over-segmentation of ``pixels`` (many small regions; ``merge_regions`` reduces them).

    Both segmenters are deterministic. Felzenszwalb's scale grows with the image so the number of
    segments stays in the hundreds at any size; SLIC asks for about one superpixel per 64 pixels,
    capped at 1,000.
    """
    from skimage.segmentation import felzenszwalb, slic

    h, w = pixels.shape[:2]
    if segmenter == "felzenszwalb":
        return felzenszwalb(pixels, scale=max(h, w) / 4, sigma=0.5, min_size=max(4, h * w // 4000)).astype(np.int64)
    if segmenter == "slic":
        n = int(min(1000, max(16, h * w // 64)))
        return slic(pixels, n_segments=n, compactness=10.0, start_label=0, channel_axis=-1).astype(np.int64)
    raise ValueError(f"segmenter must be 'felzenszwalb' or 'slic'; got {segmenter!r}")


def load_embedded_image(
    name: str,
    size: int | None = 256,
    num_regions: int = 8,
    min_pixels: int | None = None,
    segmenter: Segmenter = "felzenszwalb",
) -> RegionImage:
    """One of ``EMBEDDED_IMAGES`` resized to short side ``size`` with ``num_regions`` unsupervised regions.

    Steps: resize (anti-aliased) -> over-segment (``segment``) -> ``merge_regions`` to
    ``num_regions`` with every region at least ``min_pixels`` (default 0.2 % of the resized image).
    ``absorb_small_components`` is not needed here: the segments are connected, and merging
    smallest-first already dissolves every segment below ``min_pixels`` into its most similar
    neighbour (dissolving all small superpixels by distance would erase a fine over-segmentation).
    Regions are named ``"region 0"`` .. in raster order. Deterministic: same arguments, same map.

    Example
    -------
    >>> img = load_embedded_image("chelsea", size=64, num_regions=6)
    >>> img.pixels.shape, img.num_regions
    ((64, 96, 3), 6)
    """
    pixels = resize_pixels(_embedded_rgb(name), size)
    min_px = _default_min_pixels(pixels.shape) if min_pixels is None else min_pixels
    regions = merge_regions(pixels, segment(pixels, segmenter), num_regions, min_px)
    return RegionImage(name, pixels, regions, tuple(f"region {k}" for k in range(int(regions.max()) + 1)))


def load_embedded_images(
    size: int | None = 256,
    num_regions: int = 8,
    names: Sequence[str] = EMBEDDED_IMAGES,
    min_pixels: int | None = None,
    segmenter: Segmenter = "felzenszwalb",
) -> list[RegionImage]:
    """``load_embedded_image`` for each of ``names`` (default: all ten)."""
    return [load_embedded_image(n, size, num_regions, min_pixels, segmenter) for n in names]


# -- ADE20K ---------------------------------------------------------------------------------------

def ade20k_full_classes(rgb: np.ndarray) -> np.ndarray:
    """Class index per pixel of a full-ADE20K ``*_seg.png``: ``R // 10 * 256 + G`` (B encodes instances)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"an ADE20K *_seg.png must be RGB; got shape {rgb.shape}")
    return rgb[:, :, 0].astype(np.int64) // 10 * 256 + rgb[:, :, 1].astype(np.int64)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_label_map(path: Path, layout: Literal["ade20k", "sceneparsing"]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if layout == "ade20k":
            return ade20k_full_classes(np.asarray(im.convert("RGB")))
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: a SceneParsing annotation must be a single-channel PNG of class "
                             f"indices; got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def load_ade20k_image(
    image_path: str | Path,
    label_path: str | Path,
    layout: Literal["ade20k", "sceneparsing"],
    size: int | None = 256,
    min_pixels: int | None = None,
    max_regions: int | None = None,
    class_names: Mapping[int, str] | None = None,
) -> RegionImage:
    """One image and its category label map as a ``RegionImage``: one region per category present.

    ``layout="ade20k"``: ``label_path`` is a full-dataset ``*_seg.png`` (class = R // 10 * 256 + G);
    ``"sceneparsing"``: a single-channel PNG of class indices (ADEChallengeData2016). Class 0
    (unlabelled / "other") is treated like any category: its large areas stay a region named
    ``class_names.get(0, "unlabelled")`` and its specks are absorbed like any speck.

    Steps: check sizes match -> resize (pixels anti-aliased, labels nearest) ->
    ``absorb_small_components`` (``min_pixels`` default 0.2 % of the image) -> ``merge_regions``
    down to ``max_regions`` if given. A merged region keeps the name of the region it merged into.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    if not label_path.is_file():
        raise DatasetNotFoundError(f"label map {label_path} for image {image_path} does not exist")
    rgb = _read_rgb(image_path)
    classes = _read_label_map(label_path, layout)
    if classes.shape != rgb.shape[:2]:
        raise ValueError(f"label map {label_path} is {classes.shape[1]}x{classes.shape[0]} (W x H) but image "
                         f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]}: they must have the same size")
    pixels = resize_pixels(rgb.astype(np.float32) / 255.0, size)
    classes = resize_labels(classes, size)
    min_px = _default_min_pixels(pixels.shape) if min_pixels is None else min_pixels
    classes = absorb_small_components(classes, min_px)
    if max_regions is not None:
        # merge_regions renumbers; recover each merged region's class as the majority class under it.
        merged = merge_regions(pixels, classes, max_regions, min_px)
        pairs, count = np.unique(np.stack([merged.ravel(), classes.ravel()], axis=1), axis=0, return_counts=True)
        # Rows are sorted by (region, class); lexsort picks, per region, the largest count, ties to the lower class.
        best = np.lexsort((pairs[:, 1], -count, pairs[:, 0]))
        first = np.unique(pairs[best, 0], return_index=True)[1]
        class_of = pairs[best[first], 1].tolist()
        regions = merged
    else:
        regions, old = renumber(classes)
        class_of = old.tolist()
    names = class_names or {}
    region_names = tuple(names.get(c, "unlabelled" if c == 0 else f"class {c}") for c in class_of)
    return RegionImage(image_path.stem, pixels, regions, region_names)


def _scene_parsing_names(folder: Path) -> dict[int, str]:
    """Class names from ``objectInfo150.csv`` (SceneParsing: columns Idx, Ratio, Train, Val, Name), if present."""
    for candidate in (folder / "objectInfo150.csv", folder.parent / "objectInfo150.csv"):
        if candidate.is_file():
            with candidate.open(newline="") as f:
                rows = csv.DictReader(f)
                return {int(row["Idx"]): row["Name"].split(";")[0].strip() for row in rows}
    return {}


def load_ade20k_folder(
    folder: str | Path,
    size: int | None = 256,
    limit: int | None = 10,
    layout: Layout = "auto",
    min_pixels: int | None = None,
    max_regions: int | None = None,
    class_names: Mapping[int, str] | None = None,
) -> list[RegionImage]:
    """The first ``limit`` images (sorted by path) of a folder in an ADE20K layout.

    Layouts (``layout="auto"`` picks SceneParsing when ``folder/images`` and ``folder/annotations``
    both exist, else full ADE20K):

    - ``"ade20k"`` (the full dataset): ``**/NAME.jpg`` with ``NAME_seg.png`` beside it; class =
      R // 10 * 256 + G of the seg PNG.
    - ``"sceneparsing"`` (ADEChallengeData2016): ``images/**/NAME.jpg`` and
      ``annotations/**/NAME.png`` at the same relative path, one class index per pixel. Names come
      from ``objectInfo150.csv`` in the folder (or its parent) when present.

    ``class_names`` overrides names per class index. Raises ``DatasetNotFoundError`` when the folder
    holds no images or an image has no label map, and ``ValueError`` when a label map's size differs
    from its image's.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetNotFoundError(f"ADE20K folder {root} does not exist")
    if layout == "auto":
        layout = "sceneparsing" if (root / "images").is_dir() and (root / "annotations").is_dir() else "ade20k"
    if layout == "sceneparsing":
        images = sorted(p for p in (root / "images").rglob("*.jpg"))
        labels = [root / "annotations" / p.relative_to(root / "images").with_suffix(".png") for p in images]
        names = {**_scene_parsing_names(root), **(class_names or {})}
        expected = f"{root}/images/**/*.jpg with {root}/annotations/**/*.png"
    elif layout == "ade20k":
        images = sorted(root.rglob("*.jpg"))
        labels = [p.with_name(p.stem + "_seg.png") for p in images]
        names = dict(class_names or {})
        expected = f"{root}/**/*.jpg with *_seg.png beside each"
    else:
        raise ValueError(f"layout must be 'auto', 'ade20k' or 'sceneparsing'; got {layout!r}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or None; got {limit}")
        images, labels = images[:limit], labels[:limit]
    if not images:
        raise DatasetNotFoundError(f"no images in {root}: expected the {layout} layout, {expected}")
    missing = [str(lab) for lab in labels if not lab.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} image(s) in {root} have no label map ({layout} layout, "
                                   f"{expected}); first missing: {missing[:3]}")
    return [load_ade20k_image(img, lab, layout, size, min_pixels, max_regions, names)
            for img, lab in zip(images, labels)]
