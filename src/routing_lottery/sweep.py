"""What ``rtl sweep`` writes after the runs: diagnostics per run, equal-storage comparison, collapse study.

A sweep directory may hold one run, one run per seed (``seeds/<s>/``), one per image
(``images/<name>/``), or both. Every such run gets ``rtl diagnose``'s files; the sweep's own
``report.md`` adds, over all of them,

- the results with their seed intervals;
- the equal-storage comparison (``pareto``): RTL against each method's best configuration that
  stores no more weights, with ``pareto.png``;
- the collapse study (``diagnostics.signals``): each label-free signal's lead on the metric's drop,
  per run and summarized, in ``study.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .diagnose import DiagnoseSettings, diagnose_run
from .diagnose import study_run
from .pareto import budget_comparison, budget_markdown, plot_pareto
from .seeds import paired_markdown
from .diagnostics.signals import study_markdown, study_table
from .io import atomic_write_json, atomic_write_text, read_json
from .report import markdown_table, primary_metric_key, aggregate_rows

Log = Callable[[str], None]


def sweep_parts(out: Path) -> list[Path]:
    """The run directories under ``out`` that hold RTL checkpoints, in a stable order."""
    candidates = [out, *sorted((out / "images").glob("*")), *sorted((out / "seeds").glob("*"), key=_seed_order)]
    for seed_dir in sorted((out / "seeds").glob("*"), key=_seed_order):
        candidates += sorted((seed_dir / "images").glob("*"))
    return [p for p in candidates if p.is_dir() and any((p / "checkpoints").glob("rtl_*"))]


def _seed_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.lstrip("-").isdigit() else (0, path.name)


def write_sweep_report(out: str | Path, settings: DiagnoseSettings, log: Log = lambda m: None) -> dict[str, Any]:
    """Diagnose every run of the sweep, then write the sweep's ``report.md``; returns what it found."""
    out = Path(out)
    parts = sweep_parts(out)
    if not parts:
        raise FileNotFoundError(f"{out} holds no RTL checkpoints: is it a finished sweep with method rtl?")
    verdicts = {}
    for part in parts:
        verdicts[str(part.relative_to(out)) or "."] = diagnose_run(part, settings, log=log)["verdict"]
    entries = [e for e in (study_run(p, settings.collapse) for p in parts) if e is not None]
    study = study_table(entries)
    atomic_write_json(out / "study.json", {"runs": entries, "summary": study})
    records = read_json(out / "results.json") if (out / "results.json").exists() else []
    metric = primary_metric_key(aggregate_rows([r for r in records if "routing" not in r]))

    sections = []
    if out not in parts:  # a directory of seeds or images: its own results table first
        sections += ["## Results", "", markdown_table(records), ""]
    if metric and any(r.get("method") == "rtl" for r in records) and len({r["method"] for r in records}) > 1:
        rows = budget_comparison(records, "rtl", metric)
        figure = plot_pareto(records, out / "pareto.png", metric, title=f"{metric} against stored weights")
        sections += ["## Equal storage", "", budget_markdown(rows, metric), ""]
        if figure is not None:
            sections += [f"![equal storage]({figure.name})", ""]
        atomic_write_json(out / "pareto.json", rows)
    if (out / "paired.json").exists():
        sections += ["## Paired tests over seeds", "", paired_markdown(read_json(out / "paired.json")), ""]
    sections += ["## Collapse study", "", study_markdown(study) or "No run had enough levels and a metric at each.", ""]
    sections += ["## Per run", ""] + [f"- `{name}`: {verdict}" for name, verdict in verdicts.items()] + [""]
    head = (out / "report.md").read_text() if out in parts else f"# Sweep: {out.name}\n"
    atomic_write_text(out / "report.md", head.rstrip("\n") + "\n\n" + "\n".join(sections))
    return {"verdicts": verdicts, "study": study, "runs": entries}


def study_sweeps(directories: list[str | Path], out: str | Path, settings: DiagnoseSettings) -> list[dict[str, Any]]:
    """The collapse study over finished sweeps of several experiments: ``study.json`` and ``study.md`` in ``out``."""
    entries = []
    for directory in directories:
        parts = sweep_parts(Path(directory))
        if not parts:
            raise FileNotFoundError(f"{directory} holds no RTL checkpoints: is it a finished sweep?")
        entries += [e for e in (study_run(p, settings.collapse) for p in parts) if e is not None]
    rows = study_table(entries)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", {"runs": entries, "summary": rows})
    atomic_write_text(out / "study.md", "# Collapse study\n\n" + (study_markdown(rows) or "No run had enough levels "
                                                                    "and a metric at each.\n"))
    return rows
