"""The project's one error type: every message names what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["FloraError"]


class FloraError(ValueError):
    """Bad input or state, reported without a traceback by the CLI.

    Messages name the client, the module or field, and the fix.
    """
