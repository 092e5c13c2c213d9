"""Agents re-found when the workspace changes, so Opik learns of them without a restart.

Opik's runner registers its agents once, at start. Here a cheap fingerprint of the files
discovery reads (path, size and modification time of each ``.py`` file the walk passes, and
what decides how agents run) is taken every ``interval`` seconds in a worker thread; only when
it changes is discovery run again, and only a different set of agents is published.
Polling, not inotify: it works on every filesystem (NFS, bind mounts, overlay) and its cost
is bounded by the walk's bounds whatever the tree does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator

import anyio

from runner_daemon.core.settings import Settings
from runner_daemon.jobs.agents import AgentsFound, agents_for, python_for
from runner_daemon.jobs.discovery import MAX_FILES, Walk, python_files
from runner_daemon.system.workspace import Workspace


def fingerprint(settings: Settings) -> bytes:
    """A digest that changes when an agent may have: a ``.py`` file added, removed, edited or
    resized, the interpreter changing (a ``.venv`` created), or the declared agents.
    Blocking: call it in a worker thread."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(settings.jobs.model_dump_json().encode())
    digest.update(python_for(settings).encode())
    if settings.jobs.discover:
        workspace = Workspace(settings.workspace_root, settings.deny_paths)
        for count, entry in enumerate(python_files(Walk(workspace))):
            if count == MAX_FILES:
                break
            try:
                info = os.stat(entry.name, dir_fd=entry.folder_fd, follow_symlinks=False)
            except OSError:
                continue  # gone since it was listed: the next scan sees it gone
            stamp = (
                f"{entry.relative}\0{info.st_ino}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\n"
            )
            digest.update(stamp.encode("utf-8", "surrogateescape"))
    return digest.digest()


async def watch_agents(settings: Settings, *, interval: float = 2.0) -> AsyncGenerator[AgentsFound, None]:
    """The agents at once, then again each time the set changes (checked every ``interval``
    seconds): ``async with aclosing(watch_agents(settings)) as sets: async for found in sets: …``.

    A change is seen within ``interval`` plus one scan. The scans run in worker threads
    abandoned on cancel (bounded, they end on their own), so cancelling never waits for a
    slow disk.
    """
    seen = await anyio.to_thread.run_sync(fingerprint, settings, abandon_on_cancel=True)
    found = await anyio.to_thread.run_sync(agents_for, settings, abandon_on_cancel=True)
    yield found
    while True:
        await anyio.sleep(interval)
        now = await anyio.to_thread.run_sync(fingerprint, settings, abandon_on_cancel=True)
        if now == seen:
            continue
        seen = now
        latest = await anyio.to_thread.run_sync(agents_for, settings, abandon_on_cancel=True)
        if latest.specs != found.specs:
            found = latest
            yield found
