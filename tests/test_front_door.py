"""A user's own model and data through the front door (issue 23, items 16-20): tensors pruned away
whole, defaults that train a small model, runs made from a Task object, tied and weight-normed
weights, and a finished ``fit(out=...)`` called again."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from routing_lottery import AdaptiveTickets, OptimizerConfig, PruningConfig, RTLConfig, TrainingConfig, tensor_stream
from routing_lottery.experiments import LabelledDataset
from routing_lottery.config import config_from_dict
from routing_lottery.errors import ConfigError
from routing_lottery.tasks.classification import ClassificationTask

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "routing_lottery" / "configs"


def regression_streams(inputs: int = 8, outputs: int = 2, contexts: int = 2, rows: int = 48) -> dict[str, object]:
    out = {}
    for k in range(contexts):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(rows, inputs, generator=g)
        out[f"c{k}"] = tensor_stream(f"c{k}", x, x @ torch.randn(inputs, outputs, generator=g), F.mse_loss, 16)
    return out


def quiet_fit(rtl: AdaptiveTickets, streams: dict[str, object]) -> list[str]:
    """Fit, returning the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rtl.fit(streams)
    return [str(w.message) for w in caught]


# -- 16: a tensor pruned away whole ------------------------------------------------------------
def small_head_model() -> nn.Module:
    """A body of large weights and a head of much smaller ones: global ranking takes the head first."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        net[0].weight.mul_(10.0)
        net[2].weight.mul_(0.01)
    return net


def head_recipe(min_keep: float = 0.0) -> RTLConfig:
    return RTLConfig(pruning=PruningConfig(sparsities=(0.75,), step=0.5, min_keep_per_tensor=min_keep),
                     training=TrainingConfig(imp_epochs=1, epochs=1, optimizer=OptimizerConfig(lr=1e-4)))


def test_a_head_pruned_away_whole_is_warned_and_described():
    rtl = AdaptiveTickets(small_head_model(), head_recipe())
    caught = quiet_fit(rtl, regression_streams())
    assert all(int(rtl.masks.stacked["2.weight"][k].sum()) == 0 for k in range(2))  # the head is gone
    line = next(m for m in caught if "prune away" in m)
    assert "every weight of 2.weight (in 2 of 2 tickets)" in line and "pruning.min_keep_per_tensor" in line
    assert "every weight of 2.weight" in rtl.describe()


def test_a_run_log_gets_the_line_instead_of_a_python_warning():
    lines: list[str] = []
    rtl = AdaptiveTickets(small_head_model(), head_recipe(), log=lines.append)
    assert not [m for m in quiet_fit(rtl, regression_streams()) if "prune away" in m]
    assert any(line.startswith("warning: at 75% sparsity") and "2.weight" in line for line in lines)


def test_min_keep_per_tensor_keeps_a_share_of_every_tensor_in_every_ticket():
    rtl = AdaptiveTickets(small_head_model(), head_recipe(min_keep=0.1))
    caught = quiet_fit(rtl, regression_streams())
    assert all(int(rtl.masks.stacked["2.weight"][k].sum()) >= 7 for k in range(2))  # ceil(0.1 * 64)
    assert rtl.masks.counts() == [round(0.25 * rtl.total)] * 2  # the level is still exact
    assert not any("every weight of" in m for m in caught)
    assert "at least 10.0% of each tensor" in rtl.describe()


def test_a_floor_the_levels_cannot_keep_is_refused_and_the_default_leaves_the_identity_alone():
    with pytest.raises(ConfigError, match="fewer than every ticket must keep"):
        AdaptiveTickets(small_head_model(), head_recipe(min_keep=0.3))
    with pytest.raises(ConfigError, match="min_keep_per_tensor"):
        PruningConfig(min_keep_per_tensor=1.0)
    with pytest.raises(ConfigError, match="channel tickets"):
        PruningConfig(min_keep_per_tensor=0.1, granularity="channel")
    assert "min_keep_per_tensor" not in RTLConfig().to_dict()["pruning"]
    assert RTLConfig(pruning=PruningConfig(min_keep_per_tensor=0.1)).to_dict()["pruning"]["min_keep_per_tensor"] == 0.1


# -- 17: defaults that train a small model, and a warning when training did not ---------------------
def test_the_paper_configs_state_the_settings_the_defaults_no_longer_give():
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw["task"] == "lm":
            continue  # one-shot scores and a retraining budget: no IMP step, its lr in retraining
        assert "step" in raw["pruning"] and "lr" in raw["training"]["optimizer"], path.name
    paper = config_from_dict(yaml.safe_load((CONFIGS / "cifar10.yaml").read_text()))
    assert paper.pruning.step == 4096 and paper.training.optimizer.lr == 1e-4
    default = RTLConfig()
    assert default.training.optimizer.lr == 3e-3 and isinstance(default.pruning.step, float)


def breast_cancer_task() -> ClassificationTask:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[: len(y) // 4], order[len(y) // 4:]
    x = (x - x[train].mean(0)) / x[train].std(0).clamp_min(1e-6)
    names = tuple(str(n) for n in bunch.target_names)
    return ClassificationTask(LabelledDataset(x[train], y[train], names), LabelledDataset(x[test], y[test], names),
                              [0, 1], list(names), model=mlp)


def mlp(num_outputs: int, input_shape, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_outputs))


def fit_breast_cancer(config: RTLConfig) -> tuple[float, list[str]]:
    task = breast_cancer_task()
    torch.manual_seed(0)
    rtl = AdaptiveTickets(task.build_model(), config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routed = rtl.fit({name: task.context_stream(k) for k, name in enumerate(task.context_names)}).routed
    row = task.score_routed(lambda k, x: routed(x, k), "rtl")[0]
    return row["balanced_accuracy"], [str(w.message) for w in caught]


def test_the_default_recipe_trains_a_small_tabular_model():
    accuracy, caught = fit_breast_cancer(RTLConfig())  # with the paper's lr 1e-4: 0.52 (chance)
    assert accuracy > 0.9
    assert not any("barely moved" in m for m in caught)


def test_a_loss_that_did_not_move_is_named_with_its_context():
    stuck = RTLConfig(pruning=PruningConfig(sparsities=(0.5,)),
                      training=TrainingConfig(imp_epochs=2, epochs=1, optimizer=OptimizerConfig(lr=1e-6)))
    _, caught = fit_breast_cancer(stuck)
    stalled = [m for m in caught if "barely moved" in m]
    assert len(stalled) == 2 and "'malignant'" in stalled[0] and "'benign'" in stalled[1]
    assert "training.optimizer.lr (now 1e-06)" in stalled[0]


# -- 18: a run made from a Task object -----------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, num_outputs: int, input_shape) -> None:
        super().__init__()
        self.body = nn.Linear(input_shape[0], 16)
        self.head = nn.Linear(16, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def object_task() -> ClassificationTask:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = torch.randn(60, 5, generator=g) + 2 * F.one_hot(labels, 5).float()
    names = ("a", "b", "c")
    return ClassificationTask(LabelledDataset(x[:45], labels[:45], names), LabelledDataset(x[45:], labels[45:], names),
                              [0, 1, 2], list(names), batch_size=16, model=TinyNet)


def test_a_run_from_a_task_object_says_so_and_export_refuses_clearly(tmp_path):
    from routing_lottery.cli import app
    from routing_lottery.run.deploy import export_run
    from routing_lottery.run import make_runner

    config = config_from_dict({"methods": ["rtl"], "pruning": {"sparsities": [0.5], "step": 0.5},
                               "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 16}, "deploy": {"routers": []}})
    records = make_runner(config, tmp_path, tasks=object_task()).run_all()  # the public way in
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["task"] == "python_object"
    assert written["data"]["name"] == "routing_lottery.tasks.classification:ClassificationTask"
    assert written["model"]["name"] == f"{__name__}:TinyNet"
    assert {r["experiment"] for r in records} == {"ClassificationTask"}  # not the default name "digits"
    identity = yaml.safe_load((tmp_path / "identity.json").read_text())
    assert identity["config"]["task"] == "classification"  # the identity is the config's, unchanged
    make_runner(config, tmp_path, tasks=object_task())  # and it resumes

    with pytest.raises(ConfigError, match="made from a Python Task object .*AdaptiveTickets.load"):
        export_run(tmp_path, "a")
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--context", "a"])
    assert result.exit_code != 0 and "Python Task object" in result.output and "Traceback" not in result.output


# -- 19: tied and weight-normed weights ----------------------------------------------------------
class TiedLanguageModel(nn.Module):
    """An embedding and an output head that share one weight (``head.weight = emb.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.emb(tokens))))


def token_streams() -> dict[str, object]:
    out = {}
    for k in range(2):
        tokens = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(k))
        out[f"c{k}"] = tensor_stream(f"c{k}", tokens, (tokens + k + 1) % 10, F.cross_entropy, 16)
    return out


SMALL = RTLConfig(pruning=PruningConfig(sparsities=(0.5,), step=0.3), training=TrainingConfig(imp_epochs=2, epochs=2))


def test_tied_weights_are_masked_once_under_their_first_name(tmp_path):
    torch.manual_seed(0)
    model = TiedLanguageModel()
    rtl = AdaptiveTickets(model, SMALL)
    assert rtl.prunable == ["emb.weight", "hidden.weight"]  # head.weight is emb.weight
    assert "tied: also head.weight" in rtl.describe()
    routed = rtl.fit(token_streams()).routed
    union = rtl.masks.union()["emb.weight"]
    assert torch.all(model.head.weight.detach()[~union] == 0)  # rewinding through the alias kept the zeros
    tokens = torch.tensor([1, 5, 7, 2])
    names = ["c0", "c1", "c1", "c0"]
    with torch.no_grad():
        mixed = routed(tokens, names)
        for row, name in enumerate(names):
            torch.testing.assert_close(mixed[row], routed(tokens[row:row + 1], name)[0])
    rtl.save(tmp_path / "tickets")
    torch.manual_seed(1)
    loaded = AdaptiveTickets.load(tmp_path / "tickets", TiedLanguageModel())
    with torch.no_grad():
        assert torch.equal(loaded.routed(tokens, names), mixed)


def weight_normed(old_style: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still used
        layer = nn.utils.weight_norm(layer) if old_style else nn.utils.parametrizations.weight_norm(layer)
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("old_style", [False, True])
def test_weight_norm_masks_the_direction_and_keeps_a_weight_in_every_row(old_style):
    model = weight_normed(old_style)
    direction = "0.weight_v" if old_style else "0.parametrizations.weight.original1"
    recipe = RTLConfig(pruning=PruningConfig(sparsities=(0.85,), step=0.3),
                       training=TrainingConfig(imp_epochs=2, epochs=2))
    rtl = AdaptiveTickets(model, recipe)
    assert rtl.prunable == [direction, "2.weight"]
    assert "weight_norm direction v of 0.weight" in rtl.describe()
    routed = rtl.fit(regression_streams()).routed
    assert bool(rtl.masks.stacked[direction].any(dim=2).all())  # no row's norm is 0/0
    assert rtl.masks.counts() == [round(0.15 * rtl.total)] * 2
    x = torch.randn(6, 8)
    with torch.no_grad():
        out = routed(x, ["c0", "c1"] * 3)
        assert torch.isfinite(out).all()
        for k in range(2):  # the weight the layer computes is zero wherever the direction is pruned
            weight = torch._weight_norm(rtl.masks.stacked[direction][k] * dict(model.named_parameters())[direction],
                                        dict(model.named_parameters())["0.weight_g" if old_style else
                                                                       "0.parametrizations.weight.original0"], 0)
            assert torch.all(weight[~rtl.masks.stacked[direction][k]] == 0)


def test_the_random_control_keeps_a_weight_in_every_weight_normed_row():
    rtl = AdaptiveTickets(weight_normed(), RTLConfig(pruning=PruningConfig(sparsities=(0.85,))))
    name = "0.parametrizations.weight.original1"
    sparse = {n: torch.zeros(s, dtype=torch.bool) for n, s in rtl.structure.shapes.items()}
    sparse[name][torch.arange(4), 0] = True
    sparse["2.weight"][0, 0] = True
    for seed in range(20):
        random = rtl.structure.random_like(sparse, torch.Generator().manual_seed(seed))
        assert int(random[name].sum()) == 4 and bool(random[name].any(dim=1).all())


def test_another_parametrization_is_refused_with_the_way_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"computed by a parametrization \(_Orthogonal\).*remove_parametrizations"
                                         r".*pruning.exclude: \['0.weight'\]"):
        AdaptiveTickets(model, SMALL)
    excluded = RTLConfig(pruning=PruningConfig(sparsities=(0.5,), exclude=("0.weight",)))
    assert AdaptiveTickets(model, excluded).prunable == ["2.weight"]


# -- 20: a finished fit(out=...) called again ----------------------------------------------------------
def test_fit_on_a_finished_directory_loads_the_result_without_training(tmp_path, monkeypatch):
    recipe = RTLConfig(seed=1, pruning=PruningConfig(sparsities=(0.5,), step=0.3),
                       training=TrainingConfig(imp_epochs=1, epochs=2))

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    first = AdaptiveTickets(model(), recipe, out=tmp_path)
    quiet_fit(first, regression_streams())
    steps = []
    real = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    again = AdaptiveTickets(model(), recipe, out=tmp_path)
    quiet_fit(again, regression_streams())
    assert steps == []  # no IMP round and no retraining step ran
    assert all(torch.equal(again.masks.stacked[n], first.masks.stacked[n]) for n in first.prunable)
    final, loaded = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(final[k], loaded[k]) for k in final)
