"""Deploying a finished run: refit the detectors' thresholds (``rtl calibrate``), export one context
(``rtl export``).

The deployment rows themselves -- routers, routing errors, calibrated detectors beside oracle
routing -- are part of every routed method's fit (``methods.deployment``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..diagnose import rtl_checkpoints
from ..errors import CheckpointError, ConfigError, DataError
from ..io import atomic_write_json, atomic_write_text
from ..methods.deployment import Row, calibration_rows
from ..calibration import detector_metrics
from ..channels import ChannelStructure
from ..export import export_context, inside_directory, safe_filename
from ..routed import as_tuple
from ..report import markdown_table
from ..router import router_problem
from ..contract import supports
from ..tickets import AdaptiveTickets
from .builders import build_tasks
from .experiment import Experiment


def _check_routers(run_dir: Path, checkpoints: Iterable[Path], features: Callable[[Any], torch.Tensor] | None) -> None:
    """``CheckpointError`` naming the first saved router that does not load, before calibration rewrites anything.

    Calibration rewrites each checkpoint in turn (its router with it); stopping at a bad router
    halfway would leave some levels recalibrated and the rest not. Resuming the run refits it.
    """
    for path in checkpoints:
        if (path / "router").is_dir():  # a checkpoint saved without a learned router has nothing to check
            problem = router_problem(path / "router", features)
            if problem is not None:
                raise CheckpointError(f"{problem}. Run the command that made the run (`rtl run CONFIG --out "
                                      f"{run_dir}`) again on it: the resume refits the router; then calibrate")


def calibrate_run(run_dir: str | Path, deploy: Mapping[str, Any] | None = None, log: Callable[[str], None] = print
                  ) -> list[Row]:
    """Fit (or refit) the thresholds of a finished run's RTL detectors: ``rtl calibrate RUN``.

    The run's own config (``config.yaml``) rebuilds its task, and so the same calibration split;
    ``deploy`` overrides its deploy settings (objective, target precision, delta, rule). Each RTL
    checkpoint gets the new thresholds (rewritten atomically, weights and masks unchanged); the
    rows before and after go to ``calibration.json``/``.md`` and the precision-recall figures to
    ``calibration/``. Returns the rows.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    config = config.replace(deploy={**dataclasses.asdict(config.deploy), "calibration": config.deploy.calibration or "f1",
                                    **(deploy or {})})
    tasks = build_tasks(config)
    if len(tasks) != 1 or not supports(tasks[0], "detectors"):
        raise ConfigError(f"{run_dir}: calibration fits thresholds of one-vs-rest detectors; task {config.task!r} has none")
    task = tasks[0]
    try:
        task.context_examples("calibration")
    except DataError as err:
        raise DataError(f"{run_dir}: {err}, then run it again (the held-out examples change the training data)") from None
    checkpoints = rtl_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} holds no RTL checkpoints (checkpoints/rtl_*): run it with method rtl first")
    _check_routers(run_dir, checkpoints.values(), task.router_features if supports(task, "router_features") else None)
    experiment = Experiment(config, run_dir, task, log=log)
    rows: list[Row] = []
    with experiment.run.locked():
        for level, path in checkpoints.items():
            tickets = AdaptiveTickets.load(path, experiment.model)
            routed = tickets.routed

            def predict(k: int, x: torch.Tensor) -> torch.Tensor:
                return routed(x.to(experiment.device), k)

            test_scores = task.detector_scores(predict, "test")
            _, test_contexts = task.context_examples("test")
            before = {**detector_metrics(test_scores, test_contexts, None), "routing": "logit 0"}
            calibrated, thresholds = calibration_rows(experiment, "rtl", level, predict, test_scores)
            tickets.thresholds = thresholds
            kept = {k: v for k, v in tickets.metadata.items() if k not in ("recipe", "masked", "sparsity", "thresholds")}
            tickets.save(path, kept)
            common = {"experiment": config.name, "method": "rtl", "sparsity": level}
            rows += [{**common, **before}, {**common, **calibrated[0]}]
            log(f"rtl at {level:.0%}: precision {before['precision']:.3f} -> {calibrated[0]['precision']:.3f}, "
                f"recall {before['recall']:.3f} -> {calibrated[0]['recall']:.3f} (test)")
        atomic_write_json(run_dir / "calibration.json", rows)
        columns = ["routing", "precision", "recall", "balanced_accuracy", "fires_none", "fires_several",
                   "decided_accuracy", "target_met"]
        figures = "".join(f"\n![rtl at {lv:.0%}](calibration/rtl_{lv:.4f}.png)\n" for lv in checkpoints)
        atomic_write_text(run_dir / "calibration.md",
                          f"# Calibrated detectors: {config.name}\n\nObjective `{config.deploy.calibration}`"
                          + (f", target precision {config.deploy.target_precision:g}" if config.deploy.calibration
                             == "precision" else "") + (f", delta {config.deploy.delta:g}" if config.deploy.delta else "")
                          + f", rule `{config.deploy.rule}`; thresholds fitted on the held-out calibration split, "
                          "scored on test.\n\n" + markdown_table(rows, columns) + figures)
    return rows


def export_run(run_dir: str | Path, context: str, level: float | None = None, out: str | Path | None = None,
               rows: int = 256, kernels: bool = False) -> dict[str, Any]:
    """``rtl export``: context ``context`` of a finished run's RTL tickets at ``level`` (default: the highest).

    The default directory is ``RUN/export/<safe_filename(context)>_<level>``, checked to resolve
    inside the run directory (context names come from data sets, and a class may be named ``../x``).
    """
    run_dir = Path(run_dir)
    checkpoints = rtl_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"{run_dir} holds no RTL checkpoints (checkpoints/rtl_*); for a run with several seeds "
                              "or images, name one: RUN/seeds/<s> or RUN/images/<name>")
    if level is None:
        level = max(checkpoints)
    match = [lv for lv in checkpoints if abs(lv - level) < 5e-5]
    if not match:
        raise ValueError(f"no RTL checkpoint at sparsity {level}; {run_dir} has {sorted(checkpoints)}")
    level = match[0]
    config = load_config(run_dir / "config.yaml")
    tasks = build_tasks(config.replace(replicates=1))
    task = tasks[0] if len(tasks) == 1 else next((t for t in tasks if getattr(t, "name", None) == run_dir.name), None)
    if task is None:
        raise ConfigError(f"{run_dir}: cannot tell which of the config's parts this run is; export from its own directory")
    tickets = AdaptiveTickets.load(checkpoints[level], task.build_model())
    routed = tickets.routed
    channels = None
    # a name first (contexts may be named "0", "1", ...), else an index
    # a context's name first; else digits (with a sign: -1 is refused as an index, not looked up as a name)
    as_index = context not in routed.masks.context_names and re.fullmatch(r"[+-]?[0-9]{1,18}", context)
    k = routed.masks.check_context(int(context) if as_index else context)
    if out is None:
        folder = f"{safe_filename(routed.masks.context_names[k], k)}_{level:.4f}"
        out = inside_directory(run_dir / "export" / folder, run_dir, "the run directory")
    example = _context_inputs(task, k, rows)
    first = example[:2] if isinstance(example, torch.Tensor) else tuple(t[:2] for t in example)
    if config.pruning.granularity == "channel":
        # the groups are a function of the architecture and the recipe's roots: traced again here
        channels = ChannelStructure.trace(tickets.model, first, tickets.selected)
    return export_context(routed, k, out, first, verify=example,
                          metadata={"run": str(run_dir), "sparsity": level, "experiment": config.name},
                          kernels=kernels, channels=channels)


def _context_inputs(task: Any, k: int, rows: int) -> Any:
    """Up to ``rows`` test inputs of context ``k`` (the task's ``context_examples``), else a training batch."""
    if supports(task, "examples"):
        inputs, contexts = task.context_examples("test")
        chosen = (torch.as_tensor(contexts) == k).nonzero(as_tuple=True)[0][:rows]
        if len(chosen):
            parts = as_tuple(inputs)
            picked = tuple(p[chosen] for p in parts)
            return picked if len(picked) > 1 else picked[0]
    batch = task.context_stream(k).epoch(torch.Generator().manual_seed(0))[0][0]
    return batch[:rows] if isinstance(batch, torch.Tensor) else tuple(t[:rows] for t in batch)
