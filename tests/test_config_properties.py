"""The config loader on generated YAML documents: a config, or ConfigError — never another exception.

A config that loads is also one a run can write and read back: ``config.yaml`` (``yaml.safe_dump`` of
``to_dict()``, as ``RunDirectory.claim`` writes it), ``identity.json`` (JSON of ``identity_settings``,
compared on resume) and the dict a stage-1 worker rebuilds its config from. Anything else must be
refused at load, in a message of bounded length, in bounded time, however the document abuses YAML
(aliases that expand, a value containing itself, dates, integers past Python's 4,300-digit limit,
hexadecimal, deep nesting).
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_lottery.config import MAX_MESSAGE, ExperimentConfig, build, load_config
from routing_lottery.errors import ConfigError
from routing_lottery.run.directory import identity_settings

pytestmark = pytest.mark.slow  # every property runs 1,000 generated cases

KEYS = ["name", "task", "seed", "device", "methods", "data", "model", "pruning", "training", "threads", "speech",
        "scales", "sparsities", "step", "scope", "epochs", "imp_epochs", "batch_size", "optimizer", "lr", "options",
        "width", "include", "root", "unknown"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["digits", "rtl", "auto", "classification", "adam", "0.5"]))
documents = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)), max_leaves=20)
CASES = []
SECONDS = 5.0  # per document, on a loaded CI machine; a bomb that got through takes minutes and gigabytes


def read_back(config: ExperimentConfig, path) -> None:
    """Write ``config`` as a run does and read it back: the same config, and an identity equal to itself."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))  # RunDirectory.claim's config.yaml
    assert load_config(path) == config
    identity = json.dumps(identity_settings(config), indent=2)  # identity.json (io.atomic_write_json)
    assert json.loads(identity) == json.loads(identity)  # what a resume compares: NaN would never match
    assert build(ExperimentConfig, config.to_dict()) == config  # what a stage-1 worker receives


def check(path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    try:
        config = load_config(path)
    except ConfigError as err:
        assert len(str(err)) <= MAX_MESSAGE
    else:
        read_back(config, path.with_name("written.yaml"))
    assert time.perf_counter() - start < SECONDS


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


# -- YAML text that abuses the format -------------------------------------------------------------------
# Scalars written as YAML reads them: dates and times, integers of every base and size, floats that
# overflow, NaN, tagged values without a JSON form, keys YAML does not read as strings, deep nesting.
TRICKY = ["2020-01-01", "2001-12-14t21:59:43.10-05:00", "2020-13-45", "0x1F", "0o17", "0b101", "017", "1_000",
          "190:20:30", ".nan", ".inf", "-.inf", "~", "yes", "off", "1.0e400", "1e400", "3.5", "0.5", "-1",
          "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1, b: 2]", "!!pairs [a: 1]", "!!timestamp 2020-01-01",
          "!!float 1", "!!int '7'", "!!str 3", "'quoted'", "digits", "rtl", "classification", "auto", "cpu", "cuda:0",
          "adam", "ghostnet", "[]", "{}", "null"]
FIELDS = ["seed", "threads", "workers", "replicates", "name", "device", "methods", "data", "model", "deploy",
          "training", "pruning", "options", "target_precision", "calibration", "epochs", "lr", "step", "sparsities",
          "width", "x"]
KEYS_YAML_DOES_NOT_READ_AS_TEXT = ["1", "yes", "~", "2020-01-01", "0x10"]
SECTIONS = {"data": ["options", "name", "calibration", "image_size"], "model": ["options", "name"],
            "deploy": ["target_precision", "error_rates", "delta"], "training": ["epochs", "batch_size", "optimizer"],
            "pruning": ["sparsities", "step", "rewind_steps"]}


@st.composite
def long_integers(draw) -> str:
    digits = draw(st.sampled_from([1, 18, 19, 20, 99, 100, 101, 4300, 4301, 6000]))
    prefix = draw(st.sampled_from(["", "-", "0x", "0o", "+"]))
    return prefix + "1" * digits


@st.composite
def nested(draw) -> str:
    depth = draw(st.one_of(st.integers(1, 34), st.integers(1, 80)))
    return "[" * depth + draw(st.sampled_from(["", "1", "2020-01-01"])) + "]" * depth


class Text:
    """Flow-style YAML from draws, with anchors on some values and aliases to anchors already written
    (an open ancestor's included: a value that contains itself), and alias bombs."""

    def __init__(self, draw) -> None:
        self.draw, self.anchors = draw, 0

    def anchor(self) -> str:
        self.anchors += 1
        return f"a{self.anchors - 1}"

    def value(self, depth: int, key: str = "") -> str:
        kinds = ["scalar"] * 6 + ["alias"] * 3 + ["list"] * 2 + ["map"] * 2 + ["long", "nested", "bomb"]
        kind = self.draw(st.sampled_from(kinds if depth < 4 else ["scalar", "alias", "long"]))
        anchor = f"&{self.anchor()} " if kind in ("list", "map", "scalar") and self.draw(st.booleans()) else ""
        if kind == "alias" and self.anchors:
            return f"*a{self.draw(st.integers(0, self.anchors - 1))}"
        if kind == "long":
            return self.draw(long_integers())
        if kind == "nested":
            return self.draw(nested())
        if kind == "bomb":
            return self.bomb()
        if kind == "list":
            items = [self.value(depth + 1) for _ in range(self.draw(st.integers(0, 3)))]
            return anchor + "[" + ", ".join(items) + "]"
        if kind == "map":
            return anchor + self.mapping(depth + 1, SECTIONS.get(key, FIELDS))
        return anchor + self.draw(st.sampled_from(TRICKY))

    def bomb(self) -> str:
        """Lists of aliases to the list before: width ** levels values in a few characters. Those that
        pass the bound (10,000 values) are kept small: a config of thousands of values takes a second
        to write and read back, and the unit tests try the bound itself."""
        width, levels = self.draw(st.integers(2, 10)), self.draw(st.integers(1, 10))
        if 300 < width**levels <= 100_000:
            levels += 3
        names = [self.anchor() for _ in range(levels + 1)]
        parts = [f"&{names[0]} [" + ", ".join(["lol"] * width) + "]"]
        parts += [f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * width) + "]" for i in range(1, levels + 1)]
        return "[" + ", ".join(parts) + "]"

    def mapping(self, depth: int, keys: list[str]) -> str:
        chosen = self.draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
        if self.draw(st.integers(0, 29)) == 17:  # not an end of the range: Hypothesis draws those often
            chosen.append(self.draw(st.sampled_from(KEYS_YAML_DOES_NOT_READ_AS_TEXT)))
        return "{" + ", ".join(f"{k}: {self.value(depth, k)}" for k in chosen) + "}"


@st.composite
def yaml_texts(draw) -> str:
    """A config whose free-form options (passed to a user's loader and model) and a few other settings
    hold generated values: most load, so what a run writes is read back too."""
    text = Text(draw)
    lines = []
    for section in draw(st.lists(st.sampled_from(["data", "model"]), max_size=2, unique=True)):
        lines.append(f"{section}: {{options: {text.mapping(2, FIELDS)}}}")
    for key in draw(st.lists(st.sampled_from(FIELDS[:11]), max_size=2, unique=True)):
        if all(not line.startswith(f"{key}:") for line in lines):
            lines.append(f"{key}: {text.value(1, key)}")
    return "\n".join(lines) + "\n"


YAML_CASES: list[int] = []


@settings(max_examples=1000, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=yaml_texts())
def test_hostile_yaml_gives_a_config_that_reads_back_or_a_short_config_error(tmp_path_factory, text):
    check(tmp_path_factory.getbasetemp() / "hostile.yaml", text)
    YAML_CASES.append(1)


def test_the_properties_saw_enough_cases():
    assert len(CASES) >= 1000 and len(YAML_CASES) >= 1000
