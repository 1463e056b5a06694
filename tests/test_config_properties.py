"""The config loader on generated YAML documents: a config, or ConfigError — never another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_lottery.config import ExperimentConfig, load_config
from routing_lottery.errors import ConfigError

KEYS = ["name", "task", "seed", "device", "methods", "data", "model", "pruning", "training", "threads", "speech",
        "scales", "sparsities", "step", "scope", "epochs", "imp_epochs", "batch_size", "optimizer", "lr", "options",
        "width", "include", "root", "unknown"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["digits", "rtl", "auto", "classification", "adam", "0.5"]))
documents = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)), max_leaves=20)
CASES = []


@settings(max_examples=1000, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(document=st.one_of(documents, st.dictionaries(st.sampled_from(KEYS), documents, max_size=6)),
       raw_text=st.one_of(st.none(), st.text(max_size=40)))
def test_generated_yaml_gives_a_config_or_a_config_error(tmp_path_factory, document, raw_text):
    path = tmp_path_factory.getbasetemp() / "generated.yaml"
    path.write_text(raw_text if raw_text is not None else yaml.safe_dump(document))
    try:
        assert isinstance(load_config(path), ExperimentConfig)
    except ConfigError:
        pass
    CASES.append(1)


def test_the_property_saw_enough_cases():
    assert len(CASES) >= 1000
