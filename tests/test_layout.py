"""The architecture's rules (docs/architecture.md), checked on the source: what may import what,
and a CLI that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flora"
HEAVY = ("torch", "transformers", "peft", "safetensors", "flwr", "datasets")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports and those under
    ``if TYPE_CHECKING:`` included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _module_name(path: Path) -> str:
    parts = ("flora", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _flora_imports(module: str) -> set[str]:
    """The flora modules ``module`` imports, lazily or not (as :func:`_imports` reads them):
    each imported name taken to the deepest module it names (``from flora.aggregation.lowrank
    import stack`` -> flora.aggregation.lowrank). Importing a submodule also runs its package's
    ``__init__``, which is not counted: Python starts a package before its children, so that
    edge closes no circle."""
    found: set[str] = set()
    for name in _imports(MODULES[module]):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


GRAPH = {module: _flora_imports(module) for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle in ``graph`` (module -> the modules it imports), as the path that
    closes it (``[a, b, a]``), or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if circle := visit(imported):
                return circle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if circle := visit(module):
            return circle
    return []


@pytest.mark.parametrize("package", ["flower", "evaluation", "commands"])
def test_no_module_imports_the_embedded_runtime(package):
    for path in sorted((SRC / package).glob("*.py")):
        offending = {n for n in _imports(path) if n.startswith("flora.simulation")}
        if package == "commands" and path.name == "run.py":
            offending -= {"flora.simulation", "flora.simulation.run"}  # `flora run` starts it
        assert not offending, f"{path.name} imports {sorted(offending)}"


def test_only_the_flower_package_imports_flwr():
    for path in sorted(SRC.rglob("*.py")):
        if "flower" in path.relative_to(SRC).parts:
            continue
        assert not {n for n in _imports(path) if n.split(".")[0] == "flwr"}, path


def test_no_import_cycles_among_flora_modules():
    # every import counts: one inside a function only hides a circle until the function runs,
    # and one under `if TYPE_CHECKING:` still ties the two modules' designs together (a module
    # that needs only some attributes of a class above it types them with a Protocol of its own,
    # as flora.optim and flora.privacy.config do for the config's TrainConfig). None is exempt.
    circle = _cycle(GRAPH)
    assert not circle, (
        f"import circle: {' -> '.join(circle)}; move what both sides need into a module below "
        "them (docs/architecture.md's layers)"
    )


@pytest.mark.parametrize(
    ("graph", "circle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_the_cycle_finder_finds_circles(graph, circle):
    assert _cycle(graph) == circle


def _chains(module: str) -> dict[str, list[str]]:
    """Every flora module ``module`` reaches through flora imports (itself included), with the
    chain of modules that leads there."""
    chains = {module: [module]}
    todo = [module]
    while todo:
        here = todo.pop()
        for imported in sorted(GRAPH[here]):
            if imported not in chains:
                chains[imported] = [*chains[here], imported]
                todo.append(imported)
    return chains


MATHS = ["flora.protocol", *(m for m in MODULES if m.split(".")[:2] == ["flora", "aggregation"])]


@pytest.mark.parametrize("module", MATHS)
def test_the_maths_imports_torch_only(module):
    """The maths and the round protocol import no transformers or peft (nor any other library
    but torch and numpy), directly or through the flora modules they import."""
    allowed = {"torch", "numpy", "flora", *sys.stdlib_module_names}
    for reached, chain in sorted(_chains(module).items()):
        libraries = {n.split(".")[0] for n in _imports(MODULES[reached])} - allowed
        assert not libraries, f"{' -> '.join(chain)} imports {sorted(libraries)}"


def test_the_core_imports_no_runtime():
    for name in ("client", "server", "engine", "outputs", "weights", "protocol", "training"):
        runtime = {
            n
            for n in _imports(SRC / f"{name}.py")
            if n.startswith(("flora.simulation", "flora.flower"))
        }
        assert not runtime, f"{name}.py imports {sorted(runtime)}"


def test_no_private_name_crosses_modules():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flora"):
                private = [
                    a.name for a in node.names if a.name.startswith("_") and a.name[1] != "_"
                ]
                assert not private, f"{path.relative_to(SRC)} imports {private}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["aggregate", "--help"],
        ["eval", "--help"],
        ["compare", "--help"],
        ["flower-worker", "--help"],
        ["configs", "--help"],
    ],
)
def test_cli_help_imports_no_torch(argv):
    probe = (
        "import sys\nfrom flora.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]
