"""Retrying a call to Opik: one policy for every phase that retries.

Start-up, the poll, the report and the outbox's back-pressure all wait the same way: the
server's ``Retry-After`` on a 429, else a capped exponential backoff with jitter. A
:class:`~runner_daemon.core.errors.Fatal` error is never retried.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from runner_daemon.core.errors import ApiError, Fatal, RateLimited

T = TypeVar("T")


class Backoff:
    """Delays of ``initial * 2**n`` capped at ``maximum``, each drawn from its upper half.

    The jitter spreads a fleet of runners that lost the server at the same instant; keeping
    the lower half out guarantees the delay still grows.
    """

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        # The module's generator unless told: seeding one per backoff reads 2.5 KB of entropy.
        self._rng = rng

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 63))
        self.attempts += 1
        return ceiling * (self._rng or random).uniform(0.5, 1.0)

    def delay_after(self, exc: ApiError) -> float:
        """How long to wait after ``exc``: what a 429 asks for, else the next backoff step."""
        if isinstance(exc, RateLimited):
            self.attempts += 1
            return exc.retry_after
        return self.next_delay()

    def reset(self) -> None:
        self.attempts = 0


async def retrying(
    call: Callable[[], Awaitable[T]],
    backoff: Backoff,
    on_failure: Callable[[ApiError, float], None],
    *,
    final: tuple[type[ApiError], ...] = (),
) -> T:
    """Await ``call`` until it succeeds; ``on_failure(error, delay)`` before each wait.

    Errors that are :class:`Fatal`, or of a ``final`` type, pass through at once. There is no
    total deadline here: the caller bounds the whole with a cancel scope (``move_on_after``).
    """
    while True:
        try:
            result = await call()
        except Fatal:
            raise
        except ApiError as exc:
            if isinstance(exc, final):
                raise
            delay = backoff.delay_after(exc)
            on_failure(exc, delay)
            await anyio.sleep(delay)
        else:
            backoff.reset()
            return result
