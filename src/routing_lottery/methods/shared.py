"""Methods with K masks over one shared θ, retrained jointly: RTL and the random-ticket control."""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..io import load_masks
from ..masks import MaskSet
from .deployment import learned_router, repair_router, routed_rows, router_applies
from ..contract import supports
from ..training import generator
from . import METHODS, Row
from .context import RunContext
from .accounting import Accounting, shared_accounting



class _JointlyRetrained:
    name = ""
    per_level, needs_contexts, needs_single = True, True, False

    def steps(self, run: RunContext) -> int:
        return run.config.training.epochs * len(run.detectors) * max(s.num_batches for s in run.detectors)

    def masks(self, run: RunContext, level: float) -> MaskSet:
        raise NotImplementedError

    def fit(self, run: RunContext, level: float) -> tuple[list[Row], Accounting]:
        masks = self.masks(run, level)
        routed = run.tickets.retrain(run.detectors, masks, self.name, level, rewind_stream=run.classifier)

        def predict(k: int, x: torch.Tensor) -> torch.Tensor:
            return routed(x.to(run.device), k)

        rows = routed_rows(run, self.name, level, predict, routed)
        self.keep(run, level)
        return rows, shared_accounting(run.tickets.model, run.tickets.prunable, masks)

    def keep(self, run: RunContext, level: float) -> None:
        """What to leave in the run directory besides the record (RTL: its tickets)."""

    def damaged(self, run: RunContext, level: float) -> str | None:
        return None


class Rtl(_JointlyRetrained):
    name, label = "rtl", "RTL"

    def masks(self, run: RunContext, level: float) -> MaskSet:
        return run.context_masks()[level]

    def damaged(self, run: RunContext, level: float) -> str | None:
        """Its ticket checkpoint must be there and pass its checksums (diagnostics read it); a router
        saved with it that does not load is refitted in place (``methods.deployment.repair_router``)."""
        checkpoint = run.checkpoint_dir(self.name, level)
        try:
            load_masks(checkpoint)
        except CheckpointError as err:
            return str(err)
        repair_router(run, checkpoint)
        return None

    def keep(self, run: RunContext, level: float) -> None:
        if router_applies(run, "learned"):
            run.tickets.router = learned_router(run)  # saved with the tickets
        run.tickets.save(run.checkpoint_dir(self.name, level),
                         {"experiment": run.config.name, "context_members": run.task.context_members if supports(run.task, "context_members") else None})


class RandomTickets(_JointlyRetrained):
    """K random masks with RTL's per-tensor counts: specialization versus mere sparsity."""

    name, label = "random", "random tickets"

    def masks(self, run: RunContext, level: float) -> MaskSet:
        masks = run.context_masks()[level]
        return MaskSet.from_tickets(
            [run.tickets.structure.random_like(masks[k], generator(run.config.seed, self.name, k, str(level)))
             for k in range(masks.num_contexts)], masks.context_names)


METHODS.register("rtl")(Rtl())
METHODS.register("random")(RandomTickets())
