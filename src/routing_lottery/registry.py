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
from typing import Any, Generic, TypeVar

from .errors import ConfigError, RoutingLotteryError, brief, shorten

T = TypeVar("T")


class RegistryError(ConfigError):
    """A name that is neither registered nor an importable ``package.module:attribute`` path."""


class EntryError(RoutingLotteryError, ValueError):
    """An entry a setting chose (a user's loader, model factory or task builder) raised when called.

    The message names the setting, the entry and the error; the original is its ``__cause__``
    (``rtl --debug`` shows where it happened). A ``ValueError`` as the library's other input errors.
    """


def import_path(path: str) -> object:
    """The object named by ``package.module:attribute`` (attribute may be dotted)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise RegistryError(f"{brief(path)} is not an import path of the form package.module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as err:
        # The `rtl` script's sys.path starts at its own bin directory, not where the user stands:
        # look in the working directory too, as `python -m` would.
        if os.getcwd() in sys.path or "" in sys.path:
            raise RegistryError(f"cannot import {brief(module_name)} for {brief(path)} ({shorten(str(err), 300)}); "
                                "is it on PYTHONPATH?") from None
        sys.path.insert(0, os.getcwd())
        return import_path(path)
    except Exception as err:  # noqa: BLE001 -- the user's module failed while importing: say which
        raise RegistryError(f"importing {brief(module_name)} for {brief(path)} raised {type(err).__name__}: "
                            f"{shorten(str(err), 300)}") from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{brief(module_name)} has no attribute {brief(attribute)} (from {brief(path)})")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named entries of one kind; ``get`` also resolves ``package.module:attribute`` paths."""

    def __init__(self, kind: str, loaders: tuple[str, ...] = (), setting: str | None = None) -> None:
        self.kind = kind
        self.setting = setting or kind  # the config setting that names an entry: errors in the entry name it
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
        raise RegistryError(f"unknown {self.kind} {brief(name)}; registered: {sorted(self._entries)}, "
                            "or give an import path package.module:attribute")

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry ``name`` (as ``get``) with the arguments; whatever it raises names the setting.

        A user's loader or factory that fails deep in their own code would otherwise reach the user as
        an anonymous "unexpected" error, with nothing saying which setting chose that code. The
        library's own errors pass unchanged: they name their culprit already.
        """
        entry: Any = self.get(name)
        try:
            return entry(*args, **kwargs)
        except RoutingLotteryError:
            raise
        except Exception as err:  # noqa: BLE001 -- any failure of the entry, named by its setting
            detail = shorten(str(err), 500)
            if isinstance(err, (ValueError, OSError)):  # an input error: its message is the point
                raise EntryError(f"{self.setting} {brief(name)}: {detail}") from err
            raise EntryError(f"{self.setting} {brief(name)} raised {type(err).__name__}"
                             + (f": {detail}" if detail else "")) from err

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
