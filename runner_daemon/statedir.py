"""The state directory's default location (a tiny module so settings can use it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def default_state_directory(environ: Mapping[str, str]) -> Path:
    """systemd's ``StateDirectory=`` first, then the XDG base directory convention."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "runner-daemon"
    return Path.home() / ".local" / "state" / "runner-daemon"
