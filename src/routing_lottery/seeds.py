"""Tables over seeds: per-seed records into summary records (mean, 95 % interval, n) and paired tests.

A summary record has the identifying keys of its group (method, sparsity, and image,
environment or routing where the records have them), ``n`` (the seeds it averages), ``seeds``,
and for every numeric measurement the mean under its own name plus ``<key>_low``/``<key>_high``
(``statistics.mean_interval``; absent with one seed). Per-context breakdowns are averaged without
an interval. A flag (``target_met``) becomes the share of seeds where it held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .methods import ARGMAX, method_label
from .report import HIGH, LOW, aggregate_rows, is_per_context_key, primary_metric_key, sorted_records
from .statistics import Interval, mean_interval, paired_test

Row = dict[str, Any]
COMPARISONS = (("rtl", "single_imp"), ("rtl", "multi_imp"), ("rtl" + ARGMAX, "single_imp"))
"""Paired differences reported by default: RTL against one shared mask and against K models, and RTL's
detectors as one K-way classifier against the single-mask classifier (where the context is the label)."""


GROUP_KEYS = ("experiment", "method", "sparsity", "image", "environment", "routing", "error_rate", "objective")
"""The keys that name a group of records (a row of a table); every other key is measured or carried."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value))


def _is_numeric(value: Any) -> bool:
    """A number, finite or not (a diverged seed's NaN must show, not vanish)."""
    return isinstance(value, (int, float))


def summarize_seeds(records: Sequence[Row]) -> list[Row]:
    """One summary record per group of records that differ only in their seed and measurements.

    Records group by ``GROUP_KEYS``. A key that is a number in every record of a group is
    measured; one that is not a finite number in some seed gives NaN with ``<key>_nonfinite``,
    the count of such seeds (a diverged seed is shown, not averaged away). Other values are kept
    where every seed agrees on them.
    """
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    out = []
    for key, rows in groups.items():
        summary: Row = {k: v for k, v in zip(GROUP_KEYS, key) if any(k in r for r in rows)}
        summary["n"] = len(rows)
        summary["seeds"] = sorted({r["seed"] for r in rows if "seed" in r})
        keys = list(dict.fromkeys(k for r in rows for k in r if k not in summary and k != "seed"))
        for k in keys:
            present = [r.get(k) for r in rows]
            if not all(_is_numeric(v) for v in present):
                if all(v == present[0] for v in present):  # a label every seed agrees on
                    summary[k] = present[0]
                continue
            values = [float(v) for v in present]
            bad = sum(not math.isfinite(v) for v in values)
            if bad:
                summary[k], summary[k + "_nonfinite"] = math.nan, bad
                continue
            whole = all(isinstance(v, int) and not isinstance(v, bool) for v in present)
            if whole and len(set(values)) == 1:  # a count every seed agrees on (passes, parameters): itself
                summary[k] = present[0]
                continue
            if is_per_context_key(k) or all(isinstance(v, bool) for v in present):
                summary[k] = sum(values) / len(values)  # a flag: the share of seeds where it held
                continue
            interval = mean_interval(values)
            summary[k] = round(interval.mean) if whole and interval.low is None else interval.mean
            if interval.low is not None:
                summary[k + LOW], summary[k + HIGH] = interval.low, interval.high
        out.append(summary)
    return sorted_records(out)


def interval_of(record: Row, key: str) -> Interval | None:
    """The interval a summary record holds for ``key`` (None when it holds no number for it)."""
    if not _is_number(record.get(key)):
        return None
    low, high = record.get(key + LOW), record.get(key + HIGH)
    return Interval(float(record[key]), low, high, int(record.get("n", 1)))


def paired_comparisons(records: Sequence[Row], metric: str | None = None,
                       comparisons: Sequence[tuple[str, str]] = COMPARISONS) -> list[Row]:
    """Per sparsity, ``a - b`` of the primary metric over the seeds both methods ran (oracle rows only;
    INR: the image means, speech: all environments).

    Returns rows with ``sparsity``, ``comparison`` (the labels), ``metric``, ``n``, ``difference``,
    ``difference_low``/``_high``, ``p_wilcoxon`` and ``p_t`` (``statistics.paired_test``).
    """
    rows = aggregate_rows([r for r in records if "routing" not in r])
    metric = metric or primary_metric_key(rows)
    if metric is None:
        return []
    value = {(r["method"], float(r["sparsity"]), r.get("seed")): float(r[metric]) for r in rows
             if _is_number(r.get(metric))}
    out = []
    for level in sorted({lv for _, lv, _ in value if lv > 0}):
        for a, b in comparisons:
            seeds = sorted(s for m, lv, s in value if m == a and lv == level and (b, level, s) in value)
            if not seeds:
                continue
            test = paired_test([value[(a, level, s)] for s in seeds], [value[(b, level, s)] for s in seeds])
            d = test.difference
            out.append({"sparsity": level, "comparison": f"{method_label(a)} - {method_label(b)}", "metric": metric,
                        "n": d.n, "difference": d.mean, "difference_low": d.low, "difference_high": d.high,
                        "p_wilcoxon": test.p_wilcoxon, "p_t": test.p_t})
    return out


def paired_markdown(rows: Sequence[Row]) -> str:
    """The paired comparisons as a Markdown table with a sentence on how to read it."""
    if not rows:
        return ""

    def number(v: float | None, digits: int = 3) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    lines = ["| sparsity | comparison | metric | n | mean difference | 95 % interval | p (Wilcoxon) | p (paired t) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        interval = "" if r["difference_low"] is None else f"[{r['difference_low']:.3f}, {r['difference_high']:.3f}]"
        lines.append(f"| {r['sparsity']:.0%} | {r['comparison']} | {r['metric']} | {r['n']} | {r['difference']:+.3f} "
                     f"| {interval} | {number(r['p_wilcoxon'], 4)} | {number(r['p_t'], 4)} |")
    n = max(r["n"] for r in rows)
    return ("Paired over seeds (each method on the same seeds: θ₀, masks and data order). A positive difference "
            "favours the first method. The interval is Student's t on the per-seed differences; the exact "
            f"Wilcoxon signed-rank p-value cannot fall below {2 / 2 ** n:.4f} with {n} seeds.\n\n" + "\n".join(lines) + "\n")


def seeds_note(records: Sequence[Row]) -> str:
    """"mean ± half-width of the 95 % t interval over n seeds", with the n (or range of n) the table holds."""
    ns = sorted({int(r["n"]) for r in records if "n" in r})
    if not ns:
        return ""
    count = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return (f"Each cell: mean ± half-width of its 95 % Student t interval over {count} seeds "
            "(seed s: θ₀, masks and data order; per-seed records in `seeds/<s>/` and `replicates.json`).\n")


__all__ = ["COMPARISONS", "interval_of", "paired_comparisons", "paired_markdown", "seeds_note", "summarize_seeds"]
