"""What the watchdog, /healthz and STATUS= judge the daemon by, written where it happens.

The loops and the heartbeat write here as they go (no callback up to the daemon); the
service shell only reads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Liveness:
    """When Opik last answered, and whether the loop is moving or legitimately parked."""

    last_contact: float | None = None  # monotonic; None until Opik first answered
    last_tick: float = field(default_factory=time.monotonic)  # the loop last moved
    parked: bool = False  # waiting, by design, for a free execution slot

    def contact(self) -> None:
        self.last_contact = time.monotonic()

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def seconds_since_contact(self) -> float:
        """Infinite before Opik ever answered."""
        return math.inf if self.last_contact is None else time.monotonic() - self.last_contact

    def moving(self, stuck_after: float) -> bool:
        return self.parked or time.monotonic() - self.last_tick <= stuck_after
