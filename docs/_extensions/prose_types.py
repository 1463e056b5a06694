"""A griffe extension for the API reference: this project's docstrings write ``name : what it is``.

The numpydoc layout is ``name : type`` with the description indented below; the project's docstrings
put the description in the type's place (the signature carries the type annotations). Read as
numpydoc, every description would be rendered as a type. Before the docstrings are parsed, this
rewrites such a line ``name : some prose`` as ``name`` with ``some prose`` indented below it, the
numpydoc form of a parameter without a type; a real type (``int``, ``dict[str, torch.Tensor]``,
``int, optional``) is left where it is. Only the Parameters, Other Parameters and Attributes
sections are touched. mkdocs.yml loads it (mkdocstrings' ``extensions`` option).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SECTIONS = {"parameters", "other parameters", "attributes"}
ITEM = re.compile(r"^(\*{0,2}[A-Za-z_][\w, *]*?) : (.+)$")
TYPE_CHARACTERS = re.compile(r"[\w.\[\]|,()'\"]+")


def looks_like_a_type(text: str) -> bool:
    """``int``, ``dict[str, Tensor]``, ``str | None``, ``int, optional``: no prose between the words."""
    text = re.sub(r",\s*optional$", "", text.strip())
    text = re.sub(r",\s+", ",", re.sub(r"\s*\|\s*", "|", text))
    return bool(TYPE_CHARACTERS.fullmatch(text))


def rewrite(docstring: str) -> str:
    """The docstring with every prose-typed item of a parameter-like section in numpydoc's untyped form."""
    lines, out, section = docstring.splitlines(), [], None
    for i, line in enumerate(lines):
        underline = lines[i + 1] if i + 1 < len(lines) else ""
        if underline.strip() and set(underline.strip()) == {"-"} and line.strip():
            section = line.strip().lower()
        item = ITEM.match(line) if section in SECTIONS else None
        if item and not looks_like_a_type(item.group(2)):
            out += [item.group(1), "    " + item.group(2)]
        else:
            out.append(line)
    return "\n".join(out)


class ProseTypes(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
