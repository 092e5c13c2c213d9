"""Race-safe file mutation inside the workspace: locks, anchored folders, atomic replace.

A path is confined once when the command starts (``Workspace.resolve``), but a symlink can be
swapped in before the write. So mutations walk from the root to the file's folder one
component at a time with ``O_NOFOLLOW``, holding each folder open, and do every read, write
and rename relative to that folder's descriptor: once the walk succeeded, nothing done
through it can leave the root. The file itself is replaced atomically: a temporary file in
the same folder, fsync, rename over the target, fsync of the folder; a crash leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio

from runner_daemon.errors import CommandFailed
from runner_daemon.workspace import Workspace

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SWAPPED = "Path changed to point outside the workspace while the command ran"


class FileLocks:
    """One lock per real file path, shared by every command of one daemon.

    Entries live only while someone holds or waits for them, so the table stays as small as
    the number of files being mutated at once.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, real_path: Path) -> AsyncIterator[None]:
        key = str(real_path)
        lock, users = self._locks.get(key) or (anyio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class AnchoredDir:
    """An open folder inside the workspace; names are resolved relative to it, never followed."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open_parent(cls, workspace: Workspace, real_path: Path, *, create: bool = False) -> AnchoredDir:
        """Walk from the root to ``real_path``'s folder without following any symlink.

        With ``create``, missing folders are made on the way (``permission_denied`` if that
        fails). A component that is now a symlink or not a folder is ``path_traversal``.
        """
        parts = Path(workspace.relative(real_path)).parts[:-1]
        fd = os.open(workspace.root, _DIR_FLAGS)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except PermissionError:
                        raise CommandFailed(
                            "permission_denied", f"Cannot create parent directory for: {real_path.name}"
                        ) from None
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise CommandFailed("file_not_found", f"Directory not found: {part}") from None
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise CommandFailed("path_traversal", _SWAPPED) from None
                    raise
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, real_path.parent)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self.fd)

    def stat(self, name: str) -> os.stat_result | None:
        """The entry itself (a symlink is not followed), or None when missing."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes | None:
        """The regular file's bytes; None when it does not exist or is not a regular file."""
        info = self.stat(name)
        if info is None or not stat.S_ISREG(info.st_mode):
            if info is not None and stat.S_ISLNK(info.st_mode):
                raise CommandFailed("path_traversal", _SWAPPED)
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CommandFailed("path_traversal", _SWAPPED) from None
            raise
        with os.fdopen(fd, "rb") as stream:
            return stream.read()

    def replace(self, name: str, data: bytes) -> None:
        """Atomically put ``data`` at ``name``, keeping an existing file's permission bits."""
        existing = self.stat(name)
        if existing is not None and not stat.S_ISREG(existing.st_mode) and not stat.S_ISLNK(existing.st_mode):
            raise CommandFailed("permission_denied", f"Not a regular file: {name}")
        temp = f".{secrets.token_hex(6)}.rd-tmp"
        # 0o666 lets the process umask decide a new file's mode, as a plain open() would.
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=self.fd
        )
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                if existing is not None and stat.S_ISREG(existing.st_mode):
                    os.fchmod(stream.fileno(), stat.S_IMODE(existing.st_mode))
                os.fsync(stream.fileno())
            # rename() replaces a symlink swapped in at ``name``; it never follows it.
            os.replace(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=self.fd)
            raise
        os.fsync(self.fd)
