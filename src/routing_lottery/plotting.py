"""Writing a matplotlib figure: the core's figures (precision-recall curves, routing confusion) and
the framework's diagnostics all land through ``save_png``.

matplotlib is an optional dependency of the core: it is imported inside the functions, so
``import routing_lottery`` never loads it and a user who draws nothing never needs it.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes

DPI = 120


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` (a ``matplotlib.figure.Figure``) to ``path`` as PNG, atomically
    (``io.atomic_write_bytes``): a killed run leaves no half file.

    A figure with a layout engine (``layout="constrained"``) is laid out already and drawn once;
    ``bbox_inches="tight"`` would draw it a second time to measure it. PNG's fastest compression
    level: a run draws a figure per level, and the default level spends more time than the drawing
    for files a few percent smaller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    buffer = _io.BytesIO()
    tight = None if fig.get_layout_engine() is not None else "tight"
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches=tight, pil_kwargs={"compress_level": 1})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def context_colors(k: int) -> list[Any]:
    """One colour per context, the same in every figure (tab10, or tab20 beyond ten contexts)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def log_x_axis(ax: Any, label: str) -> None:
    """A log-scale x axis with 1-2-5 ticks written as ``20k``: budgets and sweeps often span less than a
    decade, where decade ticks would show none."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


__all__ = ["DPI", "context_colors", "log_x_axis", "save_png"]
