"""Logging configuration: the one place structlog is set up.

JSON lines when the log stream is not a terminal (journald, containers, files), readable
console output when it is. Every line names the logger that wrote it (key ``logger``: our
module path, or a dependency's stdlib logger name). Log lines go to stderr so stdout stays
free for command output (``demo``, ``check-config``). Every rendered line is scrubbed of the
configured secrets as the very last step, so a secret cannot leak through an exception text
or a third-party message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import sys
import urllib.parse
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, WrappedLogger

from runner_daemon.core.settings import LogFormat, LogLevel

MASK = "***"
# Shorter values are masked only as they are: their encodings are too short to be told from
# ordinary text (base64 of "abc" is four letters).
MIN_ENCODED_SECRET_CHARS = 8
Secret = str | bytes


def _repr_forms(value: str | bytes) -> set[str]:
    """How ``repr()`` shows a value inside its quotes, alone or within a longer text.

    ``repr`` escapes ``'`` only when the text also holds a ``"``: both ways are given.
    """
    if isinstance(value, bytes):
        return {repr(value)[2:-1], repr(value + b"'\"")[2:-4]}
    return {repr(value)[1:-1], repr(value + "'\"")[1:-4]}


def _binary_forms(data: bytes) -> set[str]:
    """Renderings of raw bytes: repr, hex, base64 standard and URL-safe, padded or not."""
    forms = {*_repr_forms(data), data.hex(), data.hex().upper()}
    for encoded in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
        text = encoded.decode()
        forms.update((text, text.rstrip("=")))
    return forms


def _text_forms(secret: str) -> set[str]:
    if len(secret) < MIN_ENCODED_SECRET_CHARS:
        return {secret}
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        *_repr_forms(secret),
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret, safe="/"),
        urllib.parse.quote_plus(secret),
        *_binary_forms(secret.encode("utf-8", "surrogatepass")),
    }


def secret_forms(secret: Secret) -> frozenset[str]:
    """Every way our code or a library may render ``secret`` in a log line or a message.

    A text secret as it is, escaped as JSON (both ASCII modes), as ``repr`` of the text and
    of its UTF-8 bytes (h11's "Illegal header value b'...'"), percent-encoded, in base64 and
    in hex. A bytes secret (the bridge key) as its raw bytes are shown, and as the text forms
    of its base64 (how it is stored). Each form also as JSON and ``repr`` escape it, since a
    message holding it may be rendered again by the JSON log renderer or in a ``repr``.
    """
    if not secret:
        return frozenset()
    if isinstance(secret, bytes):
        base = _binary_forms(secret) | _text_forms(base64.b64encode(secret).decode())
    else:
        base = _text_forms(secret)
    forms = set(base)
    for form in base:
        forms.add(json.dumps(form)[1:-1])
        for shown in _repr_forms(form):
            forms.update((shown, json.dumps(shown)[1:-1]))
    forms.discard("")
    return frozenset(forms)


class Scrubber:
    """Replaces every form of the given secrets in a text with :data:`MASK`."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        needles: set[str] = set()
        for secret in secrets:
            needles.update(secret_forms(secret))
        # Longest first, so a form containing another is masked whole.
        self._needles = sorted(needles, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, MASK)
        return text


def scrub(text: str, secrets: Iterable[Secret]) -> str:
    """``text`` without any form of ``secrets``: for what is printed, not logged."""
    return Scrubber(secrets)(text)


class _ScrubbingRenderer:
    """Wraps the final renderer and scrubs its output."""

    def __init__(self, renderer: Any, secrets: Iterable[Secret]) -> None:
        self._renderer = renderer
        self._scrub = Scrubber(secrets)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        return self._scrub(str(self._renderer(logger, name, event_dict)))


def uses_json(log_format: LogFormat, stream: TextIO) -> bool:
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


# Loggers keep their configuration from their first use (a measurable saving per line);
# the test suite turns it off, so a logger first used in one test does not keep that test's
# stream for the rest of the session.
CACHE_LOGGERS = True


def configure_logging(
    level: LogLevel = "info",
    log_format: LogFormat = "auto",
    secrets: Iterable[Secret] = (),
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
        # Plain tracebacks: rich's would show local variables, cut short where no scrubber
        # can recognise a secret any more.
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        exception_processors = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exception_processors,
            _ScrubbingRenderer(renderer, secrets),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda name=None, *_: _PrintLogger(stream, name),
        cache_logger_on_first_use=CACHE_LOGGERS,
    )
    # Our dependencies log through the stdlib: route that through the same pipeline, so it
    # is formatted and scrubbed alike. httpx logs every request at INFO: per-poll noise.
    root = logging.getLogger()
    root.handlers = [_ToStructlog()]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    """Adds the name given to ``structlog.get_logger`` as ``logger``: which module wrote it."""
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


class _PrintLogger(structlog.PrintLogger):
    """Drops a line it cannot write instead of raising; knows its logger's name.

    A terminal that was closed (SIGHUP, then EIO on every write) or a reader that went away
    (EPIPE) must not turn the drain that the hang-up started into a crash (exit 1).
    """

    def __init__(self, stream: TextIO, name: str | None) -> None:
        super().__init__(stream)
        self.name = name

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().msg(message)

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg


class _ToStructlog(logging.Handler):
    """Hands stdlib log records to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        logger.log(record.levelno, message, exc_info=record.exc_info or None)
