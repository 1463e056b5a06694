"""Full scale (``folder_speech_dataset``) -- DNS Challenge clean speech + TAU Urban Acoustic Scenes 2020.

Clean speech: every ``*.wav`` under ``<clean_root>/clean/`` (or under ``clean_root`` itself
when it has no ``clean`` folder), recursively; files are split between train / validation /
test by a seeded permutation, so no file serves two splits. Noise: ``<noise_root>/meta.csv``
(tab-separated, header ``filename  scene_label  [identifier ...]``) naming ``audio/*.wav``
files, grouped into environments by ``scene_map`` (default: TAU 2020 3Class). Noise files
are split by their recording location (``identifier``) when the column is there and an
environment has at least three locations, so a test mixture never hears a place heard in
training; otherwise by file. Audio is downmixed to mono and resampled to ``sample_rate``
with a polyphase filter. All clips are held in memory: at 10 s and 16 kHz a mixture takes
1.28 MB (noisy + clean, float32), so size ``*_per_environment`` to the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...audio import read_wav
from ..images import DatasetNotFoundError
from .dataset import ENVIRONMENTS, FULL_SCALE_MIX, SPLITS, SpeechDataset, SpeechMixConfig, _cached
from .mixing import _assemble, _Clip, _clip_rng, _mix, _random_window, _speech_window, _unit_power

TAU_3CLASS: dict[str, str] = {
    "airport": "indoor", "shopping_mall": "indoor", "metro_station": "indoor",
    "park": "outdoor", "public_square": "outdoor", "street_pedestrian": "outdoor", "street_traffic": "outdoor",
    "bus": "transportation", "metro": "transportation", "tram": "transportation",
}
"""TAU 2020 Mobile scene label -> 3Class environment (the official grouping of Task 1B)."""


@dataclass(frozen=True)
class NoiseFile:
    """One TAU recording: its path, scene label, environment and recording location."""

    path: Path
    scene: str
    environment: str
    location: str


def environments_of(scene_map: Mapping[str, str]) -> tuple[str, ...]:
    """Environment names in context-id order: the 3Class order when they are those, else first appearance."""
    names = list(dict.fromkeys(scene_map.values()))
    return ENVIRONMENTS if sorted(names) == sorted(ENVIRONMENTS) else tuple(names)


def read_tau_meta(noise_root: str | Path, scene_map: Mapping[str, str] = TAU_3CLASS) -> list[NoiseFile]:
    """The recordings listed in ``<noise_root>/meta.csv``, each tagged with its environment.

    The file is TAU's tab-separated table with a header naming at least ``filename`` and
    ``scene_label``; ``identifier`` (the recording location) is used when present. Raises
    ``DatasetNotFoundError`` for a missing folder, meta.csv or listed wav file and ``ValueError``
    for scene labels ``scene_map`` does not map.
    """
    root = Path(noise_root).expanduser()
    meta = root / "meta.csv"
    if not root.is_dir():
        raise DatasetNotFoundError(f"noise folder {root} does not exist; it should hold TAU Urban Acoustic Scenes "
                                   "2020 (meta.csv and audio/*.wav)")
    if not meta.is_file():
        raise DatasetNotFoundError(f"{meta} is missing: {root} does not look like a TAU Urban Acoustic Scenes 2020 "
                                   "folder (meta.csv and audio/*.wav)")
    lines = [line.rstrip("\r\n") for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].split("\t") if lines else []
    if "filename" not in header or "scene_label" not in header:
        raise ValueError(f"{meta} must be tab-separated with a header naming 'filename' and 'scene_label'; got {header}")
    column = {name: i for i, name in enumerate(header)}
    rows = [line.split("\t") for line in lines[1:]]
    unknown = sorted({r[column["scene_label"]] for r in rows} - set(scene_map))
    if unknown:
        raise ValueError(f"{meta} has scene labels the scene map does not assign to an environment: {unknown}; "
                         f"known labels: {sorted(scene_map)}")
    files = []
    for r in rows:
        path = root / r[column["filename"]]
        scene = r[column["scene_label"]]
        location = r[column["identifier"]] if "identifier" in column else str(path.name)
        files.append(NoiseFile(path, scene, scene_map[scene], location))
    missing = [str(f.path) for f in files if not f.path.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} audio files listed in {meta} are missing, e.g. {missing[:3]}")
    return files


def find_clean_files(clean_root: str | Path) -> list[Path]:
    """Every ``*.wav`` under ``<clean_root>/clean`` (DNS layout) or under ``clean_root``, sorted."""
    root = Path(clean_root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"clean speech folder {root} does not exist; it should hold the DNS Challenge "
                                   "clean speech (any *.wav under clean/)")
    base = root / "clean" if (root / "clean").is_dir() else root
    files = sorted(base.rglob("*.wav"))
    if not files:
        raise DatasetNotFoundError(f"no *.wav files under {base}")
    return files


def _split_groups(keys: Sequence[str], fractions: Sequence[float], rng: np.random.Generator) -> list[list[int]]:
    """Assign items to splits by group key (items sharing a key share a split), a seeded share per split.

    Every split gets at least one group when there are at least as many groups as splits.
    """
    groups = list(dict.fromkeys(keys))
    order = [groups[i] for i in rng.permutation(len(groups))]
    bounds = np.cumsum([0.0, *fractions]) / sum(fractions) * len(order)
    cuts = [int(round(b)) for b in bounds]
    if len(order) >= len(fractions):
        for i in range(1, len(cuts)):
            cuts[i] = max(cuts[i], cuts[i - 1] + 1) if i < len(cuts) - 1 else len(order)
        for i in range(len(cuts) - 2, 0, -1):
            cuts[i] = min(cuts[i], cuts[i + 1] - 1)
    split_of = {g: s for s in range(len(fractions)) for g in order[cuts[s]:cuts[s + 1]]}
    return [[i for i, k in enumerate(keys) if split_of[k] == s] for s in range(len(fractions))]


@dataclass(frozen=True)
class FolderSpeechConfig:
    """Where the real audio is and how to cut it; ``mix`` holds what every mixture shares."""

    clean_root: str  # DNS Challenge folder (any *.wav under clean/)
    noise_root: str  # TAU Urban Acoustic Scenes 2020 folder (meta.csv, audio/*.wav)
    mix: SpeechMixConfig = field(default_factory=lambda: FULL_SCALE_MIX)
    scene_map: Mapping[str, str] = field(default_factory=lambda: dict(TAU_3CLASS))
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test share of files


def _folder_clip(mix: SpeechMixConfig, clean_file: Path, source: str, noise_file: NoiseFile, env: int,
                 rng: np.random.Generator) -> _Clip:
    """One mixture: a random window of the speech file (zero-padded if short) in a random window of the noise.

    Noise shorter than a clip is tiled rather than padded: silence in the noise would make the
    clip's SNR a lie for the part that has none.
    """
    n = mix.clip_samples
    speech, noise = read_wav(clean_file, mix.sample_rate), read_wav(noise_file.path, mix.sample_rate)
    for path, audio in ((clean_file, speech), (noise_file.path, noise)):
        if not np.any(audio):
            raise ValueError(f"{path} is silent (all samples zero)")
    clean = _speech_window(speech, n, rng)
    noise = np.resize(noise, n) if noise.size < n else _random_window(noise, n, rng)
    snr = float(rng.uniform(*mix.snr_db))
    noisy, clean = _mix(_unit_power(clean), _unit_power(noise), snr, mix.level_db)
    return _Clip(noisy, clean, env, snr, source)


def folder_speech_dataset(config: FolderSpeechConfig, cache_dir: str | Path | None = None,
                          use_cache: bool = True) -> SpeechDataset:
    """Full scale: DNS clean speech mixed with TAU scenes grouped into environments (see the module docstring).

    Each split draws its clean files from its own share of the files (cycling through a seeded
    permutation, so files repeat only when a split needs more clips than it has files) and its
    noise from its own share of every environment's recording locations.
    """
    clean_files = find_clean_files(config.clean_root)
    noise_files = read_tau_meta(config.noise_root, config.scene_map)
    names = environments_of(config.scene_map)
    listing = hashlib.sha256("\n".join([*(str(p) for p in clean_files), *(str(f.path) for f in noise_files)])
                             .encode()).hexdigest()
    settings = {"source": "folders", **dataclasses.asdict(config), "files": listing}

    def build() -> SpeechDataset:
        rng = np.random.default_rng(np.random.SeedSequence([config.mix.seed, 104729]))
        clean_split = _split_groups([str(p) for p in clean_files], config.split_fractions, rng)
        noise_split: dict[str, list[list[int]]] = {}
        for env in names:
            members = [i for i, f in enumerate(noise_files) if f.environment == env]
            if not members:
                raise DatasetNotFoundError(f"no noise recordings for environment {env!r} in {config.noise_root}")
            # Split by recording location when there are enough of them, else by file.
            locations = [noise_files[i].location for i in members]
            keys = locations if len(set(locations)) >= len(SPLITS) else [str(noise_files[i].path) for i in members]
            parts = _split_groups(keys, config.split_fractions, rng)
            noise_split[env] = [[members[j] for j in part] for part in parts]
        splits = {}
        for s, split in enumerate(SPLITS):
            pool = clean_split[s]
            if not pool:
                raise ValueError(f"no clean files left for the {split} split: {len(clean_files)} files are too few")
            clips, turn = [], 0
            for e, env in enumerate(names):
                if not noise_split[env][s]:
                    raise ValueError(f"environment {env!r} has too few recording locations to give the {split} split one")
                for i in range(config.mix.count(split)):
                    rng_clip = _clip_rng(config.mix.seed, s, e, i)
                    clean_file = clean_files[pool[turn % len(pool)]]
                    turn += 1
                    noise_file = noise_files[noise_split[env][s][int(rng_clip.integers(len(noise_split[env][s])))]]
                    source = str(clean_file.relative_to(Path(config.clean_root).expanduser()))
                    clips.append(_folder_clip(config.mix, clean_file, source, noise_file, e, rng_clip))
            splits[split] = _assemble(clips, names, config.mix.sample_rate)
        return SpeechDataset(splits["train"], splits["validation"], splits["test"], names, config.mix.sample_rate,
                             settings)

    return _cached("folders", settings, cache_dir, use_cache, build)


__all__ = ["TAU_3CLASS", "NoiseFile", "FolderSpeechConfig", "folder_speech_dataset", "read_tau_meta", "find_clean_files", "environments_of"]
