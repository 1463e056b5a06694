"""A saved LearnedRouter under byte mutations: it loads as the router it was, or ``CheckpointError``.

One tiny router is fitted and saved once; every case rewrites its two files (``router.json``,
``router.safetensors``) with bits flipped, bytes set, tails cut or added, or a file deleted, and
loads them. Nothing else may happen: no other exception, no router that routes differently, no
case that takes long. ``router_problem`` (what a resuming run checks before refitting) must agree
with ``load`` on every case.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_lottery.errors import CheckpointError
from routing_lottery.router import REFIT_ROUTER, ROUTER_INDEX, ROUTER_WEIGHTS, LearnedRouter, router_problem

pytestmark = pytest.mark.slow  # the property runs 1,000 generated cases

FILES = (ROUTER_INDEX, ROUTER_WEIGHTS)


@pytest.fixture(scope="module")
def saved():
    """(directory, {name: original bytes}, probe inputs, the original router's logits on them)."""
    g = torch.Generator().manual_seed(0)
    contexts = torch.arange(24) % 3
    x = torch.randn(24, 4, generator=g) + 3 * torch.nn.functional.one_hot(contexts, 4).float()
    router = LearnedRouter.fit(x, contexts, 3, max_components=3, seed=0)
    directory = Path(tempfile.mkdtemp(prefix="router-props-"))
    router.save(directory)
    originals = {name: (directory / name).read_bytes() for name in FILES}
    yield directory, originals, x, router.logits(x)
    shutil.rmtree(directory, ignore_errors=True)


# Positions are drawn below 2**16 and taken modulo the file's length, so strategies need no sizes.
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**16), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**16)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.binary(max_size=64)),
    st.tuples(st.just("delete")),
)
EDITS = st.lists(st.tuples(st.sampled_from(FILES), MUTATION), min_size=1, max_size=3)


def apply(data: bytes | None, edit: tuple) -> bytes | None:
    """The file's new bytes after ``edit`` (None: deleted)."""
    kind = edit[0]
    if data is None or kind == "delete":
        return None
    if kind in ("flip", "set"):
        if not data:
            return data
        out = bytearray(data)
        at = edit[1] % len(out)
        out[at] = out[at] ^ (1 << edit[2]) if kind == "flip" else edit[2]
        return bytes(out)
    if kind == "cut":
        return data[:edit[1] % max(len(data), 1)]
    return data + edit[1] if kind == "append" else edit[1]


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(changes=EDITS)
def test_a_mutated_router_loads_as_itself_or_raises_checkpoint_error(saved, changes):
    directory, originals, x, expected = saved
    contents = dict(originals)
    for name, edit in changes:
        contents[name] = apply(contents[name], edit)
    for name, data in contents.items():
        path = directory / name
        path.unlink(missing_ok=True)
        if data is not None:
            path.write_bytes(data)
    start = time.perf_counter()
    problem = router_problem(directory)
    try:
        loaded = LearnedRouter.load(directory)
    except CheckpointError as err:
        message = str(err)
        assert any(name in message for name in FILES), message  # names the file
        assert message.endswith(REFIT_ROUTER)  # and the remedy
        assert problem is not None and message.startswith(problem)
    else:
        assert problem is None
        assert torch.equal(loaded.logits(x), expected)  # an accepted file routes exactly as the original
    assert time.perf_counter() - start < 5.0  # generous for a loaded CI machine; a case takes about 1 ms


def test_an_edit_that_changes_nothing_of_substance_loads_the_same_router(saved):
    """The property's second branch is reachable: JSON whitespace is not corruption."""
    directory, originals, x, expected = saved
    (directory / ROUTER_WEIGHTS).write_bytes(originals[ROUTER_WEIGHTS])
    (directory / ROUTER_INDEX).write_bytes(originals[ROUTER_INDEX] + b"\n \n")
    assert router_problem(directory) is None
    assert torch.equal(LearnedRouter.load(directory).logits(x), expected)
