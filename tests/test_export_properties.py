"""Properties of exports handed to their loaders after damage, and of the names exports are filed under.

One tiny export is written once per module. Each example mutates one of its files (bit flips,
overwritten, inserted and deleted bytes, truncation; positions lean towards headers: the
safetensors JSON header, the zip directory of ``model.pt2``), loads through both loaders -- the
library's and the standalone ``load_weights.py`` -- and restores the file. Either the loader
raises its ``CheckpointError`` naming a file of the export, or it returns exactly what was
exported: the same tensors bit for bit, a program computing the same outputs. For the weights,
half the examples also record the damaged file's size and sha256 in ``export.json``, so the
file's own digest is all that guards it (it must cover names, shapes and metadata, not only the
values). ``torch.export.load`` is memoized by the bytes it is given (it is a function of them),
so that the few examples that reach it cost one real load in all. 1,000 examples each,
derandomized, each bounded in time.
"""

import hashlib
import io
import json
import re
import runpy
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from routing_lottery.errors import CheckpointError
from routing_lottery.export import (INDEX_FILE, LOADER_FILE, MAX_NAME_CHARACTERS, PROGRAM_FILE, WEIGHTS_FILE,
                                    export_context, load_compact_state, load_program, safe_filename)
from routing_lottery.masks import MaskSet
from routing_lottery.pruning import random_mask_like
from routing_lottery.routed import RoutedModel
from byte_edits import apply_edits, edit_lists
from toy import toy_model

pytestmark = pytest.mark.slow  # every property runs 1,000 generated cases

SECONDS_PER_CASE = 5.0  # a case takes about a millisecond; a loader that hangs or balloons fails this
SETTINGS = settings(max_examples=1000, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Export:
    """The export's folder, its files' original bytes, what they hold, and the two sets of loaders."""

    def __init__(self, folder: Path, routed: RoutedModel, inputs: torch.Tensor):
        self.folder, self.inputs = folder, inputs
        self.originals = {name: (folder / name).read_bytes() for name in (WEIGHTS_FILE, PROGRAM_FILE, INDEX_FILE)}
        self.state = {k: v.clone() for k, v in routed.standalone("b").state_dict().items()}
        with torch.no_grad():
            self.outputs = routed(inputs, "b")
        standalone = runpy.run_path(str(folder / LOADER_FILE))
        self.loaders = {"library": (load_compact_state, load_program, CheckpointError),
                        "standalone": (standalone["load_compact_state"], standalone["load_program"],
                                       standalone["CheckpointError"])}
        header = 8 + int.from_bytes(self.originals[WEIGHTS_FILE][:8], "little")
        program = len(self.originals[PROGRAM_FILE])
        # where mutations bite: the JSON header of the weights; the zip's local headers and directory
        self.hot = {WEIGHTS_FILE: list(range(header)),
                    PROGRAM_FILE: [*range(min(96, program)), *range(max(0, program - 1024), program)],
                    INDEX_FILE: list(range(len(self.originals[INDEX_FILE])))}
        self._outputs: dict[int, torch.Tensor] = {}

    def __repr__(self):  # keeps Hypothesis's report of a failing case short
        return f"Export({self.folder})"

    def mutate(self, name, edits):
        return apply_edits(self.originals[name], edits, self.hot[name])

    def rerecord(self, name, data):
        """export.json with ``name``'s entry made to match ``data``."""
        index = json.loads(self.originals[INDEX_FILE])
        entry = next(f for f in index["files"] if f["file"] == name)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        return json.dumps(index, indent=2).encode()

    def program_outputs(self, program):
        if id(program) not in self._outputs:
            with torch.no_grad():
                self._outputs[id(program)] = program.module()(self.inputs)
        return self._outputs[id(program)]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = toy_model()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    base = {n: torch.rand(params[n].shape, generator=g) > 0.7 for n in ("0.weight", "2.weight")}
    routed = RoutedModel(model, MaskSet.from_tickets([random_mask_like(base, g) for _ in range(3)], ["a", "b", "c"]))
    folder = tmp_path_factory.mktemp("export")
    inputs = torch.randn(5, 4, generator=g)
    export_context(routed, "b", folder, inputs[:2], verify=inputs)
    real_load, programs = torch.export.load, {}

    def load_once(f, **kwargs):
        data = f.getvalue() if isinstance(f, io.BytesIO) else Path(f).read_bytes()
        key = hashlib.sha256(data).hexdigest()
        if key not in programs:
            programs[key] = real_load(io.BytesIO(data), **kwargs)
        return programs[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.export, "load", load_once)
        yield Export(folder, routed, inputs)


EDITS = edit_lists(positions=1 << 20)  # in the hot positions or anywhere


def _written(export, files):
    """Write ``files`` (name -> bytes) into the export; return a function that restores the originals."""
    for name, data in files.items():
        (export.folder / name).write_bytes(data)

    def restore():
        for name in files:
            (export.folder / name).write_bytes(export.originals[name])

    return restore


def _loads_exactly_or_refuses(export, which):
    """Load ``which`` (weights or program) with both loaders: CheckpointError naming a file, or the original."""
    for loader, (load_state, load_prog, error) in export.loaders.items():
        start = time.perf_counter()
        try:
            if which == WEIGHTS_FILE:
                state = load_state(str(export.folder / WEIGHTS_FILE))
                assert state.keys() == export.state.keys(), loader
                assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in export.state.items())
            else:
                assert torch.equal(export.program_outputs(load_prog(export.folder / PROGRAM_FILE)), export.outputs)
        except error as err:
            assert any(name in str(err) for name in (WEIGHTS_FILE, PROGRAM_FILE, INDEX_FILE)), err
            assert isinstance(err, CheckpointError) == (loader == "library")
            event(f"{which} refused: " + re.sub(r"\d+", "N", str(err).split(": ", 1)[-1])[:40])
        else:
            event(f"{which} loaded exactly")
        assert time.perf_counter() - start < SECONDS_PER_CASE


@SETTINGS
@given(edits=EDITS, rerecord=st.booleans())
def test_damaged_weights_load_exactly_or_raise_checkpoint_error(export, edits, rerecord):
    data = export.mutate(WEIGHTS_FILE, edits)
    files = {WEIGHTS_FILE: data, **({INDEX_FILE: export.rerecord(WEIGHTS_FILE, data)} if rerecord else {})}
    restore = _written(export, files)
    try:
        _loads_exactly_or_refuses(export, WEIGHTS_FILE)
    finally:
        restore()


@SETTINGS
@given(edits=EDITS)
def test_damaged_programs_load_exactly_or_raise_checkpoint_error(export, edits):
    restore = _written(export, {PROGRAM_FILE: export.mutate(PROGRAM_FILE, edits)})
    try:
        _loads_exactly_or_refuses(export, PROGRAM_FILE)
    finally:
        restore()


@SETTINGS
@given(edits=EDITS)
def test_a_damaged_export_json_loads_exactly_or_raises_checkpoint_error(export, edits):
    restore = _written(export, {INDEX_FILE: export.mutate(INDEX_FILE, edits)})
    try:
        _loads_exactly_or_refuses(export, WEIGHTS_FILE)
        _loads_exactly_or_refuses(export, PROGRAM_FILE)
    finally:
        restore()


NAMES = st.lists(st.one_of(st.text(max_size=80), st.sampled_from(["..", ".", "/", "../../../x", "/etc/passwd",
                                                                   "sweet/pepper", "sweet_pepper", "a@1", "-rf"])),
                 min_size=1, max_size=6, unique=True)


@settings(max_examples=1000, derandomize=True, deadline=None, database=None)
@given(names=NAMES)
def test_context_names_become_distinct_file_names_inside_their_folder(names):
    root = Path("/srv/run/export").resolve()
    files = [safe_filename(name, k) for k, name in enumerate(names)]
    assert len(set(files)) == len(files), files  # one folder per context
    for name, file in zip(names, files):
        assert file not in (".", "..") and not file.startswith((".", "-")) and "/" not in file and "\\" not in file
        assert len(file) <= MAX_NAME_CHARACTERS + 1 + len(str(len(names))), file
        assert (root / f"{file}_0.5000").resolve().parent == root
        assert file.isascii() and file.isprintable()
        if file == name:  # kept as it is only when already a plain file name
            assert "@" not in file
