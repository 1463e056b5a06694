"""The ``rtl`` command line, the experiment framework's thin face: ``demo``, ``run CONFIG`` (an LM config
too), ``sweep``, ``budget``, ``study``, ``diagnose RUN``, ``calibrate RUN``, ``export RUN``, ``partition``
and ``report RUN`` (``rtl COMMAND --help`` says what each takes)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from .budget import (
    DEFAULT_METHODS, budget_study, closest_budget, epoch_points, learning_rate_points, paper_regime_point,
    per_class_points, regime_markdown,
)
from .config import load_config, load_yaml
from .contexts.clustering import partition_names
from .contexts.encoders import EncoderUnavailable
from .contexts.names import name_set
from .contexts.partitions import format_partition, reference_partition, reference_scores
from .data.digits import DIGIT_NAMES
from .diagnose import diagnose_run, DiagnoseSettings, mask_collapse_warning
from .diagnostics.collapse import CollapseSettings
from .errors import brief, CheckpointError, ConfigError, RoutingLotteryError, shorten
from .io import read_json
from .kernels import choices_markdown, KernelChoice
from .methods import method_label
from .report import metric_keys, record_cell, sorted_records
from .run import make_runner
from .run.deploy import calibrate_run, export_run
from .run.distributed import torchrun_session
from .run.lm import is_lm_config, load_lm_config, results_markdown, run_lm_experiment
from .sweep import study_sweeps, write_sweep_report
from .threads import thread_budget
from .training import SILENT

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Routing the Lottery: one shared weight tensor, one pruning mask per data context.")
console = Console()
console.width = max(console.width, 140)  # tables (with seed intervals) stay readable in logs and narrow terminals


class RichProgress:
    """A ProgressSink drawing one bar over the whole run; its total is set once the run is planned.

    The ETA is the steps left times the mean time of the steps this process trained: steps found
    on disk (a resumed run) are skipped in no time and must not make the rest look instant.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None, start=False, eta="")
        self.trained, self.started = 0, time.perf_counter()

    def plan(self, total: int) -> None:
        self.progress.update(self.task, total=total)
        self.progress.start_task(self.task)
        self.started = time.perf_counter()

    def advance(self, steps: int, status: str) -> None:
        if "on disk" not in status:
            self.trained += steps
        task = self.progress.tasks[self.task]
        left = (task.total or 0) - task.completed - steps
        eta = ""
        if self.trained:
            seconds = max(0.0, left) * (time.perf_counter() - self.started) / self.trained
            eta = time.strftime("%H:%M:%S", time.gmtime(seconds))
        self.progress.update(self.task, advance=steps, description=status, eta=eta)


class _Options:
    debug = False


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="On an error, print its full traceback.")) -> None:
    _Options.debug = debug


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``command``; any error becomes one red line (the traceback only with ``rtl --debug``)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, click.exceptions.ClickException, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 -- every error reaches the user as one line
            if _Options.debug:
                raise
            console.print(f"[red]error:[/red] {escape(error_line(err))}")
            raise typer.Exit(2) from None

    return run


def error_line(err: BaseException) -> str:
    """The one line an error is reported as: the library's documented errors (and ``ValueError`` /
    ``OSError``, the standard ones for bad input) as their message, anything else as "unexpected"
    with its type. At most 1,000 characters: a message that quotes a huge value stays one line."""
    if isinstance(err, (RoutingLotteryError, ValueError, OSError)):
        message = str(err)
    else:
        message = f"{type(err).__name__}: {err} (unexpected; `rtl --debug ...` shows where)"
    return shorten(message)


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("routing_lottery") / "configs" / f"{name}.yaml"))


PACKAGED_CONFIGS = ", ".join(sorted(p.stem for p in packaged_config("digits").parent.glob("*.yaml")))
CONFIG_HELP = f"A YAML config file, or a packaged config: {PACKAGED_CONFIGS}."
WORKERS_HELP = ("Processes for stage 1 (the per-context and single-mask IMP runs), each with the cores shared out "
                "(or --set threads=T each).")
SEEDS_HELP = ("Run this many seeds (seed, seed+1, ...), each a full run in DIR/seeds/<seed>; tables then show the mean "
              "and a 95 % interval, with paired tests of RTL against the baselines.")
DEVICE_HELP = ("Where to train: auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps. "
               "Not part of the run's identity: a run moved to another device resumes.")


def resolve_config(config: str) -> Path:
    """A config path, or the bare name of a packaged config (``cifar10``, ``digits``)."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = packaged_config(config.removesuffix(".yaml"))
    if packaged.is_file():
        return packaged
    raise ConfigError(f"no config file {config!r} (and no packaged config of that name: {PACKAGED_CONFIGS})")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``a.b=1`` pairs into a nested mapping; values parsed as YAML (numbers, lists, null)."""

    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY (training.epochs=4); got {brief(pair)}")
        parsed = load_yaml(value, f"--set {shorten(pair, 120)}: the value")  # bounded as a config file is (aliases, sizes)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {brief(key)}: {brief(p)} is set to a value and used as a section")
        node[leaf] = parsed
    return out


def execute(config_path: Path, out: Path, scale: Optional[str], overrides: dict[str, Any],
            before: Optional[Any] = None, overrides_from: str = "--set") -> None:
    """Run a config with a progress bar and print its table; ``before(experiment)`` runs after planning.

    The config is loaded and the run planned (data, model, run directory) before the bar appears,
    so a refused run prints its error without a bar (after its ``threads:`` line: the shared thread
    budget, ``threads.py``, starts first). Under ``torchrun`` (``run.distributed``) rank 0 does all
    of this, sharing stage 1 and the joint-retraining steps with the other ranks, which print
    nothing but errors and leave when the run ends. An invalid override is blamed on
    ``overrides_from``, the options that gave them (``options_named``).
    """

    config = load_config(config_path, scale, overrides, overrides_from=overrides_from)
    session = torchrun_session(config)  # None unless torchrun started several processes
    if session is not None:
        config = session.config  # this rank's thread budget and device
        if not session.leads:
            session.follow(out)  # its share of stage 1, then its rows of every joint-retraining step
            raise typer.Exit(0)  # nothing to print and nothing more to write: the rest is rank 0's
    start = time.perf_counter()
    if console.is_terminal:  # a live bar; in a log file, timed stage lines instead
        columns = [TextColumn("{task.description}", style="cyan"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}")]
        bar: Any = Progress(*columns, console=console, transient=False)
        sink: Any = RichProgress(bar)
        log = lambda message: console.print(f"  {escape(message)}")  # noqa: E731
    else:
        bar, sink = contextlib.nullcontext(), SILENT
        log = lambda message: console.print(f"  [{time.perf_counter() - start:7.1f} s] {escape(message)}")  # noqa: E731
    with contextlib.ExitStack() as stack:
        if session is not None:  # until rank 0 starts the run, its error is every rank's
            stack.enter_context(session.refusing())
        budget = stack.enter_context(thread_budget(config.threads, log))  # its share of the cores, kept up to date
        experiment = make_runner(config, out, progress=budget.watch(sink), log=log)
        stack.enter_context(experiment.run.locked())  # the lock covers what `before` computes too
        console.print(f"[bold]{config.name}[/bold]: {experiment.description} -> {out}")
        if console.is_terminal:
            sink.plan(experiment.planned_steps())
        if session is not None:
            session.start(experiment)  # θ₀ on disk; then the other ranks start, under this rank's lock
        with bar:
            if session is not None:
                session.stage_one(experiment)
            if before is not None:
                before(experiment)
            records = experiment.run_all() if session is None else session.run_all(experiment)
    log(f"finished in {time.perf_counter() - start:.1f} s")
    tickets = "channel tickets" if config.pruning.granularity == "channel" else "weight tickets"
    print_table(records, title=f"{config.name}, {tickets} (written to {out})")
    if getattr(experiment, "summary", ""):
        console.print(experiment.summary)
    if (out / "deployment.md").exists():
        console.print(f"without an oracle (routers, routing errors, calibrated detectors): {out / 'deployment.md'}")


HEADERS = {"balanced_accuracy": "bal. acc.", "precision": "prec.", "parameters": "params",
           "dense_parameters": "dense params", "storage_bytes": "bytes", "train_seconds": "train s",
           "si_snri": "SI-SNRi", "si_snr_input": "SI-SNR in", "si_snr_enhanced": "SI-SNR out", "psnr": "PSNR"}


def print_table(records: list[dict[str, Any]], title: str) -> None:

    rows = sorted_records(records)
    if any(r.get("image") == "mean" for r in rows):  # INR: the mean over images (per image in results.csv)
        rows = [r for r in rows if r.get("image") == "mean"]
    keys = metric_keys(rows)
    table = Table(title=title)
    for h in ["sparsity", "method", *keys]:  # short headers: the table fits 100 columns uncut
        table.add_column(HEADERS.get(h, h.replace("_", " ")), justify="left" if h == "method" else "right",
                         no_wrap=h == "method")
    for r in rows:
        table.add_row(f"{r['sparsity']:.0%}", method_label(r["method"]), *[record_cell(r, k) for k in keys])
    console.print(table)


@app.command()
@reports_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), metavar="DIR", help="Run directory (re-running on it resumes)."),
    scale: Optional[str] = typer.Option(None, metavar="SCALE", help="A scale defined in the digits config."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a setting, e.g. --set training.epochs=4."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    seeds: Optional[int] = typer.Option(None, min=1, metavar="N", help=SEEDS_HELP),
    workers: Optional[int] = typer.Option(None, min=1, metavar="N", help=WORKERS_HELP),
) -> None:
    """Table 1 on scikit-learn's bundled handwritten digits: dense, single IMP, multiple IMP, RTL, random."""
    execute(packaged_config("digits"), out, scale, with_overrides(parse_overrides(set_), None, device, seeds, workers),
            overrides_from=options_named(set_, device=device, seeds=seeds, workers=workers))


@app.command()
@reports_errors
def run(
    config: str = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    out: Optional[Path] = typer.Option(None, metavar="DIR", help="Run directory (default runs/<config name>); re-running resumes."),
    scale: Optional[str] = typer.Option(None, metavar="SCALE", help="smoke or full (as the config defines)."),
    data: Optional[Path] = typer.Option(None, metavar="DIR", help="Directory holding the dataset files (sets data.root)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a setting, e.g. --set training.epochs=4."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    seeds: Optional[int] = typer.Option(None, min=1, metavar="N", help=SEEDS_HELP),
    workers: Optional[int] = typer.Option(None, min=1, metavar="N", help=WORKERS_HELP),
) -> None:
    """Run (or resume) any experiment config (a pretrained-LM config, ``task: lm``, included)."""
    path, overrides = config_and_overrides(config, data, set_, device, seeds, workers)
    if is_lm_config(path):
        if seeds is not None or workers is not None:
            raise ConfigError("--seeds and --workers do not apply to an LM experiment: its repeats are "
                              "pruning.draws (--set pruning.draws=N)")
        execute_lm(path, out or Path("runs") / path.stem, scale, overrides)
        return
    execute(path, out or Path("runs") / path.stem, scale, overrides,
            overrides_from=options_named(set_, data=data, device=device, seeds=seeds, workers=workers))


def execute_lm(config_path: Path, out: Path, scale: Optional[str], overrides: dict[str, Any]) -> None:
    """Run an LM experiment config (``run.lm``) with timed log lines, and print its tables."""
    config = load_lm_config(config_path, scale, overrides)
    start = time.perf_counter()
    log = lambda message: console.print(f"  [{time.perf_counter() - start:7.1f} s] {escape(message)}")  # noqa: E731
    with thread_budget(config.threads, log):
        console.print(f"[bold]{config.name}[/bold]: model {config.model.name}, {config.pruning.score} masks per "
                      f"domain at {', '.join(config.pruning.patterns)} -> {out}")
        records = run_lm_experiment(config, out, log=log)
    console.print(results_markdown(records, config))


def config_and_overrides(config: str, data: Optional[Path], pairs: list[str], device: Optional[str] = None,
                         seeds: Optional[int] = None, workers: Optional[int] = None) -> tuple[Path, dict[str, Any]]:
    """The config file a command names, and its ``--set`` overrides with ``--data`` as ``data.root``."""
    return resolve_config(config), with_overrides(parse_overrides(pairs), data, device, seeds, workers)


def options_named(pairs: list[str], **options: Any) -> str:
    """The command-line options that set something (``--set`` and the given ``options``), as an error
    about an override names them: ``--device tpu9`` is the culprit, not a ``--set`` nobody typed."""
    named = (["--set"] if pairs else []) + [f"--{name}" for name, value in options.items() if value is not None]
    return ", ".join(named) or "--set"


def with_overrides(overrides: dict[str, Any], data: Optional[Path], device: Optional[str],
                   seeds: Optional[int] = None, workers: Optional[int] = None) -> dict[str, Any]:
    """``--set`` overrides plus the options that are settings too: ``--data`` (data.root), ``--device``,
    ``--seeds`` (replicates), ``--workers``."""
    if workers is not None:
        overrides["workers"] = workers
    if data is not None:
        overrides.setdefault("data", {})["root"] = str(data)
    if device is not None:
        overrides["device"] = device
    if seeds is not None:
        overrides["replicates"] = seeds
    return overrides


def sweep_levels(text: str) -> list[float]:
    try:
        levels = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter(f"--levels expects comma-separated fractions, got {text!r}") from None
    return levels


DEFAULT_SWEEP = ",".join(f"{1 - 0.8 ** i:.4f}" for i in range(1, 15))  # 20 % of survivors per level, up to 95.6 %


@app.command()
@reports_errors
def sweep(
    config: str = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    out: Optional[Path] = typer.Option(None, metavar="DIR", help="Run directory (default runs/<config name>-sweep); re-running resumes."),
    scale: Optional[str] = typer.Option(None, metavar="SCALE", help="smoke or full (as the config defines)."),
    data: Optional[Path] = typer.Option(None, metavar="DIR", help="Directory holding the dataset files (sets data.root)."),
    levels: str = typer.Option(DEFAULT_SWEEP, help="Comma-separated sparsity levels."),
    methods: Optional[str] = typer.Option(None, metavar="LIST", help="Comma-separated methods (default: the config's, "
                                          "for the equal-storage comparison); rtl alone is the fastest collapse sweep."),
    threshold: float = typer.Option(3.0, help="Collapse rule: robust residuals off the trend that raise the warning."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a setting, e.g. --set training.epochs=4."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    seeds: Optional[int] = typer.Option(None, min=1, metavar="N", help=SEEDS_HELP),
    workers: Optional[int] = typer.Option(None, min=1, metavar="N", help=WORKERS_HELP),
) -> None:
    """Every method at increasing sparsity: warn of subnetwork collapse from the masks alone, measure the metric,
    compare at equal storage, and study which label-free signal warned first."""

    path, overrides = config_and_overrides(config, data, set_, device, seeds, workers)
    if methods is not None:
        overrides["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
        if "rtl" not in overrides["methods"]:
            raise typer.BadParameter("--methods must include rtl: the sweep studies RTL's masks")
    overrides.setdefault("pruning", {})["sparsities"] = sweep_levels(levels)

    named = options_named(set_, data=data, device=device, seeds=seeds, workers=workers, methods=methods, levels=levels)
    if "rtl" not in load_config(path, scale, overrides, overrides_from=named).methods:  # refused now, not later
        raise typer.BadParameter("the config's methods lack rtl, whose masks the sweep studies; add it with --methods")
    out = out or Path("runs") / f"{path.stem}-sweep"
    settings = DiagnoseSettings(collapse=CollapseSettings(threshold=threshold), layer_heatmaps=False)

    def before_evaluation(experiment: Any) -> None:
        if not hasattr(experiment, "context_masks"):  # several seeds or images: each is diagnosed after its run
            return
        masks = experiment.context_masks()
        warning, scores = mask_collapse_warning(masks, settings.collapse)
        curve = ", ".join(f"{lv:.0%} {sc:.3f}" for lv, sc in zip(masks, scores))
        console.print(f"  similarity score by sparsity (masks only): {curve}")
        console.print(f"  [bold yellow]{warning.message()}[/bold yellow]" if warning.fired else f"  {warning.message()}")

    execute(path, out, scale, overrides, before=before_evaluation, overrides_from=named)
    found = write_sweep_report(out, settings, log=lambda m: console.print(f"  {escape(m)}"))
    for name, verdict in found["verdicts"].items():
        console.print(f"[bold]{escape(name)}[/bold]: {escape(verdict)}")
    console.print(f"report: {out / 'report.md'}")


def number_list(text: str, option: str, kind: type = float) -> list:
    """``1,2,4`` as numbers of ``kind``; a clear error naming ``option`` otherwise."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated {kind.__name__}s, got {brief(text)}") from None


@app.command()
@reports_errors
def budget(
    config: str = typer.Argument(..., metavar="CONFIG", help=CONFIG_HELP),
    out: Optional[Path] = typer.Option(None, metavar="DIR", help="Study directory (default runs/<config name>-budget); "
                                                                 "re-running resumes every point."),
    scale: Optional[str] = typer.Option(None, metavar="SCALE", help="smoke or full (as the config defines)."),
    data: Optional[Path] = typer.Option(None, metavar="DIR", help="Directory holding the dataset files (sets data.root)."),
    epochs: Optional[str] = typer.Option(None, metavar="LIST", help="Multipliers of the config's IMP and retraining "
                                         "epochs, e.g. 1,2,4: one budget point each."),
    per_class: Optional[str] = typer.Option(None, "--per-class", metavar="LIST", help="Training images per class, "
                                            "e.g. 20,40,160: one budget point each."),
    lr: Optional[str] = typer.Option(None, metavar="LIST", help="Learning rates, e.g. 1e-4,1e-3: one point each."),
    paper_regime: bool = typer.Option(False, "--paper-regime", help="Add the under-trained point (1 IMP epoch per "
                                      "round, 1 retraining epoch) and report where single IMP's accuracy comes "
                                      "closest to the paper's 48 %."),
    levels: str = typer.Option("0.5", help="Comma-separated sparsity levels."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), metavar="LIST", help="Comma-separated methods."),
    seeds: int = typer.Option(5, min=1, metavar="N", help="Seeds per budget point (the same seeds at every point)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a setting at every point, e.g. "
                                   "--set deploy.routers=[]."),
    device: Optional[str] = typer.Option(None, metavar="DEVICE", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, min=1, metavar="N", help=WORKERS_HELP),
) -> None:
    """How each method's metric grows with the training budget (epochs, images per class, learning rate), at equal
    samples between RTL and single IMP: budget.md, budget.json and budget.png (issue 26)."""

    path, overrides = config_and_overrides(config, data, set_, device, None, workers)
    base = load_config(path, scale, overrides, overrides_from=options_named(set_, data=data, device=device,
                                                                             workers=workers))
    points = []
    if epochs:
        points += epoch_points(number_list(epochs, "--epochs"), base)
    if per_class:
        points += per_class_points(number_list(per_class, "--per-class", int))
    if lr:
        points += learning_rate_points(number_list(lr, "--lr"))
    if paper_regime:
        points.append(paper_regime_point())
    if not points:
        raise ConfigError("name the budgets to compare: --epochs, --per-class, --lr and/or --paper-regime")
    out = out or Path("runs") / f"{path.stem}-budget"
    start = time.perf_counter()
    log = lambda message: console.print(f"  [{time.perf_counter() - start:7.1f} s] {escape(message)}")  # noqa: E731
    with thread_budget(base.threads, log) as threads:
        result = budget_study(path, out, points, seeds, sweep_levels(levels), scale, overrides, log=log,
                              methods=[m.strip() for m in methods.split(",") if m.strip()],
                              progress=threads.watch(SILENT))
    console.print((out / "budget.md").read_text(), markup=False)
    if paper_regime:
        console.print(regime_markdown(closest_budget(result)), markup=False)
    console.print(f"written: {out / 'budget.md'}, budget.json, budget.png")


@app.command()
@reports_errors
def study(
    sweeps: list[Path] = typer.Argument(..., help="Finished sweep directories (rtl sweep), of one or more experiments."),
    out: Path = typer.Option(Path("runs/study"), metavar="DIR", help="Where study.md and study.json go."),
    threshold: float = typer.Option(3.0, help="Collapse rule: robust residuals off the trend that raise a warning."),
) -> None:
    """Which label-free signal warned of collapse before the metric dropped: each signal's lead, per experiment."""

    study_sweeps(list(sweeps), out, DiagnoseSettings(collapse=CollapseSettings(threshold=threshold)))
    console.print((out / "study.md").read_text())


@app.command()
@reports_errors
def diagnose(
    run_dir: Path = typer.Argument(..., help="A finished run directory with RTL checkpoints."),
    threshold: float = typer.Option(3.0, help="Collapse rule: robust residuals off the trend that raise the warning."),
    measure: str = typer.Option("path", help="WordNet similarity: path (the paper) or wup (Wu-Palmer)."),
    layer_heatmaps: bool = typer.Option(True, help="A heatmap per layer and level (else all-weights only)."),
) -> None:
    """Mask similarity, collapse warning and semantic alignment of a run's RTL masks, with figures and report.md."""

    if measure not in ("path", "wup"):
        raise typer.BadParameter("--measure must be path or wup")
    settings = DiagnoseSettings(collapse=CollapseSettings(threshold=threshold), measure=measure,
                                layer_heatmaps=layer_heatmaps)
    images = sorted(p for p in (run_dir / "images").glob("*") if p.is_dir())
    for part in images or [run_dir]:  # an INR run holds one experiment per image
        summary = diagnose_run(part, settings, log=lambda m: console.print(f"  {m}"))
        print_similarity(part, summary)


@app.command()
@reports_errors
def calibrate(
    run_dir: Path = typer.Argument(..., help="A finished classification run with RTL checkpoints and data.calibration > 0."),
    objective: str = typer.Option("f1", help="Per detector: f1, balanced_accuracy, or precision (see --target-precision)."),
    target_precision: float = typer.Option(0.8, help="objective precision: the precision each detector must reach."),
    delta: Optional[float] = typer.Option(None, help="objective precision: guarantee it with probability 1 - delta "
                                                     "(Learn-Then-Test)."),
    rule: str = typer.Option("most_confident", help="When zero or several detectors fire: most_confident or abstain."),
) -> None:
    """Fit a threshold per RTL detector on the run's held-out calibration split (never test), save them with the
    tickets, and write calibration.md with precision and recall before and after."""

    calibrate_run(run_dir, {"calibration": objective, "target_precision": target_precision, "delta": delta,
                            "rule": rule}, log=lambda m: console.print(f"  {escape(m)}"))
    console.print(f"written: {run_dir / 'calibration.md'}")


@app.command()
@reports_errors
def export(
    run_dir: Path = typer.Argument(..., help="A finished run with RTL checkpoints (for several seeds or images: one "
                                             "of them, RUN/seeds/<s> or RUN/images/<name>)."),
    context: str = typer.Option(..., metavar="NAME", help="The context to export (its name or index)."),
    sparsity: Optional[float] = typer.Option(None, help="The RTL level to export (default: the highest)."),
    out: Optional[Path] = typer.Option(None, metavar="DIR", help="Export directory (default RUN/export/<context>_<level>)."),
    kernels: bool = typer.Option(False, "--kernels", help="Also pick dense, CSR or BSR per layer by timing them on this "
                                                          "machine (prepared.pt) and report the measured speed-up."),
) -> None:
    """One context's subnetwork as files that run without this library: compact weights (kept values + 1-bit mask),
    a standalone loader, a torch.export program, and export.json with sizes, checksums and a verification."""

    if context.startswith("-") and context[1:].isdigit():  # -1 is not "the last": say so, not "unknown name"
        raise ConfigError(f"--context {brief(context)}: context indices run from 0 to K-1 (K contexts; they do not "
                          "count back from the end); give an index >= 0 or the context's name")
    index = export_run(run_dir, context, sparsity, out, kernels=kernels)
    kept = (f"channel ticket sliced to {index['parameters']:,} of {index['dense_parameters']:,} parameters"
            if index.get("granularity") == "channel" else f"density {index['density']:.1%}")
    table = Table(title=f"{index['context']} at {index['sparsity']:.0%} sparsity ({kept})")
    for h in ("file", "bytes", "sha256"):
        table.add_column(h, justify="right" if h == "bytes" else "left")
    for f in index["files"]:
        table.add_row(f["file"], f"{f['bytes']:,}", f["sha256"][:16] + "...")
    console.print(table)
    v = index["verification"]
    console.print(f"dense state as safetensors: {index['dense_file_bytes']:,} bytes; compact weights: "
                  f"{index['compact_ratio']:.2f}x of it. "
                  f"Outputs on {v['rows']} inputs of this context equal the routed model's (max |diff| "
                  f"{v['max_abs_diff']:.2g}). {escape(index['program'])}")
    if "kernels" in index:
        k = index["kernels"]
        fields = {f.name for f in dataclasses.fields(KernelChoice)}
        console.print(choices_markdown([KernelChoice(**{**{f: c[f] for f in fields},
                                                        "block": tuple(c["block"]) if c["block"] else None})
                                        for c in k["layers"]]))
        console.print(f"prepared.pt on {k['batch']} rows, {k['threads']} thread(s): {k['speedup']:.2f}x the dense "
                      "subnetwork's speed (median of 7 interleaved calls)")


def print_similarity(run_dir: Path, summary: dict[str, Any]) -> None:
    """The similarity score by level and depth group, then the collapse verdict."""
    table = Table(title=f"mask similarity ({run_dir})")
    for h in ("sparsity", "mean score", "shallow", "middle", "deep"):
        table.add_column(h, justify="right")
    for key, entry in summary["per_level"].items():
        g = entry["group_mean"]
        table.add_row(f"{float(key):.0%}", f"{entry['mean_score']:.3f}",
                      *[f"{g[k]:.3f}" if k in g else "" for k in ("shallow", "middle", "deep")])
    console.print(table)
    console.print(f"[bold]{summary['verdict']}[/bold]\nreport: {run_dir / 'report.md'}")


@app.command()
@reports_errors
def partition(
    names: str = typer.Option("cifar100", help="cifar100, cifar10, digits, or a text file with one class name per line."),
    out: Path = typer.Option(Path("runs/partition"), metavar="DIR", help="Directory for partition.json."),
    clusters: Optional[int] = typer.Option(8, help="Target cluster count (the paper: 8); 0 lets HDBSCAN decide."),
    seed: int = typer.Option(0, help="Seed of UMAP (same names + seed: same clusters)."),
    reference: Optional[str] = typer.Option(None, help="Print a shipped partition instead: paper or superclasses."),
    template: Optional[str] = typer.Option(None, help='Prompt around each name, e.g. "a photo of a {}".'),
) -> None:
    """Group class names into contexts: offline text embeddings, UMAP, HDBSCAN; scored against the paper."""

    try:
        if reference is not None:
            result = reference_partition(reference)
        else:
            if names == "digits":
                class_names = list(DIGIT_NAMES)
            elif Path(names).is_file():
                class_names = [line.strip() for line in Path(names).read_text().splitlines() if line.strip()]
            else:
                class_names = list(name_set(names))
            with console.status(f"embedding and clustering {len(class_names)} names"):
                result = partition_names(class_names, target=clusters or None, seed=seed, template=template)
    except (EncoderUnavailable, KeyError) as err:
        raise ConfigError(str(err)) from None
    console.print(format_partition(result))
    search = result.settings.get("search", {})
    if result.settings:
        used = {k: v for k, v in result.settings.items() if k != "search"}
        console.print(f"settings: {used}")
    if search:
        console.print(f"search: {search.get('outcome', '')} ({search.get('exact_hits', '?')} of "
                      f"{search.get('tried', '?')} settings gave the target)")
    for key, value in reference_scores(result).items():
        console.print(f"adjusted Rand index vs {key}: {value:.3f}")
    path = result.save(out / "partition.json")
    console.print(f"written: {path}")


@app.command()
@reports_errors
def report(run_dir: Path = typer.Argument(..., help="A run directory.")) -> None:
    """Print the results table of a finished run."""

    path = run_dir / "results.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: is {run_dir} a finished run?")
    records = read_json(path)
    if isinstance(records, list) and records and all(isinstance(r, dict) and "domain" in r and "pattern" in r
                                                     for r in records):
        console.print(results_markdown(records))  # an LM experiment (run.lm): perplexity per domain
        return
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("method"), str)
                                                and isinstance(r.get("sparsity"), (int, float)) for r in records):
        raise CheckpointError(f"{path} is not a list of result records; re-run the run to rewrite it")
    print_table(records, title=str(run_dir))


if __name__ == "__main__":
    app()
