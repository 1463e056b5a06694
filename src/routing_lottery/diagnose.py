"""Diagnose a finished run: mask similarity, the collapse warning and semantic alignment, as files.

``diagnose_run(run_dir)`` reads the RTL ticket checkpoints of every sparsity level in a run
directory (``checkpoints/rtl_<level>/``) and writes, under ``run_dir/diagnostics/``:

- per level: the K×K Jaccard matrices (all weights and each layer) as CSV/JSON and heatmaps,
  each subnetwork's similarity score, per-layer mean similarity; the Mantel test of every layer
  against WordNet similarity of the context names and its figure by depth;
- across levels: the similarity score and the task metric against sparsity with the collapse
  warning (from masks alone) and the level where the metric actually dropped; the correlation
  with WordNet against sparsity for shallow, middle and deep layers;
- ``summary.json``, and ``report.md`` in the run directory linking every figure beside the
  results table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .diagnostics import figures
from .diagnostics.collapse import CollapseSettings, CollapseWarning, detect_collapse, metric_drop_level
from .diagnostics.semantic import MantelResult, WordNetUnavailable, layer_alignment, semantic_similarity_matrix
from .diagnostics.signals import study_sweep
from .diagnostics.similarity import ALL_WEIGHTS, SimilarityReport, depth_groups, similarity_report
from .channels import channel_view
from .io import CheckpointError, atomic_write_json, atomic_write_text, load_masks, read_json
from .masks import MaskSet
from .report import markdown_table, per_context_values

METRICS = {"balanced_accuracy": 0.02, "psnr": 0.5, "si_snri": 0.5}
"""The primary metric of each experiment and the fall (in its own units) that counts as a drop."""

Log = Callable[[str], None]


@dataclass
class DiagnoseSettings:
    collapse: CollapseSettings = field(default_factory=CollapseSettings)
    drop_tolerance: float | None = None  # None: the metric's default in METRICS
    measure: str = "path"  # WordNet similarity: "path" (the paper) or "wup" (Wu-Palmer)
    permutations: int = 999
    layer_heatmaps: bool = True


def rtl_checkpoints(run_dir: Path) -> dict[float, Path]:
    """Sparsity level -> RTL ticket checkpoint directory, ascending."""
    found = {}
    for path in (run_dir / "checkpoints").glob("rtl_*"):
        try:
            found[float(path.name.removeprefix("rtl_"))] = path
        except ValueError:
            continue
    return dict(sorted(found.items()))


def load_level_masks(run_dir: Path) -> tuple[dict[float, MaskSet], dict[str, Any]]:
    """The RTL masks of every level, and the metadata of the first level's checkpoint."""
    checkpoints = rtl_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} holds no RTL checkpoints (checkpoints/rtl_*): run it with method rtl first")
    loaded = {level: load_masks(path) for level, path in checkpoints.items()}
    masks = {level: masks for level, (masks, _) in loaded.items()}
    metadata = next(iter(loaded.values()))[1]
    groups = metadata.get("channel_groups")
    if groups:  # channel tickets: similarity over the channels each context keeps, not the weights they span
        try:
            masks = {level: channel_view(m, groups) for level, m in masks.items()}
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CheckpointError(f"{run_dir}: unreadable channel_groups in the ticket metadata ({err})") from None
    return masks, metadata


def mask_collapse_warning(masks: dict[float, MaskSet], settings: CollapseSettings) -> tuple[CollapseWarning, list[float]]:
    """The collapse rule applied to the mean similarity score of each level's masks (no labels)."""
    levels = sorted(masks)
    scores = [similarity_report(masks[level]).mean_score for level in levels]
    return detect_collapse(levels, scores, settings), scores


def primary_metric(records: Sequence[dict[str, Any]]) -> str | None:
    return next((m for m in METRICS if any(m in r for r in records)), None)


def rtl_metric_by_level(records: Sequence[dict[str, Any]], metric: str) -> dict[float, float]:
    """The RTL metric per level (the row without a sub-group, or the mean over sub-group rows)."""
    by_level: dict[float, list[float]] = {}
    image_set = any(r.get("image") == "mean" for r in records)  # a run over images: use the mean rows
    for r in records:
        if (r["method"] == "rtl" and metric in r and r.get("environment", "all") == "all"
                and (not image_set or r.get("image") == "mean")):
            by_level.setdefault(float(r["sparsity"]), []).append(float(r[metric]))
    return {level: float(np.mean(v)) for level, v in sorted(by_level.items())}


def rtl_context_metric_by_level(records: Sequence[dict[str, Any]], metric: str,
                                context_names: Sequence[str]) -> dict[float, list[float]]:
    """Each RTL subnetwork's metric on its own context, per level: ``<metric>_context_k`` keys of
    the level's row, or (speech) the rows whose ``environment`` is the context's name."""
    by_level: dict[float, list[float]] = {}
    for r in records:
        if r["method"] != "rtl" or r.get("image") == "mean":
            continue
        level = float(r["sparsity"])
        values = per_context_values(r, metric, len(context_names))
        if values is not None:
            by_level[level] = values
        elif r.get("environment") in context_names and metric in r:
            by_level.setdefault(level, [math.nan] * len(context_names))[
                list(context_names).index(r["environment"])] = float(r[metric])
    return {level: v for level, v in sorted(by_level.items()) if not any(math.isnan(x) for x in v)}


def _semantic(context_names: Sequence[str], members: Sequence[Sequence[str]] | None, measure: str,
              log: Log) -> tuple[np.ndarray | None, str]:
    """WordNet similarity of the contexts, or None with the reason it is unavailable or uninformative."""
    try:
        semantic = semantic_similarity_matrix(list(members) if members else list(context_names), measure=measure)
    except (WordNetUnavailable, ValueError) as err:
        log(f"semantic alignment skipped: {err}")
        return None, str(err)
    off = semantic[~np.eye(len(semantic), dtype=bool)]
    if np.ptp(off) == 0:
        reason = (f"every pair of contexts is equally similar in WordNet ({measure} similarity {off[0]:.3f}), "
                  "so no correlation with mask similarity can be measured")
        log(f"semantic alignment: {reason}")
        return None, reason
    return semantic, ""


def diagnose_run(run_dir: str | Path, settings: DiagnoseSettings | None = None, log: Log = lambda m: None) -> dict[str, Any]:
    """Write every diagnostic of a finished run; return the summary that ``summary.json`` holds."""
    settings = settings or DiagnoseSettings()
    run_dir = Path(run_dir)
    out = run_dir / "diagnostics"
    masks, metadata = load_level_masks(run_dir)
    levels = list(masks)
    first = masks[levels[0]]
    if first.num_contexts < 2:
        raise ValueError("diagnostics compare masks of different contexts; this run has a single context")
    semantic, semantic_note = _semantic(first.context_names, metadata.get("context_members"), settings.measure, log)

    summary: dict[str, Any] = {"levels": levels, "context_names": first.context_names, "per_level": {}}
    reports: dict[float, SimilarityReport] = {}
    alignments: list[dict[str, MantelResult]] = []
    figures_made: dict[str, list[str]] = {"sweep": []}
    for level in levels:
        log(f"similarity at {level:.0%}")
        report = similarity_report(masks[level])
        reports[level] = report
        level_dir = out / f"rtl_{level:.4f}"
        report.write(level_dir)
        tag = f"RTL {level:.0%}: "
        if settings.layer_heatmaps:
            pngs = figures.plot_report_heatmaps(report, level_dir, title_prefix=tag)
        else:
            pngs = {ALL_WEIGHTS: figures.plot_similarity_heatmap(
                report.overall, report.context_names, level_dir / "jaccard_all.png", f"{tag}Jaccard, all prunable weights")}
        entry: dict[str, Any] = {"mean_score": report.mean_score, "scores": dict(zip(report.context_names, report.scores.tolist())),
                                 "group_mean": report.group_mean, "heatmap": str(pngs[ALL_WEIGHTS].relative_to(run_dir))}
        if semantic is not None:
            alignment = layer_alignment(report.matrices(), semantic, n_permutations=settings.permutations)
            alignments.append(alignment)
            atomic_write_json(level_dir / "alignment.json", {n: a.to_dict() for n, a in alignment.items()})
            png = figures.plot_alignment_by_depth(alignment, level_dir / "alignment_by_depth.png",
                                                  title=f"{tag}mask vs WordNet similarity by depth")
            entry["alignment_all"] = alignment[ALL_WEIGHTS].to_dict()
            entry["alignment_figure"] = str(png.relative_to(run_dir))
        summary["per_level"][f"{level:.4f}"] = entry

    # -- the sweep view: collapse warning (masks only) against the metric (labels) --------------
    warning = detect_collapse(levels, [reports[lv].mean_score for lv in levels], settings.collapse)
    summary["collapse"] = warning.to_dict()
    records = read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else []
    metric = primary_metric(records)
    drop = None
    metric_values = per_context = None
    if metric:
        by_level = rtl_metric_by_level(records, metric)
        if all(lv in by_level for lv in levels):
            metric_values = [by_level[lv] for lv in levels]
            tolerance = settings.drop_tolerance if settings.drop_tolerance is not None else METRICS[metric]
            drop = metric_drop_level(levels, metric_values, tolerance, sustained=True)
            summary["metric"] = {"name": metric, "values": metric_values, "tolerance": tolerance, "drop_level": drop}
            by_context = rtl_context_metric_by_level(records, metric, first.context_names)
            if all(lv in by_context for lv in levels):
                per_context = [by_context[lv] for lv in levels]
                summary["metric"]["per_context"] = dict(zip(first.context_names, map(list, zip(*per_context))))
    summary["verdict"] = collapse_verdict(warning, drop, metric, len(levels))
    log(summary["verdict"])
    if len(levels) >= 2:
        scores = np.stack([reports[lv].scores for lv in levels])
        png = figures.plot_collapse_sweep(levels, scores, out / "collapse_sweep.png", first.context_names,
                                          metric=metric_values, metric_name=(metric or "").replace("_", " "),
                                          metric_per_context=per_context,
                                          warning_level=warning.level, drop_level=drop,
                                          title="RTL masks: similarity score and task metric vs sparsity")
        figures_made["sweep"].append(str(png.relative_to(run_dir)))
        if alignments:
            png = figures.plot_alignment_vs_sparsity(levels, alignments, out / "alignment_vs_sparsity.png")
            figures_made["sweep"].append(str(png.relative_to(run_dir)))
    summary["semantic_note"] = semantic_note
    summary["figures"] = figures_made["sweep"]
    atomic_write_json(out / "summary.json", summary)
    write_report(run_dir, records, summary, reports)
    return summary


def study_run(run_dir: str | Path, settings: CollapseSettings | None = None) -> dict[str, Any] | None:
    """``study_sweep`` on one finished run directory (its RTL checkpoints and results), with its
    experiment and seed; None when it has fewer levels than the rule needs or no metric at every level."""
    run_dir = Path(run_dir)
    settings = settings or CollapseSettings()
    masks, _ = load_level_masks(run_dir)
    records = read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else []
    metric = primary_metric(records)
    levels = [lv for lv in masks if lv > 0]
    if metric is None or len(levels) < settings.min_history + 1:
        return None
    by_level = rtl_metric_by_level(records, metric)
    if not all(lv in by_level for lv in levels):
        return None
    rtl = [r for r in records if r.get("method") == "rtl"]
    result = study_sweep(levels, [masks[lv] for lv in levels], [by_level[lv] for lv in levels], METRICS[metric],
                         settings)
    return {"run": str(run_dir), "experiment": rtl[0].get("experiment", run_dir.name) if rtl else run_dir.name,
            "seed": rtl[0].get("seed") if rtl else None, "metric": metric, **result}


def collapse_verdict(warning: CollapseWarning, drop: float | None, metric: str | None, num_levels: int) -> str:
    """One plain sentence: did the label-free warning fire, and did the metric drop after it?"""
    if num_levels < warning.settings.min_history + 1:
        return (f"collapse rule not applicable: {num_levels} sparsity level(s), it needs at least "
                f"{warning.settings.min_history + 1} (run `rtl sweep` for a sweep)")
    said = (f"collapse warning at {warning.level:.0%} sparsity (similarity {warning.direction}s off its trend)"
            if warning.fired else "no collapse warning fired")
    if metric is None:
        return said + "; no metric in results.json to compare with"
    if drop is None:
        return said + f"; {metric} did not drop at any level"
    dropped = f"{metric} dropped at {drop:.0%}"
    if not warning.fired:
        return f"{said}, but {dropped}: the warning missed it"
    lead = drop - warning.level
    if lead > 0:
        return f"{said}; {dropped}: the warning came {lead:.0%} of sparsity earlier"
    if lead == 0:
        return f"{said}; {dropped}, at the same level"
    return f"{said}; {dropped}, before the warning: the warning came too late"


def write_report(run_dir: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any],
                 reports: dict[float, SimilarityReport]) -> Path:
    """``report.md``: results table, collapse verdict, similarity by depth, links to every figure."""
    lines = [f"# Report: {run_dir.name}", ""]
    if records:
        lines += ["## Results", "", markdown_table(records), ""]
    lines += ["## Subnetwork collapse", "", summary["verdict"] + ".", "", f"Rule: {summary['collapse']['rule']}", ""]
    lines += [f"![similarity and metric vs sparsity]({f})" for f in summary["figures"]] + [""]
    lines += ["## Mask similarity by depth", "",
              "Mean off-diagonal Jaccard of the K masks per layer group (layers in network order, split in thirds).", "",
              "| sparsity | all | " + " | ".join(depth_groups(next(iter(reports.values())).layer_names)) + " |",
              "|---|---|" + "---|" * len(depth_groups(next(iter(reports.values())).layer_names))]
    for level, report in reports.items():
        groups = report.group_mean
        lines.append(f"| {level:.0%} | {report.mean_score:.3f} | " + " | ".join(f"{v:.3f}" for v in groups.values()) + " |")
    lines += ["", "## Semantic alignment (WordNet)", ""]
    if summary["semantic_note"]:
        lines += [f"Not measured: {summary['semantic_note']}.", ""]
    else:
        lines += ["Spearman correlation between mask Jaccard and WordNet similarity over context pairs, all weights "
                  "(Mantel permutation p-value).", "", "| sparsity | rho | p |", "|---|---|---|"]
        for key, entry in summary["per_level"].items():
            a = entry["alignment_all"]
            rho = "n/a" if a["rho"] is None else f"{a['rho']:.3f}"
            p = "n/a" if a["p_value"] is None else f"{a['p_value']:.3f}"
            lines.append(f"| {float(key):.0%} | {rho} | {p} |")
        lines.append("")
    lines += ["## Figures per level", ""]
    for key, entry in summary["per_level"].items():
        links = [f"[Jaccard heatmap]({entry['heatmap']})"]
        if "alignment_figure" in entry:
            links.append(f"[alignment by depth]({entry['alignment_figure']})")
        lines.append(f"- {float(key):.0%}: " + ", ".join(links) + f"; all matrices in `diagnostics/rtl_{key}/`")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
