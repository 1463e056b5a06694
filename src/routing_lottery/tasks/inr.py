"""Implicit neural representation of one image, with one context (ticket) per image region.

A coordinate network maps a pixel's position to its colour. The contexts are the regions of the
image (``data.regions.RegionImage``): RTL extracts one ticket per region from one shared network,
and every pixel is evaluated by its own region's subnetwork.

Input convention (shared with ``models.inr``)
    Every batch's inputs are a float32 tensor ``(N, 3)``, columns ``x, y, region id``. ``x`` runs
    along the image's width and ``y`` down its height, both in [-1, 1] at pixel centres
    (``-1 + (2j + 1) / W`` for column ``j``; each axis is scaled on its own, so a non-square
    image is stretched to the square). The region id is stored as a float (exact below 2**24)
    so that one plain tensor serves every model through ``model(inputs)``: ``CoordinateMLP``
    ignores the third column, ``RegionEmbeddingMLP`` embeds it, and a routed model reads it
    with ``models.inr.region_ids_of(inputs)``. Targets are float32 ``(N, 3)`` RGB in [0, 1].
    Pixel ``p`` is row ``p // W``, column ``p % W`` (row-major).

Full batch
    The paper trains coordinate MLPs full-batch: ``batch_size=None`` makes a stream's epoch one
    batch holding all of its pixels, so with the core loops *epochs are steps*
    (``train(..., epochs=steps)``, ``extract_ticket(..., epochs_per_round=steps)``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from torch import nn

from ..data.regions import RegionImage
from ..models.inr import CoordinateMLP, RegionEmbeddingMLP
from ..fingerprint import fingerprint
from ..errors import CheckpointError
from ..io import atomic_write_bytes, atomic_write_with_sha256, read_with_sha256
from ..methods import method_label
from ..report import method_rank, per_context_key
from ..training import Batch, Stream
from .base import output_problem, rows_by_context, verified_outputs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["InrTask", "PredictRegion", "pixel_grid", "psnr", "save_grid"]

PredictRegion = Callable[[int, torch.Tensor], torch.Tensor]
"""``predict(k, inputs)``: RGB ``(n, 3)`` for ``(n, 3)`` input rows that all belong to region ``k``."""


def pixel_grid(height: int, width: int) -> torch.Tensor:
    """Pixel-centre coordinates ``(H*W, 2)`` as ``(x, y)`` in [-1, 1], row-major (see the module docstring).

    Centres, not edges: the grid is symmetric about 0 and never touches +-1, so no pixel sits
    where the Fourier features of opposite edges coincide.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1; got {height}x{width}")
    ys = (2 * torch.arange(height, dtype=torch.float64) + 1) / height - 1
    xs = (2 * torch.arange(width, dtype=torch.float64) + 1) / width - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).float()


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak**2 / MSE)``; ``inf`` for identical inputs.

    Computed in float64 so that near-identical images do not round to a spurious ``inf``.
    """
    ta = torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a).double()
    tb = torch.as_tensor(np.asarray(b) if isinstance(b, np.ndarray) else b).double()
    if ta.shape != tb.shape:
        raise ValueError(f"psnr needs arrays of one shape; got {tuple(ta.shape)} and {tuple(tb.shape)}")
    if ta.numel() == 0:
        raise ValueError("psnr of empty arrays is undefined")
    if peak <= 0:
        raise ValueError(f"peak must be > 0; got {peak}")
    mse = float(torch.mean((ta - tb) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


@dataclass(eq=False)  # holds tensors: identity, not element-wise equality
class InrTask:
    """One ``RegionImage`` as training streams (one per region, or all pixels) and its scoring.

    Parameters
    ----------
    image : the image and its region map.
    eval_batch_size : rows per forward pass in ``reconstruct`` (bounds evaluation memory).

    Example
    -------
    >>> from routing_lottery.data.regions import load_embedded_image
    >>> from routing_lottery.training import OptimizerConfig, train
    >>> task = InrTask(load_embedded_image("chelsea", size=32, num_regions=4))
    >>> stream = task.region_stream(0)                       # full batch: one batch per epoch
    >>> net = CoordinateMLP()
    >>> train(net, None, stream, epochs=20, optimizer=OptimizerConfig(lr=1e-2), seed=0)
    >>> image = task.reconstruct(lambda k, x: net(x))
    >>> psnr, per_region = task.psnr(image), task.region_psnr(image)
    >>> len(per_region)
    4
    """

    image: RegionImage
    eval_batch_size: int = 65536
    batch_size: int | None = None  # pixels per training step; None: full batch (the paper)
    hidden: int = 128
    depth: int = 4
    octaves: int = 8
    embed_dim: int = 16  # the single-mask baseline's region embedding
    shared_epoch_factor = 1  # every pixel is seen once per epoch by both the shared and the region streams
    # A pixel's region is part of its input (the region map, column 2 of ``inputs``): routing needs no
    # router, and inferred routing is oracle routing. Routing errors are still measured.
    context_is_label = False
    context_from_input = True
    routers: tuple[str, ...] = ()
    coords: torch.Tensor = field(init=False, repr=False)
    region_ids: torch.Tensor = field(init=False, repr=False)
    inputs: torch.Tensor = field(init=False, repr=False)
    targets: torch.Tensor = field(init=False, repr=False)
    region_index: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1; got {self.eval_batch_size}")
        img = self.image
        self.coords = pixel_grid(img.height, img.width)
        self.region_ids = torch.as_tensor(img.regions.reshape(-1), dtype=torch.long)
        self.inputs = torch.cat([self.coords, self.region_ids[:, None].float()], dim=1)
        self.targets = torch.as_tensor(img.pixels.reshape(-1, 3), dtype=torch.float32)
        self.region_index = [(self.region_ids == k).nonzero(as_tuple=True)[0] for k in range(img.num_regions)]

    # -- shape of the data --------------------------------------------------------------------
    @property
    def num_contexts(self) -> int:
        """Number of regions: the K of this experiment."""
        return self.image.num_regions

    @property
    def context_names(self) -> tuple[str, ...]:
        return self.image.region_names

    @property
    def context_sizes(self) -> list[int]:
        """Pixels per region."""
        return [len(i) for i in self.region_index]

    @property
    def num_pixels(self) -> int:
        return len(self.region_ids)

    def original(self) -> torch.Tensor:
        """The target image ``(H, W, 3)``."""
        return self.targets.reshape(self.image.height, self.image.width, 3)

    # -- the Task contract (tasks.base) ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.image.name

    def data_fingerprint(self) -> str:
        return fingerprint(self.image.name, self.inputs, self.targets, list(self.context_names))

    def build_model(self) -> nn.Module:
        return CoordinateMLP(hidden=self.hidden, depth=self.depth, octaves=self.octaves)

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        """The paper's single-mask baseline: RTL's network plus a region embedding, same initial shared columns."""
        return RegionEmbeddingMLP.from_coordinate_mlp(model, self.num_contexts, embed_dim=self.embed_dim)

    def context_stream(self, k: int) -> Stream:
        return self.region_stream(k, self.batch_size)

    def shared_stream(self) -> Stream:
        return self.all_pixels_stream(self.batch_size)

    def score_shared(self, predict: Callable[[torch.Tensor], torch.Tensor], label: str = "",
                     outputs: Path | None = None) -> list[dict]:
        return self._score(self.reconstruct(lambda k, x: predict(x)), label, outputs)

    def score_routed(self, predict: PredictRegion, label: str = "", outputs: Path | None = None,
                     chosen: torch.Tensor | None = None) -> list[dict]:
        """PSNR with every pixel reconstructed by its region's subnetwork, or by ``chosen[i]``'s."""
        return self._score(self.reconstruct(predict, chosen=chosen), label, outputs)

    def context_examples(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pixel's inputs and region (an INR's training and test pixels are the same)."""
        if split not in ("train", "test"):
            raise ValueError(f"an INR has train and test pixels only (the same); got split {split!r}")
        return self.inputs, self.region_ids

    def _score(self, reconstruction: torch.Tensor, label: str, outputs: Path | None) -> list[dict]:
        if outputs is not None and label:
            buffer = io.BytesIO()
            np.save(buffer, reconstruction.numpy())
            atomic_write_with_sha256(outputs / f"{label}.npy", buffer.getvalue())
        row: dict = {"image": self.image.name, "psnr": self.psnr(reconstruction)}
        row.update({per_context_key("psnr", k): v for k, v in enumerate(self.region_psnr(reconstruction))})
        return [row]

    def load_output(self, path: Path) -> np.ndarray:
        """A reconstruction ``(H, W, 3)`` kept by ``score_*``, verified against its checksum; else ``CheckpointError``."""
        data = read_with_sha256(path)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:  # noqa: BLE001 -- NumPy raises several types for a malformed header
            raise CheckpointError(f"{path} is not a NumPy array file ({type(err).__name__}: {err})") from None
        shape = (self.image.height, self.image.width, 3)
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != np.float32:
            found = (array.shape, array.dtype) if isinstance(array, np.ndarray) else type(array).__name__
            raise CheckpointError(f"{path} is not a reconstruction of this image: expected float32 {shape}, got {found}")
        return array

    def output_problem(self, outputs: Path, label: str) -> str | None:
        """Why the reconstruction ``score_*`` kept for ``label`` is missing or unusable; None when it verifies."""
        return output_problem(self.load_output, outputs / f"{label}.npy")

    def write_figures(self, outputs: Path) -> list[Path]:
        """``reconstructions.png`` beside ``outputs``: the original, the region map and dense in the first
        row, then one row per sparsity with one column per method (``save_grid``).

        Only verified reconstructions are drawn; one that fails its checksum is left out with a
        warning naming it (a resumed run has recomputed the ones its records refer to by now)."""
        if not outputs.is_dir():
            return []
        path = outputs.parent / "reconstructions.png"
        images = verified_outputs(outputs, "*.npy", self.load_output, path, rank=method_rank)
        save_grid(path, self.original(), images, regions=self.image.regions,
                  title=f"{self.image.name}: reconstructions by sparsity (rows) and method (columns), PSNR in dB")
        return [path]

    # -- what each subnetwork trains on -----------------------------------------------------------
    def _check_region(self, k: int) -> int:
        if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < self.num_contexts:
            raise ValueError(f"region id {k!r} is outside 0..{self.num_contexts - 1}")
        return int(k)

    def region_stream(self, k: int, batch_size: int | None = None) -> Stream:
        """Region ``k``'s pixels with MSE loss; ``batch_size=None``: all of them in one batch per epoch."""
        k = self._check_region(k)
        return self._stream(self.context_names[k], self.region_index[k], batch_size)

    def all_pixels_stream(self, batch_size: int | None = None) -> Stream:
        """Every pixel with MSE loss (dense and single-mask training); inputs carry the region id column."""
        return self._stream("all pixels", torch.arange(self.num_pixels), batch_size)

    def _stream(self, name: str, index: torch.Tensor, batch_size: int | None) -> Stream:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch); got {batch_size}")
        x, y = self.inputs[index], self.targets[index]
        n = len(index)
        if batch_size is None or batch_size >= n:
            full: list[Batch] = [(x, y)]

            # The order inside a full batch does not change a mean loss: skip the shuffle.
            return Stream(name, lambda gen: full, F.mse_loss, 1)

        def epoch(gen: torch.Generator) -> list[Batch]:
            order = torch.randperm(n, generator=gen)
            return [(x[i], y[i]) for i in order.split(batch_size)]

        return Stream(name, epoch, F.mse_loss, -(-n // batch_size))

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, predict_region: PredictRegion, clamp: bool = True,
                    device: torch.device | str = "cpu", chosen: torch.Tensor | None = None) -> torch.Tensor:
        """The image ``(H, W, 3)`` with every pixel predicted exactly once, by its own region's predictor.

        ``predict_region(k, inputs)`` gets only region ``k``'s input rows (``(n, 3)``, see the
        module docstring) in chunks of ``eval_batch_size``: for RTL, ``lambda k, x:
        routed.subnetwork(x, k)``; for a single network, ``lambda k, x: net(x)``. Colours are
        clamped to [0, 1] when ``clamp`` (the image's range: clamping can only lower the error).
        ``chosen`` (one region id per pixel) sends pixel i to ``chosen[i]``'s predictor instead of its
        own region's (a router's choice, or injected routing errors).
        """
        groups = self.region_index if chosen is None else rows_by_context(chosen, self.num_contexts, self.num_pixels)
        out = torch.full((self.num_pixels, 3), math.nan)
        for k, index in enumerate(groups):
            if not len(index):
                continue
            for rows in index.split(self.eval_batch_size):
                y = predict_region(k, self.inputs[rows].to(device))
                if tuple(y.shape) != (len(rows), 3):
                    raise ValueError(f"predict_region({k}, inputs) must return ({len(rows)}, 3); got {tuple(y.shape)}")
                out[rows] = y.detach().float().cpu()
        if clamp:
            out = out.clamp(0.0, 1.0)
        return out.reshape(self.image.height, self.image.width, 3)

    def _as_flat(self, reconstruction: torch.Tensor | np.ndarray) -> torch.Tensor:
        rec = torch.as_tensor(reconstruction, dtype=torch.float32)
        if rec.shape != (self.image.height, self.image.width, 3):
            raise ValueError(f"reconstruction must be ({self.image.height}, {self.image.width}, 3); got {tuple(rec.shape)}")
        return rec.reshape(-1, 3)

    def psnr(self, reconstruction: torch.Tensor | np.ndarray) -> float:
        """PSNR (dB, peak 1) of a reconstruction against the whole image."""
        return psnr(self._as_flat(reconstruction), self.targets)

    def region_psnr(self, reconstruction: torch.Tensor | np.ndarray) -> list[float]:
        """PSNR (dB) over each region's pixels, by region id."""
        rec = self._as_flat(reconstruction)
        return [psnr(rec[i], self.targets[i]) for i in self.region_index]


def save_grid(
    path: str | Path,
    original: torch.Tensor | np.ndarray,
    reconstructions: Mapping[tuple[str, float] | str, torch.Tensor | np.ndarray],
    regions: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """Write a PNG grid of reconstructions, methods at one sparsity side by side, and return the figure.

    Parameters
    ----------
    reconstructions : ``(method, sparsity) -> (H, W, 3)`` image. The first row holds the original,
        the region map (``regions``, optional) and the reconstructions at sparsity 0 (dense); then
        one row per sparsity, ascending, with one column per method in the table's order
        (``report.method_rank``), a blank cell where a method lacks that level. Each panel is titled
        with the method's table label and its PSNR against ``original``. A plain string key is a
        ready-made title and joins the first row.

    Rendered with a bare ``matplotlib.figure.Figure`` (Agg, no pyplot state, safe in threads and
    headless) into memory, then written atomically (temporary file + ``os.replace``), so a killed
    run never leaves half a PNG.
    """
    from matplotlib.figure import Figure

    target = _to_image(original)
    first: list[tuple[str, np.ndarray, str | None]] = [("original", target, None)]
    if regions is not None:
        first.append((f"regions ({int(np.max(regions)) + 1})", np.asarray(regions), "tab20"))
    pruned: dict[float, dict[str, np.ndarray]] = {}
    for key, img in reconstructions.items():
        image = _to_image(img)
        if isinstance(key, str):
            first.append((key, image, None))
            continue
        method, level = key
        if float(level) == 0.0:
            first.append((f"{method_label(method)} 0%\n{psnr(image, target):.2f} dB", image, None))
        else:
            pruned.setdefault(float(level), {})[method] = image
    levels = sorted(pruned)
    methods = sorted({m for row in pruned.values() for m in row}, key=lambda m: (method_rank(m), m))
    cols = max(len(first), len(methods))
    rows = 1 + len(levels)
    h, w = target.shape[:2]
    panel_w = 2.6
    fig = Figure(figsize=(cols * panel_w, rows * (panel_w * h / w + 0.55)), dpi=100)
    grid = fig.add_gridspec(rows, cols)

    def panel(row: int, col: int, label: str, img: np.ndarray, cmap: str | None = None) -> None:
        ax = fig.add_subplot(grid[row, col])
        ax.imshow(img, cmap=cmap, interpolation="nearest", vmin=0 if cmap is None else None)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0 and row > 0:
            ax.set_ylabel(f"{levels[row - 1]:.0%} sparse", fontsize=10)

    for col, (label, img, cmap) in enumerate(first):
        panel(0, col, label, img, cmap)
    for row, level in enumerate(levels, start=1):
        for col, method in enumerate(methods):
            if method in pruned[level]:
                image = pruned[level][method]
                panel(row, col, f"{method_label(method)} {level:.0%}\n{psnr(image, target):.2f} dB", image)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return fig


def _to_image(img: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"images must be (H, W, 3); got shape {arr.shape}")
    return np.clip(arr.astype(np.float32), 0.0, 1.0)

