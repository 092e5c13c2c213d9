"""The handler registry, keyed by command type.

Adding a command type is one new module in this package that defines ``HANDLER``, an
instance of a :class:`~runner_daemon.bridge.handlers.base.Handler` subclass; discovery finds it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from runner_daemon.bridge.handlers.base import Handler


class HandlerRegistry(Mapping[str, Handler[Any]]):
    """An immutable map from command type to handler."""

    def __init__(self, handlers: Iterable[Handler[Any]]) -> None:
        self._by_type: dict[str, Handler[Any]] = {}
        for handler in handlers:
            if handler.command_type in self._by_type:
                raise ValueError(f"two handlers for command type {handler.command_type!r}")
            self._by_type[handler.command_type] = handler

    def __getitem__(self, command_type: str) -> Handler[Any]:
        return self._by_type[command_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_type)

    def __len__(self) -> int:
        return len(self._by_type)

    def with_handlers(self, *extra: Handler[Any]) -> HandlerRegistry:
        return HandlerRegistry([*self._by_type.values(), *extra])


def discover() -> HandlerRegistry:
    """Every ``HANDLER`` defined by a module of this package."""
    found: list[Handler[Any]] = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        handler = getattr(module, "HANDLER", None)
        if isinstance(handler, Handler):
            found.append(handler)
    return HandlerRegistry(found)
