"""The ``rtl`` command line: ``demo``, ``run CONFIG``, ``report RUN``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Routing the Lottery: one shared weight tensor, one pruning mask per data context.")
console = Console()


class RichProgress:
    """A ProgressSink drawing one bar over the whole run, with ETA."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=total)

    def advance(self, steps: int, status: str) -> None:
        self.progress.update(self.task, advance=steps, description=status)


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("routing_lottery") / "configs" / f"{name}.yaml"))


def resolve_config(config: str) -> Path:
    """A config path, or the bare name of a packaged config (``cifar10``, ``digits``)."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = packaged_config(config.removesuffix(".yaml"))
    if packaged.is_file():
        return packaged
    raise typer.BadParameter(f"no config file {config!r} (and no packaged config of that name)")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``a.b=1`` pairs into a nested mapping; values parsed as YAML (numbers, lists, null)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def execute(config_path: Path, out: Path, scale: Optional[str], overrides: dict[str, Any]) -> None:
    from .config import load_config
    from .experiment import Experiment

    try:
        config = load_config(config_path, scale, overrides)
        experiment = Experiment(config, out)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"[bold]{config.name}[/bold]: {experiment.num_contexts} contexts, "
                  f"{experiment.total:,} prunable weights, sparsities {', '.join(f'{s:.0%}' for s in experiment.levels)}, "
                  f"{len(experiment.schedule)} IMP rounds, device {experiment.device} -> {out}")
    columns = [TextColumn("{task.description}", style="cyan"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        experiment.progress = RichProgress(bar, experiment.planned_steps())
        experiment.log = lambda message: bar.console.print(f"  {message}")
        try:
            records = experiment.run_all()
        except (ValueError, FileNotFoundError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from None
    print_table(records, title=f"{config.name} (written to {out})")


def print_table(records: list[dict[str, Any]], title: str) -> None:
    from .report import METHOD_LABEL, _cell, metric_keys, sorted_records

    rows = sorted_records(records)
    keys = metric_keys(rows)
    table = Table(title=title)
    for h in ["sparsity", "method", *keys]:
        table.add_column(h, justify="right" if h not in ("method",) else "left")
    for r in rows:
        table.add_row(f"{r['sparsity']:.0%}", METHOD_LABEL.get(r["method"], r["method"]), *[_cell(k, r.get(k)) for k in keys])
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (re-running on it resumes)."),
    scale: Optional[str] = typer.Option(None, help="A scale defined in the digits config."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set training.epochs=4."),
) -> None:
    """Table 1 on scikit-learn's bundled handwritten digits: dense, single IMP, multiple IMP, RTL, random."""
    execute(packaged_config("digits"), out, scale, parse_overrides(set_))


@app.command()
def run(
    config: str = typer.Argument(..., help="A YAML config file, or a packaged config name (digits, cifar10, cifar100)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<config name>); re-running resumes."),
    scale: Optional[str] = typer.Option(None, help="smoke or full (as the config defines)."),
    data: Optional[Path] = typer.Option(None, help="Directory holding the dataset files (sets data.root)."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set training.epochs=4."),
) -> None:
    """Run (or resume) any experiment config."""
    path = resolve_config(config)
    overrides = parse_overrides(set_)
    if data is not None:
        overrides.setdefault("data", {})["root"] = str(data)
    execute(path, out or Path("runs") / path.stem, scale, overrides)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory.")) -> None:
    """Print the results table of a finished run."""
    from .io import read_json

    path = run_dir / "results.json"
    if not path.exists():
        console.print(f"[red]error:[/red] {path} not found: is {run_dir} a finished run?")
        raise typer.Exit(2)
    print_table(read_json(path), title=str(run_dir))


if __name__ == "__main__":
    app()
