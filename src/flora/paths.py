"""Where flora keeps what it caches (converted models, Flower node state); imports no torch."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "FLORA_CACHE"


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$FLORA_CACHE``, else ``~/.cache/flora``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flora"
