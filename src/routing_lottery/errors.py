"""The library's exception types: one per kind of thing a user can get wrong.

Config, data and checkpoint errors are ``ValueError``s as well, so callers that validate inputs
generically still catch them (the lock's error is a ``RuntimeError``); the
command line prints any of them as one line (file, setting, problem, remedy) and a traceback only
with ``--debug``.
"""

from __future__ import annotations


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
