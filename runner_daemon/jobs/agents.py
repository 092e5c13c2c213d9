"""The agents this runner serves: declared in the settings, or discovered in the workspace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner_daemon.core.models import Agent, AgentParam

# The bootstrap a discovered Python agent runs through: ``python bootstrap.py FILE FUNCTION``.
BOOTSTRAP = Path(__file__).with_name("bootstrap.py")


@dataclass(frozen=True)
class AgentSpec:
    """One agent: what is registered with Opik, and how a job of it is started."""

    name: str
    description: str
    params: tuple[AgentParam, ...]
    timeout: int | None  # seconds; None or 0: Opik's default (1800 s)
    argv: tuple[str, ...]  # the process a job starts; inputs as JSON on its stdin
    source: str  # why it is served: "declared in [jobs.agents.NAME]" or "path/to/file.py:LINE"
    language: str | None = None  # "python" for a discovered agent
    sandbox: bool = False  # run in the Exec sandbox

    def registration(self) -> Agent:
        """What ``PUT {runnerId}/agents`` sends for it, as Opik's own runner sends it."""
        return Agent(
            description=self.description,
            language=self.language,
            params=list(self.params),
            timeout=self.timeout or 0,
        )
