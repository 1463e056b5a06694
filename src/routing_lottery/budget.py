"""The training-budget study (issue 26): how each method's metric grows with the budget it trains on.

RTL's deficit to single-mask IMP on the small classification sets could be a property of the
method, of an easy data set, or of the budget. This module answers the last: the same config at
several **budget points** (named sets of config overrides: more IMP and retraining epochs, more
images per class, another learning rate), each run for the same seeds, compared per point and
sparsity level with seed intervals and paired tests.

Equal samples. The comparison is at equal total samples seen between RTL and single IMP, the
paper's rule, and the runs already enforce it: the classification task declares
``shared_epoch_factor = 2`` (``tasks/classification.py``), and the runner trains the shared
network -- single IMP's rounds (``Experiment.single_rounds``: ``factor * imp_epochs`` per round)
and its final training, dense's too (``methods/baselines.py``: ``factor * epochs``) -- for twice
the epochs of a context's stream. A detector epoch shows its positives plus ``negative_ratio`` as
many negatives, so the K detectors together see about ``(1 + negative_ratio) * N`` samples per
epoch against the classifier's ``N``: equal at the default ``negative_ratio: 1``. Each row of the
study carries ``samples_seen``, counted from the run's own streams (``samples_seen``), so the rule
is checked, not assumed; RTL's joint retraining cycles the smaller contexts' batches up to the
largest context's count (``training.joint_retrain``), which the count includes.

Layout of ``out``::

    points/<name>/             one replicate run per point, laid out as ``rtl run --seeds N`` lays one
                               out (seeds/<s>/ per seed even for one seed, replicates.json, paired.json,
                               results.*), resumable; raising the seeds later reuses every finished one
    budget.json                every point's settings, per (point, level, method) the metric's mean,
                               95 % interval and n with its samples seen, and the paired tests
    budget.md                  the budget points and one table per level
    budget.png                 the metric against samples seen, one line per method, seed intervals as bands

A re-run on the same ``out`` trains nothing that finished (each point's runs resume as any run
does) and rewrites the tables from the records. **The paper's regime** (item 3 of the issue):
``paper_regime_point`` is a point with explicit small-budget overrides, and ``closest_budget``
reads, from finished results, the budget at which single IMP's accuracy came closest to the
paper's under-trained baseline -- a reading of points chosen beforehand, never a search.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig, load_config
from .errors import ConfigError, brief
from .io import atomic_write_json, atomic_write_text, read_json
from .methods import ARGMAX, method_label
from .plotting import log_x_axis, save_png
from .report import HIGH, LOW, aggregate_rows, method_rank, method_style, primary_metric_key
from .run import Replicates, make_runner
from .seeds import COMPARISONS, paired_comparisons, summarize_seeds
from .training import SILENT, ProgressSink, Stream

Row = dict[str, Any]
Log = Callable[[str], None]

DEFAULT_METHODS = ("dense", "single_imp", "multi_imp", "rtl")
"""The methods of a budget study: the two baselines of the paper's claim, RTL, and dense as the ceiling."""

BUDGET_VERSION = 1
POINTS_DIR = "points"

PAPER_SINGLE_MASK_ACCURACY = 0.48
"""The paper's single-mask baseline on CIFAR-10: 48 % accuracy (balanced accuracy 0.711, as issue 26 quotes it).

For a K-way classifier on a class-balanced test set, accuracy is the macro recall the records
hold (``recall``), and the macro one-vs-rest balanced accuracy is ``(a + 1 - (1 - a) / (K - 1)) / 2``:
0.711 at a = 0.48 and K = 10, the paper's two numbers."""
PAPER_SINGLE_MASK_BALANCED_ACCURACY = 0.711

STUDY_SETTINGS = {"replicates": "seeds argument", "methods": "methods argument", "pruning.sparsities": "levels argument"}
"""Settings the study itself sets (from the argument named beside each): an override of them is refused."""
POINT_FIXED = {**STUDY_SETTINGS, "seed": "overrides: every point runs the same seeds"}
"""What a point may not set: the study's settings, and the seed (every point runs the same seeds, so points compare)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


# -- budget points ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One training budget: a name (its sub-directory of the study) and the config overrides that make it.

    ``overrides`` is nested as a config file is, e.g. ``{"training": {"imp_epochs": 6, "epochs": 12}}``;
    ``note`` says why the point is there (it is printed in ``budget.md``).
    """

    name: str
    overrides: Mapping[str, Any]
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(f"budget point name {brief(self.name)}: expected 1-64 letters, digits, '_', '.', '+' "
                              "or '-', starting with a letter or digit (it names the point's directory)")
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"budget point {self.name!r}: overrides must be a mapping of settings, "
                              f"got {brief(self.overrides)}")


def _whole(value: float, what: str) -> int:
    """``value`` as an int when it is a whole number >= 1 (epochs are counted whole), else a ConfigError."""
    if not math.isfinite(value) or value < 1 - 1e-9 or abs(value - round(value)) > 1e-9:
        raise ConfigError(f"{what} = {value:g}: epochs must come out as a whole number >= 1")
    return int(round(value))


def _positive_numbers(values: Sequence[Any], what: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{what} must be a non-empty list of positive numbers; got {brief(values)}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v <= 0]
    if bad:
        raise ConfigError(f"{what} must be positive finite numbers; got {brief(bad)}")
    return [float(v) for v in values]


def epoch_points(multipliers: Sequence[float], base_config: ExperimentConfig) -> list[Point]:
    """One point per multiplier m: ``training.imp_epochs`` and ``training.epochs`` of ``base_config`` times m.

    Both stages scale together, so single IMP keeps its factor of the epochs (the equal-samples
    rule) at every point. Raises ConfigError when a product is not a whole number of epochs.

    Example
    -------
    >>> from routing_lottery.cli import packaged_config
    >>> [p.overrides for p in epoch_points([1, 2], load_config(packaged_config("digits")))]
    [{'training': {'imp_epochs': 3, 'epochs': 6}}, {'training': {'imp_epochs': 6, 'epochs': 12}}]
    """
    t = base_config.training
    points = []
    for m in _positive_numbers(multipliers, "epoch multipliers"):
        imp = _whole(t.imp_epochs * m, f"training.imp_epochs {t.imp_epochs} x {m:g}")
        epochs = _whole(t.epochs * m, f"training.epochs {t.epochs} x {m:g}")
        points.append(Point(f"epochs_x{m:g}", {"training": {"imp_epochs": imp, "epochs": epochs}},
                            f"{m:g} x the config's IMP epochs per round and retraining epochs"))
    return points


def per_class_points(counts: Sequence[int | None]) -> list[Point]:
    """One point per count of training images per class (``data.train_per_class``; None: all of them).

    A count above what a class holds gives the whole class (the data loaders cap, they do not repeat).
    """
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or not counts:
        raise ConfigError(f"per-class counts must be a non-empty list of positive integers; got {brief(counts)}")
    bad = [c for c in counts if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1)]
    if bad:
        raise ConfigError(f"per-class counts must be integers >= 1 (or None for all); got {brief(bad)}")
    return [Point("per_class_all" if c is None else f"per_class_{c}", {"data": {"train_per_class": c}},
                  "every training image" if c is None else f"{c} training images per class") for c in counts]


def learning_rate_points(rates: Sequence[float]) -> list[Point]:
    """One point per learning rate (``training.optimizer.lr``): the same samples seen, another step size."""
    return [Point(f"lr_{r:g}", {"training": {"optimizer": {"lr": r}}}, f"learning rate {r:g}")
            for r in _positive_numbers(rates, "learning rates")]


def paper_regime_point(imp_epochs: int = 1, epochs: int = 1, lr: float | None = None,
                       train_per_class: int | None = None, name: str = "paper_regime") -> Point:
    """A point that under-trains on purpose, as the paper's single-mask baseline was.

    The paper's single-mask CIFAR-10 network reached 48 % accuracy (balanced accuracy 0.711), far
    below what it reaches when trained well; the paper's RTL gain is measured against that
    baseline. To ask whether the gain comes from the method or from the baseline's budget, a study
    includes a point whose budget is small by construction -- one IMP epoch per round and one
    retraining epoch (single IMP gets twice as many, as always), optionally a lower learning rate
    or fewer images per class -- with every value stated here, in ``budget.json`` and in
    ``budget.md``. Nothing is searched: ``closest_budget`` then reads which of the study's points
    put single IMP closest to the paper's accuracy, and the comparison at that point is the
    paper's regime. If none comes close (``RegimeMatch.bracketed`` is False), the README says so
    rather than adding points until one does.
    """
    training: dict[str, Any] = {"imp_epochs": imp_epochs, "epochs": epochs}
    if lr is not None:
        training["optimizer"] = {"lr": lr}
    overrides: dict[str, Any] = {"training": training}
    if train_per_class is not None:
        overrides["data"] = {"train_per_class": train_per_class}
    stated = ", ".join(f"{k} {v}" for k, v in [("imp_epochs", imp_epochs), ("epochs", epochs), ("lr", lr),
                                                ("train_per_class", train_per_class)] if v is not None)
    return Point(name, overrides, f"the paper's under-trained single-mask regime, emulated by a small budget: {stated}")


# -- configs of the points --------------------------------------------------------------------------------
def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, Mapping):
            keys += _flat_keys(v, f"{prefix}{k}.")
    return keys


def _refuse_fixed(tree: Mapping[str, Any], fixed: Mapping[str, str], whose: str) -> None:
    taken = [k for k in _flat_keys(tree) if k in fixed]
    if taken:
        raise ConfigError(f"{whose}: {', '.join(taken)} cannot be overridden; the budget study sets it "
                          f"(from its {'; '.join(fixed[k] for k in taken)})")


def _merged(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` deep-merged over ``base`` (as a scale over a config file)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def point_configs(config_path: str | Path, points: Sequence[Point], seeds: int, levels: Sequence[float] | None,
                  methods: Sequence[str] = DEFAULT_METHODS, scale: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, ExperimentConfig]:
    """The config of every point, all validated before anything runs (a typo in the last point costs nothing).

    Raises ConfigError for no points, repeated names, ``seeds`` < 1, an override of what the study
    sets (``STUDY_SETTINGS``; a point may not set ``seed`` either), or any invalid setting, naming
    the point whose override it is.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be an integer >= 1 (runs per budget point); got {brief(seeds)}")
    if not points:
        raise ConfigError("a budget study needs at least one budget point; got none")
    bad = [p for p in points if not isinstance(p, Point)]
    if bad:
        raise ConfigError(f"budget points must be Point objects (epoch_points, per_class_points, ...); got {brief(bad)}")
    names = [p.name for p in points]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"budget point names must differ (each names a directory); repeated: {repeated}")
    overrides = dict(overrides or {})
    _refuse_fixed(overrides, STUDY_SETTINGS, "overrides")
    study: dict[str, Any] = {"replicates": seeds, "methods": list(methods)}
    if levels is not None:
        study["pruning"] = {"sparsities": list(levels)}
    base = load_config(config_path, scale, _merged(overrides, study), overrides_from="the budget study's settings")
    configs = {}
    for p in points:
        _refuse_fixed(p.overrides, POINT_FIXED, f"budget point {p.name!r}")
        configs[p.name] = load_config(config_path, scale, _merged(_merged(overrides, p.overrides), study),
                                      overrides_from=f"budget point {p.name!r}")
    if not any(level > 0 for level in base.pruning.sparsities):
        raise ConfigError(f"levels {list(base.pruning.sparsities)}: a budget study needs a sparsity level > 0")
    return configs


def point_settings(config: ExperimentConfig) -> Row:
    """What a reader compares between points: the budget settings of the point's resolved config."""
    t, d = config.training, config.data
    return {"imp_epochs": t.imp_epochs, "epochs": t.epochs, "lr": t.optimizer.lr, "batch_size": t.batch_size,
            "negative_ratio": t.negative_ratio, "train_per_class": d.train_per_class}


# -- samples seen ------------------------------------------------------------------------------------------
def _epoch_sizes(stream: Stream) -> list[int]:
    """The rows of each batch of one epoch (the same every epoch: only the order is drawn)."""
    return [len(targets) for _, targets in stream.epoch(torch.Generator().manual_seed(0))]


def samples_seen(run: Any, levels: Sequence[float]) -> dict[tuple[str, float], int]:
    """Training samples each built-in method sees to reach and retrain at each level, from ``run``'s streams.

    ``run`` is a ``methods.RunContext`` (``run.experiment.Experiment``). Counted, per method:
    dense ``factor * epochs * C``; single IMP ``factor * imp_epochs * R_single * C + factor * epochs * C``;
    multiple IMP ``imp_epochs * R * D + epochs * D``; RTL and the random control
    ``imp_epochs * R * D + epochs * J``, with C the classifier's samples per epoch, D the
    detectors' together, J joint retraining's (smaller contexts cycle up to the largest's batch
    count), R the IMP rounds up to the level. A ``+argmax`` row counts as its method; a user's
    method is not counted (absent). ``pruning.rewind_steps`` (θ_j's pre-training, shared) is left out.
    Returns ``{}`` for a run without these members (a task with several parts, as the INR).
    """
    members = ("detectors", "classifier", "factor", "tickets", "shared_tickets", "config")
    if not all(hasattr(run, m) for m in members):
        return {}
    t = run.config.training
    classifier = sum(_epoch_sizes(run.classifier))
    detectors = [_epoch_sizes(s) for s in run.detectors]
    longest = max(len(b) for b in detectors)
    per_detector = sum(sum(b) for b in detectors)
    joint = sum(sum(b[m % len(b)] for m in range(longest)) for b in detectors if b)
    out: dict[tuple[str, float], int] = {("dense", 0.0): run.factor * t.epochs * classifier}
    for level in levels:
        rounds = run.tickets.level_round.get(level, -1) + 1  # a level that prunes nothing needs no round
        single = run.shared_tickets.level_round.get(level, -1) + 1
        out[("single_imp", level)] = run.factor * (t.imp_epochs * single + t.epochs) * classifier
        out[("multi_imp", level)] = (t.imp_epochs * rounds + t.epochs) * per_detector
        out[("rtl", level)] = out[("random", level)] = t.imp_epochs * rounds * per_detector + t.epochs * joint
    return out


def _samples_of(samples: Mapping[tuple[str, float], int], method: str, level: float) -> int | None:
    return samples.get((method.removesuffix(ARGMAX), 0.0 if method == "dense" else level))


# -- the study ---------------------------------------------------------------------------------------------
@dataclass
class BudgetResult:
    """What ``budget_study`` found (also ``budget.json``; ``load_budget`` reads it back).

    ``rows``: one per (point, level, method): ``point``, ``sparsity``, ``method``, ``n``, ``seeds``,
    ``samples_seen``, and per metric of ``metrics`` its mean with ``<metric>_low``/``_high`` (the
    95 % t interval over seeds; absent with one seed). Dense is at sparsity 0. ``paired``: per
    (point, level, comparison) the rows of ``seeds.paired_comparisons`` with ``point``.
    ``points``: name, overrides, note and resolved budget settings (``point_settings``), in order.
    """

    out: Path
    config: str
    scale: str | None
    metric: str
    metrics: list[str]
    seeds: list[int]
    levels: list[float]
    methods: list[str]
    points: list[Row]
    rows: list[Row] = field(default_factory=list)
    paired: list[Row] = field(default_factory=list)

    def to_dict(self) -> Row:
        return {"version": BUDGET_VERSION, **{k: v for k, v in asdict(self).items() if k != "out"}}

    def value(self, point: str, level: float, method: str) -> Row | None:
        """The row of (point, level, method), or None (dense: any level gives its sparsity-0 row)."""
        level = 0.0 if method == "dense" else float(level)
        return next((r for r in self.rows if r["point"] == point and r["method"] == method
                     and float(r["sparsity"]) == level), None)


def load_budget(out: str | Path) -> BudgetResult:
    """The ``BudgetResult`` a finished study wrote to ``out/budget.json``."""
    data = read_json(Path(out) / "budget.json")
    if not isinstance(data, dict) or data.get("version") != BUDGET_VERSION:
        raise ConfigError(f"{Path(out) / 'budget.json'} is not a budget study of version {BUDGET_VERSION}; "
                          "re-run the study to rewrite it")
    data.pop("version")
    return BudgetResult(out=Path(out), **data)


def _run_point(config: ExperimentConfig, directory: Path, progress: ProgressSink,
               log: Log) -> tuple[list[Row], dict[tuple[str, float], int]]:
    """One point's replicate run (resuming what is on disk): its per-seed records and samples seen.

    Always the ``seeds/<s>/`` layout of ``Replicates``, one seed included, so raising ``seeds`` later
    resumes in the same directory.
    """
    runner = Replicates(config, directory, lambda c, o: make_runner(c, o, progress, log), log)
    first = runner.parts[runner.seeds[0]]  # built already: its streams are the point's data
    samples = samples_seen(first, [float(s) for s in config.pruning.sparsities])
    runner.run_all()
    records = read_json(directory / "replicates.json")
    return aggregate_rows([r for r in records if "routing" not in r]), samples


def _point_rows(name: str, records: Sequence[Row], samples: Mapping[tuple[str, float], int],
                metrics: Sequence[str]) -> list[Row]:
    """Per (level, method) of one point: the metrics' means and seed intervals (``seeds.summarize_seeds``)."""
    rows = []
    for s in summarize_seeds(records):
        row: Row = {"point": name, "sparsity": float(s["sparsity"]), "method": s["method"], "n": s["n"],
                    "seeds": s["seeds"], "samples_seen": _samples_of(samples, s["method"], float(s["sparsity"]))}
        for m in metrics:
            if m in s:
                row.update({m: s[m], m + LOW: s.get(m + LOW), m + HIGH: s.get(m + HIGH)})
        rows.append(row)
    return rows


def budget_study(config_path: str | Path, out: str | Path, points: Sequence[Point], seeds: int,
                 levels: Sequence[float] | None, scale: str | None = None,
                 overrides: Mapping[str, Any] | None = None, log: Log = print,
                 methods: Sequence[str] = DEFAULT_METHODS, progress: ProgressSink = SILENT,
                 comparisons: Sequence[tuple[str, str]] = COMPARISONS) -> BudgetResult:
    """Run ``config_path`` at every budget point for ``seeds`` seeds, and compare the methods per point and level.

    Parameters
    ----------
    config_path : an experiment config file (``configs/digits.yaml``, ``fashion_mnist.yaml``, ...).
    out : the study's directory; point p runs in ``out/points/<p.name>`` (resumable, as any run).
    points : the budgets (``epoch_points``, ``per_class_points``, ``learning_rate_points``,
        ``paper_regime_point`` or hand-made ``Point``s); every point runs the same seeds.
    seeds : runs per point (seed, seed + 1, ...; the config's ``seed`` first), as ``--seeds`` does.
    levels : sparsity levels (None: the config's).
    scale, overrides : as ``rtl run``'s ``--scale`` and ``--set``; a point's overrides go over them.
    log : one line per step for the person running it.
    methods : the methods run at every point (default ``DEFAULT_METHODS``).
    progress : the progress sink every run trains with.
    comparisons : the paired differences (default ``seeds.COMPARISONS``: RTL - single IMP,
        RTL - multiple IMP, RTL scored as a K-way classifier - single IMP).

    Returns
    -------
    The ``BudgetResult``, also written as ``out/budget.json``, with ``budget.md`` and ``budget.png``.

    Raises ConfigError before anything runs for a bad point or setting (``point_configs``).

    Example
    -------
    >>> from routing_lottery.cli import packaged_config
    >>> result = budget_study(packaged_config("digits"), "runs/budget", per_class_points([40, 160]),
    ...                       seeds=5, levels=[0.5])  # doctest: +SKIP
    """
    configs = point_configs(config_path, points, seeds, levels, methods, scale, overrides)
    out = Path(out)
    first = next(iter(configs.values()))
    records: dict[str, list[Row]] = {}
    samples: dict[str, dict[tuple[str, float], int]] = {}
    for i, p in enumerate(points, 1):
        log(f"budget point {i} of {len(points)}: {p.name} {dict(p.overrides)}")
        records[p.name], samples[p.name] = _run_point(configs[p.name], out / POINTS_DIR / p.name, progress, log)
    metric = primary_metric_key([r for rs in records.values() for r in rs]) or "balanced_accuracy"
    metrics = [metric] + [m for m in ("recall",) if m != metric]  # recall: a K-way classifier's accuracy
    result = BudgetResult(out, str(config_path), scale, metric, metrics, [first.seed + i for i in range(seeds)],
                          [float(s) for s in first.pruning.sparsities if s > 0], list(methods),
                          [{"name": p.name, "overrides": dict(p.overrides), "note": p.note,
                            **point_settings(configs[p.name])} for p in points])
    for p in points:
        result.rows += _point_rows(p.name, records[p.name], samples[p.name], metrics)
        result.paired += [{"point": p.name, **r} for r in paired_comparisons(records[p.name], metric, comparisons)]
    write_budget(result, title=first.name)
    return result


# -- the paper's regime --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegimeMatch:
    """The budget point at which ``method``'s ``metric`` at ``sparsity`` came closest to ``target``.

    ``bracketed``: whether the study's points lie on both sides of the target (False: the closest
    point is an end of the range, and the target regime was not reached). ``comparisons``: the
    paired tests at that point and level (RTL against the baselines there).
    """

    sparsity: float
    point: str
    method: str
    metric: str
    target: float
    value: float
    low: float | None
    high: float | None
    samples_seen: int | None
    bracketed: bool
    comparisons: list[Row]

    @property
    def distance(self) -> float:
        return abs(self.value - self.target)


def closest_budget(result: BudgetResult, target: float = PAPER_SINGLE_MASK_ACCURACY, method: str = "single_imp",
                   metric: str = "recall", level: float | None = None) -> list[RegimeMatch]:
    """Per level (or only ``level``), the point where ``method``'s mean ``metric`` is nearest ``target``.

    The default reads single IMP's accuracy (``recall``: macro recall, which is a K-way classifier's
    accuracy on a class-balanced test set) against the paper's 48 %; for the paper's balanced
    accuracy, ``metric="balanced_accuracy", target=PAPER_SINGLE_MASK_BALANCED_ACCURACY``. Equal
    distances go to the point with fewer samples seen (then the earlier point). Only reads finished
    results: it never chooses a budget to run.
    """
    if metric not in result.metrics:
        raise ValueError(f"metric {metric!r} is not in the study's results; it holds {result.metrics}")
    levels = result.levels if level is None else [float(level)]
    order = {p["name"]: i for i, p in enumerate(result.points)}
    matches = []
    for lv in levels:
        rows = [r for r in result.rows if r["method"] == method and float(r["sparsity"]) == lv
                and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        if not rows:
            raise ValueError(f"no finite {metric} of method {method!r} at sparsity {lv:g} in the study "
                             f"(its methods: {result.methods}, levels: {result.levels})")
        # distances equal up to float noise (0.50 and 0.46 around 0.48) are a tie, decided by the budget
        best = min(rows, key=lambda r: (round(abs(r[metric] - target), 12), r["samples_seen"] or 0,
                                        order.get(r["point"], 0)))
        values = [r[metric] for r in rows]
        matches.append(RegimeMatch(lv, best["point"], method, metric, target, best[metric], best.get(metric + LOW),
                                   best.get(metric + HIGH), best["samples_seen"], min(values) <= target <= max(values),
                                   [c for c in result.paired if c["point"] == best["point"]
                                    and float(c["sparsity"]) == lv]))
    return matches


def regime_markdown(matches: Sequence[RegimeMatch]) -> str:
    """The matches as sentences a README can quote: the point, its value, and RTL's differences there."""
    lines = []
    for m in matches:
        reach = "" if m.bracketed else " (the study's points do not reach the target on both sides: an end of the range)"
        lines.append(f"- {m.sparsity:.0%} sparsity: {method_label(m.method)} {m.metric} closest to {m.target:g} at "
                     f"point `{m.point}`: {_cell(m.value, m.low, m.high)}{reach}.")
        lines += [f"  - {c['comparison']}: {_difference_cell(c)}" for c in m.comparisons]
    return "\n".join(lines) + ("\n" if lines else "")


# -- budget.md and budget.png ------------------------------------------------------------------------------
def _cell(mean: Any, low: Any, high: Any) -> str:
    if not isinstance(mean, (int, float)):
        return "—"
    return f"{mean:.3f}" if low is None or high is None else f"{mean:.3f} ± {(high - low) / 2:.3f}"


def _difference_cell(row: Row) -> str:
    interval = "" if row["difference_low"] is None else f" [{row['difference_low']:+.3f}, {row['difference_high']:+.3f}]"
    p = "" if row["p_wilcoxon"] is None else f", p {row['p_wilcoxon']:.3g}"
    return f"{row['difference']:+.3f}{interval}{p}"


def _shown_methods(result: BudgetResult) -> list[str]:
    return sorted({r["method"] for r in result.rows}, key=method_rank)


def _points_table(result: BudgetResult) -> str:
    lines = ["| point | IMP epochs / round | retraining epochs | lr | train images / class | batch | why |",
             "|---|---|---|---|---|---|---|"]
    for p in result.points:
        per_class = "all" if p["train_per_class"] is None else p["train_per_class"]
        lines.append(f"| `{p['name']}` | {p['imp_epochs']} | {p['epochs']} | {p['lr']:g} | {per_class} "
                     f"| {p['batch_size']} | {p['note']} |")
    return "\n".join(lines) + "\n"


def _comparison_labels(result: BudgetResult, level: float) -> list[str]:
    """The paired comparisons at ``level``, in the order of ``seeds.COMPARISONS`` (others after them)."""
    known = [f"{method_label(a)} - {method_label(b)}" for a, b in COMPARISONS]
    found = {c["comparison"] for c in result.paired if float(c["sparsity"]) == level}
    return [c for c in known if c in found] + sorted(found - set(known))


def _level_table(result: BudgetResult, level: float) -> str:
    methods = _shown_methods(result)
    labels = _comparison_labels(result, level)
    head = ["point", "samples seen (RTL)", *(method_label(m) for m in methods), *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result.points:
        rtl = result.value(p["name"], level, "rtl")
        seen = "—" if rtl is None or rtl["samples_seen"] is None else f"{rtl['samples_seen']:,}"
        cells = []
        for m in methods:
            r = result.value(p["name"], level, m)
            cells.append("—" if r is None else _cell(r.get(result.metric), r.get(result.metric + LOW),
                                                     r.get(result.metric + HIGH)))
        pairs = {c["comparison"]: c for c in result.paired if c["point"] == p["name"] and float(c["sparsity"]) == level}
        cells += [_difference_cell(pairs[c]) if c in pairs else "—" for c in labels]
        lines.append(f"| `{p['name']}` | {seen} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_markdown(result: BudgetResult, title: str = "", figure: str | None = "budget.png") -> str:
    """``budget.md``: how to read it, the points, one table per level, and the figure (when ``figure`` names one)."""
    n = len(result.seeds)
    intro = (f"# Training budget: {title or Path(result.config).stem}\n\n"
             f"{len(result.points)} budget points, each run for {n} seed(s) ({result.seeds[0]}..{result.seeds[-1]}, the "
             f"same at every point). Each cell: {result.metric}, mean ± half-width of the 95 % Student t interval over "
             "seeds (the mean alone for one seed). Differences are paired over seeds: mean [95 % interval], exact "
             "Wilcoxon p (it cannot fall below 2 / 2^n with n seeds). Equal samples: single IMP and dense train for "
             "the task's shared_epoch_factor times the epochs of a context's stream (2 for classification), so "
             "they see as many samples as the K detectors together (`samples_seen` in budget.json, per method). "
             "Dense is trained once per point (sparsity 0) and repeated in every level's table.\n")
    sections = [intro, "## Budget points", "", _points_table(result)]
    for level in result.levels:
        sections += [f"## Sparsity {level:.0%}", "", _level_table(result, level)]
    if figure:
        sections += [f"![budget curves]({figure})", ""]
    return "\n".join(sections)


def _x_values(result: BudgetResult) -> tuple[bool, dict[str, int]]:
    """(whether samples seen can be the x axis, point -> index): samples serve when every row has them
    and no method repeats a count across points at a level (a learning-rate sweep does: then points)."""
    index = {p["name"]: i for i, p in enumerate(result.points)}
    if any(r["samples_seen"] is None for r in result.rows):
        return False, index
    seen: dict[tuple[str, float], list[int]] = {}
    for r in result.rows:
        seen.setdefault((r["method"], float(r["sparsity"])), []).append(r["samples_seen"])
    return all(len(set(v)) == len(v) for v in seen.values()), index


def plot_budget(result: BudgetResult, path: str | Path) -> Path | None:
    """``budget.png``: per level a panel of the metric against samples seen, a line per method, seed bands.

    Dense (sparsity 0) is drawn dashed in every panel. Where samples seen cannot order the points
    (``_x_values``), the x axis is the points in the study's order. Returns None when there is nothing to draw.
    """
    if not result.rows or not result.levels:
        return None
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    numeric, index = _x_values(result)
    fig = Figure(figsize=(4.2 * len(result.levels) + 1.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(result.levels), sharey=True, squeeze=False)[0]
    colors, metric = colormaps["tab10"], result.metric
    for ax, level in zip(axes, result.levels):
        for method in _shown_methods(result):
            rows = [result.value(p["name"], level, method) for p in result.points]
            rows = [r for r in rows if r is not None and isinstance(r.get(metric), (int, float))]
            if not rows:
                continue
            rows.sort(key=lambda r: r["samples_seen"] if numeric else index[r["point"]])
            xs = [r["samples_seen"] if numeric else index[r["point"]] for r in rows]
            color = colors(method_style(method) % colors.N)
            ax.plot(xs, [r[metric] for r in rows], marker="o", ms=4, color=color, label=method_label(method),
                    ls="--" if method == "dense" else "-")
            if all(r.get(metric + LOW) is not None for r in rows):
                ax.fill_between(xs, [r[metric + LOW] for r in rows], [r[metric + HIGH] for r in rows],
                                color=color, alpha=0.15, lw=0)
        if numeric:
            log_x_axis(ax, "training samples seen (log scale)")
        else:
            ax.set_xticks(range(len(result.points)), [p["name"] for p in result.points], rotation=30, ha="right")
            ax.set_xlabel("budget point")
        ax.set_title(f"sparsity {level:.0%}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{metric} against training budget ({len(result.seeds)} seeds, 95 % bands)", fontsize=11)
    return save_png(fig, path)


def write_budget(result: BudgetResult, title: str = "") -> None:
    """``budget.json``, ``budget.png`` and ``budget.md`` in ``result.out``, each written atomically."""
    result.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result.out / "budget.json", result.to_dict())
    figure = plot_budget(result, result.out / "budget.png")
    atomic_write_text(result.out / "budget.md", budget_markdown(result, title, figure.name if figure else None))


__all__ = [
    "BudgetResult", "DEFAULT_METHODS", "PAPER_SINGLE_MASK_ACCURACY", "PAPER_SINGLE_MASK_BALANCED_ACCURACY", "Point",
    "RegimeMatch", "budget_markdown", "budget_study", "closest_budget", "epoch_points", "learning_rate_points",
    "load_budget", "paper_regime_point", "per_class_points", "plot_budget", "point_configs", "point_settings",
    "regime_markdown", "samples_seen", "write_budget",
]
