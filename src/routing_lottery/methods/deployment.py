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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..calibration import Thresholds, decide, detector_metrics, fit_thresholds, plot_precision_recall
from ..routed import RoutedModel, as_tuple
from ..router import (build_router, fit_router, flatten_features, inject_errors, needs_fitting, plot_confusion,
                      router_problem, routing_accuracy, save_router)
from ..contract import supports, task_setting
from ..training import derive_seed, generator
from . import ARGMAX
from .context import RunContext

Row = dict[str, Any]
RoutedPredict = Callable[[int, torch.Tensor], torch.Tensor]


def router_applies(run: RunContext, name: str) -> bool:
    """Whether the run records router ``name``: the config asks for it and the task supports it."""
    return (supports(run.task, "routing") and name in run.config.deploy.routers
            and name in task_setting(run.task, "routers"))


def _router_features(task: Any) -> Any:
    """What the learned router reads of an input: the task's feature map, else the flattened input."""
    return task.router_features if supports(task, "router_features") else flatten_features


def learned_router(run: RunContext) -> Any:
    """The run's learned router, fitted once on the training contexts (it does not depend on the method)."""
    if run.learned_router is None:
        inputs, contexts = run.task.context_examples("train")
        features = _router_features(run.task)
        run.learned_router = fit_router("learned", inputs, contexts, len(run.task.context_names), features=features,
                                        seed=derive_seed(run.config.seed, "router") % 2**32)
    return run.learned_router


def repair_router(run: RunContext, checkpoint: Path) -> None:
    """Refit the learned router saved with a reused ticket checkpoint when it does not load; log one line.

    A resumed run reuses a finished RTL level after checking its masks, and the router in
    ``<checkpoint>/router`` went unchecked: a truncated or bit-flipped file stayed, and every later
    ``rtl export`` and ``rtl calibrate`` failed on it. The router is a function of the training
    contexts and the run's seed only (``learned_router``), so fitting it again gives the same file,
    byte for byte, without retraining the level; the level's recorded deployment rows stay valid.
    """
    if not router_applies(run, "learned"):
        return
    directory = checkpoint / "router"
    problem = router_problem(directory, _router_features(run.task))
    if problem is None:
        return
    save_router(learned_router(run), directory)
    run.log(f"{problem}; refitted the learned router into {directory}")


def _routers(run: RunContext, routed: RoutedModel | None, thresholds: Thresholds | None) -> dict[str, Any]:
    """The routers the config asks for and the task supports, built through the registry (``router.ROUTERS``)."""
    routers: dict[str, Any] = {}
    for name in (r for r in run.config.deploy.routers if router_applies(run, r)):
        if needs_fitting(name):  # fitted on the training contexts, once per run
            routers[name] = learned_router(run) if name == "learned" else fit_router(
                name, *run.task.context_examples("train"), len(run.task.context_names),
                seed=derive_seed(run.config.seed, "router", name) % 2**32)
        elif routed is not None:  # the others read the K masks of one shared network
            routers[name] = build_router(name, thresholds=thresholds)
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
    if callable(reuse) and supports(task, "detectors"):
        chosen = reuse(task.detector_scores(predict, "test"))
        if chosen is not None:
            return chosen.cpu(), True
    return _choose(router, routed, inputs, device, batch), False


def routed_rows(run: RunContext, method: str, level: float, predict: RoutedPredict,
                routed: RoutedModel | None) -> list[Row]:
    """A routed method's rows: the task's oracle scoring (timed), then its ``deployment_rows``.

    ``predict(k, x)`` runs context k's subnetwork (or model); ``routed`` is the shared network with
    its K masks (None for K separate models, which only a router of their own can route)."""
    # the same detector scores serve every row below
    with run.task.reusing_scores() if supports(run.task, "reusing_scores") else contextlib.nullcontext():
        start = time.perf_counter()
        with torch.no_grad():
            rows = run.task.score_routed(predict, f"{method}_{level:.4f}", run.outputs)
        seconds = time.perf_counter() - start
        return rows + argmax_rows(run, method, predict) + deployment_rows(run, method, level, predict, routed, seconds)


def argmax_rows(run: RunContext, method: str, predict: RoutedPredict) -> list[Row]:
    """Where the context is the label: the K detectors as one K-way classifier (the most confident
    detector's context is the answer), scored like the dense and single-IMP classifiers -- the
    like-for-like comparison the detector metrics alone lack. A results row, method ``<method>+argmax``."""
    task = run.task
    if not supports(task, "argmax"):
        return []
    scores = task.detector_scores(predict, "test")
    return [{**task.score_predictions(scores.argmax(dim=1)), "method": method + ARGMAX}]


def deployment_rows(run: RunContext, method: str, level: float, predict: RoutedPredict,
                    routed: RoutedModel | None, oracle_seconds: float) -> list[Row]:
    """Every deployment row of one method at one level (see the module docstring); [] if the task opts out."""
    task = run.task
    if not supports(task, "routing"):  # scoring a routing it did not choose: context_examples + chosen=
        return []
    rows: list[Row] = []
    thresholds = None
    if routed is not None and run.config.deploy.calibration is not None and _can_calibrate(task):
        calibrated, thresholds = calibration_rows(run, method, level, predict)
        rows += calibrated
        if method == "rtl":
            run.tickets.thresholds = thresholds  # saved with the tickets
    inputs, true = task.context_examples("test")
    batch = int(task_setting(task, "eval_batch_size"))
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
        plot_confusion(choices, true, list(task.context_names), run.directory / "routing" / f"{label}.png",
                       title=f"{method} at {level:.0%}: routers (rows: true context)")
    if not supports(task, "context_is_label"):
        for rate in run.config.deploy.error_rates:
            chosen = inject_errors(true, rate, len(task.context_names), generator(run.config.seed, "routing errors",
                                                                                  str(rate)))
            scored = task.score_routed(predict, f"{label}_errors", None, chosen=chosen)
            rows += [{**r, "routing": "errors", "error_rate": rate,
                      "routing_accuracy": routing_accuracy(chosen, true)} for r in scored]
    return rows


def _can_calibrate(task: Any) -> bool:
    if not supports(task, "detectors"):
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


def calibration_rows(run: RunContext, method: str, level: float, predict: RoutedPredict,
                     test_scores: torch.Tensor | None = None) -> tuple[list[Row], Thresholds]:
    """Fit, score and draw one method's calibrated detectors at one level (``test_scores``: the
    detectors' test logits when the caller has them already)."""
    thresholds, scores, contexts = fit_run_thresholds(run.config, run.task, predict)
    for k, message in enumerate(thresholds.messages):
        if message:
            run.log(f"{method} at {level:.0%}, detector {run.task.context_names[k]}: {message}")
    plot_precision_recall(scores, contexts, thresholds, run.directory / "calibration" / f"{method}_{level:.4f}.png",
                          names=list(run.task.context_names),
                          title=f"{method} at {level:.0%}: detectors on the calibration split")
    if test_scores is None:
        test_scores = run.task.detector_scores(predict, "test")
    _, test_contexts = run.task.context_examples("test")
    return [calibrated_row(run.config, thresholds, test_scores, test_contexts)], thresholds
