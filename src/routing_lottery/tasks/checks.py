"""``check_task``: test a Task against the contract before a long run finds the problem for you.

Like scikit-learn's estimator checks: run it once on your own task (the tests run it on every
built-in one). Every problem found is listed in one ``TaskContractError``: the required members of
``tasks.base.Task``, and each optional capability the task declares (``tasks.base.CAPABILITIES``),
which must be whole -- a capability with a piece missing is one the runner would skip in silence.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from numbers import Number
from typing import Any

import torch
from torch import nn

from ..errors import RoutingLotteryError
from ..pruning import prunable_names
from ..routed import as_tuple
from ..training import Stream, generator
from ..contract import (CAPABILITIES, CHOSEN, FLAGS, REQUIRED_ATTRIBUTES, REQUIRED_METHODS, SETTINGS, VALUES, Task,
                       capabilities, half_capabilities)


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

    Then every optional capability the task declares: all its pieces present (``detector_scores``
    without ``context_examples`` is named as half a capability), and one small call of each
    (``context_examples`` splits of matching lengths and context ids in range, ``score_routed(chosen=)``
    rows, (N, K) ``detector_scores``, ``router_features`` rows, ``output_problem`` of a missing output
    a message, not an exception) and the settings in ``tasks.base.SETTINGS``.
    """
    problems = _structure(task)
    if any(p.startswith(_REQUIRED) for p in problems):  # nothing below can call a member that is not there
        raise TaskContractError(_message(task, problems))

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
        _check_capabilities(problems, task, len(names), lambda k, x: _forward(model, x))
    if problems:
        raise TaskContractError(_message(task, problems))


_REQUIRED = "lacks the required "


def _structure(task: Any) -> list[str]:
    """The members that are missing or of the wrong kind, before anything is called."""
    problems = [f"{_REQUIRED}attribute {name} (tasks.base.Task)" for name in REQUIRED_ATTRIBUTES
                if not hasattr(task, name)]
    for name in REQUIRED_METHODS:
        if not hasattr(task, name):
            problems.append(f"{_REQUIRED}method {name}() (tasks.base.Task)")
        elif not callable(getattr(task, name)):
            problems.append(f"{_REQUIRED}method {name}(): {name} is a {type(getattr(task, name)).__name__}, "
                            "not callable")
    for name, missing in half_capabilities(task).items():
        capability = CAPABILITIES[name]
        problems.append(f"half of the {name} capability ({capability.protocol.__name__}): it has "
                        f"{capability.declared_by} but lacks {', '.join(missing)}")
    # A member of the right name but not callable is one the runner ignores: say so rather than skip it.
    methods = {p for c in CAPABILITIES.values() for p in c.pieces} - {CHOSEN, *FLAGS, *VALUES}
    for piece in sorted(methods):
        value = getattr(task, piece, None)
        if value is not None and not callable(value):
            problems.append(f"{piece} must be a method (the runner ignores a {type(value).__name__})")
    flag = getattr(task, "context_is_label", False)
    if not isinstance(flag, bool):
        problems.append(f"context_is_label must be True or False; got {flag!r}")
    return problems


def _check_capabilities(problems: list[str], task: Any, num_contexts: int, predict: Callable[[int, Any], Any]) -> None:
    """One small call of each capability the task has in full (see ``check_task``)."""
    has = capabilities(task)
    test = _check_splits(problems, task, num_contexts) if "examples" in has else None
    if test is not None:
        if "routing" in has:
            _check_rows(problems, "score_routed(chosen=)", _call(problems, "score_routed(..., chosen=)",
                        lambda: task.score_routed(predict, "check", None, chosen=test[1])))
        if "detectors" in has:
            _check_detectors(problems, task, predict, len(test[1]), num_contexts)
        if "argmax" in has:
            row = _call(problems, "score_predictions(contexts)", lambda: task.score_predictions(test[1]))
            _check_rows(problems, "score_predictions", [row] if isinstance(row, dict) else row)
        if "router_features" in has:
            _check_router_features(problems, task, test[0])
    if "reusing_scores" in has:
        _call(problems, "with reusing_scores()", lambda: _enter(task.reusing_scores()))
    if "output_check" in has:
        with tempfile.TemporaryDirectory() as empty:  # the runner asks before the output exists, too
            answer = _call(problems, "output_problem(outputs, label)",
                           lambda: task.output_problem(Path(empty), "check_0.5000"))
        if not isinstance(answer, str):
            problems.append(f"output_problem of an output never written must return a message; got {answer!r}")
    _check_values(problems, task, has, num_contexts)


def _check_splits(problems: list[str], task: Any, num_contexts: int) -> tuple[Any, torch.Tensor] | None:
    """``context_examples`` of train, test and (where the task has one) calibration; the test split when it is sound."""
    checked = {}
    for split in ("train", "test"):
        examples = _call(problems, f"context_examples({split!r})", lambda: task.context_examples(split))
        checked[split] = _check_examples(problems, split, examples, num_contexts)
    try:  # optional: a task without a calibration split refuses it
        calibration = task.context_examples("calibration")
    except ValueError:
        calibration = None
    except Exception as err:  # noqa: BLE001 -- the check reports whatever a task raises
        problems.append(f"context_examples('calibration') raised {type(err).__name__}; a task without a "
                        "calibration split must raise ValueError (e.g. DataError)")
        calibration = None
    if calibration is not None:
        _check_examples(problems, "calibration", calibration, num_contexts)
    return checked["test"]


def _check_detectors(problems: list[str], task: Any, predict: Callable[[int, Any], Any], rows: int,
                     num_contexts: int) -> None:
    scores = _call(problems, "detector_scores(predict, 'test')", lambda: task.detector_scores(predict, "test"))
    if scores is not None and not (isinstance(scores, torch.Tensor) and scores.is_floating_point()
                                   and tuple(scores.shape) == (rows, num_contexts)):
        problems.append(f"detector_scores(predict, 'test') must be ({rows}, {num_contexts}) float logits; got "
                        f"{_describe(scores)}")


def _check_router_features(problems: list[str], task: Any, inputs: Any) -> None:
    few = tuple(p[:4] for p in as_tuple(inputs))
    features = _call(problems, "router_features(inputs)", lambda: task.router_features(few if len(few) > 1 else few[0]))
    wanted = len(few[0])
    if features is not None and not (isinstance(features, torch.Tensor) and features.dim() == 2
                                     and len(features) == wanted and features.is_floating_point()):
        problems.append(f"router_features(inputs) must be ({wanted}, F) float features; got {_describe(features)}")


def _check_values(problems: list[str], task: Any, has: frozenset[str], num_contexts: int) -> None:
    if "context_members" in has:
        members = task.context_members
        if not (isinstance(members, Sequence) and len(members) == num_contexts
                and all(isinstance(m, Sequence) and all(isinstance(n, str) for n in m) for m in members)):
            problems.append(f"context_members must be {num_contexts} lists of class names; got {members!r}")
    if "partition" in has and not callable(getattr(task.partition, "save", None)):
        problems.append(f"partition must be a contexts.partitions.Partition; got {type(task.partition).__name__}")
    if "name" in has and not (isinstance(task.name, str) and task.name):
        problems.append(f"name must be a non-empty string; got {task.name!r}")
    routers = getattr(task, "routers", SETTINGS["routers"])
    if routers is not None and (isinstance(routers, str) or not isinstance(routers, Sequence)
                                or not all(isinstance(r, str) for r in routers)):
        problems.append(f"routers must be a tuple of router names; got {routers!r}")
    batch = getattr(task, "eval_batch_size", SETTINGS["eval_batch_size"])
    if batch is not None and not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        problems.append(f"eval_batch_size must be an int >= 1; got {batch!r}")


def _check_examples(problems: list[str], split: str, examples: Any,
                    num_contexts: int) -> tuple[Any, torch.Tensor] | None:
    """``context_examples(split)`` with its contexts as ids when it is (inputs, contexts) with one context id
    in range per input row; None (and the problem listed) otherwise."""
    if examples is None:
        return None
    what = f"context_examples({split!r})"
    if not (isinstance(examples, (tuple, list)) and len(examples) == 2):
        problems.append(f"{what} must return (inputs, contexts); got {type(examples).__name__}")
        return None
    inputs, contexts = examples
    contexts = torch.as_tensor(contexts)
    parts = as_tuple(inputs)
    if contexts.dim() != 1 or contexts.is_floating_point() or not contexts.numel():
        problems.append(f"{what}: contexts must be a non-empty 1-D tensor of context ids; got {_describe(contexts)}")
        return None
    if not 0 <= int(contexts.min()) <= int(contexts.max()) < num_contexts:
        problems.append(f"{what}: context ids must lie in 0..{num_contexts - 1}; got {int(contexts.min())}.."
                        f"{int(contexts.max())}")
        return None
    if not all(isinstance(p, torch.Tensor) and len(p) == len(contexts) for p in parts):
        problems.append(f"{what}: {len(contexts)} contexts but inputs of {[_describe(p) for p in parts]}")
        return None
    return inputs, contexts.long()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _enter(block: Any) -> None:
    with block:
        pass


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
