"""Whether one way of computing something is clearly faster than another, decided on a busy machine.

Two places choose a computation by timing it on the user's machine: ``kernels.prepare`` (a dense
layer or a sparse form of it; then the whole prepared network or the dense one) and
``RoutedModel`` (a mixed-context batch one context group at a time, or all groups in one vmapped
call). Both promise never to be slower than the safe choice they start from, so both decide the
same way, here:

- the two variants run in **interleaved rounds** (baseline, candidate; then candidate, baseline;
  ...) after an untimed warm-up, so drift and load on a shared machine hit both alike, and each
  round gives a *pair* of samples taken back to back;
- the candidate wins only if it is faster than the baseline by ``margin`` on **three** summaries
  at once: the ratio of the medians, the median (lower middle value) of the per-round ratios, and
  the ratio of the fastest samples (min-of-k, what each does when nothing interferes). A load
  spike during the baseline's samples, a lucky streak or an alternation between fast and slow
  rounds moves one of them, rarely all three;
- otherwise the **baseline is kept**: on a tie or in noise, the safe choice.

The clock is injectable (``timer``), so the rule is tested with a fake one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

Timer = Callable[[], float]
"""A clock in seconds, ``time.perf_counter`` unless a test passes a fake one."""

MIN_SAMPLE_SECONDS = 2e-4
"""One sample repeats a variant until it lasts about this long, so timer overhead and scheduler
jitter stay small next to what is measured (a small layer runs in microseconds)."""

MAX_INNER = 50
"""The most calls one sample makes, however fast a variant is."""


def _no_sync() -> None:
    return None


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before the clock is read: CUDA runs asynchronously,
    so without it a sample would time the launch, not the work. On the CPU, nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _no_sync


@dataclass(frozen=True)
class Verdict:
    """Timings of a baseline and a candidate, and whether the candidate is clearly faster.

    ``baseline_seconds`` and ``candidate_seconds`` are medians per call. The three ratios are
    baseline over candidate (above 1: the candidate is faster); ``faster`` holds only when all
    three reach ``margin``.
    """

    baseline_seconds: float
    candidate_seconds: float
    median_ratio: float  # median(baseline) / median(candidate)
    paired_ratio: float  # lower median over rounds of baseline_r / candidate_r
    best_ratio: float  # min(baseline) / min(candidate)
    margin: float
    rounds: int

    @property
    def faster(self) -> bool:
        """Whether the candidate beat the baseline by ``margin`` on every summary."""
        return min(self.median_ratio, self.paired_ratio, self.best_ratio) >= self.margin

    @property
    def weakest_ratio(self) -> float:
        """The least favourable of the three ratios: what the decision rests on."""
        return min(self.median_ratio, self.paired_ratio, self.best_ratio)

    def describe(self) -> str:
        """One line for notes and logs: the three ratios against the margin."""
        return (f"{self.median_ratio:.2f}x on medians, {self.paired_ratio:.2f}x paired, {self.best_ratio:.2f}x "
                f"min-of-{self.rounds} (margin {self.margin:g})")


def _ratio(baseline: float, candidate: float) -> float:
    if candidate <= 0:
        return math.inf if baseline > 0 else 1.0
    return baseline / candidate


def judge(baseline: Sequence[float], candidate: Sequence[float], margin: float) -> Verdict:
    """The verdict on paired samples: ``baseline[r]`` and ``candidate[r]`` were taken in round ``r``.

    >>> judge([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], margin=1.15).faster
    True
    >>> judge([1.0, 1.0, 1.0, 1.0], [0.4, 2.0, 0.4, 2.0], margin=1.15).faster  # noise, not speed
    False
    """
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"judge needs the same non-zero number of samples of each variant, got "
                         f"{len(baseline)} and {len(candidate)}")
    if not math.isfinite(margin) or margin < 1:
        raise ValueError(f"margin must be a finite number >= 1, got {margin!r}")
    return Verdict(
        baseline_seconds=statistics.median(baseline),
        candidate_seconds=statistics.median(candidate),
        median_ratio=_ratio(statistics.median(baseline), statistics.median(candidate)),
        # median_low: with an even count of rounds, the less favourable of the two middle pairs
        paired_ratio=statistics.median_low([_ratio(b, c) for b, c in zip(baseline, candidate)]),
        best_ratio=_ratio(min(baseline), min(candidate)),
        margin=margin,
        rounds=len(baseline),
    )


def sample(variants: Mapping[str, Callable[[], object]], repeats: int, *, timer: Timer = time.perf_counter,
           sync: Callable[[], None] = _no_sync, warmup: int = 3,
           min_sample_seconds: float = MIN_SAMPLE_SECONDS) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` samples each, in interleaved rounds.

    Round ``r`` runs every variant once, in the given order when ``r`` is even and reversed when it
    is odd, so sample ``r`` of two variants are neighbours in time. Each sample repeats its variant
    enough times to last about ``min_sample_seconds`` (the count is found from the warm-up, whose
    ``warmup`` calls per variant are not kept: first calls pay for allocation and, in MKL's sparse
    kernels, for analysing the matrix); ``0`` times single calls. ``sync`` waits for queued
    device work (CUDA).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(variants)
    start = timer()
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync()
    per_call = (timer() - start) / max(1, warmup * len(names))
    inner = max(1, min(MAX_INNER, math.ceil(min_sample_seconds / max(per_call, 1e-9)))) if warmup else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = variants[name]
            t0 = timer()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((timer() - t0) / inner)
    return samples


def compare(baseline: Callable[[], object], candidate: Callable[[], object], *, margin: float, repeats: int,
            timer: Timer = time.perf_counter, sync: Callable[[], None] = _no_sync, warmup: int = 3,
            min_sample_seconds: float = MIN_SAMPLE_SECONDS) -> Verdict:
    """Time ``baseline`` and ``candidate`` in interleaved rounds (:func:`sample`) and judge them (:func:`judge`).

    >>> slow, fast = (lambda: sum(range(20000))), (lambda: None)
    >>> compare(slow, fast, margin=1.2, repeats=5).faster
    True
    """
    samples = sample({"baseline": baseline, "candidate": candidate}, repeats, timer=timer, sync=sync, warmup=warmup,
                     min_sample_seconds=min_sample_seconds)
    return judge(samples["baseline"], samples["candidate"], margin)
