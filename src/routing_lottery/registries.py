"""The experiment framework's registries: the methods, tasks and data sets a config names.

They sit at the bottom of the framework, below everything that registers into them, so that
``config`` checks a name when it is loaded (before a run directory is claimed) without
importing the runner, the tasks or the methods. The built-in entries are registered by their
own modules (``methods/``, ``run/builders``), which a registry imports by name on its first
lookup: the plugin direction, as entry points work, rather than an import running upward.
A user's entry is one ``@REGISTRY.register("name")`` or a ``package.module:attribute`` path.
(Models have theirs in ``models``, which has no dependency above it.)
"""

from __future__ import annotations

from typing import Any

from .registry import Registry

METHODS: Registry[Any] = Registry("method", loaders=("routing_lottery.methods.baselines",
                                                     "routing_lottery.methods.shared"), setting="methods")
"""Compared methods (``methods.Method``): dense, single_imp, multi_imp, rtl, random, and users'."""

TASKS: Registry[Any] = Registry("task", loaders=("routing_lottery.run.builders",))
"""Task builders ``(config) -> Task | list[Task]``: classification, inr, speech, and users'."""

DATASETS: Registry[Any] = Registry("dataset", loaders=("routing_lottery.run.builders",), setting="data.name")
"""Classification data loaders ``(data config, seed) -> data.labelled.Splits``: digits, cifar10, cifar100, and users'."""

__all__ = ["DATASETS", "METHODS", "TASKS"]
