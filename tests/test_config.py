import datetime
import json
import time
from pathlib import Path

import pytest
import yaml

from routing_lottery.config import MAX_CONFIG_BYTES, MAX_MESSAGE, MAX_VALUES, config_from_dict, load_config
from routing_lottery.data.speech import SpeechMixConfig
from routing_lottery.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "routing_lottery" / "configs"


def test_packaged_configs_load_at_every_scale():
    for path in CONFIGS.glob("*.yaml"):
        if yaml.safe_load(path.read_text())["task"] == "lm":
            continue  # the pretrained-LM experiment has its own settings (run.lm, tests/test_lm_experiment.py)
        load_config(path)
        for scale in ("smoke", "full"):
            try:
                load_config(path, scale)
            except ValueError as err:
                assert "no scale" in str(err)


def test_scale_and_overrides_merge_deeply():
    cfg = load_config(CONFIGS / "cifar10.yaml", "smoke", {"training": {"epochs": 3}})
    assert cfg.model.options["width"] == 0.5 and cfg.training.epochs == 3
    assert cfg.training.optimizer.lr == 0.002 and cfg.training.optimizer.name == "adam"
    assert isinstance(cfg.pruning.step, float)
    assert isinstance(load_config(CONFIGS / "cifar10.yaml", "full").pruning.step, int)


@pytest.mark.parametrize("raw, message", [
    ({"pruning": {"sparsities": [0.5, 1.0]}}, r"\[0, 1\)"),
    ({"pruning": {"sparsities": [-0.2]}}, r"\[0, 1\)"),
    ({"trainin": {}}, "unknown setting"),
    ({"training": {"epochs": 0}}, "epochs must be >= 1"),
    ({"methods": ["rtl", "magic"]}, "unknown methods"),
    ({"data": {"name": "mnist"}}, "unknown dataset .mnist.; registered"),
    ({"task": "nope"}, "unknown task"),
    ({"model": {"name": "resnet"}}, "unknown model"),
    ({"model": {"name": "no_such_module:f"}}, "cannot import"),
    ({"model": {"options": "wide"}}, "options"),
    ({"speech": {"snr_db": [5.0, -5.0]}}, r"config: speech: snr_db must be \(low, high\)"),
    ({"speech": {"snr_db": [0.0, 1.0, 2.0]}}, r"config: speech: snr_db must be \(low, high\)"),
    ({"speech": {"train_per_environment": 0}}, "config: speech: train_per_environment must be >= 1"),
])
def test_bad_settings_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_round_trip_through_dict():
    cfg = load_config(CONFIGS / "digits.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg


def test_speech_section_is_the_mixture_settings_plus_the_network_front_end():
    cfg = load_config(CONFIGS / "speech.yaml", "smoke", {"seed": 7, "speech": {"seed": 3}})
    assert isinstance(cfg.speech, SpeechMixConfig)
    assert (cfg.speech.clip_seconds, cfg.speech.train_per_environment, cfg.speech.n_fft) == (1.0, 24, 1024)
    assert cfg.speech.seed == 3 and cfg.seed == 7  # the data's seed is its own: other run seeds, same mixtures


# -- hostile files: bounded before anything is built, refused by name in a short message ------------------
def bomb(levels: int, width: int = 10, indent: str = "") -> str:
    """The classic "billion laughs": each list holds ``width`` aliases of the one before."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def refused(tmp_path, text: str, match: str, seconds: float = 5.0) -> str:
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert time.perf_counter() - start < seconds  # before the fix: 80 s and 6.3 GB, or never
    assert len(str(err.value)) <= MAX_MESSAGE
    return str(err.value)


@pytest.mark.parametrize("where", ["top", "options"])
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, where):
    text = bomb(9) if where == "top" else "data:\n  options:\n" + bomb(9, indent="    ")
    assert len(text) < 2000  # a billion values in under 2 KB
    message = refused(tmp_path, text, r"hostile.yaml, line \d+, column \d+: through its aliases, this value "
                                      r"expands to more than 10,000 values")
    assert "lol" not in message


def test_the_expansion_bound_counts_values_after_aliases(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  options:\n" + bomb(2, indent="    "))  # 1,233 values after expansion
    assert len(load_config(path).data.options["l2"]) == 10
    refused(tmp_path, "data:\n  options:\n" + bomb(3, indent="    "), "more than 10,000 values")  # 12,345
    refused(tmp_path, "data:\n  options:\n    x: [" + "1, " * MAX_VALUES + "]\n", "more than 10,000 values")


def test_a_value_containing_itself_is_refused(tmp_path):
    refused(tmp_path, "data:\n  options: &o\n    self: *o\n",
            "line 2, column 12: an alias refers to a value that contains it")
    refused(tmp_path, "methods: &m [rtl, *m]\n", "an alias refers to a value that contains it")


def test_nesting_is_bounded_before_the_recursion_limit(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  options:\n    x: " + "[" * 20 + "]" * 20 + "\n")
    load_config(path)
    refused(tmp_path, "data:\n  options:\n    x: " + "[" * 2000 + "]" * 2000 + "\n", "nest deeper than 32 levels")


@pytest.mark.parametrize("text, match", [
    ("seed: " + "1" * 5000 + "\n", r"line 1, column 7: an integer of more than 100 digits \(5,000 characters\)"),
    ("data:\n  options:\n    x: " + "9" * 4301 + "\n", "line 3, column 8: an integer of more than 100 digits"),
    ("deploy:\n  target_precision: 0x" + "f" * 400 + "\n", "line 2, column 21: an integer of more than 100 digits"),
    ("deploy:\n  target_precision: 0x" + "f" * 90 + "\n", "line 2, column 21: an integer of more than 100 digits"),
    ("seed: 99999999999999999999999\n", r"seed must be in 0..2\*\*63-1"),
    ("seed: -1\n", r"seed must be in 0..2\*\*63-1"),
    ("seed: 9223372036854775807\nreplicates: 2\n", r"replicate i runs seed \+ i"),
    ("threads: 1000000\n", r"threads must be >= 1 and <= 1024"),
    ("workers: 1000000000\n", r"workers must be >= 1 and <= 1024"),
    ("replicates: 1000000000\n", r"replicates must be >= 1 and <= 1000 \(--seeds"),
    ("data:\n  options:\n    x: !!binary aGVsbG8=\n", r"data.options.x: b'hello' is a bytes"),
    ("data:\n  options:\n    x: !!set {a: null}\n", r"data.options.x: \{'a'\} is a set"),
    ("model:\n  options:\n    x: [1, .nan]\n", r"model.options.x\[1\]: NaN is not a setting"),
    ("deploy:\n  target_precision: .nan\n", "deploy.target_precision: NaN is not a setting"),
    ("data:\n  options:\n    1: 2\n", "data.options: the key 1 is not a string; quote it"),
    ("model:\n  options:\n    on: 2\n", "model.options: the key True is not a string"),
    ("device: " + "x" * 100_000 + "\n", "device must be auto, cpu"),
    ("? " + "x" * 100_000 + "\n: 1\n", "unknown setting"),  # an explicit key: no 1,024-character limit
])
def test_values_a_run_cannot_write_back_are_refused_by_name(tmp_path, text, match):
    refused(tmp_path, text, match)


def test_a_file_or_its_expansion_past_the_size_bound_is_refused(tmp_path):
    refused(tmp_path, "name: x\n" + "#" * MAX_CONFIG_BYTES + "\n", "a config file holds at most 1,048,576")
    # 300,000 characters as read, each written as \U0001F600 (10 characters) in config.yaml
    refused(tmp_path, "data:\n  options:\n    x: '" + "\U0001F600" * 200_000 + "'\n",
            "written out as config.yaml .aliases expanded., these settings take")


@pytest.mark.parametrize("value", ["2020-01-01", "2001-12-14t21:59:43.10-05:00", "2020-13-45"])
def test_dates_stay_the_text_they_were_written_as(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: {value}\ndata:\n  options:\n    day: {value}\n    pairs: !!omap [a: 1]\n")
    config = load_config(path)
    assert config.name == value and config.data.options == {"day": value, "pairs": [["a", 1]]}
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))  # as RunDirectory.claim writes it
    assert load_config(written) == config
    json.dumps(config.to_dict())


def test_settings_from_python_are_held_to_the_same_bounds():
    shared: list = ["lol"] * 10
    for _ in range(8):
        shared = [shared] * 10  # a billion values in 80 list cells
    with pytest.raises(ConfigError, match=r"config: data.options.x.*more than 10,000 values") as err:
        config_from_dict({"data": {"options": {"x": shared}}})
    assert len(str(err.value)) <= MAX_MESSAGE
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ConfigError, match="nest deeper than 32 levels"):
        config_from_dict({"model": {"options": loop}})
    with pytest.raises(ConfigError, match=r"--set: seed: an integer of more than 100 digits"):
        config_from_dict({}, overrides={"seed": 10**5000})
    with pytest.raises(ConfigError, match=r"is a datetime"):
        config_from_dict({"data": {"options": {"t": datetime.datetime(2020, 1, 1)}}})
    assert config_from_dict({"data": {"options": {"t": (1, 2)}}}).data.options == {"t": [1, 2]}  # YAML's form


def test_an_invalid_override_is_blamed_on_the_option_that_gave_it():
    with pytest.raises(ConfigError, match=r"^--device \(over config\): device must be"):
        config_from_dict({}, overrides={"device": "tpu9"}, overrides_from="--device")
