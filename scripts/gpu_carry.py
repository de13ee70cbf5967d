"""The carry folder of the GPU check: what a GPU machine without a package index needs besides
the working tree (issue 25). Built here, git-ignored, at most 64 MiB with the tree.

    python scripts/gpu_carry.py build                  # .gpu-carry/: wheels for Python 3.12, data
    python scripts/gpu_carry.py install --target DIR   # on the GPU machine: each wheel on its own

The GPU machines this project borrows hold Python 3.12 with torch, transformers, peft, accelerate,
safetensors, numpy, pyarrow, pandas, scipy, matplotlib, seaborn, rich, aiohttp, xxhash and more
(/work/.library/device/KINDS.md lists them); of flora's dependencies they lack ``CARRIED``, which
travel as wheels at the versions installed here (flora's tested ones), each downloaded and
installed on its own (``--no-deps``, ``--no-index`` there), so one missing wheel never blocks the
rest. The data: Dolly's first ``DOLLY_ROWS`` rows and every MMLU subject's dev set and first
``MMLU_ROWS`` test questions, in the shared folder's layout (``FLORA_DATA_DIR`` points there).
Models travel not at all: the check builds random-weight ones from configs with flora's shipped
tokenizer. ``manifest.json`` lists what was carried, what could not be, and the bytes.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CARRIED = ("datasets", "dill", "multiprocess", "flwr-datasets", "opacus")
OPTIONAL = ("bitsandbytes",)  # the 4-bit part; carried only if it fits the budget
# the module each distribution provides (what the self-test makes the carry provide)
MODULES = {
    "datasets": "datasets",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "flwr-datasets": "flwr_datasets",
    "opacus": "opacus",
    "bitsandbytes": "bitsandbytes",
}
LIMIT = 64 * 2**20  # the working tree and the carry, all together
DOLLY_ROWS = 1000
MMLU_ROWS = 4
PLATFORMS = (  # pip matches a manylinux tag exactly: every one a wheel may name
    *(f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _download(spec: str, wheels: Path, python_version: str, find_links: Path | None) -> bool:
    """One wheel, alone (a failure names it and costs the others nothing)."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    done = subprocess.run([*command, "-d", str(wheels), spec], capture_output=True, text=True)
    return done.returncode == 0


def tree_bytes() -> int:
    """The bytes of the files git tracks or would add (the working tree that travels)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(
        (ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file()
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _data(out: Path) -> list[str]:
    """Dolly's first rows and MMLU's dev sets and first test questions, as the shared layout."""
    from flora.data.sources import DOLLY_FILE, find_shared_data
    from flora.evaluation.mmlu_data import MMLU_DIR

    written = []
    dolly = find_shared_data(DOLLY_FILE)
    if dolly is not None:
        target = out / DOLLY_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        with dolly.open(encoding="utf-8") as source, target.open("w", encoding="utf-8") as sink:
            for number, line in enumerate(source):
                if number >= DOLLY_ROWS:
                    break
                sink.write(line)
        written.append(DOLLY_FILE)
    marker = find_shared_data(f"{MMLU_DIR}/dev/abstract_algebra_dev.csv")
    mmlu = marker.parents[1] if marker is not None else None
    if mmlu is not None:
        for path in sorted(mmlu.rglob("*.csv")):
            relative = path.relative_to(mmlu)
            target = out / MMLU_DIR / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with path.open(newline="", encoding="utf-8") as source:
                rows = list(csv.reader(source))
            keep = rows if relative.parts[0] == "dev" else rows[: MMLU_ROWS + 1]  # + header
            with target.open("w", newline="", encoding="utf-8") as sink:
                csv.writer(sink).writerows(keep)
            written.append(f"{MMLU_DIR}/{relative}")
    return written


def build(
    out: Path, python_version: str, find_links: Path | None = None, optional: bool = True
) -> dict[str, object]:
    """Fill ``out`` (wheels/, data/, manifest.json); returns the manifest. ``optional``: also
    carry ``OPTIONAL`` where it fits."""
    wheels, data = out / "wheels", out / "data"
    wheels.mkdir(parents=True, exist_ok=True)
    carried, missing = [], []
    for distribution in CARRIED:
        version = _version(distribution)
        spec = f"{distribution}=={version}" if version else distribution
        (carried if _download(spec, wheels, python_version, find_links) else missing).append(spec)
    files = _data(data)
    budget = LIMIT - tree_bytes() - folder_bytes(out)
    skipped = {}
    for distribution in OPTIONAL if optional else ():  # only into what is left of the budget
        version = _version(distribution)
        if version is None:
            skipped[distribution] = "not installed here (no version to carry)"
            continue
        trial = out / "optional"
        trial.mkdir(exist_ok=True)
        spec = f"{distribution}=={version}"
        if not _download(spec, trial, python_version, find_links):
            skipped[distribution] = "no wheel for the machine's platform"
        elif folder_bytes(trial) > budget:
            skipped[distribution] = (
                f"its wheel ({folder_bytes(trial) / 2**20:.0f} MiB) does not fit the "
                f"{budget / 2**20:.0f} MiB left of the 64 MiB"
            )
        else:
            for wheel in trial.glob("*.whl"):
                wheel.rename(wheels / wheel.name)
            carried.append(spec)
        for leftover in trial.glob("*"):
            leftover.unlink()
        trial.rmdir()
    manifest = {
        "python_version": python_version,
        "carried": carried,
        "missing": missing,
        "skipped": skipped,
        "data": files,
        "carry_bytes": folder_bytes(out),
        "tree_bytes": tree_bytes(),
        "limit_bytes": LIMIT,
    }
    manifest["fits"] = manifest["carry_bytes"] + manifest["tree_bytes"] <= LIMIT
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def install(carry: Path, target: Path) -> dict[str, str]:
    """Install every carried wheel into ``target`` on its own, from no index; returns each
    wheel's outcome ("ok" or pip's last line)."""
    target.mkdir(parents=True, exist_ok=True)
    outcome = {}
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        command += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
        done = subprocess.run([*command, str(wheel)], capture_output=True, text=True)
        lines = (done.stderr or done.stdout).strip().splitlines() or ["failed"]
        outcome[wheel.name] = "ok" if done.returncode == 0 else lines[-1]
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("build", help="download the wheels and copy the data")
    make.add_argument("--out", type=Path, default=ROOT / ".gpu-carry")
    make.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    make.add_argument("--find-links", type=Path, help="take the wheels from here, no index")
    make.add_argument("--no-optional", action="store_true", help=f"leave out {', '.join(OPTIONAL)}")
    put = verbs.add_parser("install", help="install each carried wheel on its own, no index")
    put.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    put.add_argument("--target", type=Path, required=True)
    args = parser.parse_args()
    if args.verb == "build":
        manifest = build(args.out, args.python_version, args.find_links, not args.no_optional)
        print(json.dumps(manifest, indent=2))
        return 0 if manifest["fits"] and not manifest["missing"] else 1
    outcome = install(args.carry, args.target)
    for wheel, result in outcome.items():
        print(f"gpu-carry: {wheel}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
