"""The project's one error type: every message names what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["FloraError", "need"]


class FloraError(ValueError):
    """Bad input or state, reported without a traceback by the CLI.

    Messages name the client, the module or field, and the fix.
    """


def need(ok: bool, key: str, value: object, expected: str) -> None:
    """Raise ``<key> must be <expected>, got <value>`` unless ``ok``: the configs' one check."""
    if not ok:
        raise FloraError(f"{key} must be {expected}, got {value!r}")
