"""The baselines: dense, single-mask IMP (one mask for all data) and multiple IMP (K independent models)."""

from __future__ import annotations

import torch

from ..masks import Mask
from .deployment import routed_rows
from ..routed import masked_forward
from ..training import derive_seed, rewound, snapshot, train
from . import METHODS, Row
from .context import RunContext
from .accounting import Accounting, dense_accounting, independent_accounting, single_mask_accounting



def _fit_shared_network(run: RunContext, method: str, level: float, mask: Mask | None) -> list[Row]:
    """The shared network (dense, or one mask) trained on all data from its rewind point, then scored."""
    t, tickets = run.config.training, run.shared_tickets
    model = tickets.model
    model.load_state_dict(rewound(tickets._rewind_point(run.classifier), mask))
    train(model, mask, run.classifier, run.factor * t.epochs, t.optimizer,
          derive_seed(run.config.seed, method, str(level)), run.progress)
    model.eval()
    fmask = {n: m.to(run.device, torch.float32) for n, m in (mask or {}).items()}
    with torch.no_grad():
        return run.task.score_shared(
            lambda x: masked_forward(model, fmask, x.to(run.device)) if fmask else model(x.to(run.device)),
            f"{method}_{level:.4f}", run.outputs)


class _SharedNetwork:
    """The shared network trained on all data (a K-way classifier in classification)."""

    name = ""
    needs_contexts, needs_single = False, False

    def damaged(self, run: RunContext, level: float) -> str | None:
        return None  # leaves nothing but its record

    def steps(self, run: RunContext) -> int:
        return run.factor * run.config.training.epochs * run.classifier.num_batches


class Dense(_SharedNetwork):
    name, label, per_level = "dense", "dense", False

    def fit(self, run: RunContext, level: float) -> tuple[list[Row], Accounting]:
        rows = _fit_shared_network(run, self.name, level, None)
        return rows, dense_accounting(run.shared_tickets.model, run.shared_tickets.prunable)


class SingleImp(_SharedNetwork):
    name, label, per_level, needs_single = "single_imp", "single IMP", True, True

    def fit(self, run: RunContext, level: float) -> tuple[list[Row], Accounting]:
        mask = run.shared_tickets._mask_at(run.single_rounds(), level)
        rows = _fit_shared_network(run, self.name, level, mask)
        return rows, single_mask_accounting(run.shared_tickets.model, run.shared_tickets.prunable, mask)


class MultiImp:
    """K independent networks, network k trained on context k only; each input goes to its context's."""

    name, label = "multi_imp", "multiple IMP"
    per_level, needs_contexts, needs_single = True, True, False

    def steps(self, run: RunContext) -> int:
        return run.config.training.epochs * sum(s.num_batches for s in run.detectors)

    def damaged(self, run: RunContext, level: float) -> str | None:
        return None

    def fit(self, run: RunContext, level: float) -> tuple[list[Row], Accounting]:
        t, tickets = run.config.training, run.tickets
        masks = run.context_masks()[level]
        model, rewind = tickets.model, tickets._rewind_point(run.classifier)
        states = []
        for k, stream in enumerate(run.detectors):
            model.load_state_dict(rewound(rewind, masks[k]))
            train(model, masks[k], stream, t.epochs, t.optimizer,
                  derive_seed(run.config.seed, self.name, k, str(level)), run.progress)
            states.append(snapshot(model))
        model.eval()
        current: list[int] = [-1]

        def predict(k: int, x: torch.Tensor) -> torch.Tensor:
            if current[0] != k:  # the scorer asks context by context: swap networks only when k changes
                model.load_state_dict(states[k])
                current[0] = k
            return model(x.to(run.device))

        rows = routed_rows(run, self.name, level, predict, None)  # K networks: no router reads their masks
        return rows, independent_accounting(model, tickets.prunable, masks)


METHODS.register("dense")(Dense())
METHODS.register("single_imp")(SingleImp())
METHODS.register("multi_imp")(MultiImp())
