"""The shipped configs and Flower app: one copy (package data), `flora configs list | copy`, and
configs named by their bare name."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from flora.cli import main
from flora.errors import FloraError
from flora.packaged import CONFIG_DIR, FLOWER_APP_DIR, config_path, shipped_configs
from flora.tiny_tokenizer import TOKENIZER_FILE

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_data_is_the_checkout_s_one_copy():
    """src/flora/configs and src/flora/flower_app are the root's configs/ and flower-app/ (links):
    no second copy to drift."""
    assert CONFIG_DIR.resolve() == (ROOT / "configs").resolve()
    assert FLOWER_APP_DIR.resolve() == (ROOT / "flower-app").resolve()
    assert set(shipped_configs()) == {p.stem for p in (ROOT / "configs").glob("*.toml")}


def test_the_wheel_s_package_data_globs_cover_every_shipped_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["flora"]
    package = ROOT / "src" / "flora"
    covered = {p.resolve() for pattern in globs for p in package.glob(pattern)}
    shipped = [*CONFIG_DIR.glob("*.toml"), *FLOWER_APP_DIR.iterdir(), TOKENIZER_FILE]
    assert shipped and {p.resolve() for p in shipped} <= covered


def test_configs_list_names_and_describes_each(capsys):
    assert main(["configs", "list"]) == 0
    out = capsys.readouterr().out
    for name, path in shipped_configs().items():
        line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert path.read_text().splitlines()[0].lstrip("# ") in line
    assert "A tiny random Llama" in out and str(FLOWER_APP_DIR) in out


def test_configs_copy_copies_and_never_overwrites(tmp_path, capsys):
    # Execute: copy into a new directory, then again over the copy
    assert main(["configs", "copy", "tiny", str(tmp_path / "mine")]) == 0
    copied = tmp_path / "mine" / "tiny.toml"
    copied.write_text(copied.read_text() + "# my edit\n")
    assert main(["configs", "copy", "tiny", str(tmp_path / "mine")]) == 2
    # Assert: the copy is the shipped file, the second copy left the edit alone, one-line error
    assert copied.read_text() == shipped_configs()["tiny"].read_text() + "# my edit\n"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["configs", "copy", "default", str(tmp_path / "demo.toml")]) == 0
    assert (tmp_path / "demo.toml").read_bytes() == shipped_configs()["default"].read_bytes()


@pytest.mark.parametrize("argv", [["copy", "nope", "x"], ["copy", "tiny", "FILE"]])
def test_configs_copy_refuses_bad_input_in_one_line(tmp_path, capsys, argv):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a in ("x", "FILE") else a for a in argv]
    assert main(["configs", *argv]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_bare_name_names_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: as from an installed wheel
    assert config_path("tiny") == config_path("tiny.toml") == shipped_configs()["tiny"]
    (tmp_path / "tiny").write_text("seed = 1\n")  # a file of that name wins
    assert config_path("tiny") == Path("tiny")
    with pytest.raises(FloraError, match="the shipped one is `tiny`"):
        config_path("configs/tiny.toml")
    with pytest.raises(FloraError, match="shipped: default, "):
        config_path("nope")


@pytest.mark.slow
def test_an_unpacked_wheel_finds_its_configs_without_the_checkout(tmp_path):
    """Build the wheel from a copy of the tree (tracked and new files), unpack it, and list the
    configs from a directory far from the checkout, with only the unpacked wheel on the path."""
    # Prepare: the tree as git sees it (links kept)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tree = tmp_path / "tree"
    for name in files:
        source, target = ROOT / name, tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.write_bytes(source.read_bytes())
    # Execute: build, unpack, run from elsewhere
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(tree),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("flora_lora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    listed = subprocess.run(
        [sys.executable, "-m", "flora.cli", "configs", "list"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    probe = "from flora.tiny_tokenizer import tiny_tokenizer as t; print(len(t()))"
    tokenizer = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # Assert
    assert {f"flora/configs/{n}.toml" for n in shipped_configs()} <= set(names)
    assert {"flora/flower_app/pyproject.toml", "flora/tiny_tokenizer.json"} <= set(names)
    assert "tiny " in listed.stdout and str(tmp_path / "site" / "flora") in listed.stdout
    assert tokenizer.stdout.split() == ["4096"]


def test_the_flower_app_s_default_config_is_a_shipped_one(tmp_path, monkeypatch):
    """The packaged Flower app names its default config by bare name, so `flwr run` of the app
    inside an installed wheel finds it whatever the SuperLink's working directory."""
    app = tomllib.loads((FLOWER_APP_DIR / "pyproject.toml").read_text())
    monkeypatch.chdir(tmp_path)
    default = app["tool"]["flwr"]["app"]["config"]["config"]
    assert config_path(default) == shipped_configs()["tiny"]
