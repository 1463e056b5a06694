"""Methods are named like models, tasks and data sets: by registered name or by import path (issue 24)."""

import pytest

from routing_lottery.cli import packaged_config
from routing_lottery.config import config_from_dict, load_config
from routing_lottery.errors import ConfigError
from routing_lottery.methods import Method, RunContext
from routing_lottery.methods.baselines import Dense
from routing_lottery.methods.context import RunContext as ContextProtocol
from routing_lottery.run import build_tasks, make_runner
from routing_lottery.run.experiment import Experiment

TINY = {"data": {"train_per_class": 8, "test_per_class": 4, "image_size": 8},
        "model": {"options": {"width": 0.25}}, "pruning": {"sparsities": [0.5], "step": 0.5},
        "training": {"epochs": 1, "imp_epochs": 1}, "deploy": {"routers": []}}


class DenseAgain(Dense):
    """A user's method: the dense baseline under another name (its own seed, its own rows)."""

    name, label = "dense_again", "dense, a user's copy"


DENSE_AGAIN = DenseAgain()


@pytest.mark.slow
def test_a_method_named_by_import_path_is_accepted_and_runs(tmp_path):
    config = load_config(packaged_config("digits"), "smoke",
                         {**TINY, "methods": ["dense", "test_methods_registry:DENSE_AGAIN"]})
    records = make_runner(config, tmp_path).run_all()
    rows = {r["method"]: r for r in records}
    assert {"dense", "dense_again"} <= set(rows)
    assert 0.0 <= rows["dense_again"]["balanced_accuracy"] <= 1.0


def test_an_unknown_method_or_bad_import_path_is_named():
    with pytest.raises(ConfigError, match="unknown methods.*magic"):
        config_from_dict({"methods": ["magic"]})
    with pytest.raises(ConfigError, match="unknown methods.*cannot import"):
        config_from_dict({"methods": ["no_such_module_here:METHOD"]})


def test_the_runner_provides_every_member_of_the_run_context_methods_see(tmp_path):
    members = [n for n in vars(ContextProtocol) if not n.startswith("_")] + list(ContextProtocol.__annotations__)
    config = load_config(packaged_config("digits"), "smoke", TINY)
    experiment = Experiment(config, tmp_path, build_tasks(config)[0])
    missing = sorted({m for m in members if not hasattr(experiment, m)})
    assert not missing, f"Experiment lacks RunContext members {missing}"
    assert RunContext is ContextProtocol and "fit" in vars(Method)
