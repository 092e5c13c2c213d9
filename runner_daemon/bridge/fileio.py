"""Race-safe file access inside the workspace: locks, anchored folders, atomic replace.

A path is confined once when the command starts (``Workspace.resolve``), but a co-tenant
can swap a folder for a symlink before it is used. So every handler walks from the root to
the folder one component at a time with ``O_NOFOLLOW``, holding each folder open, and does
every open, listing, read, write and rename relative to that folder's descriptor: once the
walk succeeded, nothing done through it can leave the root. Only regular files are read,
and never with a blocking open (see :func:`open_regular`). A mutated file is replaced
atomically: a temporary file in the same folder, fsync, rename over the target, fsync of
the folder; a crash leaves the old file or the new one, never half of one.
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
from typing import BinaryIO, Self

import anyio

from runner_daemon.core.errors import CommandFailed
from runner_daemon.system.workspace import Workspace

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
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


class NotRegularFile(Exception):
    """The entry is a folder, FIFO, socket or device: never opened for reading or editing."""


def open_regular(dir_fd: int, name: str) -> BinaryIO:
    """Open ``name`` in the folder ``dir_fd`` for reading, if it is a regular file.

    ``FileNotFoundError`` when it is missing, :class:`NotRegularFile` when it is something
    else, ``path_traversal`` when it is a symlink (a path is resolved before it is opened, so
    a symlink here was swapped in). The entry is checked before the open, so a device is not
    opened, and again through the descriptor: a FIFO swapped in meanwhile is opened without
    blocking (``O_NONBLOCK``) and refused, so no read can hang a worker thread.
    """
    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(info.st_mode):
        raise CommandFailed("path_traversal", _SWAPPED)
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFile(name)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CommandFailed("path_traversal", _SWAPPED) from None
        if exc.errno == errno.ENXIO:  # a socket swapped in
            raise NotRegularFile(name) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(name)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_subfolder(dir_fd: int, name: str) -> int | None:
    """A descriptor of the folder ``name`` in ``dir_fd``; None when it is not a folder (now),
    is a symlink, or cannot be opened. For walks, which skip what they cannot enter."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None


class AnchoredDir:
    """An open folder inside the workspace; names are resolved relative to it, never followed."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open_parent(cls, workspace: Workspace, real_path: Path, *, create: bool = False) -> AnchoredDir:
        """Walk from the root to ``real_path``'s folder without following any symlink.

        With ``create``, missing folders are made on the way (``permission_denied`` if that
        fails). A component that is now a symlink or not a folder is ``path_traversal``;
        :class:`NotRegularFile` when ``real_path`` is the root itself.
        """
        parts = Path(workspace.relative(real_path)).parts
        if not parts:
            raise NotRegularFile(str(real_path))
        try:
            fd = cls._walk(workspace, parts[:-1], create_for=real_path.name if create else None)
        except FileNotFoundError as exc:
            raise CommandFailed("file_not_found", f"Directory not found: {exc.filename}") from None
        return cls(fd, real_path.parent)

    @classmethod
    def open_folder(cls, workspace: Workspace, real_path: Path, path_arg: str) -> AnchoredDir:
        """Walk from the root to the folder ``real_path`` itself without following any symlink.

        Missing or not a folder is ``file_not_found``; a component that is now a symlink is
        ``path_traversal``.
        """
        parts = Path(workspace.relative(real_path)).parts
        try:
            fd = cls._walk(workspace, parts)
        except FileNotFoundError:
            raise CommandFailed("file_not_found", f"Directory not found: {path_arg}") from None
        except PermissionError:
            raise CommandFailed("permission_denied", f"Permission denied: {path_arg}") from None
        except CommandFailed:
            # O_NOFOLLOW | O_DIRECTORY fails alike on a symlink and on a file: which one?
            with cls.open_parent(workspace, real_path) as parent:
                info = parent.stat(real_path.name)
            if info is None or not stat.S_ISLNK(info.st_mode):
                raise CommandFailed("file_not_found", f"Directory not found: {path_arg}") from None
            raise
        return cls(fd, real_path)

    @staticmethod
    def _walk(workspace: Workspace, parts: tuple[str, ...], *, create_for: str | None = None) -> int:
        """The descriptor of the folder ``parts`` below the root, opened one component at a
        time with ``O_NOFOLLOW``; ``FileNotFoundError`` names a missing component. With
        ``create_for`` (the file's name, for the message) missing folders are made."""
        fd = os.open(workspace.root, _DIR_FLAGS)
        try:
            for part in parts:
                if create_for is not None:
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except PermissionError:
                        raise CommandFailed(
                            "permission_denied", f"Cannot create parent directory for: {create_for}"
                        ) from None
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise CommandFailed("path_traversal", _SWAPPED) from None
                    raise
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

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
        try:
            with open_regular(self.fd, name) as stream:
                return stream.read()
        except (FileNotFoundError, NotRegularFile):
            return None

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
