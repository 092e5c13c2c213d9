"""Settings: one validated object, built once at start and passed down.

Sources, highest priority first: command-line flags, ``RUNNER_DAEMON_*`` environment
variables, Opik's own variables (``OPIK_URL_OVERRIDE``, ``OPIK_API_KEY``,
``OPIK_WORKSPACE``), the TOML file given with ``--config``, then the defaults below.
Nothing reads the environment after :func:`load_settings` returns.

Over 400 lines on purpose: every setting, its validation and its sources in one place, as the
one settings object.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import string
import tomllib
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from runner_daemon.core.errors import ConfigError, describe_validation_error
from runner_daemon.core.statedir import default_state_directory

ENV_PREFIX = "RUNNER_DAEMON_"

# Opik's SDK and CLI read these; honouring them lets one environment serve both.
OPIK_ENV_NAMES: Mapping[str, str] = {
    "OPIK_URL_OVERRIDE": "url",
    "OPIK_API_KEY": "api_key",
    "OPIK_WORKSPACE": "workspace",
}

# Files that usually hold secrets: never read or written by a command.
DEFAULT_DENY_PATHS = (
    ".env",
    ".env.*",
    ".envrc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    ".git-credentials",
    ".pgpass",
)
# Git's own database: readable (a UI may show history), never written by a command.
DEFAULT_DENY_WRITE_PATHS = (".git/",)
# Environment variables that hold the daemon's own secrets; Exec's children never see them.
SECRET_ENV_NAMES = ("OPIK_API_KEY", "RUNNER_DAEMON_API_KEY", "RUNNER_DAEMON_BRIDGE_KEY")

# What a header value may hold once trimmed: visible ASCII, inner spaces for names only.
_HEADER_TOKEN = re.compile(r"[!-~]*")
_HEADER_TEXT = re.compile(r"[ -~]*")

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
EventLoopName = Literal["auto", "asyncio", "uvloop", "trio"]


class ExecSettings(BaseModel):
    """Policy of the ``Exec`` command type (``[exec]`` in the TOML file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # When not empty, a command must start with one of these prefixes to run.
    allow_prefixes: tuple[str, ...] = ()
    # Regular expressions blocked on top of Opik's built-in blocklist.
    deny_patterns: tuple[str, ...] = ()
    # More environment variable names to remove from the child's environment.
    secret_env: tuple[str, ...] = ()
    max_background: int = Field(5, ge=0, le=64)
    # The kernel sandbox of every process Exec (and SearchFiles' git) starts; see sandbox.py.
    sandbox: Literal["landlock", "off"] = "landlock"
    # Whether sandboxed commands may open TCP connections (builds fetch packages).
    network: bool = True
    # More folders sandboxed commands may read (and execute), or also write: a package cache.
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()

    @field_validator("deny_patterns")
    @classmethod
    def _check_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


def header_value(value: str, *, spaces: bool) -> str:
    """``value`` trimmed of surrounding whitespace, fit to be sent as an HTTP header.

    A file or variable made from a file (``kubectl create secret --from-file``) often ends
    in a newline: that is trimmed. What remains must be printable ASCII, inner spaces only
    when ``spaces``; anything else would make every request fail, so it is refused here. The
    ``ValueError`` never repeats the value, which may be a secret.
    """
    value = value.strip(string.whitespace)
    allowed = _HEADER_TEXT if spaces else _HEADER_TOKEN
    if not allowed.fullmatch(value):
        what = "printable ASCII" if spaces else "printable ASCII without spaces"
        raise ValueError(f"must be {what} once trimmed: it is sent as an HTTP header")
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) into its parts; ``ValueError`` with a clear reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


class HealthSettings(BaseModel):
    """The optional health and metrics listener (``[health]`` in the TOML file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "host:port" to serve /healthz, /readyz and /metrics on; off when unset.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value


AGENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
ParamTypeName = Literal["string", "integer", "float", "boolean", "prompt", "prompt_commit"]


class BridgeSettings(BaseModel):
    """The bridge capability (``[bridge]``): its runner id is the top-level ``runner_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True


class AgentParamSettings(BaseModel):
    """One input of a declared agent, as Opik registers it (``../shared/JOBS.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    type: ParamTypeName = "string"
    presence: Literal["required", "optional"] = "required"


class AgentSettings(BaseModel):
    """A declared agent (``[jobs.agents.NAME]``): any program, given its inputs as JSON on stdin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: tuple[str, ...] = Field(min_length=1)
    description: str = ""
    params: tuple[AgentParamSettings, ...] = ()
    # Seconds; registered with Opik, which fixes it as the timeout of the jobs it creates.
    timeout: int | None = Field(None, gt=0, le=7 * 24 * 3600)
    # None: as [jobs] sandbox says.
    sandbox: bool | None = None


class JobsSettings(BaseModel):
    """The jobs capability (``[jobs]``): the user's agents, run for Opik's Agent Playground."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    # The endpoint runner's id (``runner-daemon pair --type endpoint`` stores one).
    runner_id: uuid.UUID | None = None
    max_jobs: int = Field(2, ge=1, le=32)
    # Agents are the user's own code and often need their home folder: unconfined by default.
    sandbox: bool = False
    # The interpreter of discovered Python agents; default: the workspace's .venv, else python3.
    python: str | None = None
    # Find @opik.track(entrypoint=True) functions in the workspace (read, never imported).
    discover: bool = True
    agents: dict[str, AgentSettings] = Field(default_factory=dict)
    # A job's process group gets SIGTERM, then SIGKILL after this long (cancel, timeout, stop).
    kill_grace_seconds: float = Field(5.0, ge=0, le=120)
    # The most unsent log lines kept per job; past it the oldest are dropped (and counted).
    max_log_lines: int = Field(10_000, ge=100, le=1_000_000)

    @field_validator("agents")
    @classmethod
    def _check_agent_names(cls, agents: dict[str, AgentSettings]) -> dict[str, AgentSettings]:
        for name in agents:
            if not AGENT_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an agent name (letters, digits, _ . -)")
        if len(agents) > 50:
            raise ValueError(f"{len(agents)} agents declared; Opik accepts at most 50")
        return agents


class Settings(BaseModel):
    """Every knob of the daemon. Secrets are ``SecretStr`` so ``repr()`` masks them."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    url: str = Field(
        "http://localhost:5173/api/",
        description="Opik API base URL (ends in /api/ for a self-hosted Opik).",
    )
    api_key: SecretStr | None = Field(None, description="Opik API key; not needed locally.")
    workspace: str | None = Field(None, description="Opik workspace name (Comet-Workspace).")
    runner_id: uuid.UUID | None = Field(None, description="The paired runner's id.")
    workspace_root: Path = Field(
        Path("."), description="The folder the handlers may read; nothing outside it."
    )
    max_concurrency: int = Field(10, ge=1, le=64)
    heartbeat_interval_seconds: float = Field(5.0, gt=0, le=60)
    shutdown_grace_seconds: float = Field(20.0, ge=0, le=3600)
    disconnect_on_exit: bool = False
    poll_timeout_seconds: float = Field(
        45.0, ge=5, le=600, description="Read timeout of a long poll; above the server's hold."
    )
    request_timeout_seconds: float = Field(10.0, gt=0, le=300)
    connect_timeout_seconds: float = Field(5.0, gt=0, le=120)
    retry_initial_seconds: float = Field(0.5, gt=0, le=60)
    retry_max_seconds: float = Field(30.0, gt=0, le=600)
    result_ttl_seconds: float = Field(
        600.0, gt=0, le=86400, description="How long one result is retried before it is dropped."
    )
    event_loop: EventLoopName = Field(
        "auto", description="auto: uvloop when it is installed, else asyncio's own loop."
    )
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"
    state_directory: Path = Field(
        default_factory=lambda: default_state_directory(os.environ),
        description="Where `pair` stores the runner id and bridge key.",
    )
    bridge_key_file: Path | None = Field(None, description="A file holding the base64 bridge key.")
    allow_unsigned_commands: bool = False
    reject_replayed_signatures: bool = Field(
        False, description="Refuse a command whose signature this runner accepted before (a replay)."
    )
    read_only: bool = Field(False, description="Refuse every mutating type (WriteFile, EditFile, Exec).")
    deny_paths: tuple[str, ...] = DEFAULT_DENY_PATHS
    deny_write_paths: tuple[str, ...] = DEFAULT_DENY_WRITE_PATHS
    exec: ExecSettings = ExecSettings()
    health: HealthSettings = HealthSettings()
    bridge: BridgeSettings = BridgeSettings()
    jobs: JobsSettings = JobsSettings()

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("http://", "https://")) or value[-3:] == "://":
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value if value.endswith("/") else value + "/"

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        key = header_value(value.get_secret_value(), spaces=False)
        return SecretStr(key) if key else None

    @field_validator("workspace")
    @classmethod
    def _check_workspace(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Empty means not set, as it always did (no header is sent).
        return header_value(value, spaces=True) or None

    @field_validator("state_directory", "bridge_key_file")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("workspace_root")
    @classmethod
    def _check_workspace_root(cls, value: Path) -> Path:
        resolved = value.expanduser().resolve()
        if not resolved.is_dir():
            raise ValueError(f"{str(value)!r} is not an existing folder")
        return resolved

    @model_validator(mode="after")
    def _check_retry_bounds(self) -> Settings:
        if self.retry_initial_seconds > self.retry_max_seconds:
            raise ValueError("retry_initial_seconds must not exceed retry_max_seconds")
        return self

    def secret_values(self) -> tuple[str, ...]:
        """The raw secrets, so log output can be scrubbed of them (a password in the URL too)."""
        values = [s.get_secret_value() for s in (self.api_key,) if s is not None]
        password = urllib.parse.urlsplit(self.url).password
        return tuple(values + ([password] if password else []))


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build and validate the settings once; raise :class:`ConfigError` with one clear line.

    The sources are merged here rather than with pydantic-settings: four small sources do
    not need a library whose import costs 1.5 MB of RSS in a daemon that idles for days.
    Nested tables merge key by key (``[exec]`` from the file, ``RUNNER_DAEMON_EXEC__ENABLED``
    from the environment).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file is not None:
        _merge(values, _read_toml(config_file))
    _merge(values, {field: environ[name] for name, field in OPIK_ENV_NAMES.items() if environ.get(name)})
    _merge(values, _from_environment(environ))
    _merge(values, {key: value for key, value in (overrides or {}).items() if value is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, unknown="unknown setting")) from None


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist or is not a file")
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """``RUNNER_DAEMON_<FIELD>`` and ``RUNNER_DAEMON_<TABLE>__<FIELD>``, names in any case.

    A variable with the prefix that names no setting is an error, as an unknown key in the
    file is: a typo must not be ignored silently. Empty ones are ignored. Lists and tables
    are given as JSON (``RUNNER_DAEMON_DENY_PATHS='[".env"]'``).
    """
    values: dict[str, Any] = {}
    for name, raw in environ.items():
        if not raw or not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        field = _field(Settings, path[0])
        table = field is not None and len(path) == 2 and _is_model(field.annotation)
        inner = _field(field.annotation, path[1]) if field is not None and table else None
        if field is not None and len(path) == 1:
            _merge(values, {path[0]: _decode(name, raw, field.annotation)})
        elif inner is not None:
            _merge(values, {path[0]: {path[1]: _decode(name, raw, inner.annotation)}})
        else:
            guess = difflib.get_close_matches(name.upper(), environment_names(), n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            raise ConfigError(f"{name}: no such setting{hint}")
    return values


def environment_names() -> list[str]:
    """Every ``RUNNER_DAEMON_*`` name a setting answers to."""
    names = []
    for key, field in Settings.model_fields.items():
        names.append(f"{ENV_PREFIX}{key}".upper())
        if _is_model(field.annotation):
            names += [f"{ENV_PREFIX}{key}__{inner}".upper() for inner in _model_fields(field.annotation)]
    return names


def _model_fields(model: Any) -> list[str]:
    return list(model.model_fields)


def _field(model: Any, name: str) -> FieldInfo | None:
    fields: dict[str, FieldInfo] = model.model_fields
    return fields.get(name)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _decode(name: str, raw: str, annotation: Any) -> Any:
    """JSON for lists and tables, the string itself otherwise (pydantic converts it)."""
    origin = getattr(annotation, "__origin__", annotation)
    if not (_is_model(annotation) or origin in (tuple, list, dict)):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'{name}: expected JSON (e.g. ["a", "b"]), got {raw!r}: {exc.msg}') from None


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Later sources win key by key; tables merge instead of replacing each other."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
