"""Which label-free signal warns of subnetwork collapse before the metric drops? A study over sweeps.

Every signal is a curve over the sparsity levels of one sweep, computed from the K masks alone, and
fires where the collapse rule (``collapse.detect_collapse``: a robust departure from the recent
trend, the same threshold for every signal, never fitted to one experiment) first flags it:

- ``score``: the mean similarity score (the warning ``rtl sweep`` and ``rtl diagnose`` print);
- ``slope``: that score's slope against -log(1 - sparsity) (a bend in the curve);
- ``deep``: the mean Jaccard of the deepest third of the layers (the paper sees collapse there first);
- ``layers``: the first level where at least a third of the layers depart from their own trend;
- ``union``: how many weights the K masks keep together relative to one mask (the union's growth).

A sweep's **drop** is where its RTL metric falls below its best earlier value by the metric's
tolerance (``diagnose.METRICS``) and stays there (``collapse.metric_drop_level``, sustained). A
signal's **lead** is drop - fire in sparsity points: positive when it warned first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..masks import MaskSet
from ..statistics import mean_interval
from .collapse import CollapseSettings, detect_collapse, metric_drop_level
from .similarity import SimilarityReport, depth_groups, similarity_report

Curve = Callable[[Sequence[float], Sequence[MaskSet], Sequence[SimilarityReport], CollapseSettings], "float | None"]


def _fire(levels: Sequence[float], values: Sequence[float], settings: CollapseSettings,
          relative: bool = False) -> float | None:
    """The first level the collapse rule flags on ``values``; ``relative`` floors the residual scale
    in the curve's own units (a share of its largest magnitude) instead of Jaccard units."""
    if relative:
        peak = max((abs(v) for v in values), default=0.0)
        settings = dataclasses.replace(settings, min_scale=settings.min_scale * peak if peak > 0 else settings.min_scale)
    return detect_collapse(levels, values, settings).level


def score_signal(levels, masks, reports, settings):  # noqa: ANN001 -- the Curve signature
    return _fire(levels, [r.mean_score for r in reports], settings)


def slope_signal(levels, masks, reports, settings):  # noqa: ANN001
    x = [-math.log1p(-lv) for lv in levels]
    y = [r.mean_score for r in reports]
    slopes = [(y[i] - y[i - 1]) / (x[i] - x[i - 1]) for i in range(1, len(y))]
    return _fire(levels[1:], slopes, settings, relative=True)


def deep_signal(levels, masks, reports, settings):  # noqa: ANN001
    deepest = list(depth_groups(reports[0].layer_names))[-1]
    return _fire(levels, [r.group_mean[deepest] for r in reports], settings)


def layers_signal(levels, masks, reports, settings, quorum: float = 1 / 3):  # noqa: ANN001
    curves = [[r.layer_mean[name] for r in reports] for name in reports[0].layer_names]
    # a layer pruned away entirely at some level has no Jaccard there: it cannot vote
    fired = [detect_collapse(levels, c, settings).level for c in curves if all(math.isfinite(v) for v in c)]
    needed = max(1, math.ceil(quorum * len(fired)))
    for level in levels:
        if sum(f is not None and f <= level for f in fired) >= needed:
            return float(level)
    return None


def union_signal(levels, masks, reports, settings):  # noqa: ANN001
    growth = []
    for level, m in zip(levels, masks):
        union = m.union()
        kept = sum(int(u.sum()) for u in union.values()) / sum(u.numel() for u in union.values())
        growth.append(kept / max(1.0 - level, 1e-12))  # 1: the masks coincide; K: disjoint
    return _fire(levels, growth, settings, relative=True)


SIGNALS: dict[str, Curve] = {"score": score_signal, "slope": slope_signal, "deep": deep_signal,
                             "layers": layers_signal, "union": union_signal}


def study_sweep(levels: Sequence[float], masks: Sequence[MaskSet], metric: Sequence[float], tolerance: float,
                settings: CollapseSettings | None = None) -> dict[str, Any]:
    """Each signal's firing level and lead against the metric's sustained drop, for one sweep.

    Returns ``{"drop": level | None, "signals": {name: {"fired": level | None, "lead": points | None}}}``;
    the lead is None unless both the signal fired and the metric dropped.
    """
    if not (len(levels) == len(masks) == len(metric)):
        raise ValueError(f"levels ({len(levels)}), masks ({len(masks)}) and metric ({len(metric)}) must align")
    settings = settings or CollapseSettings()
    reports = [similarity_report(m) for m in masks]
    drop = metric_drop_level(levels, metric, tolerance, sustained=True)
    out: dict[str, Any] = {"drop": drop, "signals": {}}
    for name, signal in SIGNALS.items():
        fired = signal(list(levels), list(masks), reports, settings)
        lead = None if fired is None or drop is None else round(100 * (drop - fired), 2)
        out["signals"][name] = {"fired": fired, "lead": lead}
    return out


def study_table(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (signal, experiment): how often it fired, led, lagged or missed, and its mean lead with a 95 % interval.

    ``led``: fired before the drop; ``lagged``: at or after it; ``missed``: the metric dropped and the
    signal never fired; ``false alarm``: it fired and the metric never dropped.
    """
    rows = []
    experiments = sorted({e["experiment"] for e in entries})
    for name in SIGNALS:
        for experiment in experiments:
            runs = [e for e in entries if e["experiment"] == experiment]
            fired = [e["signals"][name]["fired"] for e in runs]
            leads = [e["signals"][name]["lead"] for e in runs if e["signals"][name]["lead"] is not None]
            row: dict[str, Any] = {
                "signal": name, "experiment": experiment, "runs": len(runs),
                "drops": sum(e["drop"] is not None for e in runs),
                "led": sum(lead > 0 for lead in leads), "lagged": sum(lead <= 0 for lead in leads),
                "missed": sum(e["drop"] is not None and f is None for e, f in zip(runs, fired)),
                "false_alarms": sum(e["drop"] is None and f is not None for e, f in zip(runs, fired)),
                "lead": None, "lead_low": None, "lead_high": None}
            if leads:
                interval = mean_interval(leads)
                row.update(lead=interval.mean, lead_low=interval.low, lead_high=interval.high)
            rows.append(row)
    return rows


def best_signal(rows: Sequence[dict[str, Any]]) -> str | None:
    """The signal that led most often over all experiments (ties: fewer false alarms, then the
    larger total lead); None when no signal ever led."""
    totals: dict[str, tuple[int, int, float]] = {}
    for r in rows:
        led, alarms, lead = totals.get(r["signal"], (0, 0, 0.0))
        totals[r["signal"]] = (led + r["led"], alarms + r["false_alarms"],
                               lead + (r["lead"] or 0.0) * (r["led"] + r["lagged"]))
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[1][1], -item[1][2]))
    return ranked[0][0] if ranked and ranked[0][1][0] > 0 else None


def study_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The study as a Markdown table (lead in sparsity points, mean ± 95 % half-width) and its verdict."""
    if not rows:
        return ""

    def lead(r: dict[str, Any]) -> str:
        if r["lead"] is None:
            return "n/a"
        if r["lead_low"] is None:
            return f"{r['lead']:+.1f}"
        return f"{r['lead']:+.1f} ± {(r['lead_high'] - r['lead_low']) / 2:.1f}"

    lines = ["| signal | experiment | runs | metric drops | led | lagged | missed | false alarms | lead (points) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['signal']} | {r['experiment']} | {r['runs']} | {r['drops']} | {r['led']} | {r['lagged']} | "
              f"{r['missed']} | {r['false_alarms']} | {lead(r)} |" for r in rows]
    best = best_signal(rows)
    verdict = (f"Led most often: **{best}**." if best else
               "No signal fired before the metric's drop in any run: none of these warnings leads here.")
    return ("Lead = sparsity level of the metric's sustained drop minus the level where the signal fired, in "
            "percentage points (positive: the warning came first); mean ± half-width of its 95 % t interval over "
            "the runs where both happened.\n\n" + "\n".join(lines) + f"\n\n{verdict}\n")


__all__ = ["SIGNALS", "best_signal", "study_markdown", "study_sweep", "study_table"]
