"""The agents this runner serves: declared in the settings, or discovered in the workspace."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runner_daemon.core.models import Agent, AgentParam
from runner_daemon.core.settings import Settings
from runner_daemon.jobs.discovery import DiscoveredAgent, discover_agents
from runner_daemon.system.workspace import Workspace

# The bootstrap a discovered Python agent runs through: ``python bootstrap.py FILE FUNCTION``.
BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
# Opik refuses a PUT of more (400 "Too many agents. Maximum is 50").
MAX_AGENTS = 50


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


@dataclass(frozen=True)
class AgentsFound:
    """The agents to register, and what a person should know about how they were found."""

    specs: tuple[AgentSpec, ...]
    warnings: tuple[str, ...]
    python: str  # the interpreter discovered agents run with

    def registrations(self) -> dict[str, Agent]:
        """The body of ``PUT {runnerId}/agents``: agent name → registration."""
        return {spec.name: spec.registration() for spec in self.specs}

    def by_name(self) -> dict[str, AgentSpec]:
        return {spec.name: spec for spec in self.specs}


def python_for(settings: Settings) -> str:
    """The interpreter of discovered agents: ``[jobs] python``, else the workspace's
    ``.venv/bin/python`` (kept as that path, not resolved: the venv is found through it),
    else ``python3`` from ``PATH``."""
    if settings.jobs.python:
        return settings.jobs.python
    venv = settings.workspace_root / ".venv" / "bin" / "python"
    return str(venv) if os.access(venv, os.X_OK) and venv.is_file() else "python3"


def declared_agents(settings: Settings) -> list[AgentSpec]:
    """``[jobs.agents.NAME]`` tables, in the order the settings give them."""
    return [
        AgentSpec(
            name=name,
            description=agent.description,
            params=tuple(
                AgentParam(name=param.name, type=param.type, presence=param.presence)
                for param in agent.params
            ),
            timeout=agent.timeout,
            argv=agent.command,
            source=f"declared in [jobs.agents.{name}]",
            sandbox=settings.jobs.sandbox if agent.sandbox is None else agent.sandbox,
        )
        for name, agent in settings.jobs.agents.items()
    ]


def discovered_spec(agent: DiscoveredAgent, root: Path, python: str, sandbox: bool) -> AgentSpec:
    """A discovered function as a job's process: the bootstrap imports its file and calls it."""
    return AgentSpec(
        name=agent.name,
        description=agent.description,
        params=agent.params,
        timeout=None,
        argv=(python, str(BOOTSTRAP), str(root / agent.path), agent.function),
        source=agent.source,
        language="python",
        sandbox=sandbox,
    )


def agents_for(settings: Settings) -> AgentsFound:
    """Declared agents, then discovered ones in walk order; at most :data:`MAX_AGENTS`.

    A declared agent wins over a discovered one of the same name; past the cap the rest are
    left out by name. Blocking (discovery reads files): call it in a worker thread.
    """
    python = python_for(settings)
    specs = declared_agents(settings)
    warnings: list[str] = []
    if settings.jobs.discover:
        workspace = Workspace(settings.workspace_root, settings.deny_paths)
        discovery = discover_agents(workspace)
        warnings += discovery.warnings
        for agent in discovery.agents:
            if agent.name in settings.jobs.agents:
                warnings.append(
                    f"{agent.source}: agent {agent.name!r} left out: "
                    f"[jobs.agents.{agent.name}] declares that name"
                )
            else:
                specs.append(discovered_spec(agent, workspace.root, python, settings.jobs.sandbox))
    if len(specs) > MAX_AGENTS:
        left_out = ", ".join(f"{spec.name} ({spec.source})" for spec in specs[MAX_AGENTS:])
        warnings.append(
            f"{len(specs)} agents found; Opik accepts {MAX_AGENTS}, so these are left out: {left_out}"
        )
        specs = specs[:MAX_AGENTS]
    return AgentsFound(tuple(specs), tuple(warnings), python)
