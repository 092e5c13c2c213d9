"""Where a paired runner's id and bridge key live between runs.

``pair`` stores them in the state directory (``$STATE_DIRECTORY`` under systemd, else
``$XDG_STATE_HOME/runner-daemon`` or ``~/.local/state/runner-daemon``) as one JSON file,
mode 0600 in a 0700 folder, written atomically. ``run`` loads them; a flag or environment
variable for the runner id, and a key file (a mounted secret in a container), override them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from runner_daemon.bridge.signing import decode_bridge_key, encode_bridge_key
from runner_daemon.core.errors import ConfigError
from runner_daemon.core.settings import Settings
from runner_daemon.core.statedir import write_private_file

CREDENTIALS_FILE = "credentials.json"
# The endpoint runner (jobs): its id only, since an endpoint runner has no bridge key.
ENDPOINT_FILE = "endpoint-runner.json"


@dataclass(frozen=True, repr=False)
class Credentials:
    """A runner id and, when paired, its bridge key. ``repr()`` never shows the key."""

    runner_id: str
    bridge_key: bytes | None = None
    url: str | None = None

    def __repr__(self) -> str:
        key = "set" if self.bridge_key else "none"
        return f"Credentials(runner_id={self.runner_id!r}, bridge_key=<{key}>)"


def store(
    directory: Path, credentials: Credentials, project_id: str | None = None, *, endpoint: bool = False
) -> Path:
    """Write the credentials atomically, 0600 in a 0700 folder; returns the file's path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    document = {
        "runner_id": credentials.runner_id,
        "bridge_key": encode_bridge_key(credentials.bridge_key) if credentials.bridge_key else None,
        "url": credentials.url,
        "project_id": project_id,
        "paired_at": datetime.now(UTC).isoformat(),
    }
    target = directory / (ENDPOINT_FILE if endpoint else CREDENTIALS_FILE)
    write_private_file(target, json.dumps(document, indent=2).encode())
    return target


def load(directory: Path, *, endpoint: bool = False) -> Credentials | None:
    """The stored credentials, None when nothing was paired; ``ConfigError`` when unusable."""
    path = directory / (ENDPOINT_FILE if endpoint else CREDENTIALS_FILE)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"credentials: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        # Not the decoder's message: it may quote a byte of the key.
        raise ConfigError(f"credentials: {path} is not valid JSON; pair again") from None
    if not isinstance(document, dict) or not isinstance(document.get("runner_id"), str):
        raise ConfigError(f"credentials: {path} has no runner_id; pair again")
    key_text = document.get("bridge_key")
    try:
        key = decode_bridge_key(key_text) if isinstance(key_text, str) else None
    except ValueError as exc:
        raise ConfigError(f"credentials: {path}: {exc}; pair again") from None
    url = document.get("url")
    return Credentials(document["runner_id"], key, url if isinstance(url, str) else None)


def read_key_file(path: Path) -> bytes:
    """The key in a file; surrounding whitespace (a secret's trailing newline) is trimmed.

    The file is read as bytes and checked as ASCII here, so no decoding error can quote a
    byte of the key in a message.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"bridge_key_file: cannot read {path}: {exc.strerror}") from None
    if not data.isascii():
        raise ConfigError(f"bridge_key_file: {path}: the bridge key is not valid base64") from None
    try:
        return decode_bridge_key(data.decode("ascii"))
    except ValueError as exc:
        raise ConfigError(f"bridge_key_file: {path}: {exc}") from None


def resolve(settings: Settings) -> tuple[Settings, bytes | None]:
    """The settings with the effective runner ids, and the bridge key to verify commands with.

    A runner id from flags or the environment wins over the stored one; a key file wins over
    the stored key, which is used only for the runner it was paired for. Only what an
    enabled capability needs is required.
    """
    key: bytes | None = None
    if settings.bridge.enabled:
        settings, key = _resolve_bridge(settings)
    if settings.jobs.enabled and settings.jobs.runner_id is None:
        stored = load(settings.state_directory, endpoint=True)
        if stored is None:
            raise ConfigError(
                f"jobs.runner_id: not set and no paired endpoint runner in {settings.state_directory}; "
                "run `runner-daemon pair --type endpoint`, or set RUNNER_DAEMON_JOBS__RUNNER_ID"
            )
        jobs = settings.jobs.model_copy(update={"runner_id": _uuid(stored.runner_id)})
        settings = settings.model_copy(update={"jobs": jobs})
    return settings, key


def _uuid(runner_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(runner_id)
    except ValueError:
        raise ConfigError(f"credentials: stored runner_id {runner_id!r} is not a UUID; pair again") from None


def _resolve_bridge(settings: Settings) -> tuple[Settings, bytes | None]:
    stored = load(settings.state_directory)
    if settings.runner_id is not None:
        runner_id = str(settings.runner_id)
    elif stored is not None:
        runner_id = stored.runner_id
    else:
        raise ConfigError(
            f"runner_id: not set and no paired runner in {settings.state_directory}; "
            "run `runner-daemon pair`, or pass --runner-id / RUNNER_DAEMON_RUNNER_ID"
        )
    if settings.bridge_key_file is not None:
        key: bytes | None = read_key_file(settings.bridge_key_file)
    else:
        key = stored.bridge_key if stored is not None and stored.runner_id == runner_id else None
    if key is None and not settings.allow_unsigned_commands:
        raise ConfigError(
            f"bridge key: none for runner {runner_id}, so commands could not be verified; pair with "
            "`runner-daemon pair`, set bridge_key_file, or set allow_unsigned_commands = true "
            "(local development only)"
        )
    return settings.model_copy(update={"runner_id": _uuid(runner_id)}), key
