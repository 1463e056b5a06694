"""Diagnostic figures, drawn with matplotlib's Agg canvas and written atomically as PNG.

Each function takes plain arrays (or the results of ``similarity`` / ``semantic``), writes one
PNG and returns its path. Figures are built on ``matplotlib.figure.Figure`` rather than pyplot,
so nothing touches a global figure registry or an interactive backend, and a figure is freed as
soon as its function returns. Files land through a temporary file in the same directory and
``os.replace``, so a run killed mid-save never leaves a truncated image.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from ..plotting import DPI, context_colors, save_png
from .semantic import MantelResult
from .similarity import ALL_WEIGHTS, SimilarityReport, depth_groups

ANNOTATE_MAX_K = 12  # above this, numbers in heatmap cells become unreadable


_context_colors = context_colors  # the name this module's figures use


# -- heatmaps ------------------------------------------------------------------------------------
def off_diagonal_range(matrix: Any) -> tuple[float, float] | None:
    """(min, max) of the finite off-diagonal entries of a square matrix; None when there are none."""
    m = np.asarray(matrix, dtype=np.float64)
    values = m[~np.eye(len(m), dtype=bool)]
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else None


def similarity_heatmap_figure(
    matrix: Any,
    context_names: Sequence[str],
    title: str = "Mask similarity (Jaccard)",
    colorbar_label: str = "Jaccard similarity",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
) -> Figure:
    """The figure of ``plot_similarity_heatmap``, not yet written (its image is ``fig.axes[0].images[0]``).

    Without ``vmin``/``vmax`` the colours span the off-diagonal range of ``matrix``: masks of one
    ticket set often overlap 0.87–0.89, which a fixed 0–1 scale paints one colour. The diagonal
    (a mask with itself) is then grey and left off the scale, and the colour bar says so. With
    both given, every cell is on that fixed scale (to compare heatmaps by eye).
    """
    m = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    k = len(context_names)
    if m.shape != (k, k):
        raise ValueError(f"matrix shape {m.shape} does not match {k} context names")
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgray")
    data_range = off_diagonal_range(m) if vmin is None or vmax is None else None
    shown = m
    if data_range is not None:
        low, high = data_range
        if high - low < 1e-6:  # one value (K = 2, or identical masks): a small band around it
            low, high = low - 0.005, high + 0.005
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
        shown = np.ma.masked_array(m, mask=np.eye(k, dtype=bool))
        colorbar_label = f"{colorbar_label}\n(colours span off-diagonal {data_range[0]:.2f}–{data_range[1]:.2f}; diagonal grey)"
    else:
        vmin = 0.0 if vmin is None else vmin
        vmax = 1.0 if vmax is None else vmax
    side = max(4.5, 0.45 * k + 2.5)
    fig = Figure(figsize=(side + 1.4, side))
    ax = fig.add_subplot()
    image = ax.imshow(shown, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(k), labels=list(context_names), rotation=45, ha="right", fontsize=8 if k > 12 else 9)
    ax.set_yticks(range(k), labels=list(context_names), fontsize=8 if k > 12 else 9)
    if annotate if annotate is not None else k <= ANNOTATE_MAX_K:
        for i in range(k):
            for j in range(k):
                if math.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color=_text_color(image, m[i, j], masked=np.ma.is_masked(shown[i, j])))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    ax.set_title(title)
    return fig


def _text_color(image: Any, value: float, masked: bool) -> str:
    """Black on light cells, white on dark ones (the cell's own colour, by luminance)."""
    r, g, b, _ = image.cmap.get_bad() if masked else image.cmap(image.norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_similarity_heatmap(
    matrix: Any,
    context_names: Sequence[str],
    path: str | Path,
    title: str = "Mask similarity (Jaccard)",
    colorbar_label: str = "Jaccard similarity",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
) -> Path:
    """Heatmap of a K×K matrix with the context names on both axes and a colour bar; returns ``path``.

    Colours span the off-diagonal data range unless ``vmin``/``vmax`` fix the scale (see
    ``similarity_heatmap_figure``). Cells carry their value (2 decimals) when K ≤ 12 (``annotate``
    overrides), in black or white by the cell's brightness.
    """
    fig = similarity_heatmap_figure(matrix, context_names, title, colorbar_label, vmin, vmax, annotate)
    return save_png(fig, path)


def plot_report_heatmaps(report: SimilarityReport, directory: str | Path, title_prefix: str = "") -> dict[str, Path]:
    """One heatmap per matrix of ``report`` (all weights and each layer), named like its CSV."""
    directory = Path(directory)
    layer_mean = report.layer_mean
    paths = {}
    for key, csv_name in report.matrix_file_names().items():
        matrix = report.overall if key == ALL_WEIGHTS else report.per_layer[key]
        mean = report.mean_score if key == ALL_WEIGHTS else layer_mean[key]
        label = "all prunable weights" if key == ALL_WEIGHTS else f"layer {key}"
        title = f"{title_prefix}Jaccard, {label} (mean off-diagonal {mean:.2f})"
        paths[key] = plot_similarity_heatmap(matrix, report.context_names, directory / csv_name.replace(".csv", ".png"), title)
    return paths


# -- sweep -----------------------------------------------------------------------------------------
def _per_level(values: Any, n_levels: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] != n_levels:
        raise ValueError(f"{name} must have shape (levels,) or (levels, K) with {n_levels} levels; got {v.shape}")
    return v


def plot_collapse_sweep(
    levels: Sequence[float],
    scores: Any,
    path: str | Path,
    context_names: Sequence[str] | None = None,
    metric: Any | None = None,
    metric_name: str = "task metric",
    metric_per_context: Any | None = None,
    warning_level: float | None = None,
    drop_level: float | None = None,
    title: str = "Similarity score and task metric vs sparsity",
) -> Path:
    """Similarity score (left axis, solid) and task metric (right axis, dashed) against sparsity.

    Parameters
    ----------
    levels : (L,) sparsities.
    scores : (L,) mean score, or (L, K) per subnetwork; per-subnetwork curves are thin and coloured
        by context, the mean over subnetworks thick black.
    metric : optional (L,) or (L, K) task metric, drawn the same way on a twin axis.
    metric_per_context : optional (L, K) metric of each subnetwork on its own context, drawn thin
        and coloured beside a (L,) headline ``metric`` (which need not be their mean: an image's
        PSNR is not the mean of its regions' PSNRs).
    warning_level, drop_level : vertical markers for the collapse warning (red) and the level
        where the metric actually drops (grey), so the warning's lead is visible at a glance.
    """
    x = np.asarray(levels, dtype=np.float64)
    s = _per_level(scores, len(x), "scores")
    k = s.shape[1]
    names = list(context_names) if context_names is not None else [f"context {i}" for i in range(k)]
    colors = _context_colors(max(k, 1))
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    handles: list[Any] = []
    if k > 1:
        for j in range(k):
            ax.plot(x, s[:, j], color=colors[j], lw=1, alpha=0.6)
    ax.plot(x, s.mean(axis=1), color="black", lw=2.8, marker="o", ms=4)
    handles.append(Line2D([], [], color="black", lw=2.8, marker="o", ms=4, label="similarity score (mean)"))
    ax.set_xlabel("sparsity")
    ax.set_ylabel("similarity score (mean Jaccard with other masks)")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    if metric is not None:
        m = _per_level(metric, len(x), "metric")
        thin = m if metric_per_context is None else _per_level(metric_per_context, len(x), "metric_per_context")
        twin = ax.twinx()
        if thin.shape[1] > 1:
            for j in range(thin.shape[1]):
                twin.plot(x, thin[:, j], color=colors[j % len(colors)], lw=1, ls="--", alpha=0.6)
        twin.plot(x, m.mean(axis=1), color="black", lw=2.8, ls="--", marker="s", ms=4)
        twin.set_ylabel(metric_name)
        handles.append(Line2D([], [], color="black", lw=2.8, ls="--", marker="s", ms=4, label=metric_name if metric_per_context is not None else f"{metric_name} (mean)"))
    for level, color, style, label in (
        (warning_level, "tab:red", ":", "collapse warning"),
        (drop_level, "dimgray", "-.", "metric drop"),
    ):
        if level is not None:
            ax.axvline(level, color=color, ls=style, lw=2)
            handles.append(Line2D([], [], color=color, ls=style, lw=2, label=f"{label} ({level:.0%})"))
    if k > 1:
        handles += [Line2D([], [], color=colors[j], lw=1.5, label=names[j]) for j in range(k)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.12, 1.0), fontsize=8, frameon=False,
              title="solid: similarity · dashed: metric" if metric is not None else None, title_fontsize=8)
    ax.set_title(title)
    return save_png(fig, path)


# -- semantic alignment ------------------------------------------------------------------------------
def plot_alignment_by_depth(
    alignment: Mapping[str, MantelResult],
    path: str | Path,
    alpha: float = 0.05,
    title: str = "Mask vs WordNet similarity by layer depth",
) -> Path:
    """Spearman rho per layer in depth order; bars with p < ``alpha`` are solid and starred.

    An ``"all"`` entry (all prunable weights) is drawn as a horizontal reference line.
    """
    layers = [n for n in alignment if n != ALL_WEIGHTS]
    if not layers:
        raise ValueError("alignment has no per-layer entries")
    rho = np.array([alignment[n].rho for n in layers], dtype=np.float64)
    p = np.array([alignment[n].p_value for n in layers], dtype=np.float64)
    significant = np.nan_to_num(p, nan=1.0) < alpha
    fig = Figure(figsize=(max(6.0, 0.45 * len(layers) + 3), 4.5))
    ax = fig.add_subplot()
    pos = np.arange(len(layers))
    ax.bar(pos, np.nan_to_num(rho), color=["tab:blue" if s else "lightsteelblue" for s in significant],
           edgecolor="tab:blue")
    for i in range(len(layers)):
        if not math.isfinite(rho[i]):
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
        elif significant[i]:
            ax.text(i, rho[i] + (0.03 if rho[i] >= 0 else -0.03), "*", ha="center",
                    va="bottom" if rho[i] >= 0 else "top", fontsize=12)
    if ALL_WEIGHTS in alignment and math.isfinite(alignment[ALL_WEIGHTS].rho):
        ax.axhline(alignment[ALL_WEIGHTS].rho, color="black", ls="--", lw=1,
                   label=f"all weights (rho {alignment[ALL_WEIGHTS].rho:.2f})")
        ax.legend(fontsize=8, loc="best")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(pos, labels=layers, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("Spearman rho over context pairs")
    ax.set_ylim(-1.12, 1.12)  # room for the significance stars above |rho| = 1
    ax.set_title(f"{title}\n(solid bar and * : Mantel p < {alpha:g})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def plot_alignment_vs_sparsity(
    levels: Sequence[float],
    alignments: Sequence[Mapping[str, MantelResult]],
    path: str | Path,
    alpha: float = 0.05,
    title: str = "Mask vs WordNet similarity across the sweep",
) -> Path:
    """Mean Spearman rho of the shallow / middle / deep thirds of the layers against sparsity.

    ``alignments[i]`` is ``layer_alignment(...)`` at ``levels[i]``; layers are split into thirds in
    their given order (``depth_groups``). The band spans the group's layers (min to max); a filled
    marker means at least half of the group's layers have Mantel p < ``alpha``.
    """
    x = np.asarray(levels, dtype=np.float64)
    if len(alignments) != len(x):
        raise ValueError(f"{len(alignments)} alignment results for {len(x)} levels")
    layers = [n for n in alignments[0] if n != ALL_WEIGHTS] if len(alignments) else []
    if not layers:
        raise ValueError("alignments have no per-layer entries")
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for (group, names), color in zip(depth_groups(layers).items(), ("tab:green", "tab:orange", "tab:purple")):
        rho = np.array([[a[n].rho for n in names] for a in alignments], dtype=np.float64)
        p = np.array([[a[n].p_value for n in names] for a in alignments], dtype=np.float64)
        with warnings.catch_warnings():  # an all-NaN level (flat semantic matrix) stays NaN, silently
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = np.nanmean(rho, axis=1), np.nanmin(rho, axis=1), np.nanmax(rho, axis=1)
        share = (np.nan_to_num(p, nan=1.0) < alpha).mean(axis=1)
        ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)
        ax.plot(x, mean, color=color, lw=2, label=f"{group} ({len(names)} layers)")
        filled = share >= 0.5
        ax.scatter(x[filled], mean[filled], color=color, s=36, zorder=3)
        ax.scatter(x[~filled], mean[~filled], facecolors="white", edgecolors=color, s=36, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("sparsity")
    ax.set_ylabel("Spearman rho (mean over group's layers)")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{title}\n(band: min–max over layers; filled marker: ≥ half the layers at p < {alpha:g})", fontsize=10)
    return save_png(fig, path)

