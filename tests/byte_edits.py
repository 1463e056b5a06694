"""Byte-level damage for the Hypothesis properties over files: a flipped bit, an overwritten or
inserted byte, a cut or a torn end, at a position the file's format cares about or anywhere."""

from collections.abc import Sequence

from hypothesis import strategies as st


def edit_lists(byte: st.SearchStrategy[int] = st.integers(0, 255), positions: int = 1 << 16) -> st.SearchStrategy:
    """One to three edits; positions are taken modulo what they index, so strategies need no sizes."""
    where = st.tuples(st.booleans(), st.integers(0, positions))  # (among the hot positions?, position)
    edit = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), where, byte),
        st.tuples(st.just("insert"), where, st.lists(byte, min_size=1, max_size=8).map(bytes)),
        st.tuples(st.just("delete"), where, st.integers(1, 8)),
        st.tuples(st.just("truncate"), where, st.none()),
    )
    return st.lists(edit, min_size=1, max_size=3)


def apply_edits(original: bytes, edits: Sequence[tuple], hot: Sequence[int]) -> bytes:
    """``original`` after ``edits``; a position drawn "hot" is one of ``hot`` (headers, opcodes, ...)."""
    data = bytearray(original)
    for kind, (in_hot, where), value in edits:
        at = min(hot[where % len(hot)], len(data)) if in_hot else where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << value
        elif kind == "overwrite":
            data[at:at + 1] = bytes([value])
        elif kind == "insert":
            data[at:at] = value
        elif kind == "delete":
            del data[at:at + value]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)
