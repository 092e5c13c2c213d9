"""Fault injection for the dev server: a seeded profile of latency, 5xx, 429, resets and blackouts.

A :class:`FaultProfile` is set with ``POST /dev/faults/profile`` or the ``devserver --fault-*``
flags. The route wrapper in :mod:`.app` asks the :class:`FaultInjector` for a
:class:`Decision` per request (one draw of a seeded RNG, so a run with the same requests in
the same order sees the same faults), and answers errors itself. Connection resets need the
socket, which an endpoint never sees: the endpoint only marks the request (a
:class:`ConnectionFault` in the ASGI scope) and :class:`FaultMiddleware`, the outermost ASGI
layer, swallows the response and resets the TCP connection (``SO_LINGER`` 0, then
``transport.abort()``: the kernel sends an RST). Blackouts are handled by the middleware too,
before any routing, for every route except the ``/dev`` control routes.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from typing import Any, Literal, Self

import anyio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The names ``route(name, handler)`` gives the Opik routes in app.py and jobs_routes.py;
# ``runner`` is GET/DELETE of a runner, ``command`` a GET of a command and ``job`` the UI's
# reads of jobs and their logs (those three are not in the fault queue); ``traces`` is what
# Opik's SDK posts from inside an agent.
ROUTE_NAMES = (
    "heartbeat",
    "poll",
    "report",
    "submit",
    "pairing",
    "runner",
    "command",
    "jobs",
    "job",
    "jobs_next",
    "job_report",
    "job_logs",
    "job_cancel",
    "agents",
    "checklist",
    "traces",
)
# What a runner calls (the bridge's, then the jobs'): a profile's default.
RUNNER_ROUTES = ("heartbeat", "poll", "report", "jobs_next", "job_report", "job_logs", "agents", "checklist")
FAULT_SCOPE_KEY = "runner_daemon.devserver.fault"


def _check_routes(routes: list[str]) -> list[str]:
    if "*" in routes:
        return list(ROUTE_NAMES)
    unknown = sorted(set(routes) - set(ROUTE_NAMES))
    if unknown:
        raise ValueError(f"unknown route(s) {unknown}; known: {', '.join(ROUTE_NAMES)} or *")
    return list(dict.fromkeys(routes))


class FaultProfile(BaseModel):
    """What to inject, and where. Rates are fractions of the requests to ``routes``."""

    model_config = ConfigDict(extra="forbid")

    routes: list[str] = Field(default_factory=lambda: list(RUNNER_ROUTES))
    seed: int | None = None
    latency_ms: float = Field(0.0, ge=0, le=600_000)
    error_rate: float = Field(0.0, ge=0, le=1)
    error_statuses: list[int] = Field(default_factory=lambda: [500, 502, 503], min_length=1)
    rate_limit_rate: float = Field(0.0, ge=0, le=1)
    retry_after: float = Field(1.0, ge=0, le=3600)
    reset_rate: float = Field(0.0, ge=0, le=1)
    reset_after_processing_rate: float = Field(0.0, ge=0, le=1)
    # Where after-processing resets may happen (default: ``routes``); a subset, e.g. ["report"].
    reset_after_processing_routes: list[str] | None = None
    blackout_seconds: float | None = Field(None, ge=0, le=86_400)
    blackout_until: float | None = None  # Unix time
    blackout_mode: Literal["reset", "503"] = "reset"

    @field_validator("routes")
    @classmethod
    def _routes(cls, routes: list[str]) -> list[str]:
        return _check_routes(routes)

    @field_validator("reset_after_processing_routes")
    @classmethod
    def _after_routes(cls, routes: list[str] | None) -> list[str] | None:
        return None if routes is None else _check_routes(routes)

    @field_validator("error_statuses")
    @classmethod
    def _statuses(cls, statuses: list[int]) -> list[int]:
        if not all(500 <= status <= 599 for status in statuses):
            raise ValueError("error_statuses must be 5xx")
        return statuses

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        total = self.error_rate + self.rate_limit_rate + self.reset_rate + self.reset_after_processing_rate
        if total > 1.0 + 1e-9:
            raise ValueError("error_rate + rate_limit_rate + reset_rate + reset_after_processing_rate > 1")
        if self.blackout_seconds is not None and self.blackout_until is not None:
            raise ValueError("give blackout_seconds or blackout_until, not both")
        return self


class Action(StrEnum):
    PASS = "pass"
    ERROR = "error"
    RATE_LIMIT = "rate_limit"
    RESET_BEFORE = "reset_before_processing"
    RESET_AFTER = "reset_after_processing"


@dataclass(frozen=True)
class Decision:
    """What to do with one request: wait ``latency`` seconds, then ``action``."""

    action: Action
    latency: float = 0.0
    status: int | None = None
    retry_after: float | None = None


@dataclass
class FaultCounters:
    """Faults injected so far, by kind (``errors_by_status`` splits ``error``)."""

    latency: int = 0
    error: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    rate_limit: int = 0
    reset_before_processing: int = 0
    reset_after_processing: int = 0
    blackout: int = 0
    queued: int = 0  # answers of the simple ``POST /dev/faults`` queue

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "errors_by_status": dict(self.errors_by_status)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultCounters:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class FaultInjector:
    """The current profile, its seeded RNG, the blackout window and the counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.profile: FaultProfile | None = None
        self.counters = FaultCounters()
        self._rng = random.Random()
        self._blackout_until: float | None = None  # on ``clock``

    def set_profile(self, profile: FaultProfile) -> None:
        self.profile = profile
        self._rng = random.Random(profile.seed)
        if profile.blackout_seconds is not None:
            self._blackout_until = self._clock() + profile.blackout_seconds
        elif profile.blackout_until is not None:
            self._blackout_until = self._clock() + (profile.blackout_until - time.time())
        else:
            self._blackout_until = None

    def clear(self, *, counters: bool = False) -> None:
        self.profile = None
        self._blackout_until = None
        if counters:
            self.counters = FaultCounters()

    # --- per request --------------------------------------------------------------------

    def blackout_remaining(self) -> float:
        if self._blackout_until is None:
            return 0.0
        return max(0.0, self._blackout_until - self._clock())

    def blackout_mode(self) -> str | None:
        """``reset`` or ``503`` while a blackout lasts, else None."""
        if self.profile is None or self.blackout_remaining() <= 0:
            return None
        self.counters.blackout += 1
        return self.profile.blackout_mode

    def decide(self, route: str) -> Decision | None:
        """One draw per request to a profiled route; None when no profile covers it."""
        profile = self.profile
        if profile is None or route not in profile.routes:
            return None
        latency = profile.latency_ms / 1000.0
        if latency:
            self.counters.latency += 1
        after_routes = profile.reset_after_processing_routes
        after_rate = profile.reset_after_processing_rate
        if after_routes is not None and route not in after_routes:
            after_rate = 0.0
        draw = self._rng.random()
        for action, rate in (
            (Action.RESET_BEFORE, profile.reset_rate),
            (Action.RESET_AFTER, after_rate),
            (Action.ERROR, profile.error_rate),
            (Action.RATE_LIMIT, profile.rate_limit_rate),
        ):
            if draw < rate:
                return self._count(Decision(action, latency, *self._details(action, profile)))
            draw -= rate
        return Decision(Action.PASS, latency)

    def _details(self, action: Action, profile: FaultProfile) -> tuple[int | None, float | None]:
        if action is Action.ERROR:
            return self._rng.choice(profile.error_statuses), None
        if action is Action.RATE_LIMIT:
            return 429, profile.retry_after
        return None, None

    def _count(self, decision: Decision) -> Decision:
        counters = self.counters
        if decision.action is Action.ERROR:
            counters.error += 1
            key = str(decision.status)
            counters.errors_by_status[key] = counters.errors_by_status.get(key, 0) + 1
        elif decision.action is Action.RATE_LIMIT:
            counters.rate_limit += 1
        elif decision.action is Action.RESET_BEFORE:
            counters.reset_before_processing += 1
        elif decision.action is Action.RESET_AFTER:
            counters.reset_after_processing += 1
        return decision

    # --- views and persistence ----------------------------------------------------------

    def view(self) -> dict[str, Any]:
        remaining = self.blackout_remaining()
        return {
            "profile": self.profile.model_dump(mode="json") if self.profile else None,
            "counters": self.counters.as_dict(),
            "blackout_remaining_seconds": round(remaining, 3),
            "blackout_until": time.time() + remaining if remaining else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready; the blackout end as Unix time, the RNG's state so a run resumes its sequence."""
        version, internal, gauss = self._rng.getstate()
        remaining = self.blackout_remaining()
        return {
            "profile": self.profile.model_dump(mode="json") if self.profile else None,
            "rng_state": [version, list(internal), gauss],
            "blackout_until": time.time() + remaining if remaining else None,
            "counters": self.counters.as_dict(),
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.counters = FaultCounters.from_dict(data.get("counters") or {})
        if data.get("profile") is None:
            self.clear()
            return
        self.profile = FaultProfile.model_validate(data["profile"])
        version, internal, gauss = data["rng_state"]
        self._rng.setstate((version, tuple(internal), gauss))
        until = data.get("blackout_until")
        self._blackout_until = None if until is None else self._clock() + (float(until) - time.time())


# --- connection resets -----------------------------------------------------------------------


@dataclass
class ConnectionFault:
    """Put in the ASGI scope by the middleware; an endpoint sets ``reset`` to have it reset."""

    reset: bool = False
    partial: bool = False  # send the answer's status line before the reset (mid-response)
    status: int | None = None  # of the swallowed answer


def mark_reset(scope: Scope, *, partial: bool) -> bool:
    """Ask the middleware to reset this request's connection; False when it is not installed.

    ``partial``: the status line of the endpoint's answer goes out first, as if the server
    died while answering; otherwise nothing is sent (it died before answering)."""
    marker = scope.get(FAULT_SCOPE_KEY)
    if not isinstance(marker, ConnectionFault):
        return False
    marker.reset, marker.partial = True, partial
    return True


def _is_control(path: str) -> bool:
    path = path.removeprefix("/api")
    return path == "/dev" or path.startswith("/dev/")


class FaultMiddleware:
    """The outermost ASGI layer: blackouts, and resets that endpoints ask for.

    The reset is a real TCP RST: the socket gets ``SO_LINGER`` (on, 0 s) and the asyncio
    transport is aborted, so the kernel drops the connection and sends an RST. The transport
    is found through uvicorn's ``send`` (a bound method of its request-response cycle, which
    holds ``transport``; true of both its h11 and httptools protocols), else by matching the
    scope's client address among ``connections()`` (uvicorn's server state). If neither works
    (another ASGI server), the answer is cut short instead: headers announcing a body that
    never comes, then the server closes the connection (a FIN, not an RST).
    """

    def __init__(
        self,
        app: ASGIApp,
        injector: FaultInjector,
        connections: Callable[[], Iterable[object]] | None = None,
    ) -> None:
        self.app = app
        self.injector = injector
        self.connections = connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not _is_control(scope["path"]):
            mode = self.injector.blackout_mode()
            if mode == "503":
                body = json.dumps({"errors": ["injected blackout"]}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            if mode is not None:
                await self._reset(scope, receive, send, None)
                return
        marker = ConnectionFault()
        scope[FAULT_SCOPE_KEY] = marker

        async def guarded_send(message: Message) -> None:
            if marker.reset:  # the endpoint asked for a reset: its answer is never sent
                if message["type"] == "http.response.start":
                    marker.status = int(message["status"])
                return
            await send(message)

        await self.app(scope, receive, guarded_send)
        if marker.reset:
            await self._reset(scope, receive, send, marker.status if marker.partial else None)

    def _transport(self, scope: Scope, send: Send) -> asyncio.Transport | None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if isinstance(transport, asyncio.Transport):
            return transport
        client = scope.get("client")
        if self.connections is None or client is None:
            return None
        for connection in self.connections():
            transport = getattr(connection, "transport", None)
            if getattr(connection, "client", None) == tuple(client) and isinstance(
                transport, asyncio.Transport
            ):
                return transport
        return None

    async def _reset(self, scope: Scope, receive: Receive, send: Send, status: int | None) -> None:
        transport = self._transport(scope, send)
        if transport is None:
            await self._cut_short(send, status or 200)
            return
        if status is not None and not transport.is_closing():
            # Mid-response: the status line of the answer, without the end of its headers.
            transport.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode())
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        # Let the server notice (connection_lost) before we return, so it does not try to
        # answer a request whose connection is gone.
        with anyio.move_on_after(1.0):
            while (await receive())["type"] != "http.disconnect":
                pass

    @staticmethod
    async def _cut_short(send: Send, status: int) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1024")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
