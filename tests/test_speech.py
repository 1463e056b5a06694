"""Speech enhancement: measures, the U-Net, mixing, the synthetic and folder datasets, the task.

Datasets here are tiny (1-s clips, a handful per environment) so the whole file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from routing_lottery.audio import (
    mix_at_snr, read_wav, save_spectrograms, si_snr, si_snr_improvement, weighted_sdr_loss, write_wav,
)
from routing_lottery.data.images import DatasetNotFoundError
from routing_lottery.data.speech import (
    ENVIRONMENTS, NOISE_RECIPES, SPLITS, FolderSpeechConfig, SpeechMixConfig, SynthesizerNotFoundError,
    folder_speech_dataset, read_tau_meta, synthetic_speech_dataset,
)
from routing_lottery.data import speech as speech_data
from routing_lottery.models.unet import SpeechUNet
from routing_lottery.pruning import prunable_names
from routing_lottery.tasks.speech import SpeechTask, environment_rows, speech_loss
from routing_lottery.training import OptimizerConfig, train

RATE = 16000
TINY = SpeechMixConfig(clip_seconds=1.0, train_per_environment=4, validation_per_environment=1,
                       test_per_environment=2, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> speech_data.SpeechDataset:
    return synthetic_speech_dataset(TINY, cache_dir=tmp_path_factory.mktemp("speech-cache"))


def _speechlike(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / RATE
    return torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t)) + 0.1 * torch.randn(n, generator=g)


# -- measures -----------------------------------------------------------------------------------
def test_si_snr_is_scale_invariant() -> None:
    clean = _speechlike(RATE)
    estimate = clean + 0.3 * torch.randn(RATE, generator=torch.Generator().manual_seed(1))
    base = si_snr(estimate, clean)
    for scale in (0.01, 0.5, 7.0):
        assert torch.allclose(si_snr(scale * estimate, clean), base, atol=1e-3)


def test_si_snr_of_a_perfect_estimate_is_very_high() -> None:
    clean = _speechlike(RATE)
    assert float(si_snr(clean, clean)) > 60
    assert float(si_snr(2.5 * clean + 0.1, clean)) > 60  # gain and offset do not count as error


def test_si_snr_measures_a_known_snr() -> None:
    clean = _speechlike(RATE).double()
    noise = torch.randn(RATE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    clean, noise = clean - clean.mean(), noise - noise.mean()
    noise = noise - (noise @ clean) / (clean @ clean) * clean  # orthogonal: all of it counts as error
    noise = noise * torch.sqrt((clean @ clean) / (noise @ noise) / 10)  # exactly 10 dB
    assert float(si_snr(clean + noise, clean)) == pytest.approx(10.0, abs=1e-6)


def test_si_snr_improvement_sign_and_batch_shape() -> None:
    clean = torch.stack([_speechlike(RATE, s) for s in range(3)])
    noise = torch.randn(3, RATE, generator=torch.Generator().manual_seed(4))
    noisy = clean + noise
    better, worse = clean + 0.2 * noise, clean + 3.0 * noise
    assert si_snr_improvement(better, noisy, clean).shape == (3,)
    assert bool((si_snr_improvement(better, noisy, clean) > 0).all())
    assert bool((si_snr_improvement(worse, noisy, clean) < 0).all())
    assert torch.allclose(si_snr_improvement(noisy, noisy, clean), torch.zeros(3))


def test_weighted_sdr_loss_is_minus_one_for_a_perfect_estimate_and_worse_otherwise() -> None:
    clean = torch.stack([_speechlike(RATE, s) for s in range(2)])
    noisy = clean + torch.randn(2, RATE, generator=torch.Generator().manual_seed(5))
    assert float(weighted_sdr_loss(clean, noisy, clean)) == pytest.approx(-1.0, abs=1e-5)
    assert float(weighted_sdr_loss(noisy, noisy, clean)) > -0.8
    assert float(speech_loss(clean, torch.stack([noisy, clean], 1))) == pytest.approx(-1.0, abs=1e-5)


def test_mix_at_snr_is_exact() -> None:
    clean = torch.stack([_speechlike(RATE, s) for s in range(3)]).double()
    noise = torch.randn(3, RATE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    snrs = torch.tensor([-5.0, 0.0, 12.5], dtype=torch.float64)
    mix = mix_at_snr(clean, noise, snrs)
    measured = 10 * torch.log10((clean ** 2).sum(-1) / ((mix - clean) ** 2).sum(-1))
    assert torch.allclose(measured, snrs, atol=1e-9)
    single = mix_at_snr(clean[0], noise[0], 3.0)
    assert float(10 * torch.log10((clean[0] ** 2).sum() / ((single - clean[0]) ** 2).sum())) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="silent"):
        mix_at_snr(clean[0], torch.zeros(RATE, dtype=torch.float64), 0.0)


# -- the U-Net ----------------------------------------------------------------------------------
def test_unet_has_exactly_the_papers_prunable_weights() -> None:
    net = SpeechUNet()
    params = dict(net.named_parameters())
    names = prunable_names(net)
    assert len(names) == 10
    assert sum(params[n].numel() for n in names) == 37_368
    assert params["encoder.0.conv.weight"].shape == (12, 2, 3, 5)
    assert params["decoder.4.conv.weight"].shape == (24, 2, 3, 5)  # ConvTranspose: (in, out, kh, kw)


def test_stft_istft_round_trip_with_an_all_pass_mask_is_identity() -> None:
    net = SpeechUNet()
    x = torch.randn(2, 20000, generator=torch.Generator().manual_seed(7))
    spectrum = net.stft(x)
    all_pass = torch.ones_like(spectrum)
    assert torch.allclose(net.istft(all_pass * spectrum, x.shape[-1]), x, atol=1e-4)


@pytest.mark.parametrize("n_fft,hop,length", [(1024, 256, 16000), (1024, 256, 12345), (512, 128, 8001), (400, 100, 7777)])
def test_unet_output_length_equals_input_length(n_fft: int, hop: int, length: int) -> None:
    net = SpeechUNet(n_fft, hop).eval()
    with torch.no_grad():
        y = net(torch.randn(2, length))
    assert y.shape == (2, length)
    assert torch.isfinite(y).all()


# -- synthetic data -----------------------------------------------------------------------------
def test_synthetic_dataset_shapes_and_environments(tiny: speech_data.SpeechDataset) -> None:
    assert tiny.environment_names == ENVIRONMENTS
    for name in SPLITS:
        split = tiny.split(name)
        per_env = TINY.count(name)
        assert split.noisy.shape == split.clean.shape == (3 * per_env, RATE)
        assert torch.bincount(split.environment, minlength=3).tolist() == [per_env] * 3
        measured = si_snr(split.noisy.double(), split.clean.double())  # ~ the mixing SNR (noise not orthogonal)
        assert bool(((measured > TINY.snr_db[0] - 3) & (measured < TINY.snr_db[1] + 3)).all())
        rms = split.noisy.pow(2).mean(-1).sqrt()
        assert bool((20 * torch.log10(rms) < TINY.level_db + 0.1).all())


def test_same_seed_gives_identical_arrays() -> None:
    config = SpeechMixConfig(clip_seconds=0.5, train_per_environment=1, validation_per_environment=1,
                             test_per_environment=1, seed=11)
    a = synthetic_speech_dataset(config, use_cache=False)
    b = synthetic_speech_dataset(config, use_cache=False)
    for name in SPLITS:
        assert torch.equal(a.split(name).noisy, b.split(name).noisy)
        assert torch.equal(a.split(name).clean, b.split(name).clean)
        assert a.split(name).sources == b.split(name).sources
    other = synthetic_speech_dataset(SpeechMixConfig(**{**config.__dict__, "seed": 12}), use_cache=False)
    assert not torch.equal(a.train.clean, other.train.clean)


def test_splits_never_share_a_clean_utterance(tiny: speech_data.SpeechDataset) -> None:
    texts = {name: set() for name in SPLITS}
    for name in SPLITS:
        for source in tiny.split(name).sources:
            texts[name].add(source.split(" | ", 1)[1])
        assert len(texts[name]) == len(tiny.split(name))  # every clip its own utterance, too
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    rows = {name: {tuple(r[:200].tolist()) for r in tiny.split(name).clean} for name in SPLITS}
    assert not rows["train"] & rows["test"]


def test_cached_dataset_loads_identically(tiny: speech_data.SpeechDataset, tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("cache-round-trip")
    first = synthetic_speech_dataset(TINY, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    again = synthetic_speech_dataset(TINY, cache_dir=cache)
    assert torch.equal(first.test.noisy, again.test.noisy) and first.test.sources == again.test.sources
    assert torch.equal(first.test.noisy, tiny.test.noisy)  # a cache elsewhere: the same arrays


def test_noise_recipes_differ_in_spectrum() -> None:
    """Outdoor and transportation noise are low-frequency heavy; indoor babble sits in the speech band."""
    rng = np.random.default_rng(0)
    centroid = {}
    for name in ("outdoor", "transportation"):
        x = NOISE_RECIPES[name](rng, RATE, RATE, None)
        assert x.shape == (RATE,) and np.isclose(np.mean(x * x), 1.0, rtol=1e-3)
        power = np.abs(np.fft.rfft(x)) ** 2
        centroid[name] = float((np.fft.rfftfreq(RATE, 1 / RATE) * power).sum() / power.sum())
    assert all(c < 2000 for c in centroid.values())


def test_a_missing_synthesizer_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(self: object) -> None:
        raise ImportError("No module named 'espeakng_loader'")

    monkeypatch.setattr(speech_data.EspeakLibrary, "__init__", no_library)
    monkeypatch.setattr(speech_data.shutil, "which", lambda name: None)
    with pytest.raises(SynthesizerNotFoundError, match="pip install espeakng-loader.*apt-get install espeak-ng"):
        speech_data.find_synthesizer()


# -- folder data (DNS clean speech + TAU layout) ------------------------------------------------
def _write_tone(path, seconds: float, rate: int, channels: int, freq: float) -> None:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(int(freq)).standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.stack([mono] * channels, axis=1) if channels > 1 else mono, rate)


def _tau_folder(root, scenes: list[tuple[str, str]]) -> None:
    lines = ["filename\tscene_label\tidentifier\tsource_label"]
    for i, (scene, location) in enumerate(scenes):
        name = f"audio/{scene}-{location}-{i}-a.wav"
        _write_tone(root / name, 1.5, 48000, 2, 300 + 40 * i)
        lines.append(f"{name}\t{scene}\t{location}\ta")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")


def test_tau_meta_maps_scenes_to_environments(tmp_path) -> None:
    scenes = [("airport", "barcelona-0"), ("park", "helsinki-1"), ("tram", "lyon-2"), ("metro_station", "paris-3")]
    _tau_folder(tmp_path / "tau", scenes)
    files = read_tau_meta(tmp_path / "tau")
    assert [f.environment for f in files] == ["indoor", "outdoor", "transportation", "indoor"]
    assert [f.location for f in files] == [loc for _, loc in scenes]
    custom = read_tau_meta(tmp_path / "tau", {"airport": "a", "park": "b", "tram": "b", "metro_station": "a"})
    assert [f.environment for f in custom] == ["a", "b", "b", "a"]


def test_tau_meta_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        read_tau_meta(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="meta.csv"):
        read_tau_meta(tmp_path / "empty")
    _tau_folder(tmp_path / "odd", [("airport", "x-0"), ("laboratory", "x-1")])
    with pytest.raises(ValueError, match="laboratory"):
        read_tau_meta(tmp_path / "odd")
    _tau_folder(tmp_path / "gone", [("airport", "x-0")])
    next((tmp_path / "gone" / "audio").glob("*.wav")).unlink()
    with pytest.raises(DatasetNotFoundError, match="missing"):
        read_tau_meta(tmp_path / "gone")


def test_folder_dataset_from_dns_and_tau_layouts(tmp_path) -> None:
    for i in range(6):
        _write_tone(tmp_path / "dns" / "clean" / f"book_{i:03d}.wav", 2.0, 16000, 1, 150 + 10 * i)
    scenes = [(scene, f"{scene}-loc{j}") for scene in ("airport", "park", "bus") for j in range(3)]
    _tau_folder(tmp_path / "tau", scenes)
    mix = SpeechMixConfig(clip_seconds=1.0, train_per_environment=2, validation_per_environment=1, test_per_environment=1)
    config = FolderSpeechConfig(str(tmp_path / "dns"), str(tmp_path / "tau"), mix)
    data = folder_speech_dataset(config, use_cache=False)
    assert data.environment_names == ENVIRONMENTS
    assert data.train.noisy.shape == (6, 16000) and data.test.noisy.shape == (3, 16000)
    assert data.train.environment.tolist() == [0, 0, 1, 1, 2, 2]
    files = {name: set(data.split(name).sources) for name in SPLITS}
    assert not files["train"] & files["test"] and not files["validation"] & files["test"]
    with pytest.raises(DatasetNotFoundError, match="clean"):
        folder_speech_dataset(FolderSpeechConfig(str(tmp_path / "none"), str(tmp_path / "tau"), mix), use_cache=False)


def test_wav_round_trip_downmixes_and_resamples(tmp_path) -> None:
    _write_tone(tmp_path / "stereo48k.wav", 1.0, 48000, 2, 440)
    x = read_wav(tmp_path / "stereo48k.wav", 16000)
    assert x.shape == (16000,) and x.dtype == np.float32
    write_wav(tmp_path / "out.wav", x, 16000)
    y = read_wav(tmp_path / "out.wav", None)
    assert np.allclose(x, y, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_wav(tmp_path / "missing.wav")


# -- the task -----------------------------------------------------------------------------------
def test_streams_and_evaluation(tiny: speech_data.SpeechDataset) -> None:
    task = SpeechTask(tiny, batch_size=3)
    stream = task.environment_stream(1)
    batches = stream.epoch(torch.Generator().manual_seed(0))
    assert stream.name == "outdoor" and stream.num_batches == len(batches) == 2
    x, y = batches[0]
    assert y.shape == (x.shape[0], 2, RATE) and torch.equal(y[:, 0], x)
    outdoor = set(tiny.train.indices(1).tolist())
    rows = [i for i in range(len(tiny.train)) if any(torch.equal(tiny.train.noisy[i], xi) for xi in x)]
    assert set(rows) <= outdoor
    assert task.all_stream().num_batches == math.ceil(len(tiny.train) / 3)
    rows = environment_rows(task.enhance(lambda k, noisy: noisy), tiny.test)
    assert [r["environment"] for r in rows] == ["all", *ENVIRONMENTS]
    assert all(r["si_snri"] == pytest.approx(0.0, abs=1e-4) for r in rows)
    routed_to: list[tuple[int, set[int]]] = []

    def oracle(k: int, noisy: torch.Tensor) -> torch.Tensor:
        rows = _rows_of(tiny.test.noisy, noisy)
        routed_to.append((k, {int(tiny.test.environment[r]) for r in rows}))
        return tiny.test.clean[rows]

    assert all(r["si_snri"] > 20 for r in environment_rows(task.enhance(oracle), tiny.test))
    assert sorted(k for k, _ in routed_to) == [0, 1, 2] and all(envs == {k} for k, envs in routed_to)


def _rows_of(table: torch.Tensor, batch: torch.Tensor) -> list[int]:
    return [next(i for i in range(len(table)) if torch.equal(table[i], row)) for row in batch]


def test_spectrogram_pngs(tiny: speech_data.SpeechDataset, tmp_path) -> None:
    save_spectrograms(tmp_path / "grid.png", {"noisy": tiny.test.noisy[0], "clean": tiny.test.clean[0].numpy()}, RATE)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_runner_contract_keeps_examples_and_draws_figures(tiny: speech_data.SpeechDataset, tmp_path) -> None:
    task, outputs = SpeechTask(tiny), tmp_path / "run" / "outputs"
    net = task.build_model().eval()
    assert sum(dict(net.named_parameters())[n].numel() for n in prunable_names(net)) == 37_368
    assert task.context_stream(2).name == "transportation" and task.shared_stream().name == "all"
    rows = task.score_shared(lambda x: x, "dense_0.0000", outputs)  # the identity enhances nothing
    assert [r["environment"] for r in rows] == ["all", *ENVIRONMENTS]
    assert all(r["si_snri"] == pytest.approx(0.0, abs=1e-4) for r in rows)
    task.score_routed(lambda k, x: 0.5 * x + 0.5 * tiny.test.clean[_rows_of(tiny.test.noisy, x)], "rtl_0.5000",
                      outputs)
    task.score_routed(lambda k, x: x, "multi_imp_0.5000", outputs)
    kept = ["dense_0.0000.npz", "multi_imp_0.5000.npz", "rtl_0.5000.npz"]  # each with its checksum beside it
    assert sorted(p.name for p in (tmp_path / "run" / "outputs").iterdir()) == sorted(
        kept + [name + ".sha256" for name in kept])
    assert all(task.output_problem(outputs, name[:-4]) is None for name in kept)
    figures = task.write_figures(outputs)
    assert [p.name for p in figures] == [f"{e}_0_50pct.png" for e in ENVIRONMENTS]
    assert all(p.parent == tmp_path / "run" / "spectrograms" and p.read_bytes()[:4] == b"\x89PNG" for p in figures)


@pytest.fixture
def one_thread():
    """This small U-Net trains several times faster on one thread than on two busy cores (OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_smoke_training_lowers_the_loss(tiny: speech_data.SpeechDataset, one_thread: None) -> None:
    torch.manual_seed(0)
    net = SpeechUNet()
    task = SpeechTask(tiny, batch_size=4)
    stream = task.all_stream()
    probe_x, probe_y = stream.epoch(torch.Generator().manual_seed(99))[0]

    def probe_loss() -> float:
        with torch.no_grad():  # train mode: batch statistics, as during the steps
            return float(speech_loss(net(probe_x), probe_y))

    before = probe_loss()
    train(net, None, stream, epochs=4, optimizer=OptimizerConfig(lr=3e-3), seed=0)
    assert probe_loss() < before - 0.05


@pytest.mark.slow
def test_speech_config_runs_every_method_per_environment(tmp_path):
    from routing_lottery.cli import packaged_config
    from routing_lottery.config import load_config
    from routing_lottery.run import make_runner

    config = load_config(packaged_config("speech"), "smoke", {
        "methods": ["dense", "single_imp", "rtl"], "pruning": {"sparsities": [0.5], "step": 0.5},
        "speech": {"clip_seconds": 0.5, "train_per_environment": 4, "validation_per_environment": 1,
                   "test_per_environment": 2},
        "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 4}})
    records = make_runner(config, tmp_path).run_all()
    keys = {(r["method"], r["sparsity"], r["environment"]) for r in records}
    environments = ("all", "indoor", "outdoor", "transportation")
    assert keys == {(m, s, e) for m, s in [("dense", 0.0), ("single_imp", 0.5), ("rtl", 0.5)] for e in environments}
    assert all(math.isfinite(r["si_snri"]) for r in records)
    for method in ("dense", "rtl"):  # "all" is the mean over every clip: here 2 per environment
        rows = {r["environment"]: r for r in records if r["method"] == method}
        assert rows["all"]["si_snri"] == pytest.approx(sum(rows[e]["si_snri"] for e in environments[1:]) / 3, abs=1e-5)
    rtl = next(r for r in records if r["method"] == "rtl")
    assert rtl["parameters"] >= round(0.5 * 37368)
    assert any((tmp_path / "spectrograms").glob("*.png"))


def test_config_speech_section_builds_the_same_mixtures(tiny: speech_data.SpeechDataset, tmp_path, monkeypatch) -> None:
    from routing_lottery.config import config_from_dict
    from routing_lottery.run import build_tasks

    monkeypatch.setenv("RTL_CACHE", str(tmp_path))
    mixture = {f: getattr(TINY, f) for f in ("clip_seconds", "train_per_environment", "validation_per_environment",
                                            "test_per_environment", "seed")}
    config = config_from_dict({"task": "speech", "seed": 11, "data": {"name": "speech"}, "model": {"name": "unet"},
                               "speech": {**mixture, "n_fft": 512, "hop_length": 128}})
    task = build_tasks(config)[0]
    assert isinstance(task, SpeechTask) and (task.n_fft, task.hop_length) == (512, 128)
    assert torch.equal(task.data.train.noisy, tiny.train.noisy) and torch.equal(task.data.test.clean, tiny.test.clean)


def test_check_task_passes_the_speech_task(tiny: speech_data.SpeechDataset, one_thread) -> None:
    from routing_lottery.experiments import check_task

    check_task(SpeechTask(tiny, n_fft=256, hop_length=64))


def test_routing_each_clip_by_its_own_environment_is_oracle_routing_exactly(tiny: speech_data.SpeechDataset) -> None:
    task = SpeechTask(tiny, eval_batch_size=2)
    weights = torch.linspace(0.5, 1.0, tiny.test.noisy.shape[1])

    def predict(k: int, noisy: torch.Tensor) -> torch.Tensor:  # per-environment gain: the choice matters
        return noisy * weights * (k + 1) / 3

    _, environments = task.context_examples("test")
    assert task.score_routed(predict, chosen=environments.clone()) == task.score_routed(predict)
    wrong = (environments + 1) % task.num_contexts
    assert task.score_routed(predict, chosen=wrong) != task.score_routed(predict)
