from pathlib import Path

import pytest

from routing_lottery.config import config_from_dict, load_config
from routing_lottery.data.speech import SpeechMixConfig

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "routing_lottery" / "configs"


def test_packaged_configs_load_at_every_scale():
    for path in CONFIGS.glob("*.yaml"):
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
