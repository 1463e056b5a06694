"""One independent experiment per part (INR: per image), then the mean over parts.

Each part runs in ``images/<name>/`` exactly like a single experiment (own θ₀, contexts and masks;
it resumes the same way); the top-level ``results.json`` holds every part's records plus
``image: "mean"`` rows, the mean of per-part metrics (how the paper computes its INR headline:
the mean of per-image PSNRs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..fingerprint import fingerprint
from ..report import is_per_context_key, write_deployment, write_results
from ..contract import Task
from ..tickets import Log, quiet
from ..training import SILENT, ProgressSink
from .directory import IDENTITY_COPY, IDENTITY_FILE, RunDirectory, run_identity
from .experiment import Experiment

Row = dict[str, Any]
_NOT_AVERAGED = ("experiment", "seed", "method", "sparsity", "image", "train_seconds", "routing", "error_rate")


class ImageSetExperiment:
    """The same comparison on every part; parts are named by ``task.name``."""

    def __init__(self, config: ExperimentConfig, out: str | Path, tasks: Sequence[Task],
                 progress: ProgressSink = SILENT, log: Log = quiet, task_object: bool = False) -> None:
        self.config, self.log = config, log
        self.run = RunDirectory(out, log=log)
        names = [str(getattr(t, "name", f"part_{i}")) for i, t in enumerate(tasks)]
        if len(set(names)) != len(names):
            raise ValueError(f"parts need distinct names; got {names}")
        identity = run_identity(config, fingerprint([t.data_fingerprint() for t in tasks]), tasks[0])
        if any((self.run.path / name).exists() for name in (IDENTITY_FILE, IDENTITY_COPY)):
            self.run.claim(identity, config)  # a resumed run with other settings is refused before any part
        self.parts = [Experiment(config, self.run.path / "images" / n, t, progress, log, task_object=task_object)
                      for n, t in zip(names, tasks)]
        self.run.claim(identity, config)
        self.summary = ""
        self.deployment: list[Row] = []

    @property
    def description(self) -> str:
        first = self.parts[0]
        return (f"{len(self.parts)} images, {', '.join(str(p.num_contexts) for p in self.parts)} regions, "
                f"{first.tickets.total:,} masked weights, {len(first.tickets.schedule)} IMP rounds, device {first.device}")

    @property
    def levels(self) -> list[float]:
        return self.parts[0].levels

    def planned_steps(self) -> int:
        return sum(p.planned_steps() for p in self.parts)

    def run_all(self) -> list[Row]:
        with self.run.locked():
            return self._run_all()

    def _run_all(self) -> list[Row]:
        records: list[Row] = []
        deployment: list[Row] = []
        for part in self.parts:
            self.log(f"image {part.run.path.name}")
            records += part.run_all()
            deployment += part.deployment
        records += mean_over_parts(records)
        deployment += mean_over_parts(deployment)
        self.deployment = deployment
        self.summary = rtl_wins(records)
        write_results(self.run.path, records, self.config, summary=self.summary,
                      columns=["image", "psnr", "parameters", "storage_bytes"] if any("psnr" in r for r in records)
                      else None)
        write_deployment(self.run.path, deployment, records, self.config)
        return records


def mean_over_parts(records: Sequence[Row]) -> list[Row]:
    """One ``image: "mean"`` row per (method, sparsity) -- and routing, for deployment rows: the mean of
    every numeric metric shared by its parts.

    Per-context metrics are left out: contexts (regions) differ from part to part.
    """
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in records:
        groups.setdefault((r["method"], r["sparsity"], r.get("routing"), r.get("error_rate")), []).append(r)
    rows = []
    for (method, level, routing, rate), rs in groups.items():
        keys = [k for k in rs[0] if k not in _NOT_AVERAGED and not is_per_context_key(k)
                and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rs)]
        row: Row = {"experiment": rs[0]["experiment"], "method": method, "sparsity": level, "image": "mean"}
        row.update({k: v for k, v in (("seed", rs[0].get("seed")), ("routing", routing), ("error_rate", rate))
                    if v is not None})
        for k in keys:
            mean = sum(r[k] for r in rs) / len(rs)
            row[k] = round(mean) if all(isinstance(r[k], int) for r in rs) else mean
        rows.append({**row, "images": len(rs)})
    return rows


def rtl_wins(records: Sequence[Row], metric: str = "psnr") -> str:
    """On how many parts RTL's metric beat the single mask's, at each sparsity."""
    value = {(r["method"], r["sparsity"], r["image"]): r[metric] for r in records
             if r.get("image") != "mean" and metric in r}
    lines = []
    for level in sorted({lv for m, lv, _ in value if m == "rtl"}):
        parts = [i for m, lv, i in value if m == "rtl" and lv == level and ("single_imp", lv, i) in value]
        wins = sum(value[("rtl", level, i)] > value[("single_imp", level, i)] for i in parts)
        if parts:
            lines.append(f"At {level:.0%} sparsity RTL beat the single mask on {wins} of {len(parts)} images.")
    return "\n".join(lines)
