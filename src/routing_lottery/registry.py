"""Registries: names (or ``package.module:attribute`` import paths) for the things a config picks.

One registry per concern -- methods, tasks, models, datasets -- so a new one is one file plus one
``@REGISTRY.register("name")`` line, and a config (or the command line) can name a user's own
code by import path without the library knowing it in advance.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class RegistryError(ConfigError):
    """A name that is neither registered nor an importable ``package.module:attribute`` path."""


def import_path(path: str) -> object:
    """The object named by ``package.module:attribute`` (attribute may be dotted)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise RegistryError(f"{path!r} is not an import path of the form package.module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as err:
        # The `rtl` script's sys.path starts at its own bin directory, not where the user stands:
        # look in the working directory too, as `python -m` would.
        if os.getcwd() in sys.path or "" in sys.path:
            raise RegistryError(f"cannot import {module_name!r} for {path!r} ({err}); is it on PYTHONPATH?") from None
        sys.path.insert(0, os.getcwd())
        return import_path(path)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{module_name!r} has no attribute {attribute!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named entries of one kind; ``get`` also resolves ``package.module:attribute`` paths."""

    def __init__(self, kind: str, loaders: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        # Modules that register the built-in entries, imported on first lookup so that importing
        # the registry stays cheap and free of cycles.
        self._loaders = loaders
        self._loaded = not loaders

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("ghostnet")`` over a factory (or any object)."""
        if ":" in name:
            raise ValueError(f"registered names cannot contain ':' (reserved for import paths): {name!r}")

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._loaders:
                importlib.import_module(module)

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or the object at import path ``name``."""
        self._load()
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return import_path(name)  # type: ignore[return-value]
        raise RegistryError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}, "
                            "or give an import path package.module:attribute")

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
