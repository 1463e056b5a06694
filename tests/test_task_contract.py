"""The task contract as written Protocols: ``check_task`` on required members and optional capabilities,
and ``capabilities(task)`` agreeing with how the runner decided from attributes before it existed."""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from routing_lottery.experiments import TaskContractError, check_task
from routing_lottery.data.labelled import LabelledDataset
from routing_lottery.data.regions import RegionImage
from routing_lottery.data.speech import SpeechDataset
from routing_lottery.data.speech.dataset import SpeechSplit
from routing_lottery.errors import CheckpointError
from routing_lottery.tasks import base
from routing_lottery.tasks.base import (CAPABILITIES, REQUIRED_ATTRIBUTES, REQUIRED_METHODS, SupportsRouting,
                                        capabilities, half_capabilities, supports, task_setting, verified_outputs)
from routing_lottery.tasks.classification import ClassificationTask
from routing_lottery.tasks.inr import InrTask
from routing_lottery.tasks.speech import SpeechTask
from routing_lottery.training import Stream

# -- a toy task: two contexts of a linear regression, nothing optional --------------------------------
_G = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=_G)
CONTEXT = torch.arange(16) % 2
Y = X @ torch.randn(3, 2, generator=_G)


def _stream(name: str, index: torch.Tensor) -> Stream:
    def epoch(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = index[torch.randperm(len(index), generator=gen)]
        return [(X[part], Y[part]) for part in order.split(4)]

    return Stream(name, epoch, F.mse_loss, -(-len(index) // 4))


class ToyTask:
    context_names = ("even", "odd")
    shared_epoch_factor = 1

    def data_fingerprint(self) -> str:
        return "toy-v1"

    def build_model(self) -> nn.Module:
        return nn.Linear(3, 2)

    def build_shared_model(self, model: nn.Module) -> nn.Module:
        return model

    def context_stream(self, k: int) -> Stream:
        if not 0 <= k < 2:
            raise ValueError(f"context id {k} is outside 0..1")
        return _stream(self.context_names[k], (CONTEXT == k).nonzero(as_tuple=True)[0])

    def shared_stream(self) -> Stream:
        return _stream("all", torch.arange(16))

    def score_shared(self, predict, label, outputs=None):
        return [{"mse": float(F.mse_loss(predict(X), Y))}]

    def score_routed(self, predict, label, outputs=None):
        return [{"mse": float(sum(F.mse_loss(predict(k, X[CONTEXT == k]), Y[CONTEXT == k]) for k in range(2)))}]


class RoutedToyTask(ToyTask):
    """The toy with the routing, detector and argmax capabilities, each whole."""

    context_is_label = True

    def context_examples(self, split):
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test; got {split!r}")
        return X, CONTEXT

    def score_routed(self, predict, label, outputs=None, chosen=None):
        chosen = CONTEXT if chosen is None else chosen
        return [{"mse": float(sum(F.mse_loss(predict(k, X[chosen == k]), Y[chosen == k]) for k in range(2)))}]

    def detector_scores(self, predict, split="test"):
        inputs, _ = self.context_examples(split)
        return torch.stack([predict(k, inputs)[:, k] for k in range(2)], dim=1)

    def score_predictions(self, predicted):
        return {"accuracy": float((predicted == CONTEXT).float().mean())}


def without(cls: type, member: str) -> type:
    """``cls`` flattened into one class that lacks ``member``."""
    members = {}
    for klass in reversed(cls.__mro__[:-1]):
        members.update({k: v for k, v in vars(klass).items() if k not in ("__dict__", "__weakref__")})
    del members[member]
    return type(f"{cls.__name__}Without_{member}", (), members)


def contract_error(task: object) -> str:
    with pytest.raises(TaskContractError) as err:
        check_task(task)
    return str(err.value)


# -- required members ---------------------------------------------------------------------------------
def test_a_minimal_toy_task_meets_the_contract_and_declares_nothing_optional():
    check_task(ToyTask())
    assert capabilities(ToyTask()) == frozenset()
    assert half_capabilities(ToyTask()) == {}


@pytest.mark.parametrize("member", REQUIRED_ATTRIBUTES + REQUIRED_METHODS)
def test_a_task_without_a_required_member_is_refused_naming_it(member):
    text = contract_error(without(ToyTask, member)())
    assert f"lacks the required {'attribute' if member in REQUIRED_ATTRIBUTES else 'method'} {member}" in text


def test_a_required_method_that_is_not_callable_is_named():
    task = ToyTask()
    task.shared_stream = _stream("all", torch.arange(16))  # the stream itself, not a method returning it
    assert "shared_stream(): shared_stream is a Stream, not callable" in contract_error(task)


# -- optional capabilities ----------------------------------------------------------------------------
def test_a_toy_with_whole_capabilities_passes_and_declares_them():
    check_task(RoutedToyTask())
    assert capabilities(RoutedToyTask()) == {"examples", "routing", "detectors", "context_is_label", "argmax"}
    assert supports(RoutedToyTask(), SupportsRouting) and supports(RoutedToyTask(), "detectors")


@pytest.mark.parametrize(("drop", "capability", "declared_by"), [
    ("context_examples", "detectors", "detector_scores"),  # detectors over no examples
    ("context_examples", "routing", "score_routed(chosen=)"),  # chosen= for inputs it cannot name
    ("context_is_label", "argmax", "score_predictions"),  # an argmax row where routing errors are not wrong answers
    ("detector_scores", "argmax", "score_predictions"),
])
def test_half_a_capability_is_refused_naming_the_missing_piece(drop, capability, declared_by):
    task = without(RoutedToyTask, drop)()
    assert capability not in capabilities(task)
    protocol = CAPABILITIES[capability].protocol.__name__
    assert f"half of the {capability} capability ({protocol}): it has {declared_by} but lacks" in contract_error(task)
    assert drop in half_capabilities(task)[capability]


def test_a_capability_member_that_is_not_a_method_is_named():
    task = ToyTask()
    task.detector_scores = torch.zeros(16, 2)  # scores, not the function that computes them
    assert "detector_scores must be a method (the runner ignores a Tensor)" in contract_error(task)


def test_a_capability_that_answers_wrongly_is_named():
    class WrongShapes(RoutedToyTask):
        def detector_scores(self, predict, split="test"):
            return torch.zeros(3, 2)

        def context_examples(self, split):
            if split == "calibration":
                raise KeyError(split)  # the runner catches ValueError only
            return super().context_examples(split)

    text = contract_error(WrongShapes())
    assert ("detector_scores(predict, 'test') must be (16, 2) float logits; "
            "got torch.float32 tensor of shape (3, 2)") in text
    assert "context_examples('calibration') raised KeyError" in text


def test_context_examples_out_of_range_and_a_wrong_setting_are_named():
    class Wrong(RoutedToyTask):
        eval_batch_size = 0
        routers = "learned"  # one name, not a tuple of them

        def context_examples(self, split):
            return X, CONTEXT + 1

    text = contract_error(Wrong())
    assert "context_examples('test'): context ids must lie in 0..1; got 1..2" in text
    assert "eval_batch_size must be an int >= 1; got 0" in text
    assert "routers must be a tuple of router names; got 'learned'" in text


def test_supports_refuses_an_unknown_capability_and_settings_default_as_the_runner_does():
    with pytest.raises(ValueError, match="capability must be one of .*'routing'.*got 'routnig'"):
        supports(ToyTask(), "routnig")
    assert task_setting(ToyTask(), "routers") == ("learned",) and task_setting(ToyTask(), "eval_batch_size") == 1000
    with pytest.raises(ValueError, match="task settings .* got 'batch'"):
        task_setting(ToyTask(), "batch")


# -- the built-in tasks: capabilities() agrees with the runner's attribute probes ---------------------
def _chosen(task):
    return "chosen" in inspect.signature(task.score_routed).parameters


RUNNER_BEFORE = {  # each decision as run/deploy.py, run/experiment.py, export.py and methods/ made it from attributes
    "examples": lambda t: callable(getattr(t, "context_examples", None)),  # export._context_inputs
    "routing": lambda t: callable(getattr(t, "context_examples", None)) and _chosen(t),  # methods.deployment: router_applies, deployment_rows
    "detectors": lambda t: callable(getattr(t, "detector_scores", None)),  # _can_calibrate, calibrate_run, reuse
    "reusing_scores": lambda t: callable(getattr(t, "reusing_scores", None)),  # deploy.routed_rows
    "router_features": lambda t: getattr(t, "router_features", None) is not None,  # deploy.learned_router
    "context_is_label": lambda t: bool(getattr(t, "context_is_label", False)),  # deploy.deployment_rows
    "argmax": lambda t: (getattr(t, "context_is_label", False) and callable(getattr(t, "detector_scores", None))
                         and callable(getattr(t, "score_predictions", None))),  # deploy.argmax_rows
    "figures": lambda t: callable(getattr(t, "write_figures", None)),  # Experiment.run_all
    "output_check": lambda t: callable(getattr(t, "output_problem", None)),  # Experiment.output_problem
    "partition": lambda t: getattr(t, "partition", None) is not None,  # Experiment.save_partition
    "context_members": lambda t: getattr(t, "context_members", None) is not None,  # methods.shared keep
    "name": lambda t: getattr(t, "name", None) is not None,  # run.images, export_run, workers
}


def digits_task() -> ClassificationTask:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data[:200] / 16, dtype=torch.float32)
    y = torch.as_tensor(bunch.target[:200])
    names = tuple(str(n) for n in bunch.target_names)
    model = lambda num_outputs, input_shape: nn.Linear(input_shape[0], num_outputs)  # noqa: E731
    return ClassificationTask(LabelledDataset(x[:150], y[:150], names), LabelledDataset(x[150:], y[150:], names),
                              [n % 2 for n in range(10)], ["even", "odd"], model=model,
                              context_members=[list(names[0::2]), list(names[1::2])])


def inr_task() -> InrTask:
    regions = np.zeros((6, 9), dtype=np.int64)
    regions[:, 3:] = 1
    pixels = np.random.default_rng(0).random((6, 9, 3)).astype(np.float32)
    return InrTask(RegionImage("toy", pixels, regions, ("left", "right")), hidden=8, depth=2, octaves=2)


def speech_task() -> SpeechTask:
    """Noise clips in place of speech: the contract does not listen (and needs no espeak-ng)."""
    environments = ("quiet", "street")

    def split(n: int, seed: int) -> SpeechSplit:
        g = torch.Generator().manual_seed(seed)
        clean = 0.1 * torch.randn(n, 2048, generator=g)
        return SpeechSplit(clean + 0.05 * torch.randn(n, 2048, generator=g), clean, torch.arange(n) % 2,
                           torch.zeros(n), tuple(f"clip {seed}.{i}" for i in range(n)), environments, 16000)

    data = SpeechDataset(split(4, 0), split(2, 1), split(2, 2), environments, 16000)
    return SpeechTask(data, batch_size=2, n_fft=256, hop_length=64)


@pytest.mark.parametrize(("build", "expected"), [
    (digits_task, {"examples", "routing", "detectors", "reusing_scores", "context_is_label", "argmax",
                   "context_members"}),
    (inr_task, {"examples", "routing", "figures", "output_check", "name"}),
    (speech_task, {"examples", "routing", "router_features", "figures", "output_check"}),
])
def test_capabilities_of_the_built_in_tasks_are_what_the_runner_uses(build, expected):
    task = build()
    assert capabilities(task) == expected
    assert {name for name, decided in RUNNER_BEFORE.items() if decided(task)} == expected
    assert set(RUNNER_BEFORE) == set(CAPABILITIES)  # a new capability gets its runner site here too
    check_task(task)  # and the capabilities they declare pass their checks


# -- outputs, ranked without the report -----------------------------------------------------------------
def test_verified_outputs_orders_by_name_or_by_the_rank_given_and_warns_on_a_damaged_one(tmp_path):
    for name in ("rtl_0.5000", "dense_0.0000", "rtl_0.2500", "bad_0.5000", "notes"):
        (tmp_path / f"{name}.txt").write_text(name)

    def load(path: Path) -> str:
        if path.stem.startswith("bad"):
            raise CheckpointError(f"{path} fails its checksum")
        return path.read_text()

    with pytest.warns(UserWarning, match=r"bad_0\.5000\.txt fails its checksum; left out of .*fig\.png"):
        by_name = verified_outputs(tmp_path, "*.txt", load, tmp_path / "fig.png")
    assert list(by_name) == [("dense", 0.0), ("rtl", 0.25), ("rtl", 0.5)]
    order = {"rtl": 0, "dense": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = verified_outputs(tmp_path, "*.txt", load, tmp_path / "fig.png", rank=order.__getitem__)
    assert list(ranked) == [("rtl", 0.25), ("rtl", 0.5), ("dense", 0.0)]


def test_the_task_contract_imports_nothing_above_the_tasks():
    """tasks/base.py is what a user's task is written against: it must not pull in the runner (an import circle)."""
    tree = ast.parse(Path(base.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert not {m for m in imported if m and m.split(".")[0] in ("report", "methods", "run", "config", "cli")}
