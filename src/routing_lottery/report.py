"""Result tables from a run's records: JSON (machine-readable), CSV, and Markdown for people."""

from __future__ import annotations

import csv
import io as _io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_json, atomic_write_text
from .methods import METHODS, method_label

ID_KEYS = ("experiment", "method", "sparsity")
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


def method_rank(method: str) -> int:
    """A method's place in tables: registration order (dense, single IMP, multiple IMP, RTL, random, then users')."""
    names = METHODS.names()
    return names.index(method) if method in names else len(names)


def sorted_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """By sparsity, then method, keeping the order of sub-groups (images, environments) within them."""
    return sorted(records, key=lambda r: (r["sparsity"], method_rank(r["method"])))


def metric_keys(records: Sequence[dict[str, Any]], per_context: bool = False) -> list[str]:
    """Metric columns in first-seen order, after the identifying keys and before accounting.

    Per-context breakdowns (``per_context_key``) only with ``per_context=True`` (the CSV).
    """
    accounting = ("parameters", "dense_parameters", "storage_bytes", "train_seconds")
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in ID_KEYS and k not in accounting and k not in keys
                 and (per_context or not is_per_context_key(k))]
    return keys + [k for k in accounting if any(k in r for r in records)]


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``records``; ``columns`` restricts (and orders) the metric columns."""
    rows = sorted_records(records)
    keys = [k for k in (columns or metric_keys(rows)) if any(k in r for r in rows)]
    head = ["sparsity", "method", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['sparsity']:.0%}", method_label(r["method"])]
        cells += [format_cell(k, r.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def write_results(run_dir: str | Path, records: Sequence[dict[str, Any]], config: Any | None = None,
                  summary: str = "", columns: Sequence[str] | None = None) -> None:
    """results.json (flat records), results.csv and results.md (``summary`` under the table) in ``run_dir``."""
    run_dir = Path(run_dir)
    rows = sorted_records(records)
    atomic_write_json(run_dir / "results.json", rows)
    atomic_write_text(run_dir / "results.csv", csv_text(rows))
    title = f"# Results: {getattr(config, 'name', 'experiment')}\n\n"
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
    atomic_write_text(run_dir / "results.md", title + body + notes)
