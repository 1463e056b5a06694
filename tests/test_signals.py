"""The collapse study: signals on masks built to collapse at a known level, leads against a known drop."""

import pytest
import torch

from routing_lottery.diagnostics.signals import SIGNALS, best_signal, study_markdown, study_sweep, study_table
from routing_lottery.masks import MaskSet

LEVELS = [1 - 0.8 ** i for i in range(1, 11)]  # 20 % of survivors per level, as rtl sweep
COLLAPSE_AT = 6  # from this level on, every context keeps the same weights


def _masks(level_index: int, k: int = 4, size: int = 4000, seed: int = 0, share: float = 0.92) -> MaskSet:
    """K masks at LEVELS[level_index]: each keeps a common block (``share`` of its weights) and a private one,
    so their Jaccard stays share / (2 - share) at every level; from COLLAPSE_AT on they keep the same weights."""
    keep = round((1 - LEVELS[level_index]) * size)
    common = keep if level_index >= COLLAPSE_AT else round(share * keep)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100 + level_index))
    tickets = []
    for c in range(k):
        private = order[common + c * (keep - common):common + (c + 1) * (keep - common)]
        chosen = torch.cat([order[:common], private])
        tickets.append({name: torch.zeros(size, dtype=torch.bool).index_fill_(0, chosen, True).reshape(40, 100)
                        for name in ("a.weight", "b.weight", "c.weight")})
    return MaskSet.from_tickets(tickets, [f"ctx{c}" for c in range(k)])


def _sweep(drop_index: int | None, seed: int = 0) -> dict:
    masks = [_masks(i, seed=seed) for i in range(len(LEVELS))]
    metric = [0.9 if drop_index is None or i < drop_index else 0.6 for i in range(len(LEVELS))]
    return study_sweep(LEVELS, masks, metric, tolerance=0.02)


def test_a_collapse_before_the_drop_is_a_lead_in_sparsity_points():
    result = _sweep(drop_index=8)
    assert result["drop"] == LEVELS[8]
    score = result["signals"]["score"]
    assert score["fired"] == LEVELS[COLLAPSE_AT]  # the masks coincide: their Jaccard jumps off its trend
    assert score["lead"] == round(100 * (LEVELS[8] - LEVELS[COLLAPSE_AT]), 2) > 0
    # the union stops growing when the masks coincide: that signal sees it at the same level
    assert result["signals"]["union"]["fired"] == LEVELS[COLLAPSE_AT]
    assert set(result["signals"]) == set(SIGNALS)


def test_a_drop_before_the_collapse_is_a_lag_and_no_drop_makes_false_alarms():
    lagging = _sweep(drop_index=4)
    assert lagging["signals"]["score"]["lead"] < 0
    calm = _sweep(drop_index=None, seed=1)
    assert calm["drop"] is None and calm["signals"]["score"]["lead"] is None
    rows = study_table([{**_sweep(8), "experiment": "toy"}, {**lagging, "experiment": "toy"},
                        {**calm, "experiment": "toy"}])
    score = next(r for r in rows if r["signal"] == "score")
    assert (score["runs"], score["drops"], score["led"], score["lagged"], score["false_alarms"]) == (3, 2, 1, 1, 1)
    assert score["lead"] == pytest.approx((score["lead_low"] + score["lead_high"]) / 2)  # mean of two runs, t interval
    assert best_signal(rows) is not None and "Led most often" in study_markdown(rows)


def test_when_no_signal_leads_the_study_says_so():
    rows = study_table([{**_sweep(drop_index=2), "experiment": "toy"}])  # drops before any signal could fire
    assert all(r["led"] == 0 for r in rows)
    assert best_signal(rows) is None
    assert "none of these warnings leads" in study_markdown(rows)
