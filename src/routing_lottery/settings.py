"""Typed settings from plain data, validated once at the edge and bounded.

A recipe (``recipe.RTLConfig``, saved beside every ticket checkpoint) and the experiment config
(``config.ExperimentConfig``) are dataclasses; ``build`` makes one from a mapping -- a parsed YAML
file, a checkpoint's metadata, ``--set`` overrides -- naming every unknown key and wrong type by
its dotted setting. ``plain_data`` bounds what free-form settings may hold, so a hostile file (an
alias bomb, an integer of thousands of digits, a self-referencing mapping) is refused in about a
second with a short message instead of exhausting memory.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from .errors import ConfigError, brief

# Bounds on what settings may hold, checked before anything is built from them. A config is a page
# of settings (the packaged ones hold about 100 values); these are far beyond any real one.
MAX_CONFIG_BYTES = 1 << 20  # a config file, and the config.yaml a run writes from it
MAX_VALUES = 10_000  # scalars, lists and mappings, counted after aliases are expanded
MAX_TEXT = MAX_CONFIG_BYTES  # characters of keys and scalars, counted after aliases are expanded
MAX_DEPTH = 32  # nesting; also keeps writing config.yaml and identity.json far from the recursion limit
MAX_INT_DIGITS = 100  # a seed or a count has at most 19; Python cannot even write one past 4,300 digits
_INT_BOUND = 10**MAX_INT_DIGITS


def _long_integer(characters: int | None) -> str:
    written = f" ({characters:,} characters)" if characters is not None else ""
    return (f"an integer of more than {MAX_INT_DIGITS} digits{written}; no setting takes one (a seed or a "
            "count has at most 19)")


class _Budget:
    """What is left of ``MAX_VALUES`` and ``MAX_TEXT`` while ``plain_data`` walks a value."""

    def __init__(self) -> None:
        self.values, self.text = MAX_VALUES, MAX_TEXT

    def spend(self, where: str, text: int = 0) -> None:
        self.values, self.text = self.values - 1, self.text - text
        if self.values < 0 or self.text < 0:
            raise ConfigError(f"{where or 'the settings'}: more than {MAX_VALUES:,} values or {MAX_TEXT:,} "
                              "characters in all; a config holds far fewer")


def plain_data(value: Any, where: str, budget: _Budget | None = None, depth: int = 0) -> Any:
    """``value`` as the plain data a config holds -- None, booleans, integers, floats other than NaN,
    strings, lists, and mappings with string keys -- with tuples as lists; else ``ConfigError`` naming
    the setting (``where``, dotted).

    Everything a config holds is written to config.yaml and identity.json and must read back equal:
    a set, bytes or a date has no such form, NaN never equals itself (the run could never resume),
    an integer key turns into a string in JSON. Size and nesting are bounded as ``load_yaml``'s, for
    a mapping handed in from Python too (a shared or self-referencing structure included).
    """
    budget = _Budget() if budget is None else budget
    budget.spend(where, len(value) if isinstance(value, str) else 0)
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: values nest deeper than {MAX_DEPTH} levels (or contain themselves)")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) >= _INT_BOUND:
            raise ConfigError(f"{where}: {_long_integer(None)}")
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            raise ConfigError(f"{where}: NaN is not a setting (it never equals itself, so a run could not "
                              "resume); give a number")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]", budget, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where or 'a setting'}: the key {brief(k)} is not a string; quote it (YAML "
                                  "reads unquoted yes/no/on/off as booleans, 1 as a number and ~ as null)")
            budget.spend(where, len(k))
            out[k] = plain_data(v, f"{where}.{k}" if where else k, budget, depth + 1)
        return out
    raise ConfigError(f"{where}: {brief(value)} is a {type(value).__name__}; a setting is text, a number, a "
                      "boolean, null, a list or a mapping")


def build(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {brief(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        listed = brief([f"{where}{u}" for u in unknown], 300)
        raise ConfigError(f"unknown setting(s) {listed}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own validation: say which section
        raise ConfigError(f"{where.rstrip('.')}: {err}" if where else str(err)) from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}; got {brief(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # int | float: keep the YAML type, it carries meaning (count vs fraction)
        for arg in args:
            if arg is not type(None) and isinstance(value, arg) and not (arg is int and isinstance(value, bool)):
                return value
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1:  # X | None: X's own error names the problem
            return _coerce(candidates[0], value, where)
        for arg in candidates:
            try:
                return _coerce(arg, value, where)
            except ValueError:
                continue
        raise ConfigError(f"{where}: {brief(value)} is not a valid {hint}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping; got {brief(value)}")
        # free-form (a user's loader or model options): checked as plain data, however it was handed in
        return plain_data(value, where, depth=where.count(".") + 2)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list; got {brief(value)}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number; got {brief(value)}")
        if isinstance(value, int) and abs(value) >= _INT_BOUND:
            raise ConfigError(f"{where}: {_long_integer(None)}")
        if math.isnan(value):
            raise ConfigError(f"{where} must be a number; got NaN")
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {hint.__name__}; got {brief(value)}")
    if hint is int and abs(value) >= _INT_BOUND:
        raise ConfigError(f"{where}: {_long_integer(None)}")
    return value


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def apply_scale(raw: Mapping[str, Any], scale: str | None, source: str) -> dict[str, Any]:
    """``raw`` without its ``scales:`` section, with scale ``scale`` (if any) deep-merged over it; a
    ``ConfigError`` naming ``source`` when the scale is not defined or is not a mapping of settings."""
    raw = dict(raw)
    scales = raw.pop("scales", {}) or {}
    if not isinstance(scales, Mapping):
        raise ConfigError(f"{source}: scales must be a mapping of name -> settings")
    if scale is None:
        return raw
    if scale not in scales:
        defined = brief(sorted(scales), 300) if scales else "none"
        raise ConfigError(f"{source}: no scale {brief(scale)}; it defines {defined}")
    if not isinstance(scales[scale], Mapping):
        raise ConfigError(f"{source}: scale {brief(scale)} must be a mapping of settings")
    return _deep_merge(raw, scales[scale])


__all__ = ["MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS", "MAX_TEXT", "MAX_VALUES", "apply_scale", "build",
           "plain_data"]
