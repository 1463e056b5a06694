"""Result tables from a run's records: JSON (machine-readable), CSV, Markdown for people, and one figure.

``results.png`` draws the table's first metric column per method against sparsity and against
stored weights, so the comparison can be read at a glance.
"""

from __future__ import annotations

import csv
import io as _io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plotting import log_x_axis, save_png
from .io import atomic_write_json, atomic_write_text
from .methods import ARGMAX, METHODS, method_label

ID_KEYS = ("experiment", "seed", "method", "sparsity")
ACCOUNTING_KEYS = ("parameters", "dense_parameters", "storage_bytes", "train_seconds")
_PER_CONTEXT = re.compile(r".+_context_\d+$")


def per_context_key(metric: str, k: int) -> str:
    """The record key of ``metric`` measured on context ``k`` alone (``balanced_accuracy_context_3``).

    Records carry these beside the headline metric so that a sweep can draw each subnetwork's
    curve; JSON and CSV keep them, the people-facing tables leave them out.
    """
    return f"{metric}_context_{k}"


def per_context_values(record: dict[str, Any], metric: str, num_contexts: int) -> list[float] | None:
    """``[record[metric_context_0], ...]``, or None when the record lacks any of them."""
    keys = [per_context_key(metric, k) for k in range(num_contexts)]
    return [float(record[k]) for k in keys] if all(k in record for k in keys) else None


def is_per_context_key(key: str) -> bool:
    return _PER_CONTEXT.fullmatch(key) is not None


LOW, HIGH = "_low", "_high"
SUMMARY_KEYS = ("n", "seeds")  # a summary record's count of seeds and their list (seeds.summarize_seeds)


def is_interval_key(key: str, record: dict[str, Any]) -> bool:
    """Whether ``key`` is the low or high end of an interval ``record`` carries (``<metric>_low``)."""
    return any(key.endswith(end) and key.removesuffix(end) in record for end in (LOW, HIGH))


def method_rank(method: str) -> float:
    """A method's place in tables: registration order (dense, single IMP, multiple IMP, RTL, random, then users');
    a method's argmax rows right after its own."""
    if method.endswith(ARGMAX):
        return method_rank(method.removesuffix(ARGMAX)) + 0.5
    names = METHODS.names()
    return names.index(method) if method in names else len(names)


def method_style(method: str) -> int:
    """A method's colour and marker index in figures, the same in every figure (argmax rows their own)."""
    rank = int(method_rank(method))
    return rank + len(METHODS.names()) if method.endswith(ARGMAX) else rank


def sorted_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """By sparsity, then method, keeping the order of sub-groups (images, environments) within them."""
    return sorted(records, key=lambda r: (r["sparsity"], method_rank(r["method"])))


def metric_keys(records: Sequence[dict[str, Any]], per_context: bool = False) -> list[str]:
    """Metric columns in first-seen order, after the identifying keys and before accounting.

    Per-context breakdowns (``per_context_key``), interval ends and the seed count only with
    ``per_context=True`` (the CSV); a table shows an interval inside its metric's cell.
    """
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in ID_KEYS and k not in ACCOUNTING_KEYS and k not in keys
                 and k != "seeds" and (per_context or not (is_per_context_key(k) or is_interval_key(k, r)
                                                           or k in SUMMARY_KEYS))]
    return keys + [k for k in ACCOUNTING_KEYS if any(k in r for r in records)]


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``records``; ``columns`` restricts (and orders) the metric columns."""
    rows = sorted_records(records)
    keys = [k for k in (columns or metric_keys(rows)) if any(k in r for r in rows)]
    head = ["sparsity", "method", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['sparsity']:.0%}", method_label(r["method"])]
        cells += [record_cell(r, k) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def record_cell(record: dict[str, Any], key: str) -> str:
    """``record[key]`` for a table; a metric with an interval (a summary over seeds) as ``mean ± half-width``."""
    value, low, high = record.get(key), record.get(key + LOW), record.get(key + HIGH)
    if key in ACCOUNTING_KEYS or not isinstance(value, float) or low is None or high is None:
        return format_cell(key, value)
    return f"{value:.3f} ± {(high - low) / 2:.3f}"


def format_cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key in ("parameters", "dense_parameters", "storage_bytes"):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.3f}" if key != "train_seconds" else f"{value:.1f}"
    return str(value)


def csv_text(records: Sequence[dict[str, Any]]) -> str:
    rows = sorted_records(records)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*ID_KEYS, *metric_keys(rows, per_context=True)], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def granularity_line(config: Any | None) -> str:
    """What a sparsity level counts in these results: single weights (the paper's) or whole channels."""
    pruning = getattr(config, "pruning", None)
    if getattr(pruning, "granularity", "weight") == "channel":
        return ("Granularity: **channel** tickets: a sparsity level is the fraction of output channels removed "
                "(with every slice coupled to them); `parameters` counts the weights they keep.\n\n")
    return "Granularity: weight tickets (the paper's): a sparsity level is the fraction of masked weights removed.\n\n"


def write_results(run_dir: str | Path, records: Sequence[dict[str, Any]], config: Any | None = None,
                  summary: str = "", columns: Sequence[str] | None = None) -> None:
    """results.json (flat records), results.csv, results.png (``plot_results``) and results.md
    (``summary`` under the table, then the figure) in ``run_dir``."""
    run_dir = Path(run_dir)
    rows = sorted_records(records)
    atomic_write_json(run_dir / "results.json", rows)
    atomic_write_text(run_dir / "results.csv", csv_text(rows))
    name = getattr(config, "name", "experiment")
    figure = plot_results(rows, run_dir / "results.png", columns=columns, title=f"Results: {name}")
    title = f"# Results: {name}\n\n{granularity_line(config)}"
    notes = (
        "\nMetrics are one-vs-rest per context, macro-averaged. RTL and multiple-IMP subnetworks are binary\n"
        "detectors of their context (output k of a shared dense head); dense and single IMP are one K-way\n"
        "classifier. `parameters` counts kept prunable weights (RTL: the union of its masks, shared weights\n"
        "once; multiple IMP: the sum over K models); `dense_parameters` are unpruned BN/SE/head parameters;\n"
        "`storage_bytes` = 4 bytes per stored float + 1 bit per prunable weight per mask.\n"
    )
    if getattr(config, "task", "classification") != "classification":
        notes = ("\n`parameters` counts kept prunable weights (RTL: the union of its masks; multiple IMP: the sum over "
                 "K models); `storage_bytes` = 4 bytes per stored float + 1 bit per prunable weight per mask.\n")
    body = markdown_table(rows, columns) + (f"\n{summary}\n" if summary else "")
    if figure is not None:
        body += f"\n![results]({figure.name})\n"
    atomic_write_text(run_dir / "results.md", title + body + notes)


# -- the figure --------------------------------------------------------------------------------------
def aggregate_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that speak for a whole (method, sparsity): sub-group rows left out.

    A run over several images has per-image rows and ``image: "mean"`` rows (keep the means); a
    speech run has one row per ``environment`` and one for ``"all"`` (keep "all"). Records without
    such columns are returned as they are. ``diagnose.rtl_metric_by_level`` picks the same rows.
    """
    rows = list(records)
    if any(r.get("image") == "mean" for r in rows):
        rows = [r for r in rows if r.get("image") == "mean"]
    return [r for r in rows if r.get("environment", "all") == "all"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def primary_metric_key(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str | None:
    """The table's first numeric metric column (``metric_keys``, or ``columns`` where given): the metric
    a reader looks at first. balanced_accuracy for classification, psnr for INR, si_snri for speech
    (what ``diagnose.primary_metric`` names for those tasks); None when the records have no number.
    """
    keys = [k for k in (columns or metric_keys(records)) if k not in ACCOUNTING_KEYS]
    return next((k for k in keys if any(_is_number(r.get(k)) for r in records)), None)


Point = tuple[float, float, "float | None", "tuple[float, float] | None"]  # sparsity, metric, parameters, interval


def _method_series(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, list[Point]]:
    """method -> [(sparsity, metric, parameters, interval)] in table order, the mean where a (method,
    sparsity) repeats; the interval where a lone row carries one (a summary over seeds)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in sorted_records(rows):
        if _is_number(r.get(metric)) and math.isfinite(r[metric]):
            groups.setdefault((r["method"], float(r["sparsity"])), []).append(r)
    series: dict[str, list[Point]] = {}
    for (method, level), rs in groups.items():
        params = [float(r["parameters"]) for r in rs if _is_number(r.get("parameters")) and r["parameters"] > 0]
        ends = (rs[0].get(metric + LOW), rs[0].get(metric + HIGH))
        interval = (float(ends[0]), float(ends[1])) if len(rs) == 1 and all(_is_number(e) for e in ends) else None
        point = (level, sum(float(r[metric]) for r in rs) / len(rs), sum(params) / len(params) if params else None,
                 interval)
        series.setdefault(method, []).append(point)
    return dict(sorted(series.items(), key=lambda item: method_rank(item[0])))


def plot_results(records: Sequence[dict[str, Any]], path: str | Path, columns: Sequence[str] | None = None,
                 title: str | None = None) -> Path | None:
    """Draw the primary metric per method against sparsity and against stored weights; write ``path`` (PNG).

    Parameters
    ----------
    records : result rows (``method``, ``sparsity``, metrics, ``parameters``); sub-group rows are
        left out (``aggregate_rows``), repeated (method, sparsity) rows averaged.
    path : where the PNG goes, written atomically.
    columns : the table's metric columns, when the table was restricted; the first numeric one is drawn.
    title : drawn above both panels.

    Returns
    -------
    The path written, or None (nothing written) when the records hold no finite numeric metric.

    A method measured only at sparsity 0 (dense) is a horizontal reference line on the left and a
    point on the right; every other method is one colour and marker, labelled as in the table.
    """
    rows = aggregate_rows(records)
    metric = primary_metric_key(rows, columns)
    series = _method_series(rows, metric) if metric is not None else {}
    if not series:
        return None
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    with_params = any(p is not None for points in series.values() for _, _, p, _ in points)
    fig = Figure(figsize=(11.5 if with_params else 6.5, 4.4), layout="constrained")
    axes = fig.subplots(1, 2 if with_params else 1, squeeze=False)[0]
    by_sparsity = axes[0]
    colors = colormaps["tab10"]
    markers = "osD^vPX*<>"
    for method, points in series.items():
        style = {"color": colors(method_style(method) % colors.N), "marker": markers[method_style(method) % len(markers)]}
        label = method_label(method)
        levels, values, params, intervals = zip(*points)
        reference = all(level == 0.0 for level in levels)
        if reference:  # no sparsity axis of its own: a line every pruned method is measured against
            by_sparsity.axhline(values[0], color=style["color"], ls="--", lw=1.5, label=label)
            if intervals[0] is not None:
                by_sparsity.axhspan(*intervals[0], color=style["color"], alpha=0.12, lw=0)
        else:
            by_sparsity.plot(levels, values, lw=1.8, ms=6, label=label, **style)
            banded = [(lv, iv) for lv, iv in zip(levels, intervals) if iv is not None]
            if banded:  # the seeds' 95 % intervals
                by_sparsity.fill_between([lv for lv, _ in banded], [iv[0] for _, iv in banded],
                                         [iv[1] for _, iv in banded], color=style["color"], alpha=0.15, lw=0)
        if with_params:
            kept = [(p, v, iv) for p, v, iv in zip(params, values, intervals) if p is not None]
            if kept:
                xs, ys, ivs = zip(*kept)
                axes[1].plot(xs, ys, lw=0 if reference else 1.8, ms=7 if reference else 6, label=label, **style)
                if any(iv is not None for iv in ivs):
                    err = [[y - iv[0] if iv else 0.0 for y, iv in zip(ys, ivs)], [iv[1] - y if iv else 0.0 for y, iv in zip(ys, ivs)]]
                    axes[1].errorbar(xs, ys, yerr=err, fmt="none", ecolor=style["color"], elinewidth=1.2, capsize=3)
            if reference:
                axes[1].axhline(values[0], color=style["color"], ls="--", lw=1, alpha=0.6)
    by_sparsity.set_xlabel("sparsity (share of prunable weights removed)")
    by_sparsity.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    by_sparsity.set_title(f"{metric} vs sparsity", fontsize=10)
    if with_params:
        log_x_axis(axes[1], "parameters (kept prunable weights stored, log scale)")
        axes[1].set_title(f"{metric} vs stored weights", fontsize=10)
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    by_sparsity.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


# -- deployment without an oracle (run.deploy) ----------------------------------------------------
ROUTING_ORDER = ("oracle", "calibrated", "detectors", "entropy", "learned", "errors")
DEPLOYMENT_COLUMNS = ("routing", "error_rate", "routing_accuracy", "relative_cost", "routing_passes",
                      "precision", "recall", "fires_none", "fires_several", "decided_accuracy", "target_met")


def _routing_rank(row: dict[str, Any]) -> tuple[int, float]:
    routing = row.get("routing")
    return (ROUTING_ORDER.index(routing) if routing in ROUTING_ORDER else len(ROUTING_ORDER), row.get("error_rate", 0.0))


def write_deployment(run_dir: str | Path, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                     config: Any | None = None) -> None:
    """deployment.json (every row), deployment.md (a table beside the oracle results) and deployment.png
    (``plot_routing_errors``) in ``run_dir``; nothing when there are no rows."""
    if not rows:
        return
    run_dir = Path(run_dir)
    ordered = sorted_records(sorted(rows, key=_routing_rank))
    atomic_write_json(run_dir / "deployment.json", ordered)
    shown, oracle = aggregate_rows(ordered), aggregate_rows(records)
    metric = primary_metric_key(oracle)
    columns = [c for c in DEPLOYMENT_COLUMNS[:2] + ((metric,) if metric else ()) + DEPLOYMENT_COLUMNS[2:]
               if any(c in r for r in shown)]
    figure = plot_routing_errors(records, ordered, run_dir / "deployment.png",
                                 title=f"Routing without an oracle: {getattr(config, 'name', 'experiment')}")
    text = (f"# Without an oracle: {getattr(config, 'name', 'experiment')}\n\n"
            "Rows beside oracle routing (`routing: oracle`, the results table): `detectors` / `entropy` / `learned` "
            "choose each test input's context (router.py), `errors` sends `error_rate` of the test inputs to a "
            "wrong context, `calibrated` fits a threshold per detector on the held-out calibration split. "
            "`relative_cost`: wall time of routing and scoring relative to oracle scoring; `routing_passes`: "
            "network forward passes per input spent to choose.\n\n"
            + markdown_table(sorted_records(sorted([{**r, "routing": "oracle"} for r in oracle] + shown,
                                                   key=_routing_rank)), columns))
    if figure is not None:
        text += f"\n![routing errors]({figure.name})\n"
    atomic_write_text(run_dir / "deployment.md", text)


def plot_routing_errors(records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], path: str | Path,
                        title: str | None = None) -> Path | None:
    """The primary metric against the share of wrongly routed inputs, one panel per sparsity.

    Each routed method is a curve from its oracle value (0 %) through its ``errors`` rows; each
    inferred router is a marker at its own error rate (1 - routing accuracy); dense and single IMP,
    which need no router, are horizontal lines. None (nothing written) without error rows.
    """
    oracle, deployed = aggregate_rows(records), aggregate_rows(rows)
    metric = primary_metric_key(oracle)
    errors = [r for r in deployed if r.get("routing") == "errors"]
    if metric is None or not errors:
        return None
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    levels = sorted({float(r["sparsity"]) for r in errors})
    fig = Figure(figsize=(4.2 * len(levels) + 1.5, 4.0), layout="constrained")
    axes = fig.subplots(1, len(levels), squeeze=False, sharey=True)[0]
    colors = colormaps["tab10"]
    markers = {"detectors": "^", "entropy": "s", "learned": "D"}
    for ax, level in zip(axes, levels):
        for r in oracle:
            if r["method"] == "dense" or (r["method"] == "single_imp" and float(r["sparsity"]) == level):
                ax.axhline(r[metric], color=colors(method_style(r["method"]) % colors.N), ls="--" if r["method"] == "dense"
                           else ":", lw=1.5, label=f"{method_label(r['method'])} (no router)")
        for method in sorted({r["method"] for r in errors}, key=method_rank):
            start = [r[metric] for r in oracle if r["method"] == method and float(r["sparsity"]) == level]
            curve = sorted((r["error_rate"], r[metric]) for r in errors if r["method"] == method
                           and float(r["sparsity"]) == level)
            color = colors(method_style(method) % colors.N)
            ax.plot(*zip(*([(0.0, start[0])] if start else []) + curve), marker="o", color=color, lw=1.8,
                    label=method_label(method))
            for r in deployed:
                if r["method"] == method and float(r["sparsity"]) == level and r.get("routing") in markers:
                    ax.plot(1 - r["routing_accuracy"], r[metric], markers[r["routing"]], color=color, ms=9, mec="black",
                            label=f"{method_label(method)}, {r['routing']} router")
        ax.set_title(f"{level:.0%} sparsity", fontsize=10)
        ax.set_xlabel("inputs routed to a wrong context")
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    handles, labels = axes[-1].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_png(fig, path)
