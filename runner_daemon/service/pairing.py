"""Pairing a runner: the link for the user's browser, the wait, the bridge key.

The runner makes a random activation key, registers a pairing session with it, and shows
the user a link whose fragment (never sent to a server by a browser) carries the session,
the key, the project and the runner's name. The browser activates the session; the runner
sees its runner become ``connected`` and derives the bridge key from the activation key.

An endpoint runner (jobs) is paired headless, as ``opik endpoint --headless`` does: the
runner activates its own session with the browser's HMAC; no link, no bridge key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from runner_daemon.bridge.signing import derive_bridge_key
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import PairingExpired, RetryableError, RunnerGone
from runner_daemon.core.models import PairingActivation, PairingSessionRequest

POLL_INTERVAL_SECONDS = 2.0
RunnerType = Literal["connect", "endpoint"]
TYPE_BYTES: dict[RunnerType, int] = {"connect": 0x00, "endpoint": 0x01}
MAX_NAME_CHARS = 128
MAX_NAME_BYTES = 255


@dataclass(frozen=True, repr=False)
class PendingPairing:
    session_id: str
    runner_id: str
    project_id: str
    activation_key: bytes
    link: str

    def __repr__(self) -> str:
        return f"PendingPairing(session_id={self.session_id!r}, runner_id={self.runner_id!r})"


def check_runner_name(name: str) -> None:
    if not name.strip():
        raise ValueError("the runner name must not be empty")
    if len(name) > MAX_NAME_CHARS or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"the runner name must be at most {MAX_NAME_CHARS} characters and {MAX_NAME_BYTES} bytes"
        )


def pairing_link(
    api_url: str,
    *,
    session_id: str,
    activation_key: bytes,
    project_id: str,
    project_name: str,
    runner_name: str,
    workspace: str | None,
    runner_type: RunnerType = "connect",
) -> str:
    """The link to Opik's pairing page, with the secret part in the fragment."""
    name = runner_name.encode()
    payload = (
        uuid.UUID(session_id).bytes
        + activation_key
        + uuid.UUID(project_id).bytes
        + bytes([len(name)])
        + name
        + bytes([TYPE_BYTES[runner_type]])
    )
    fragment = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    parsed = urllib.parse.urlsplit(api_url)
    trimmed = api_url.rstrip("/")
    ui_base = (trimmed[: -len("/api")] if trimmed.endswith("/api") else trimmed) + "/"
    query = {"url": ui_base, "project": project_name}
    if workspace:
        query["workspace"] = workspace
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="")
    return f"{parsed.scheme}://{parsed.netloc}/opik/pair/v1?{encoded}#{fragment}"


def parse_link_fragment(link: str) -> tuple[str, bytes, str, str]:
    """(session_id, activation_key, project_id, runner_name) from a pairing link."""
    fragment = urllib.parse.urlsplit(link).fragment
    payload = base64.urlsafe_b64decode(fragment + "=" * (-len(fragment) % 4))
    session_id = str(uuid.UUID(bytes=payload[:16]))
    activation_key = payload[16:48]
    project_id = str(uuid.UUID(bytes=payload[48:64]))
    length = payload[64]
    runner_name = payload[65 : 65 + length].decode()
    return session_id, activation_key, project_id, runner_name


def activation_hmac(activation_key: bytes, session_id: str, runner_name: str) -> str:
    """What the browser proves it saw the link with: HMAC(key, session ‖ SHA-256(name))."""
    message = uuid.UUID(session_id).bytes + hashlib.sha256(runner_name.encode()).digest()
    return base64.b64encode(hmac.new(activation_key, message, hashlib.sha256).digest()).decode()


def approve(link: str) -> tuple[str, PairingActivation]:
    """Play the browser's part for a link: the session id and its activation request."""
    session_id, activation_key, _, runner_name = parse_link_fragment(link)
    return session_id, PairingActivation(
        runner_name=runner_name, hmac=activation_hmac(activation_key, session_id, runner_name)
    )


async def start_pairing(
    api: RunnerApi,
    api_url: str,
    *,
    project_id: str,
    project_name: str,
    runner_name: str,
    workspace: str | None,
    ttl_seconds: int,
    runner_type: RunnerType = "connect",
) -> PendingPairing:
    check_runner_name(runner_name)
    activation_key = secrets.token_bytes(32)
    session = await api.create_pairing_session(
        PairingSessionRequest(
            project_id=project_id,
            activation_key=base64.b64encode(activation_key).decode(),
            type=runner_type,
            ttl_seconds=ttl_seconds,
        )
    )
    link = pairing_link(
        api_url,
        session_id=session.session_id,
        activation_key=activation_key,
        project_id=project_id,
        project_name=project_name,
        runner_name=runner_name,
        workspace=workspace,
        runner_type=runner_type,
    )
    return PendingPairing(session.session_id, session.runner_id, project_id, activation_key, link)


async def wait_until_connected(
    api: RunnerApi,
    pending: PendingPairing,
    ttl_seconds: float,
    on_tick: Callable[[float], None] = lambda remaining: None,
    poll_interval: float = POLL_INTERVAL_SECONDS,
) -> bytes:
    """Poll the runner until the browser activated it; returns the derived bridge key."""
    deadline = time.monotonic() + ttl_seconds
    while (remaining := deadline - time.monotonic()) > 0:
        on_tick(remaining)
        try:
            runner = await api.get_runner(pending.runner_id)
        except (RunnerGone, RetryableError):
            pass  # not visible until activated; or a network blip: keep waiting
        else:
            if runner.status == "connected":
                return derive_bridge_key(pending.activation_key, pending.session_id)
        await anyio.sleep(min(poll_interval, max(remaining, 0)))
    raise PairingExpired(f"pairing expired after {ttl_seconds:g}s: the link was not opened in time")


async def pair_headless(
    api: RunnerApi,
    api_url: str,
    *,
    project_id: str,
    runner_name: str,
    workspace: str | None,
    ttl_seconds: int,
) -> PendingPairing:
    """Pair an endpoint runner without a browser: the runner activates its own session.

    Opik refuses this for a connect runner (whose bridge key must come from a browser the
    user is signed in to); an endpoint runner derives no key, so nothing is lost.
    """
    pending = await start_pairing(
        api,
        api_url,
        project_id=project_id,
        project_name=project_id,
        runner_name=runner_name,
        workspace=workspace,
        ttl_seconds=ttl_seconds,
        runner_type="endpoint",
    )
    session_id, activation = approve(pending.link)
    await api.activate_pairing_session(session_id, activation)
    return pending
