"""The library's exception types: one per kind of thing a user can get wrong.

Config, data and checkpoint errors are ``ValueError``s as well, so callers that validate inputs
generically still catch them (the lock's error is a ``RuntimeError``); the
command line prints any of them as one line (file, setting, problem, remedy) and a traceback only
with ``--debug``.
"""

from __future__ import annotations

import reprlib
from typing import Any


class RoutingLotteryError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(RoutingLotteryError, ValueError):
    """A setting is missing, malformed or out of range; the message names the setting and the file."""


class DataError(RoutingLotteryError, ValueError):
    """Input data is unreadable, malformed or inconsistent; the message names the file or the context."""


class CheckpointError(RoutingLotteryError, ValueError):
    """A file on disk is missing, truncated, corrupt, or does not belong to the given model.

    Its own type so a resuming run can tell "this file is bad, redo that step" from a programming error.
    """


class RunLockedError(RoutingLotteryError, RuntimeError):
    """Another process holds the run directory; the message says which."""


# -- quoting values in messages ---------------------------------------------------------------
class _Brief(reprlib.Repr):
    """``reprlib`` with short limits, and integers too long to show given by their size: ``repr`` of an
    integer past Python's 4,300-digit limit raises, and a long one would fill the message."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 60, 60, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 3 * self.maxlong:  # 3 bits per digit, at least: it has more than maxlong digits
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1:,} digits>"
        return super().repr_int(x, level)


_BRIEF = _Brief()


def shorten(text: str, limit: int = 1000) -> str:
    """``text`` cut to at most ``limit`` characters, saying how long it was: error messages that quote a
    value (a config's, a user's exception) stay one readable line however large the value."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text):,} characters)"
    return text[:max(0, limit - len(tail))] + tail


def brief(value: Any, limit: int = 80) -> str:
    """A short ``repr`` of ``value`` for an error message, in time and length bounded whatever its size
    (nested containers are cut at a few items and levels, shared or self-referencing ones included)."""
    return shorten(_BRIEF.repr(value), limit)
