"""What a handler is: a command type, a pydantic model of its args, and an async ``run``."""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import anyio.to_thread
from pydantic import BaseModel, ConfigDict

from runner_daemon.bridge.fileio import AnchoredDir, FileLocks
from runner_daemon.core.errors import Abandoned, CommandFailed
from runner_daemon.core.settings import Settings
from runner_daemon.system.processes import BackgroundProcesses
from runner_daemon.system.sandbox import SandboxPolicy
from runner_daemon.system.workspace import Workspace

A = TypeVar("A", bound=BaseModel)
T = TypeVar("T")


class Args(BaseModel):
    """Base of handler argument models: unknown keys are ignored, as Opik's runner does."""

    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


@dataclass
class HandlerServices:
    """State one daemon's handlers share across commands; closed when the daemon stops."""

    locks: FileLocks = field(default_factory=FileLocks)
    # Exec's background children (and their log folder); see runner_daemon.system.processes.
    background: BackgroundProcesses = field(default_factory=BackgroundProcesses)
    # The bridge key, so Exec keeps it (in any encoding) out of its children's environment.
    bridge_key: bytes | None = field(default=None, repr=False)
    # The kernel sandbox for the processes commands start; None with [exec] sandbox = "off".
    sandbox: SandboxPolicy | None = None

    async def aclose(self) -> None:
        """Release what commands left behind: terminate background process groups.

        SIGTERM to each group, SIGKILL after 5 s, then the group watcher ends; bounded in
        time, never raises.
        """
        await self.background.aclose()


@dataclass
class HandlerContext:
    """What a running command may use. ``stop`` is set when the command's time is over."""

    workspace: Workspace
    settings: Settings
    services: HandlerServices
    stop: threading.Event = field(default_factory=threading.Event)

    def check_stop(self) -> None:
        """Called by long worker-thread loops so abandoned work stops burning CPU."""
        if self.stop.is_set():
            raise Abandoned

    async def resolve(self, path: str, *, write: bool = False) -> Path:
        """:meth:`Workspace.resolve` off the event loop: it stats every segment of the path."""
        return await self.in_thread(functools.partial(self.workspace.resolve, path, write=write))

    async def in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking reads off the event loop; cancelling abandons the thread."""
        return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True)

    async def in_thread_to_completion(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking mutation off the event loop; a cancel waits for it to finish.

        A write must not outlive its file lock, so it is never abandoned half-way.
        """
        return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=False)


def existing_folder(ctx: HandlerContext, path_arg: str) -> AnchoredDir:
    """Open the folder ``path_arg`` names inside the workspace (the root when empty).

    Resolved, then walked to from the root without following a symlink, so the descriptor is
    inside the root even if a folder on the way was swapped since. The caller closes it.
    Blocking: called from a worker thread."""
    real = ctx.workspace.resolve(path_arg) if path_arg else ctx.workspace.root
    return AnchoredDir.open_folder(ctx.workspace, real, path_arg)


class Handler(abc.ABC, Generic[A]):
    """One command type. Subclasses set the class attributes and implement :meth:`run`.

    A handler signals an expected failure by raising :class:`CommandFailed`; anything else
    is an internal error.
    """

    command_type: ClassVar[str]
    args_model: type[A]
    mutating: ClassVar[bool] = False

    def parse(self, raw: dict[str, Any]) -> A:
        return self.args_model.model_validate(raw)

    @abc.abstractmethod
    async def run(self, args: A, ctx: HandlerContext) -> dict[str, Any]: ...


__all__ = ["A", "Args", "CommandFailed", "Handler", "HandlerContext", "HandlerServices"]
