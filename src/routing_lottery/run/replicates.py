"""N seeds of one config: each a complete run of its own, then tables with intervals and paired tests.

Seed s runs in ``<out>/seeds/<s>/`` exactly as ``rtl run --set seed=s`` would (its own θ₀, masks,
data order and resume), so a killed replicate run resumes seed by seed, and raising the count
later reuses every finished seed. ``<out>`` itself holds

- ``replicates.json``: every seed's records, each with its ``seed``;
- ``results.{json,csv,md,png}``: one summary record per method and level (``seeds.summarize_seeds``:
  mean, 95 % interval, n), the figure with interval bars;
- ``paired.json`` and, in ``results.md``, the paired tests (``seeds.paired_comparisons``);
- ``deployment.{json,md,png}`` summarized the same way, when the runs have deployment rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..io import atomic_write_json
from ..report import write_deployment, write_results
from ..seeds import paired_comparisons, paired_markdown, seeds_note, summarize_seeds
from ..tickets import Log, quiet
from .directory import IDENTITY_VERSION, RunDirectory, identity_settings

Row = dict[str, Any]
RunnerFactory = Callable[[ExperimentConfig, Path], Any]


def replicate_seeds(config: ExperimentConfig) -> list[int]:
    """The seeds of a replicate run: ``seed``, ``seed + 1``, ..., ``replicates`` of them."""
    return [config.seed + i for i in range(config.replicates)]


class Replicates:
    """``config.replicates`` runs of ``config``, one per seed, and the tables over them."""

    def __init__(self, config: ExperimentConfig, out: str | Path, runner: RunnerFactory, log: Log = quiet) -> None:
        self.config, self.log, self.runner = config, log, runner
        self.seeds = replicate_seeds(config)
        self.run = RunDirectory(out, log=log)
        # The settings every seed shares (the seed and the count left out): raising --seeds resumes.
        self.run.claim({"version": IDENTITY_VERSION, "replicates_of": identity_settings(config.replace(seed=0))},
                       config)
        first = self.part(self.seeds[0])  # refuses a bad config before any training
        self.parts: dict[int, Any] = {self.seeds[0]: first}
        self._description, self._levels, self._steps = first.description, first.levels, first.planned_steps()
        self.summary = ""
        self.deployment: list[Row] = []

    def part(self, seed: int) -> Any:
        """The runner of one seed, in ``seeds/<seed>``."""
        return self.runner(self.config.replace(seed=seed, replicates=1), self.run.path / "seeds" / str(seed))

    @property
    def description(self) -> str:
        return f"{len(self.seeds)} seeds ({self.seeds[0]}..{self.seeds[-1]}), each: {self._description}"

    @property
    def levels(self) -> list[float]:
        return self._levels

    def planned_steps(self) -> int:
        return self._steps * len(self.seeds)

    def run_all(self) -> list[Row]:
        with self.run.locked():
            return self._run_all()

    def _run_all(self) -> list[Row]:
        records: list[Row] = []
        deployment: list[Row] = []
        for seed in self.seeds:
            self.log(f"seed {seed} ({self.seeds.index(seed) + 1} of {len(self.seeds)})")
            part = self.parts.pop(seed, None) or self.part(seed)  # one seed's data and models in memory at a time
            records += part.run_all()
            deployment += getattr(part, "deployment", [])
        atomic_write_json(self.run.path / "replicates.json", records + deployment)
        summary = summarize_seeds(records)
        paired = paired_comparisons(records)
        atomic_write_json(self.run.path / "paired.json", paired)
        self.summary = paired_markdown(paired)
        write_results(self.run.path, summary, self.config, summary=seeds_note(summary) + "\n" + self.summary)
        self.deployment = summarize_seeds(deployment)
        write_deployment(self.run.path, self.deployment, summary, self.config)
        return summary
