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
    """Every module a file imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


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


def test_the_core_imports_no_runtime():
    for name in ("client", "server", "engine", "outputs", "weights", "protocol", "training"):
        runtime = {n for n in _imports(SRC / f"{name}.py")
                   if n.startswith(("flora.simulation", "flora.flower"))}  # fmt: skip
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
    "argv", [["--help"], ["run", "--help"], ["aggregate", "--help"], ["eval", "--help"],
             ["compare", "--help"], ["flower-worker", "--help"], ["configs", "--help"]],
)  # fmt: skip
def test_cli_help_imports_no_torch(argv):
    probe = (
        "import sys\nfrom flora.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]
