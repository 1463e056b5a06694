"""The import structure of the package (issue 24; DESIGN.md section 3): a core that stands alone, an
experiment framework on top of it, imports that only run downward, and no cycle -- at module
level or hidden inside functions.

The graph is read from the source with ``ast``: every ``import`` statement of the package's own
modules, wherever it sits -- inside functions, and under ``if TYPE_CHECKING:`` too (a type named
from a layer above is a dependency on it all the same) -- so a cycle dodged by moving an import
into a function is still a cycle here. Optional third-party dependencies imported inside
functions are not the package's modules and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "routing_lottery"

# Bottom to top. A module may import modules of its own layer or below, never above; the core
# (layers "core0".."core4") imports nothing of the framework.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core0", ("errors", "timing", "registry", "settings", "fingerprint", "masks", "metrics")),
    ("core1", ("io", "plotting", "pruning", "threads")),
    ("core2", ("training", "recipe", "routed", "kernels", "channels", "calibration", "scores")),
    ("core3", ("router", "export", "store")),
    ("core4", ("tickets", "__init__")),
    ("parts", ("registries", "contract", "statistics", "audio", "data", "models", "contexts", "diagnostics",
               "lm")),  # pretrained language models: text domains, loading, serving (transformers where used)
    ("config", ("config",)),
    ("methods", ("methods",)),
    ("report", ("report",)),
    ("tasks", ("tasks",)),
    ("run", ("run", "diagnose", "pareto", "seeds", "sweep", "budget", "experiments")),
    ("cli", ("cli",)),
]
CORE = {name for layer, names in LAYERS if layer.startswith("core") for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: the entry naming it, or the longest package above it that has one."""
    parts = module.removesuffix(".__init__").split(".")
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        for index, (_, names) in enumerate(LAYERS):
            if prefix in names:
                return index
    raise AssertionError(f"module {module!r} has no layer in LAYERS: add it where it belongs")


def internal_imports(path: Path) -> list[tuple[str, int]]:
    """(imported module of this package, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")[:-1]  # a package's __init__ is named "<package>.__init__"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                if node.module is None:  # from . import x: x may be a module
                    found.extend((".".join([*target, a.name]), node.lineno) for a in node.names)
                else:
                    found.append((".".join(target), node.lineno))
            elif node.module and node.module.split(".")[0] == "routing_lottery":
                found.append((node.module.removeprefix("routing_lottery").lstrip("."), node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "routing_lottery":
                    found.append((alias.name.removeprefix("routing_lottery").lstrip("."), node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(target or "__init__", line) for target, line in found]


def resolve(target: str, modules: set[str]) -> str | None:
    """The package module ``target`` names (a name imported from a package resolves to the package)."""
    while target:
        if target in modules:
            return target
        if f"{target}.__init__" in modules:
            return f"{target}.__init__"
        target = target.rpartition(".")[0]
    return None


def import_graph() -> dict[str, list[tuple[str, int]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {}
    for f in files:
        edges = []
        for target, line in internal_imports(f):
            resolved = resolve(target, modules)
            if resolved is not None and resolved != module_name(f):
                edges.append((resolved, line))
        graph[module_name(f)] = edges
    return graph


def test_every_module_has_a_layer_and_no_import_runs_upward():
    upward = []
    for module, edges in import_graph().items():
        for target, line in edges:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target} ({LAYERS[layer_of(target)][0]} above "
                              f"{LAYERS[layer_of(module)][0]})")
    assert not upward, "imports running upward:\n" + "\n".join(upward)


def test_the_core_imports_nothing_of_the_framework():
    leaks = [f"{module}:{line} imports {target}" for module, edges in import_graph().items()
             if module.split(".")[0] in CORE for target, line in edges if target.split(".")[0] not in CORE]
    assert not leaks, "\n".join(leaks)


def test_there_is_no_import_cycle():
    graph = {m: [t for t, _ in edges] for m, edges in import_graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


HEAVY = ("sklearn", "scipy", "matplotlib", "yaml", "typer", "rich", "umap", "soundfile", "espeakng_loader",
         "skimage", "nltk", "torch_pruning", "routing_lottery.config", "routing_lottery.run",
         "routing_lottery.data", "routing_lottery.tasks", "routing_lottery.methods", "routing_lottery.cli")


@pytest.mark.slow
@pytest.mark.parametrize("statement", [
    "import routing_lottery",
    "from routing_lottery import AdaptiveTickets, MaskSet, RoutedModel, RTLConfig, tensor_stream",
    "import routing_lottery.tickets, routing_lottery.export, routing_lottery.kernels, routing_lottery.router",
])
def test_importing_the_core_loads_no_framework_and_no_heavy_dependency(statement):
    code = (f"import sys; {statement}; "
            f"print('\\n'.join(m for m in sys.modules if m.startswith({HEAVY!r})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout.split()
    assert not loaded, f"{statement!r} loaded {sorted(loaded)[:12]}"


def test_the_package_imports_its_own_modules_at_module_level_only():
    """Function-level imports are for optional third-party dependencies (matplotlib, scikit-learn, ...),
    never a way to dodge a cycle between the package's own modules."""
    inside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                own = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "routing_lottery"))) or (isinstance(node, ast.Import) and any(
                        a.name.startswith("routing_lottery") for a in node.names))
                if own:
                    inside.append(f"{module_name(path)}:{node.lineno}")
    assert not inside, "imports of the package's own modules inside functions: " + ", ".join(sorted(set(inside)))
