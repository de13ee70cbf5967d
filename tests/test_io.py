"""Atomic writes honour the umask, as a plain open() would (mkstemp alone gives 0o600)."""

from __future__ import annotations

import os
import stat

import pytest

from flora.io import atomic_write_json, atomic_write_text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_an_atomic_write_gets_the_umasks_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        with open(tmp_path / "c.txt", "w") as handle:  # what a plain open gives, for reference
            handle.write("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.txt": mode, "b.json": mode, "c.txt": mode}


def test_answer_change_is_zero_for_equal_answers_and_grows_with_the_edit():
    from flora.outputs import answer_change

    assert answer_change("Paris.", "Paris.") == 0.0
    small = answer_change("The capital is Paris.", "The capital is Paris!")
    large = answer_change("The capital is Paris.", "Bananas are yellow fruit.")
    assert 0 < small < large <= 1
