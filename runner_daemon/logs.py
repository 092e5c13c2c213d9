"""Logging configuration: the one place structlog is set up.

JSON lines when the log stream is not a terminal (journald, containers, files), readable
console output when it is. Log lines go to stderr so stdout stays free for command output
(``demo``, ``check-config``). Every rendered line is scrubbed of the configured secrets as the
very last step, so a secret cannot leak through an exception text or a third-party message.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, WrappedLogger

from runner_daemon.settings import LogFormat, LogLevel

MASK = "***"


class _Scrubber:
    """Wraps the final renderer and replaces every secret in its output."""

    def __init__(self, renderer: Any, secrets: Iterable[str]) -> None:
        self._renderer = renderer
        needles: set[str] = set()
        for secret in secrets:
            if secret:
                needles.add(secret)
                needles.add(json.dumps(secret)[1:-1])  # as the JSON renderer escapes it
        # Longest first, so a secret containing another is masked whole.
        self._needles = sorted(needles, key=len, reverse=True)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        line = str(self._renderer(logger, name, event_dict))
        for needle in self._needles:
            line = line.replace(needle, MASK)
        return line


def uses_json(log_format: LogFormat, stream: TextIO) -> bool:
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


def configure_logging(
    level: LogLevel = "info",
    log_format: LogFormat = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and quiet the stdlib loggers of our dependencies)."""
    stream = stream or sys.stderr
    as_json = uses_json(log_format, stream)
    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        # No local variables in tracebacks: they are noise, and could hold secrets.
        exception_processors: list[Any] = [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        exception_processors = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exception_processors,
            _Scrubber(renderer, secrets),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Our dependencies log through the stdlib: route that through the same pipeline, so it
    # is formatted and scrubbed alike. httpx logs every request at INFO: per-poll noise.
    root = logging.getLogger()
    root.handlers = [_ToStructlog()]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _ToStructlog(logging.Handler):
    """Hands stdlib log records to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        logger.log(record.levelno, message, logger=record.name, exc_info=record.exc_info or None)
