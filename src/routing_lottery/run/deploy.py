"""Deployment without an oracle, measured beside oracle routing: routers, routing errors, calibration.

The paper hands every test input its true context. A method whose subnetworks are routed (RTL,
the random control, multiple IMP) is here also scored

- under each **inferred routing** the task supports (``router.py``; ``task.routers``): the router
  chooses a context per test input, the task scores its subnetworks' outputs with those choices,
  and the row carries the routing accuracy, the forward passes the router spends per input and its
  wall time relative to oracle scoring; the routers' K x K confusion matrices go to ``routing/``;
- under **injected routing errors** (``deploy.error_rates``): that fraction of test inputs sent to
  a uniformly drawn wrong context, the same inputs for every method. Skipped where the context is
  the label (classification: a wrong context there is a wrong answer by definition);
- with **calibrated detectors** (classification with ``data.calibration`` and
  ``deploy.calibration``): thresholds fitted on the held-out calibration split, then scored on test;
  the precision-recall figure goes to ``calibration/``.

Each such row has a ``routing`` key (``detectors``, ``entropy``, ``learned``, ``errors``,
``calibrated``); the runner writes them to ``deployment.json``/``.md``, apart from the oracle results.
A task opts in by having ``context_examples(split)`` and a ``chosen=`` argument to ``score_routed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..calibration import Thresholds, decide, detector_metrics, fit_thresholds, plot_precision_recall
from ..methods import ARGMAX
from ..routed import RoutedModel, as_tuple
from ..training import derive_seed, generator

if TYPE_CHECKING:
    from .experiment import Experiment

Row = dict[str, Any]
RoutedPredict = Callable[[int, torch.Tensor], torch.Tensor]


def supports_routing(task: Any) -> bool:
    """Whether the task can score a routing it did not choose (``context_examples`` + ``score_routed(chosen=)``)."""
    score = getattr(task, "score_routed", None)
    return (callable(getattr(task, "context_examples", None)) and score is not None
            and "chosen" in inspect.signature(score).parameters)


def router_applies(run: Experiment, name: str) -> bool:
    """Whether the run records router ``name``: the config asks for it and the task supports it."""
    return (supports_routing(run.task) and name in run.config.deploy.routers
            and name in getattr(run.task, "routers", ("learned",)))


def learned_router(run: Experiment) -> Any:
    """The run's learned router, fitted once on the training contexts (it does not depend on the method)."""
    if run._learned_router is None:
        from ..router import LearnedRouter, flatten_features

        inputs, contexts = run.task.context_examples("train")
        features = getattr(run.task, "router_features", flatten_features)
        run._learned_router = LearnedRouter.fit(inputs, contexts, len(run.task.context_names), features=features,
                                                seed=derive_seed(run.config.seed, "router") % 2**32)
    return run._learned_router


def repair_router(run: Experiment, checkpoint: Path) -> None:
    """Refit the learned router saved with a reused ticket checkpoint when it does not load; log one line.

    A resumed run reuses a finished RTL level after checking its masks, and the router in
    ``<checkpoint>/router`` went unchecked: a truncated or bit-flipped file stayed, and every later
    ``rtl export`` and ``rtl calibrate`` failed on it. The router is a function of the training
    contexts and the run's seed only (``learned_router``), so fitting it again gives the same file,
    byte for byte, without retraining the level; the level's recorded deployment rows stay valid.
    """
    if not router_applies(run, "learned"):
        return
    from ..router import flatten_features, router_problem

    directory = checkpoint / "router"
    problem = router_problem(directory, getattr(run.task, "router_features", flatten_features))
    if problem is None:
        return
    learned_router(run).save(directory)
    run.log(f"{problem}; refitted the learned router into {directory}")


def _routers(run: Experiment, routed: RoutedModel | None, thresholds: Thresholds | None) -> dict[str, Any]:
    from ..router import DetectorRouter, EntropyRouter

    routers: dict[str, Any] = {}
    for name in (r for r in run.config.deploy.routers if router_applies(run, r)):
        if name == "learned":
            routers[name] = learned_router(run)
        elif routed is not None:  # detectors and entropy read the K masks of one shared network
            routers[name] = DetectorRouter(thresholds=thresholds) if name == "detectors" else EntropyRouter()
    return routers


def _choose(router: Any, routed: RoutedModel | None, inputs: Any, device: torch.device,
            batch: int) -> torch.Tensor:
    parts = as_tuple(inputs)  # multi-input models: a tuple
    chosen = []
    for start in range(0, len(parts[0]), batch):
        x = tuple(p[start:start + batch].to(device) for p in parts)
        chosen.append(router(routed, x if len(x) > 1 else x[0]).cpu())
    return torch.cat(chosen).long()


def _choose_reusing(task: Any, router: Any, predict: RoutedPredict, routed: RoutedModel | None, inputs: Any,
                    device: torch.device, batch: int) -> tuple[torch.Tensor, bool]:
    """``_choose`` on the test split, from the detector logits the task scored already when the router
    decides from those alone (the detector router): the same choices without K more passes.
    Returns the choices and whether they were read from those logits."""
    reuse = getattr(router, "choose_from_logits", None)
    if callable(reuse) and callable(getattr(task, "detector_scores", None)):
        chosen = reuse(task.detector_scores(predict, "test"))
        if chosen is not None:
            return chosen.cpu(), True
    return _choose(router, routed, inputs, device, batch), False


def routed_rows(run: Experiment, method: str, level: float, predict: RoutedPredict,
                routed: RoutedModel | None) -> list[Row]:
    """A routed method's rows: the task's oracle scoring (timed), then its ``deployment_rows``.

    ``predict(k, x)`` runs context k's subnetwork (or model); ``routed`` is the shared network with
    its K masks (None for K separate models, which only a router of their own can route)."""
    reusing = getattr(run.task, "reusing_scores", None)  # the same detector scores serve every row below
    with reusing() if callable(reusing) else contextlib.nullcontext():
        start = time.perf_counter()
        with torch.no_grad():
            rows = run.task.score_routed(predict, f"{method}_{level:.4f}", run.outputs)
        seconds = time.perf_counter() - start
        return rows + argmax_rows(run, method, predict) + deployment_rows(run, method, level, predict, routed, seconds)


def argmax_rows(run: Experiment, method: str, predict: RoutedPredict) -> list[Row]:
    """Where the context is the label: the K detectors as one K-way classifier (the most confident
    detector's context is the answer), scored like the dense and single-IMP classifiers -- the
    like-for-like comparison the detector metrics alone lack. A results row, method ``<method>+argmax``."""
    task = run.task
    if not (getattr(task, "context_is_label", False) and callable(getattr(task, "detector_scores", None))
            and callable(getattr(task, "score_predictions", None))):
        return []
    scores = task.detector_scores(predict, "test")
    return [{**task.score_predictions(scores.argmax(dim=1)), "method": method + ARGMAX}]


def deployment_rows(run: Experiment, method: str, level: float, predict: RoutedPredict,
                    routed: RoutedModel | None, oracle_seconds: float) -> list[Row]:
    """Every deployment row of one method at one level (see the module docstring); [] if the task opts out."""
    task = run.task
    if not supports_routing(task):
        return []
    rows: list[Row] = []
    thresholds = None
    if routed is not None and run.config.deploy.calibration is not None and _can_calibrate(task):
        calibrated, thresholds = calibration_rows(run, method, level, predict)
        rows += calibrated
        if method == "rtl":
            run.tickets.thresholds = thresholds  # saved with the tickets
    from ..router import inject_errors, plot_confusion, routing_accuracy

    inputs, true = task.context_examples("test")
    batch = int(getattr(task, "eval_batch_size", 1000))
    label = f"{method}_{level:.4f}"
    choices: dict[str, torch.Tensor] = {}
    for name, router in _routers(run, routed, thresholds).items():
        start = time.perf_counter()
        chosen, reused = _choose_reusing(task, router, predict, routed, inputs, run.device, batch)
        choices[name] = chosen
        # reused logits cost what the oracle scoring spent on them: the router's cost stays honest
        routing_seconds = time.perf_counter() - start + (oracle_seconds if reused else 0.0)
        start = time.perf_counter()
        scored = task.score_routed(predict, f"{label}_{name}", None, chosen=chosen)
        seconds = routing_seconds + time.perf_counter() - start
        extra = {"routing": name, "routing_accuracy": routing_accuracy(chosen, true),
                 "routing_passes": router.passes, "relative_cost": seconds / max(oracle_seconds, 1e-9)}
        rows += [{**r, **extra} for r in scored]
    if choices:  # the routers side by side, one figure per method and level
        plot_confusion(choices, true, list(task.context_names), run.run.path / "routing" / f"{label}.png",
                       title=f"{method} at {level:.0%}: routers (rows: true context)")
    if not getattr(task, "context_is_label", False):
        for rate in run.config.deploy.error_rates:
            chosen = inject_errors(true, rate, len(task.context_names), generator(run.config.seed, "routing errors",
                                                                                  str(rate)))
            scored = task.score_routed(predict, f"{label}_errors", None, chosen=chosen)
            rows += [{**r, "routing": "errors", "error_rate": rate,
                      "routing_accuracy": routing_accuracy(chosen, true)} for r in scored]
    return rows


def _can_calibrate(task: Any) -> bool:
    if not callable(getattr(task, "detector_scores", None)):
        return False
    try:
        task.context_examples("calibration")
    except (ValueError, KeyError):
        return False
    return True


def fit_run_thresholds(run_config: Any, task: Any, predict: RoutedPredict) -> tuple[Thresholds, torch.Tensor, torch.Tensor]:
    """Thresholds fitted on the task's calibration split (never test), with the calibration scores and contexts."""
    deploy = run_config.deploy
    scores = task.detector_scores(predict, "calibration")
    _, contexts = task.context_examples("calibration")
    thresholds = fit_thresholds(scores, contexts, deploy.calibration or "f1",
                                target_precision=deploy.target_precision if deploy.calibration == "precision" else None,
                                delta=deploy.delta if deploy.calibration == "precision" else None)
    return thresholds, scores, contexts


def calibrated_row(run_config: Any, thresholds: Thresholds, scores: torch.Tensor, contexts: torch.Tensor) -> Row:
    """Test metrics of the detectors (``scores``: their test logits) under ``thresholds``, how often zero /
    one / several fire, and the K-way answer of the configured rule (abstentions count as wrong)."""
    decision = decide(scores, thresholds, run_config.deploy.rule)
    n = len(contexts)
    return {**detector_metrics(scores, contexts, thresholds), "routing": "calibrated",
            "objective": thresholds.objective, "target_met": thresholds.all_met,
            "fires_none": decision.zero / n, "fires_one": decision.one / n, "fires_several": decision.several / n,
            "decided_accuracy": float((decision.routed == contexts).float().mean())}


def calibration_rows(run: Experiment, method: str, level: float, predict: RoutedPredict,
                     test_scores: torch.Tensor | None = None) -> tuple[list[Row], Thresholds]:
    """Fit, score and draw one method's calibrated detectors at one level (``test_scores``: the
    detectors' test logits when the caller has them already)."""
    thresholds, scores, contexts = fit_run_thresholds(run.config, run.task, predict)
    for k, message in enumerate(thresholds.messages):
        if message:
            run.log(f"{method} at {level:.0%}, detector {run.task.context_names[k]}: {message}")
    plot_precision_recall(scores, contexts, thresholds, run.run.path / "calibration" / f"{method}_{level:.4f}.png",
                          names=list(run.task.context_names),
                          title=f"{method} at {level:.0%}: detectors on the calibration split")
    if test_scores is None:
        test_scores = run.task.detector_scores(predict, "test")
    _, test_contexts = run.task.context_examples("test")
    return [calibrated_row(run.config, thresholds, test_scores, test_contexts)], thresholds


def _check_routers(run_dir: Path, checkpoints: Iterable[Path], features: Callable[[Any], torch.Tensor] | None) -> None:
    """``CheckpointError`` naming the first saved router that does not load, before calibration rewrites anything.

    Calibration rewrites each checkpoint in turn (its router with it); stopping at a bad router
    halfway would leave some levels recalibrated and the rest not. Resuming the run refits it.
    """
    from ..errors import CheckpointError
    from ..router import router_problem

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
    from ..config import load_config
    from ..diagnose import rtl_checkpoints
    from ..errors import ConfigError, DataError
    from ..io import atomic_write_json, atomic_write_text
    from ..report import markdown_table
    from ..tickets import AdaptiveTickets
    from .builders import build_tasks
    from .experiment import Experiment

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    config = config.replace(deploy={**dataclasses.asdict(config.deploy), "calibration": config.deploy.calibration or "f1",
                                    **(deploy or {})})
    tasks = build_tasks(config)
    if len(tasks) != 1 or not callable(getattr(tasks[0], "detector_scores", None)):
        raise ConfigError(f"{run_dir}: calibration fits thresholds of one-vs-rest detectors; task {config.task!r} has none")
    task = tasks[0]
    try:
        task.context_examples("calibration")
    except DataError as err:
        raise DataError(f"{run_dir}: {err}, then run it again (the held-out examples change the training data)") from None
    checkpoints = rtl_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} holds no RTL checkpoints (checkpoints/rtl_*): run it with method rtl first")
    _check_routers(run_dir, checkpoints.values(), getattr(task, "router_features", None))
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
