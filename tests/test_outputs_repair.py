"""The example outputs INR and speech runs keep for their figures (``outputs/*.npy|npz``) are verified.

Each is written with a sha256 sidecar; a bad one (bit flipped, truncated, deleted, its checksum
gone) raises ``CheckpointError`` naming it when loaded, is left out of a figure with a warning, and
on resume its (method, level) is recomputed with one log line, so the figures and records equal
the uninterrupted run's. Runs here are the smallest the INR and speech tests use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from routing_lottery.cli import packaged_config
from routing_lottery.config import load_config
from routing_lottery.errors import CheckpointError
from routing_lottery.run import build_tasks, make_runner

pytestmark = pytest.mark.slow  # every test starts from a finished run of each task (module fixture)

INR = {"data": {"images": ["coffee"], "image_size": 16, "regions": 3}, "methods": ["dense", "rtl"],
       "pruning": {"sparsities": [0.5], "step": 0.5}, "training": {"imp_epochs": 5, "epochs": 5}}
SPEECH = {"methods": ["dense", "rtl"], "pruning": {"sparsities": [0.5], "step": 0.5},
          "speech": {"clip_seconds": 0.5, "train_per_environment": 4, "validation_per_environment": 1,
                     "test_per_environment": 2},
          "training": {"imp_epochs": 1, "epochs": 1, "batch_size": 4}}


def flip(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) - 5] ^= 0x04  # in the data, past any header: still a parsable file
    path.write_bytes(bytes(blob))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete(path: Path) -> None:
    path.unlink()


def delete_checksum(path: Path) -> None:
    path.with_name(path.name + ".sha256").unlink()


CORRUPTIONS = [flip, truncate, delete, delete_checksum]


def _run(kind: str, changes: dict, out: Path, log=None) -> list[dict]:
    config = load_config(packaged_config(kind), "smoke", changes)
    return make_runner(config, out, log=log or (lambda line: None)).run_all()


def _figures(run_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every PNG of the run by its pixels (what a user sees; the encoder's bytes are beside the point)."""
    pixels = {}
    for path in sorted(run_dir.rglob("*.png")):
        with Image.open(path) as png:
            array = np.asarray(png.convert("RGBA"))
        pixels[str(path.relative_to(run_dir))] = array.shape, hashlib.sha256(array.tobytes()).hexdigest()
    return pixels


def _outputs(run_dir: Path, kind: str) -> Path:
    """Where the task keeps its outputs: an INR run has one part per image, even for one image."""
    return run_dir / "images" / "coffee" / "outputs" if kind == "inr" else run_dir / "outputs"


def _records(run_dir: Path) -> list[dict]:
    """results.json without wall-clock times, which no two runs share."""
    rows = json.loads((run_dir / "results.json").read_text())
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """kind -> an uninterrupted tiny run's directory (made once, copied by each test)."""
    runs = {}
    for kind, changes in (("inr", INR), ("speech", SPEECH)):
        out = tmp_path_factory.mktemp(kind) / "run"
        _run(kind, changes, out)
        runs[kind] = out
    return runs


# Two outputs broken at once per resume (a resumed run of these tasks spends most of its time
# drawing figures): the four ways a file goes bad, two on RTL's output, two on dense's.
BREAKS = [(flip, truncate), (delete, delete_checksum)]


@pytest.mark.parametrize("kind", ["inr", "speech"])
@pytest.mark.parametrize("rtl,dense", BREAKS, ids=lambda f: f.__name__)
def test_bad_outputs_are_regenerated_on_resume_and_the_run_equals_the_uninterrupted_one(
        finished, tmp_path, kind, rtl, dense):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[kind], run_dir)
    outputs, suffix = _outputs(run_dir, kind), ".npy" if kind == "inr" else ".npz"
    broken = {f"rtl_0.5000{suffix}": rtl, f"dense_0.0000{suffix}": dense}
    originals = {name: (outputs / name).read_bytes() for name in broken}
    for name, corrupt in broken.items():
        corrupt(outputs / name)

    lines: list[str] = []
    _run(kind, INR if kind == "inr" else SPEECH, run_dir, lines.append)
    for name in broken:  # one line each, naming the file
        named = [line for line in lines if name in line]
        assert len(named) == 1 and "recomputing" in named[0] and "\n" not in named[0], lines
    assert {name: (outputs / name).read_bytes() for name in broken} == originals  # regenerated exactly
    assert _figures(run_dir) == _figures(finished[kind])
    assert _records(run_dir) == _records(finished[kind])


def test_an_intact_run_resumes_without_recomputing(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished["inr"], run_dir)
    lines: list[str] = []
    _run("inr", INR, run_dir, lines.append)
    assert not any("recomputing" in line for line in lines), lines


@pytest.mark.parametrize("kind", ["inr", "speech"])
def test_loading_a_bad_output_names_it_and_figures_leave_it_out(finished, tmp_path, kind):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[kind], run_dir)
    task = build_tasks(load_config(run_dir / "config.yaml"))[0]
    outputs = _outputs(run_dir, kind)
    output = "rtl_0.5000" + (".npy" if kind == "inr" else ".npz")
    path, label = outputs / output, output.rsplit(".", 1)[0]
    kept = {p: p.read_bytes() for p in (path, path.with_name(output + ".sha256"))}
    assert task.output_problem(outputs, label) is None
    for corrupt in CORRUPTIONS:
        corrupt(path)
        with pytest.raises(CheckpointError, match=output.replace(".", r"\.")):
            task.load_output(path)
        problem = task.output_problem(outputs, label)
        assert problem is not None and output in problem and "\n" not in problem
        for p, data in kept.items():
            p.write_bytes(data)

    flip(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures = task.write_figures(outputs)  # drawn from the verified files, the bad one named
    assert figures and all(p.is_file() for p in figures)
    assert [w for w in caught if output in str(w.message)], [str(w.message) for w in caught]


def test_a_non_archive_with_a_valid_checksum_is_a_checkpoint_error_not_unexpected(finished, tmp_path):
    """A .npz whose checksum matches but that is no archive (written by someone else) is named, not a crash."""
    from routing_lottery.io import atomic_write_with_sha256

    run_dir = tmp_path / "run"
    shutil.copytree(finished["speech"], run_dir)
    task = build_tasks(load_config(run_dir / "config.yaml"))[0]
    atomic_write_with_sha256(run_dir / "outputs" / "rtl_0.5000.npz", b"PK\x03\x04 not really a zip file")
    with pytest.raises(CheckpointError, match=r"rtl_0\.5000\.npz is not a NumPy \.npz archive"):
        task.load_output(run_dir / "outputs" / "rtl_0.5000.npz")
    atomic_write_with_sha256(run_dir / "outputs" / "rtl_0.5000.npz", _npz(extra=np.zeros(3, dtype=np.float32)))
    with pytest.raises(CheckpointError, match="does not hold this task's example clips"):
        task.load_output(run_dir / "outputs" / "rtl_0.5000.npz")


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
