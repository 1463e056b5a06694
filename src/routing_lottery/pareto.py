"""Equal-storage comparison: each method at the best configuration that stores no more weights than RTL.

Equal per-mask sparsity is not equal storage. RTL keeps the union of its K masks, so ten masks at
75 % sparsity can keep more weights than one mask at 25 %; multiple IMP keeps K whole models. A
table by sparsity level therefore compares methods that store different amounts. Here RTL's
``parameters`` at each of its levels sets a budget B, and every other method is represented by its
best point with ``parameters <= B`` (its Pareto frontier read at B), whatever its own sparsity.

Verdicts use the 95 % seed intervals (``statistics.Interval``) where both sides have them: "ahead"
or "behind" only when the intervals do not touch, "overlap" otherwise. Single-seed records have no
interval; their verdict compares means ("ahead", "behind", "tie") and the row says
``intervals: False``, so a reader does not mistake a one-seed difference for a separated one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plotting import log_x_axis, save_png
from .methods import ARGMAX, method_label
from .report import aggregate_rows, method_rank, method_style, primary_metric_key, sorted_records
from .seeds import interval_of
from .statistics import Interval, mean_interval

Row = dict[str, Any]

AHEAD, BEHIND, OVERLAP, TIE = "ahead", "behind", "overlap", "tie"
NO_POINT = "no point within budget"
VERDICTS = (AHEAD, BEHIND, OVERLAP, TIE, NO_POINT)


@dataclass(frozen=True)
class _Point:
    """One (method, sparsity) with its stored weights and its metric (mean and, over seeds, an interval)."""

    method: str
    sparsity: float
    parameters: float | None
    value: Interval


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _comparable_rows(records: Sequence[Row]) -> list[Row]:
    """Whole-row oracle records: deployment rows (a ``routing`` key) measure routing, not the method at a budget."""
    return aggregate_rows([r for r in records if "routing" not in r])


def _point(method: str, sparsity: float, rows: Sequence[Row], metric: str) -> _Point:
    """The point of one (method, sparsity).

    A lone row keeps the interval it carries (a summary over seeds). Several rows at one
    (method, sparsity) are taken as seeds, as ``seeds.summarize_seeds`` would group them, so their
    mean gets Student's t interval; their ``parameters`` are averaged (RTL's union differs by seed).
    """
    params = [float(r["parameters"]) for r in rows if _is_number(r.get("parameters"))]
    parameters = sum(params) / len(params) if len(params) == len(rows) else None
    if len(rows) == 1:
        value = interval_of(rows[0], metric)
        assert value is not None  # rows were chosen for a finite metric
    else:
        value = mean_interval([float(r[metric]) for r in rows])
    return _Point(method, sparsity, parameters, value)


def _points(records: Sequence[Row], metric: str) -> dict[str, list[_Point]]:
    """method -> its points with a finite ``metric``, ascending sparsity, methods in table order."""
    groups: dict[tuple[str, float], list[Row]] = {}
    for r in sorted_records(_comparable_rows(records)):
        if _is_number(r.get(metric)):
            groups.setdefault((r["method"], float(r["sparsity"])), []).append(r)
    series: dict[str, list[_Point]] = {}
    for (method, level), rows in groups.items():
        series.setdefault(method, []).append(_point(method, level, rows, metric))
    ordered = sorted(series.items(), key=lambda item: method_rank(item[0]))
    return {m: sorted(ps, key=lambda p: p.sparsity) for m, ps in ordered}


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether metric value ``a`` is strictly better than ``b``."""
    return a > b if higher_is_better else a < b


def _frontier(points: Sequence[_Point], higher_is_better: bool) -> list[_Point]:
    """The points no other point beats with fewer-or-equal parameters, by ascending parameters.

    Equal means at equal parameters both stay: neither is better, and dropping one would hide a level.
    """
    placed = [p for p in points if p.parameters is not None]
    kept = [p for p in placed if not any(
        q is not p and q.parameters <= p.parameters and _better(q.value.mean, p.value.mean, higher_is_better)
        for q in placed)]
    return sorted(kept, key=lambda p: (p.parameters, p.sparsity))


def _best_within(points: Sequence[_Point], budget: float, higher_is_better: bool) -> _Point | None:
    """The best point storing at most ``budget`` weights; among equal means the cheaper one (then the lower level)."""
    within = [p for p in points if p.parameters is not None and p.parameters <= budget]
    if not within:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return min(within, key=lambda p: (-sign * p.value.mean, p.parameters, p.sparsity))


def _is_variant(name: str, method: str) -> bool:
    """Whether ``name`` scores the same weights as ``method`` (``rtl`` and ``rtl+argmax``, either way round).

    Such a pair differs only in how outputs are read, so a budget comparison between them says nothing
    about storage.
    """
    return name.removesuffix(ARGMAX) == method.removesuffix(ARGMAX)


def _verdict(ours: Interval, theirs: Interval, higher_is_better: bool) -> tuple[str, bool]:
    """(verdict, whether both intervals were used) for ``ours`` against ``theirs``."""
    with_intervals = ours.low is not None and theirs.low is not None
    if with_intervals:
        if ours.overlaps(theirs):
            return OVERLAP, True
        above = ours.low > theirs.high
    else:  # one seed on a side: only the means can be compared, and the row says so
        if ours.mean == theirs.mean:
            return TIE, False
        above = ours.mean > theirs.mean
    return (AHEAD if above == higher_is_better else BEHIND), with_intervals


def budget_comparison(records: Sequence[Row], method: str = "rtl", metric: str | None = None,
                      higher_is_better: bool = True) -> list[Row]:
    """Compare ``method`` at each of its levels with every other method's best point at no more stored weights.

    Parameters
    ----------
    records : result rows (``method``, ``sparsity``, ``parameters``, the metric, and for summaries
        over seeds ``<metric>_low``/``_high``). Sub-group rows (``report.aggregate_rows``) and
        deployment rows (a ``routing`` key) are left out; repeated (method, sparsity) rows are seeds.
    method : whose ``parameters`` set the budgets. Its own argmax rows (``method+argmax``, or plain
        ``method`` when it names the argmax rows) are not compared with it: the same weights scored another way.
    metric : defaults to the table's primary metric (``report.primary_metric_key``).
    higher_is_better : False for a loss or an error rate; it flips which side is "ahead".

    Returns
    -------
    One row per (level of ``method``, other method), ascending sparsity then table order:
    ``sparsity``, ``budget`` (``method``'s parameters), ``budget_method``, ``method`` (the other
    one), ``other_sparsity``/``other_parameters`` (None when nothing fits), ``value``/``value_low``/
    ``value_high``, ``other_value``/``other_low``/``other_high``, ``verdict`` (one of ``VERDICTS``)
    and ``intervals`` (True when both sides carried an interval).

    Raises ValueError when ``method`` has no record with the metric, or a record with the metric
    lacks ``parameters``.

    Example
    -------
    >>> rows = budget_comparison([
    ...     {"method": "rtl", "sparsity": 0.5, "acc": 0.9, "parameters": 100},
    ...     {"method": "single_imp", "sparsity": 0.8, "acc": 0.8, "parameters": 90}], metric="acc")
    >>> rows[0]["verdict"], rows[0]["intervals"]
    ('ahead', False)
    """
    rows = _comparable_rows(records)
    metric = metric or primary_metric_key(rows)
    if metric is None:
        raise ValueError("records hold no numeric metric to compare")
    series = _points(rows, metric)
    if method not in series:
        raise ValueError(f"method {method!r} has no record with metric {metric!r}; "
                         f"methods with it: {sorted(series) or 'none'}")
    unplaced = [f"{p.method} at {p.sparsity:g}" for ps in series.values() for p in ps if p.parameters is None]
    if unplaced:
        raise ValueError(f"records lack a numeric 'parameters' (stored weights), needed for a budget: "
                         f"{', '.join(unplaced)}")
    others = {m: ps for m, ps in series.items() if not _is_variant(m, method)}
    out: list[Row] = []
    for ours in series[method]:
        budget = ours.parameters
        assert budget is not None  # checked above
        for other, points in others.items():
            best = _best_within(points, budget, higher_is_better)
            row: Row = {"sparsity": ours.sparsity, "budget": budget, "budget_method": method, "method": other,
                        "other_sparsity": None, "other_parameters": None,
                        "value": ours.value.mean, "value_low": ours.value.low, "value_high": ours.value.high,
                        "other_value": None, "other_low": None, "other_high": None,
                        "verdict": NO_POINT, "intervals": False}
            if best is not None:
                verdict, with_intervals = _verdict(ours.value, best.value, higher_is_better)
                row.update({"other_sparsity": best.sparsity, "other_parameters": best.parameters,
                            "other_value": best.value.mean, "other_low": best.value.low,
                            "other_high": best.value.high, "verdict": verdict, "intervals": with_intervals})
            out.append(row)
    return out


def pareto_frontier(records: Sequence[Row], method: str, metric: str | None = None,
                    higher_is_better: bool = True) -> list[Row]:
    """``method``'s non-dominated points, ascending ``parameters``: none of its points does better with fewer weights.

    Each row: ``method``, ``sparsity``, ``parameters``, ``value`` (the metric mean), ``value_low``,
    ``value_high``. Points without ``parameters`` cannot be placed and are left out; an unknown
    method or metric gives [].
    """
    rows = _comparable_rows(records)
    metric = metric or primary_metric_key(rows)
    if metric is None:
        return []
    front = _frontier(_points(rows, metric).get(method, []), higher_is_better)
    return [{"method": p.method, "sparsity": p.sparsity, "parameters": p.parameters, "value": p.value.mean,
             "value_low": p.value.low, "value_high": p.value.high} for p in front]


# -- Markdown -------------------------------------------------------------------------------------------
def _value_cell(mean: float | None, low: float | None, high: float | None) -> str:
    """``mean ± half-width`` as in the results table (``report.record_cell``); the mean alone for one seed."""
    if mean is None:
        return "—"
    return f"{mean:.3f}" if low is None or high is None else f"{mean:.3f} ± {(high - low) / 2:.3f}"


def _verdict_cell(row: Row) -> str:
    if row["verdict"] in (AHEAD, BEHIND, TIE) and not row["intervals"]:
        return f"{row['verdict']} (means, no interval)"
    return "intervals overlap" if row["verdict"] == OVERLAP else row["verdict"]


def _summary_line(other: str, rows: Sequence[Row]) -> str:
    """``- Single IMP: ahead at X of N budgets, behind at Y, intervals overlap at Z`` (ties and misses when any)."""
    count = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    line = (f"- {method_label(other)}: ahead at {count[AHEAD]} of {len(rows)} budgets, behind at {count[BEHIND]}, "
            f"intervals overlap at {count[OVERLAP]}")
    if count[TIE]:
        line += f", tie at {count[TIE]}"
    if count[NO_POINT]:
        line += f", no point within budget at {count[NO_POINT]}"
    if any(not r["intervals"] and r["verdict"] != NO_POINT for r in rows):
        line += " (some verdicts from single-seed means)"
    return line


def budget_markdown(rows: Sequence[Row], metric: str) -> str:
    """The ``budget_comparison`` rows as a Markdown table, with how to read it and one summary line per method.

    Returns "" for no rows.
    """
    if not rows:
        return ""
    ours = method_label(rows[0].get("budget_method", "rtl"))
    intro = (f"Equal storage: at each {ours} sparsity level, {ours}'s stored weights (`parameters`) set a budget, "
             f"and each other method is shown at its best configuration that stores no more weights than {ours} "
             f"(its Pareto frontier at that budget), whatever its own sparsity. \"ahead\"/\"behind\" means the 95 % "
             f"intervals of {metric} do not overlap; where a side has one seed, only the means are compared.\n")
    lines = [f"| sparsity | {ours} budget (parameters) | compared with | {ours} {metric} | other {metric} | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["verdict"] == NO_POINT:  # nothing to compare: counted in the method's summary line only
            continue
        other = method_label(r["method"])
        if r["other_sparsity"] is not None:
            other += f" at {r['other_sparsity']:.0%} ({int(round(r['other_parameters'])):,})"
        lines.append(f"| {r['sparsity']:.0%} | {int(round(r['budget'])):,} | {other} "
                     f"| {_value_cell(r['value'], r['value_low'], r['value_high'])} "
                     f"| {_value_cell(r['other_value'], r['other_low'], r['other_high'])} | {_verdict_cell(r)} |")
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    summary = [_summary_line(m, rs) for m, rs in sorted(by_method.items(), key=lambda i: method_rank(i[0]))]
    return intro + "\n" + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n"


# -- the figure -------------------------------------------------------------------------------------------
def plot_pareto(records: Sequence[Row], path: str | Path, metric: str | None = None, title: str | None = None,
                higher_is_better: bool = True) -> Path | None:
    """Draw ``metric`` against stored weights per method, with each method's Pareto frontier; write ``path`` (PNG).

    Parameters
    ----------
    records : result rows as for ``budget_comparison``; rows without ``parameters`` cannot be placed
        and are left out (the figure draws what it can rather than refuse).
    path : where the PNG goes, written atomically (``plotting.save_png``).
    metric : defaults to the table's primary metric.
    title : drawn above the panel.
    higher_is_better : which direction the frontier keeps.

    Returns
    -------
    The path written, or None (nothing written) when no record has both the metric and ``parameters``.

    Every point is drawn, with its seed interval as an error bar where it has one; points off the
    frontier are faded. The frontier is a step line: at a budget x it reads the best value the
    method reaches with at most x weights, so it holds each frontier value up to the next point.
    A method measured only at sparsity 0 (dense) is one point and a dashed horizontal reference line.
    """
    rows = _comparable_rows(records)
    metric = metric or primary_metric_key(rows)
    points = _points(rows, metric) if metric else {}
    placed = {m: [p for p in ps if p.parameters is not None] for m, ps in points.items()}
    series = {m: ps for m, ps in placed.items() if ps}
    if not series:
        return None
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["tab10"]
    markers = "osD^vPX*<>"
    right = max(p.parameters for ps in series.values() for p in ps)
    for method, points in series.items():
        color = colors(method_style(method) % colors.N)
        marker = markers[method_style(method) % len(markers)]
        front = _frontier(points, higher_is_better)
        reference = all(p.sparsity == 0.0 for p in points)
        for on_front in (True, False):
            drawn = [p for p in points if (p in front) == on_front]
            if not drawn:
                continue
            err = [[p.value.mean - p.value.low if p.value.low is not None else 0.0 for p in drawn],
                   [p.value.high - p.value.mean if p.value.high is not None else 0.0 for p in drawn]]
            ax.errorbar([p.parameters for p in drawn], [p.value.mean for p in drawn],
                        yerr=err if any(p.value.low is not None for p in drawn) else None,
                        fmt=marker, color=color, ms=7 if reference else 6, capsize=3, elinewidth=1.2,
                        alpha=1.0 if on_front else 0.35, label=method_label(method) if on_front else None)
        if reference:  # no frontier of its own: the line every pruned method is measured against
            ax.axhline(front[0].value.mean, color=color, ls="--", lw=1, alpha=0.6)
            continue
        xs = [p.parameters for p in front] + ([right] if right > front[-1].parameters else [])
        ys = [p.value.mean for p in front] + ([front[-1].value.mean] if right > front[-1].parameters else [])
        ax.plot(xs, ys, drawstyle="steps-post", color=color, lw=1.6)
    log_x_axis(ax, "parameters (kept prunable weights stored, log scale)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs stored weights; steps: each method's best at no more weights", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


__all__ = ["AHEAD", "BEHIND", "NO_POINT", "OVERLAP", "TIE", "VERDICTS", "budget_comparison", "budget_markdown",
           "pareto_frontier", "plot_pareto"]
