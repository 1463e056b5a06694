"""Property tests (issue 12): mask bit-packing round trips, and ticket checkpoints under corruption.

Deterministic (``derandomize=True``, no example database), at least ``CASES`` generated cases per
test -- each test counts the cases it ran and checks. The loading properties:

* byte mutations of ``tickets.safetensors`` or ``tickets.json``: ``CheckpointError``, unless the
  mutated index is the same document (whitespace, escapes, number spelling), which loads exactly
  the saved weights;
* mutations of ``tickets.safetensors`` whose hashes are then recomputed (so the parser and the
  tensor checks are reached, not only the sha256): ``CheckpointError`` or a load that matches
  what the file holds, decoded independently here;
* structured edits of the index (values of other types, numbers out of range, keys removed,
  added or renamed, deep nesting, context names changed), unsigned, re-signed, or as a version-1
  file without checksum: ``CheckpointError``, or a load of exactly the saved weights with the
  edited names and metadata.

Whenever loading raises, the model must be bit-for-bit what it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from routing_lottery.errors import CheckpointError
from routing_lottery.io import load_masks, load_tickets, save_tickets
from routing_lottery.masks import MaskSet, pack_bits, unpack_bits

pytestmark = pytest.mark.slow  # every property runs 1,000 generated cases

CASES = 1000
PROPERTY = settings(
    max_examples=CASES, derandomize=True, database=None, deadline=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)  # () and 0-size included


def _bits(shape, seed, density):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


# -- bit packing -------------------------------------------------------------------------------
def test_pack_bits_round_trip_any_shape():
    ran = []

    @PROPERTY
    @given(shape=shapes, seed=st.integers(0, 2**31), density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    def check(shape, seed, density):
        mask = _bits(shape, seed, density)
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.shape == ((math.prod(shape) + 7) // 8,)
        back = unpack_bits(packed, shape)
        assert back.dtype == torch.bool and back.shape == mask.shape and torch.equal(back, mask)
        ran.append(shape)  # counted once it passed

    check()
    assert len(ran) >= CASES and () in ran and any(0 in s for s in ran)


def test_maskset_packed_round_trip_any_shapes():
    ran = []

    @PROPERTY
    @given(layers=st.lists(shapes, min_size=1, max_size=3), k=st.integers(1, 4), seed=st.integers(0, 2**31),
           density=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    def check(layers, k, seed, density):
        stacked = {f"t{i}": _bits((k, *shape), seed + i, density) for i, shape in enumerate(layers)}
        names = [f"c{j}" for j in range(k)]
        masks = MaskSet(stacked, names)
        packed = masks.packed()
        for n, shape in masks.shapes.items():
            assert packed[n].dtype == torch.uint8 and packed[n].shape == (k, (math.prod(shape) + 7) // 8)
            for j in range(k):  # the set packs each context as pack_bits does
                assert torch.equal(packed[n][j], pack_bits(stacked[n][j]))
        back = MaskSet.from_packed(packed, masks.shapes, names)
        assert back.context_names == names and back.shapes == masks.shapes
        assert all(torch.equal(back.stacked[n], stacked[n]) for n in stacked)
        ran.append(layers)  # counted once it passed

    check()
    assert len(ran) >= CASES


# -- a small valid checkpoint ----------------------------------------------------------------
K = 3
MASKED = ("0.weight", "2.weight")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    model.train()
    model(torch.randn(6, 5))  # BN statistics and num_batches_tracked away from their defaults
    return model.eval()


def _raw(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


class Checkpoint:
    """One saved checkpoint, a scratch directory to write variants of it, and a model to load into."""

    def __init__(self, root: Path) -> None:
        model = _model(0)
        g = torch.Generator().manual_seed(1)
        params = dict(model.named_parameters())
        masks = MaskSet({n: torch.rand((K, *params[n].shape), generator=g) < 0.4 for n in MASKED}, ["a", "b", "c"])
        self.saved = save_tickets(root / "saved", model, masks, {"sparsity": 0.5, "note": "x", "levels": [1, 2]})
        self.weights = (self.saved / "tickets.safetensors").read_bytes()
        self.index_text = (self.saved / "tickets.json").read_text()
        self.index = json.loads(self.index_text)
        self.masks = masks
        # What a correct load of the saved checkpoint gives: the union of the masks, 0 elsewhere.
        expected = _model(7)
        load_tickets(self.saved, expected)
        self.expected = _raw(expected)
        self.work = root / "work"
        self.work.mkdir()
        self.target = _model(99)  # distinct values everywhere, so any overwrite shows
        self.before = _raw(self.target)
        self.pristine = copy.deepcopy(self.target.state_dict())

    def write(self, weights: bytes, index: bytes | str) -> None:
        (self.work / "tickets.safetensors").write_bytes(weights)
        (self.work / "tickets.json").write_bytes(index.encode("utf-8") if isinstance(index, str) else index)

    def load(self):
        """``load_tickets`` into the target: its result, or None when it raised CheckpointError
        (after checking the model is untouched). The target is reset after a successful load."""
        try:
            result = load_tickets(self.work, self.target)
        except CheckpointError as err:
            assert "tickets." in str(err)  # names the file
            assert _raw(self.target) == self.before, "a failed load changed the model"
            with pytest.raises(CheckpointError):
                load_masks(self.work)
            return None
        state = _raw(self.target)
        self.target.load_state_dict(self.pristine)
        return result, state


@pytest.fixture(scope="module")
def ckpt():
    # Thousands of small rewrites: on a RAM disk where there is one (a disk can take ms per open).
    shm = Path("/dev/shm")
    ram = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=ram, prefix="rtl-properties-") as root:
        yield Checkpoint(Path(root))


def _canonical(obj) -> str:
    body = {k: v for k, v in obj.items() if k != "index_sha256"} if isinstance(obj, dict) else obj
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _sign(index: dict) -> dict:
    return {**index, "index_sha256": hashlib.sha256(_canonical(index).encode("ascii")).hexdigest()}


def _assert_loads_saved(ckpt: Checkpoint, outcome, names=None, metadata=None) -> None:
    assert outcome is not None, "a harmless change was refused"
    (masks, got_metadata), state = outcome
    assert state == ckpt.expected
    assert all(torch.equal(masks.stacked[n], ckpt.masks.stacked[n]) for n in MASKED)
    assert masks.context_names == (names if names is not None else ckpt.index["context_names"])
    want = metadata if metadata is not None else ckpt.index["metadata"]
    assert json.dumps(got_metadata, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN != NaN


# -- byte mutations ----------------------------------------------------------------------------
@st.composite
def byte_mutations(draw, data: bytes, hot: int) -> bytes:
    """1-4 edits (flip, set, delete, insert, duplicate, truncate); positions favour the first ``hot`` bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            out += draw(st.binary(min_size=1, max_size=4))
            continue
        size = len(out)
        pos = draw(st.one_of(st.integers(0, min(hot, size) - 1), st.integers(0, size - 1)))
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "duplicate", "truncate"]))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = draw(st.sampled_from(b'0129"[]{},:-.eE \\\x00\xff') | st.integers(0, 255))
        elif op == "delete":
            del out[pos:pos + draw(st.integers(1, 16))]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b" ", b"\n", b"0", b"-", b"[", b"{"]))
        elif op == "duplicate":
            end = pos + draw(st.integers(1, 32))
            out[pos:pos] = out[pos:end]
        else:
            del out[pos:]
    return bytes(out)


def test_load_tickets_on_byte_mutations_of_either_file(ckpt):
    ran = []

    @PROPERTY
    @given(data=st.data(), target=st.sampled_from(["tickets.json", "tickets.safetensors"]))
    def check(data, target):
        if target == "tickets.json":
            mutated = data.draw(byte_mutations(ckpt.index_text.encode(), hot=len(ckpt.index_text)))
            ckpt.write(ckpt.weights, mutated)
            try:
                same = _canonical(json.loads(mutated.decode("utf-8"))) == _canonical(ckpt.index)
            except Exception:  # noqa: BLE001 -- not JSON at all: certainly not the same document
                same = False
        else:
            header = 8 + int.from_bytes(ckpt.weights[:8], "little")
            mutated = data.draw(byte_mutations(ckpt.weights, hot=header))
            ckpt.write(mutated, ckpt.index_text)
            same = mutated == ckpt.weights
        outcome = ckpt.load()
        if same:
            _assert_loads_saved(ckpt, outcome)
        else:
            assert outcome is None, "a changed checkpoint loaded"
        ran.append(target)  # counted once it passed

    check()
    assert len(ran) >= CASES and {"tickets.json", "tickets.safetensors"} <= set(ran)


# -- re-hashed mutations of the weights file ---------------------------------------------------
DTYPES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
          "U8": 1, "I8": 1, "BOOL": 1}


def _factorizations(n: int, dims: int):
    if dims == 0:
        return [()] if n == 1 else []
    if dims == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in _factorizations(n // d, dims - 1)]


@st.composite
def header_edits(draw, blob: bytes) -> bytes:
    """Edit the safetensors header as a careless writer could, mostly keeping it parsable:
    dtype swaps of the same width, reshapes with the same element count, two entries swapped,
    entries renamed or dropped, sizes and offsets that no longer fit."""
    n = int.from_bytes(blob[:8], "little")
    header, body = json.loads(blob[8:8 + n]), blob[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if entry is None:
            continue
        op = draw(st.sampled_from(["dtype", "dtype", "reshape", "reshape", "swap", "swap", "rename", "shape", "drop",
                                   "offsets"]))
        if op == "dtype":
            same = sorted(d for d, w in DTYPES.items() if w == DTYPES[entry["dtype"]])
            entry["dtype"] = draw(st.sampled_from(same if draw(st.integers(0, 3)) else sorted(DTYPES)))
        elif op == "reshape":
            numel = math.prod(entry["shape"])
            options = [list(f) for d in range(0, 4) for f in _factorizations(numel, d)] if numel else [[0], [0, 3]]
            entry["shape"] = draw(st.sampled_from(options))
        elif op == "swap":
            other = draw(st.sampled_from(names))
            if other in header:
                header[name], header[other] = header[other], entry
        elif op == "rename":
            new = draw(st.sampled_from(["masks/", "values/", "state/", ""])) + draw(st.sampled_from(
                ["0.weight", "2.weight", "0.bias", "1.running_mean", "1.num_batches_tracked", "x"]))
            header[new] = header.pop(name)
        elif op == "shape":
            entry["shape"] = draw(st.lists(st.integers(0, 12), max_size=3))
        elif op == "drop":
            del header[name]
        else:
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = [max(0, begin + draw(st.integers(-8, 8))), max(0, end + draw(st.integers(-8, 8)))]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


@st.composite
def data_edits(draw, blob: bytes) -> bytes:
    """Flip or set bytes of the tensor data only (the header stays valid): values, masks, BN counters."""
    start = 8 + int.from_bytes(blob[:8], "little")
    out = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(start, len(out) - 1))
        out[pos] = draw(st.integers(0, 255)) if draw(st.booleans()) else out[pos] ^ (1 << draw(st.integers(0, 7)))
    return bytes(out)


def _decode_independently(blob: bytes, index: dict):
    """What a correct load of ``blob`` must give: state bytes and masks, without the library's reader."""
    stored = safetensors.torch.load(blob)
    state, masks = {}, {}
    for name in MASKED:
        shape = index["tensors"][name]
        rows = np.unpackbits(stored[f"masks/{name}"].numpy(), axis=1, count=math.prod(shape))
        masks[name] = torch.from_numpy(rows.astype(bool)).reshape(K, *shape)
        weight = torch.zeros(shape, dtype=stored[f"values/{name}"].dtype)
        weight[masks[name].any(dim=0)] = stored[f"values/{name}"]
        state[name] = weight.numpy().tobytes()
    for key in index["state"]:
        if key not in MASKED:
            state[key] = stored[f"state/{key}"].numpy().tobytes()
    return state, masks


def test_load_tickets_on_rehashed_mutations_of_the_weights_file(ckpt):
    ran, loaded = [], []

    @PROPERTY
    @given(data=st.data(), how=st.sampled_from(["header", "data", "header+data", "bytes"]))
    def check(data, how):
        header = 8 + int.from_bytes(ckpt.weights[:8], "little")
        blob = ckpt.weights
        if how.startswith("header"):
            blob = data.draw(header_edits(blob))
        if how.endswith("data"):
            blob = data.draw(data_edits(blob))
        if how == "bytes":
            blob = data.draw(byte_mutations(blob, hot=header))
        index = _sign({**ckpt.index, "weights_sha256": hashlib.sha256(blob).hexdigest()})
        ckpt.write(blob, json.dumps(index, indent=2))
        outcome = ckpt.load()
        if outcome is not None:  # it passed every check: it must be exactly what the file holds
            loaded.append(how)
            (masks, _), state = outcome
            want_state, want_masks = _decode_independently(blob, ckpt.index)
            assert state == want_state
            assert all(torch.equal(masks.stacked[n], want_masks[n]) for n in MASKED)
            for name in MASKED:  # outside the union: exactly 0
                weight = np.frombuffer(state[name], dtype=np.float32).reshape(ckpt.index["tensors"][name])
                assert (weight[~masks.union()[name].numpy()] == 0).all()
        ran.append(how)  # counted once it passed

    check()
    assert len(ran) >= CASES
    assert loaded  # some value mutations are harmless to the format and load


# -- structured edits of the index -------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**32, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 2.0, 1e308, -0.0]),
    st.text(max_size=6), st.sampled_from(["a", "b", "c", "", "float32", "int64", "0.weight", "routing-lottery/tickets"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
keys = st.sampled_from(["format", "version", "context_names", "tensors", "state", "fingerprint", "weights_sha256",
                        "metadata", "index_sha256", "shape", "dtype", "0.weight", "x", ""]) | st.text(max_size=4)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def index_edits(draw, index: dict):
    """1-3 edits at random places of the JSON tree: replace, delete, add, rename, wrap, nest, bump."""
    doc = copy.deepcopy(index)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        op = draw(st.sampled_from(["replace", "delete", "add", "rename", "wrap", "nest", "bump", "names"]))
        if op == "names" and isinstance(doc, dict):  # the edit issue 12 found loading silently
            doc["context_names"] = draw(st.lists(st.sampled_from(["a", "b", "c", "x", ""]) | st.text(max_size=3),
                                                 min_size=0, max_size=4))
            continue
        if not path:
            doc = draw(json_values) if op == "replace" else ([doc] if op in ("wrap", "nest") else doc)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last, old = path[-1], parent[path[-1]]
        if op == "replace":
            parent[last] = draw(json_values)
        elif op == "delete":
            del parent[last]
        elif op == "add":
            if isinstance(old, dict):
                old[draw(keys)] = draw(json_values)
            elif isinstance(old, list):
                old.insert(draw(st.integers(0, len(old))), draw(json_values))
            elif isinstance(parent, dict):
                parent[draw(keys)] = draw(json_values)
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(keys)] = parent.pop(last)
        elif op == "wrap":
            parent[last] = [old] if draw(st.booleans()) else {draw(keys): old}
        elif op == "nest":
            depth = draw(st.sampled_from([1, 2, 10, 63, 64, 65, 200]))
            for _ in range(depth):
                old = [old]
            parent[last] = old
        elif op == "bump":
            if isinstance(old, bool):
                parent[last] = not old
            elif isinstance(old, int):
                parent[last] = draw(st.sampled_from([old + 1, old - 1, -old, old * 2**32, float(old), str(old)]))
            elif isinstance(old, float):
                parent[last] = draw(st.sampled_from([old * 2, -old, math.inf, math.nan, int(old) if math.isfinite(old) else 0]))
            elif isinstance(old, str):
                parent[last] = draw(st.sampled_from([old + "x", old.upper(), "", old[:-1], [old]]))
    return doc


def test_load_tickets_on_structured_index_edits(ckpt):
    ran, loaded = [], []
    v1 = {k: v for k, v in ckpt.index.items() if k != "index_sha256"} | {"version": 1}

    @PROPERTY
    @given(data=st.data(), signing=st.sampled_from(["unsigned", "re-signed", "version 1"]))
    def check(data, signing):
        edited = data.draw(index_edits(v1 if signing == "version 1" else ckpt.index))
        if signing == "re-signed" and isinstance(edited, dict):
            edited = _sign(edited)
        ckpt.write(ckpt.weights, json.dumps(edited, indent=2))
        outcome = ckpt.load()
        if signing == "unsigned" and _canonical(edited) != _canonical(ckpt.index):
            assert outcome is None, "an edited index loaded without its checksum matching"
        if outcome is not None:
            loaded.append(signing)
            # The weights file is untouched, so whatever loads is exactly the saved weights.
            _assert_loads_saved(ckpt, outcome, edited["context_names"], edited["metadata"])
        ran.append(signing)  # counted once it passed

    check()
    assert len(ran) >= CASES and {"unsigned", "re-signed", "version 1"} <= set(ran)
    assert {"re-signed", "version 1"} <= set(loaded)  # harmless edits (metadata, names) do load
