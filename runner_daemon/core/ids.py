"""UUIDv7 ids, as Opik makes them for jobs and traces (Python 3.11 has no ``uuid.uuid7``)."""

from __future__ import annotations

import os
import time
import uuid


def uuid7(unix_ms: int | None = None) -> str:
    """A version-7 UUID (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Opik checks that an ingested trace id is version 7 and that its time lies in the ingestion
    window, so the time must be now's (``unix_ms`` is for tests).
    """
    millis = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    random_bits = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 are kept
    value = (millis & (1 << 48) - 1) << 80
    value |= 0x7 << 76  # version
    value |= (random_bits >> 68) << 64  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= random_bits & ((1 << 62) - 1)  # rand_b: 62 bits
    return str(uuid.UUID(int=value))


def uuid7_millis(value: str) -> int:
    """The Unix milliseconds a UUIDv7 carries; ValueError if ``value`` is not a version-7 UUID."""
    parsed = uuid.UUID(value)
    if parsed.version != 7:
        raise ValueError(f"{value} is not a version-7 UUID")
    return parsed.int >> 80
