"""Claims, the slots and drain both loops share, on their own."""

from __future__ import annotations

import anyio
import pytest

from runner_daemon.core.claims import Claims
from runner_daemon.core.liveness import Liveness

pytestmark = pytest.mark.anyio


async def test_a_full_set_parks_until_a_release() -> None:
    liveness = Liveness()
    claims = Claims(2, liveness)
    claims.claim("a")
    claims.claim("b")
    assert claims.free == 0
    freed = anyio.Event()

    async def wait() -> None:
        await claims.wait_for_free_slot(lambda: False)
        freed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert liveness.parked and not freed.is_set()  # parked counts as moving for health
        claims.release("a")
        with anyio.fail_after(5):
            await freed.wait()
    assert not liveness.parked and claims.free == 1 and "b" in claims and "a" not in claims


async def test_a_stop_ends_the_wait_for_a_slot() -> None:
    claims = Claims(1, Liveness())
    claims.claim("a")
    stopping = False

    async def stop() -> None:
        nonlocal stopping
        stopping = True
        claims.notify()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop)
        with anyio.fail_after(5):
            await claims.wait_for_free_slot(lambda: stopping)


async def test_the_drain_lets_work_finish_then_cancels_and_counts_what_is_left() -> None:
    claims = Claims(3, Liveness())
    finished: list[str] = []

    async def work(claim_id: str, seconds: float, release: bool) -> None:
        scope = claims.claim(claim_id)
        with scope:
            await anyio.sleep(seconds)
            finished.append(claim_id)
        if release:  # a cancelled task that still reports releases its claim
            claims.release(claim_id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(work, "quick", 0, True)
        tg.start_soon(work, "slow", 3600, True)
        tg.start_soon(work, "stuck", 3600, False)
        await anyio.wait_all_tasks_blocked()
        unreported = await claims.drain(0.2, 0.2, tg, "things")
    assert finished == ["quick"]
    assert unreported == 1 and list(claims) == ["stuck"]
