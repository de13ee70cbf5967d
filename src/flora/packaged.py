"""What the package ships besides code: the ready configs and the Flower app; imports no torch.

In a checkout, ``configs/`` and ``flower-app/`` at the repository root are the canonical files,
and ``src/flora/configs`` and ``src/flora/flower_app`` are symlinks to them, so the wheel (package
data) and ``flora run configs/tiny.toml`` read the same bytes. Installed from a wheel, they live
inside the package. A config is named by a path, or by the bare name of a shipped one
(``flora run tiny``).
"""

from __future__ import annotations

from pathlib import Path

from flora.errors import FloraError

__all__ = [
    "CONFIG_DIR",
    "FLOWER_APP_DIR",
    "config_path",
    "describe_config",
    "shipped_configs",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FLOWER_APP_DIR = Path(__file__).resolve().parent / "flower_app"


def shipped_configs() -> dict[str, Path]:
    """name (the file's stem) -> path, for every shipped config, sorted by name."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.toml"))}


def describe_config(path: Path) -> str:
    """A config's one-line description: the first line of its header comment."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def config_path(spec: str | Path) -> Path:
    """The TOML file ``spec`` names: an existing file, else the shipped config of that bare name
    (``tiny`` or ``tiny.toml``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".toml")
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    hint = f"; the shipped one is `{name}`" if name in shipped else ""
    raise FloraError(
        f"config {str(spec)!r}: no such file, and no shipped config of that name{hint} "
        f"(shipped: {', '.join(shipped)}; `flora configs list` describes them)"
    )
