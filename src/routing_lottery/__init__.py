"""Routing the Lottery: adaptive lottery tickets, one pruning mask per data context."""

__version__ = "0.1.0"
