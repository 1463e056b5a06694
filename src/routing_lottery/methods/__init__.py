"""The methods compared everywhere, registered by name with one interface.

- ``dense``: no pruning.  ``single_imp``: one mask for all data.  ``multi_imp``: K independent
  models, one per context.  ``rtl``: K masks over one shared θ, retrained jointly.  ``random``:
  K random masks with RTL's per-tensor counts, retrained jointly (separates specialization from
  mere sparsity).

A method is an object with a ``name``, a table ``label``, what stage 1 it needs, and three calls:
``steps(run)`` (training steps at one level, for progress), ``fit(run, level)`` (train and
score, returning result rows and its accounting) and ``damaged(run, level)`` (whether the files a
finished fit left are intact). ``run`` is a ``methods.context.RunContext``: the few members of
the run a method may use (its tickets, task, streams, device, ...), which the experiment runner
(``run.experiment.Experiment``) provides. A new method is one new
module with ``@METHODS.register("name")`` (built-in ones also listed in ``registries.METHODS``'s loaders), or
``package.module:attribute`` in a config's ``methods``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..registries import METHODS
from .context import RunContext
from .accounting import Accounting


Row = dict[str, Any]


class Method(Protocol):
    name: str
    label: str
    per_level: bool  # False: trained once (dense), reported at sparsity 0
    needs_contexts: bool  # uses the K per-context IMP tickets of stage 1
    needs_single: bool  # uses the single-mask IMP rounds of stage 1

    def steps(self, run: RunContext) -> int:
        """Training steps of one fit (the progress bar's share of this method at one level)."""

    def fit(self, run: RunContext, level: float) -> tuple[list[Row], Accounting]:
        """Train at ``level`` from the run's rewind point and score on the task's test data."""

    def damaged(self, run: RunContext, level: float) -> str | None:
        """What is wrong with the files a finished record of this method left (None: nothing, or none left).

        A resume trusts a record only when what it promised is intact (RTL: its ticket checkpoint).
        """




ARGMAX = "+argmax"
"""Suffix of a routed method's rows scored as one K-way classifier (the most confident detector wins)."""


def method_label(name: str) -> str:
    """A method's name in tables (its registered label, else the name itself)."""
    if name.endswith(ARGMAX):
        return f"{method_label(name.removesuffix(ARGMAX))}, argmax"
    return METHODS.get(name).label if name in METHODS else name


__all__ = ["ARGMAX", "METHODS", "Accounting", "Method", "RunContext", "method_label"]
