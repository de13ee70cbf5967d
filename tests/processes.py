"""What the deployment tests check after a script stopped what it started."""

from __future__ import annotations

from pathlib import Path


def alive_in_groups(groups: set[int]) -> list[str]:
    """Processes (not zombies) still in the given process groups."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            alive.append(stat.parent.name)
    return alive
