"""``check_task``: test a Task against the contract before a long run finds the problem for you.

Like scikit-learn's estimator checks: run it once on your own task (the tests run it on every
built-in one). Every problem found is listed in one ``TaskContractError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Number
from typing import Any

import torch
from torch import nn

from ..errors import RoutingLotteryError
from ..pruning import prunable_names
from ..training import Stream, generator
from .base import Task


class TaskContractError(RoutingLotteryError, ValueError):
    """A task breaks the contract of ``tasks.base.Task``; the message lists every problem found."""


def check_task(task: Task, model_seed: int = 0, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
    """Raise ``TaskContractError`` listing every way ``task`` breaks the ``Task`` contract.

    Checks: distinct context names; a positive ``shared_epoch_factor``; a stable string
    ``data_fingerprint``; ``build_model`` returning a module with maskable tensors (chosen by the
    run's ``pruning.include`` / ``exclude`` patterns, given here) that does not reseed the global
    generator; every stream non-empty, of its declared length, the same for the
    same generator, and giving a finite scalar loss that backpropagates; an out-of-range context
    refused with ``ValueError``; both scorers returning rows of numbers or strings.
    """
    problems: list[str] = []

    def expect(ok: bool, message: str) -> bool:
        if not ok:
            problems.append(message)
        return ok

    names = list(getattr(task, "context_names", []) or [])
    expect(bool(names) and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names),
           f"context_names must be distinct non-empty strings; got {names!r}")
    factor = getattr(task, "shared_epoch_factor", None)
    expect(isinstance(factor, int) and factor >= 1, f"shared_epoch_factor must be an int >= 1; got {factor!r}")
    fingerprint = _call(problems, "data_fingerprint()", task.data_fingerprint)
    if expect(isinstance(fingerprint, str) and bool(fingerprint), f"data_fingerprint() must return a string; got {fingerprint!r}"):
        expect(task.data_fingerprint() == fingerprint, "data_fingerprint() differs between two calls")

    with torch.random.fork_rng(devices=[]):
        draws = []
        for seed in (model_seed, model_seed + 1):
            torch.manual_seed(seed)
            model = _call(problems, "build_model()", task.build_model)
            draws.append(torch.rand(4))
        torch.manual_seed(model_seed)
        model = task.build_model() if model is not None else None
    # A task that seeds the global generator itself makes every run's θ₀ ignore the run's seed.
    expect(not torch.equal(draws[0], draws[1]), "build_model() reseeds the global generator; let the runner seed it")
    if not expect(isinstance(model, nn.Module), f"build_model() must return an nn.Module; got {type(model).__name__}"):
        raise TaskContractError(_message(task, problems))
    _call(problems, "prunable_names(model)", lambda: prunable_names(model, include, exclude))
    shared = _call(problems, "build_shared_model(model)", lambda: task.build_shared_model(model))
    expect(isinstance(shared, nn.Module), f"build_shared_model() must return an nn.Module; got {type(shared).__name__}")

    for k in range(len(names)):
        stream = _call(problems, f"context_stream({k})", lambda: task.context_stream(k))
        _check_stream(problems, f"context_stream({k})", stream, model)
    if isinstance(shared, nn.Module):
        _check_stream(problems, "shared_stream()", _call(problems, "shared_stream()", task.shared_stream), shared)
    try:
        task.context_stream(len(names))
        problems.append(f"context_stream({len(names)}) must raise ValueError (there are {len(names)} contexts)")
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001 -- the check reports whatever a task raises
        problems.append(f"context_stream({len(names)}) raised {type(err).__name__} instead of ValueError: {err}")

    model.eval()
    with torch.no_grad():
        if isinstance(shared, nn.Module):
            shared.eval()
            _check_rows(problems, "score_shared", _call(problems, "score_shared(...)",
                                                        lambda: task.score_shared(lambda x: _forward(shared, x), "check")))
        _check_rows(problems, "score_routed", _call(problems, "score_routed(...)",
                                                    lambda: task.score_routed(lambda k, x: _forward(model, x), "check")))
    if problems:
        raise TaskContractError(_message(task, problems))


def _message(task: Any, problems: Sequence[str]) -> str:
    return f"{type(task).__name__} breaks the Task contract:\n" + "\n".join(f"- {p}" for p in problems)


def _call(problems: list[str], what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- the check reports whatever a task raises
        problems.append(f"{what} raised {type(err).__name__}: {err}")
        return None


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _check_stream(problems: list[str], what: str, stream: Any, model: nn.Module) -> None:
    if stream is None:
        return
    if not isinstance(stream, Stream):
        problems.append(f"{what} must return a Stream; got {type(stream).__name__}")
        return
    first = _call(problems, f"{what}.epoch(generator)", lambda: list(stream.epoch(generator(0, what))))
    if first is None:
        return
    if not first:
        problems.append(f"{what} yields no batches")
        return
    if len(first) != stream.num_batches:
        problems.append(f"{what}: num_batches is {stream.num_batches} but an epoch has {len(first)} batches")
    again = list(stream.epoch(generator(0, what)))
    if not _same(first, again):
        problems.append(f"{what}: the same generator seed gave different batches (use the generator, not global RNG)")
    batch = first[0]
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        problems.append(f"{what}: a batch must be (inputs, targets); got {type(batch).__name__}")
        return
    model.train()
    output = _call(problems, f"{what}: model(inputs)", lambda: _forward(model, batch[0]))
    if output is None:
        return
    loss = _call(problems, f"{what}: loss(outputs, targets)", lambda: stream.loss(output, batch[1]))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not torch.isfinite(loss).all():
        problems.append(f"{what}: the loss must be a finite scalar tensor; got {loss!r}")
        return
    _call(problems, f"{what}: loss.backward()", loss.backward)
    model.zero_grad(set_to_none=True)


def _check_rows(problems: list[str], what: str, rows: Any) -> None:
    if rows is None:
        return
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        problems.append(f"{what} must return a non-empty list of dict rows; got {type(rows).__name__}")
        return
    for row in rows:
        bad = {k: v for k, v in row.items() if not isinstance(k, str) or not isinstance(v, (Number, str))
               or isinstance(v, bool) or (isinstance(v, float) and math.isnan(v))}
        if bad:
            problems.append(f"{what}: row values must be numbers (not NaN) or strings; got {bad}")
