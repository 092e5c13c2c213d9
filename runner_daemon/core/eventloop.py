"""Which event loop runs the daemon (the ``event_loop`` setting), and which one is running.

uvloop (asyncio's loop rewritten over libuv) cut the daemon's CPU per command by about a
seventh in A/B runs at 100 commands/s, so ``auto`` takes it whenever it imports; asyncio's
own loop otherwise. trio stays supported: anyio runs the same code on it.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass, field
from typing import Any

import sniffio

from runner_daemon.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class EventLoop:
    """What :func:`anyio.run` is given: a backend and its options; ``name`` for people."""

    backend: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


def _version(module: str) -> str | None:
    """The module's ``__version__`` once imported, or None when it cannot be imported."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(imported, "__version__", "")).strip()


def choose(setting: str) -> EventLoop:
    """The loop ``setting`` asks for; :class:`ConfigError` when that loop is not installed."""
    if setting in ("auto", "uvloop"):
        version = _version("uvloop")
        if version is not None:
            return EventLoop("asyncio", f"uvloop {version}", {"use_uvloop": True})
        if setting == "uvloop":
            raise ConfigError('event_loop = "uvloop", but uvloop is not installed (pip install uvloop)')
        return EventLoop("asyncio", "asyncio")
    if setting == "trio":
        version = _version("trio")
        if version is None:
            raise ConfigError('event_loop = "trio", but trio is not installed (pip install trio)')
        return EventLoop("trio", f"trio {version}")
    return EventLoop("asyncio", "asyncio")


def running() -> str:
    """The loop the calling task runs on: ``uvloop 0.x``, ``asyncio`` or ``trio 0.x``."""
    library = sniffio.current_async_library()
    if library != "asyncio":
        return f"{library} {_version(library) or ''}".strip()
    loop_module = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    if loop_module == "uvloop":
        return f"uvloop {_version('uvloop') or ''}".strip()
    return "asyncio"
