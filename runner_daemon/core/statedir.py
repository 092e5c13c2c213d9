"""The state directory: its default location, and atomic writes of the private files in it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path


def default_state_directory(environ: Mapping[str, str]) -> Path:
    """systemd's ``StateDirectory=`` first, then the XDG base directory convention."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "runner-daemon"
    return Path.home() / ".local" / "state" / "runner-daemon"


def write_private_file(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data``, mode 0600: after a crash, the old file or the new one.

    A temporary file in the same folder is written, fsynced and renamed over the target, then
    the folder is fsynced so the rename itself survives a power loss.
    """
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
