"""Exec under attack: processes that try to outlive their command or the daemon, and children
that try to read the daemon's secrets (its environment, /proc, its memory)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner_daemon.auth import encode_bridge_key
from runner_daemon.handlers.exec import child_environment
from runner_daemon.models import BridgeCommand
from runner_daemon.outcome import Outcome
from runner_daemon.processes import group_alive
from runner_daemon.settings import load_settings
from tests.support import executor_for, until

pytestmark = [pytest.mark.anyio, pytest.mark.adversarial]

# Test secrets: a bridge key without NUL bytes (it goes into an environment variable raw).
BRIDGE_KEY = bytes(byte % 255 + 1 for byte in hashlib.sha256(b"bridge key under test").digest())
KEY_TEXT = encode_bridge_key(BRIDGE_KEY)
API_KEY = "opik-api-key-" + hashlib.sha256(b"api key under test").hexdigest()[:24]


def b64(data: bytes | str, urlsafe: bool = False) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


# Every way an operator might have put one of the keys into the daemon's environment.
LEAKY_VALUES = {
    "bridge_key_text": KEY_TEXT,
    "bridge_key_text_wrapped": f"  {KEY_TEXT[:20]}\n{KEY_TEXT[20:]}\n",
    "bridge_key_hex": BRIDGE_KEY.hex(),
    "bridge_key_HEX": BRIDGE_KEY.hex().upper(),
    "bridge_key_urlsafe_unpadded": b64(BRIDGE_KEY, urlsafe=True).rstrip("="),
    "bridge_key_raw_bytes": BRIDGE_KEY.decode("utf-8", "surrogateescape"),
    "bridge_key_as_latin1": BRIDGE_KEY.decode("latin-1"),
    "bridge_key_text_in_base64": b64(KEY_TEXT),
    "bridge_key_text_percent_encoded": urllib.parse.quote(KEY_TEXT, safe=""),
    "bridge_key_in_json": json.dumps({"key": KEY_TEXT}).replace("/", "\\/"),
    "bridge_key_in_url": f"https://deploy:{urllib.parse.quote(KEY_TEXT, safe='')}@example.com/hook",
    "api_key_base64": b64(API_KEY),
    "api_key_in_basic_auth": "Basic " + b64(f"user:{API_KEY}"),
    "api_key_in_bearer": f"Bearer {API_KEY}",
    "api_key_hex": API_KEY.encode().hex(),
    "api_key_urlsafe_in_text": "x" + b64("ab" + API_KEY + "cd", urlsafe=True),
}


@pytest.mark.parametrize("value", LEAKY_VALUES.values(), ids=LEAKY_VALUES.keys())
def test_child_environment_drops_both_keys_in_any_encoding(tmp_path: Path, value: str) -> None:
    settings = load_settings(None, {"workspace_root": tmp_path, "api_key": API_KEY})
    environ = {"PATH": "/bin", "DEPLOY_BRIDGE_KEY": value}
    assert child_environment(settings, environ, BRIDGE_KEY) == {"PATH": "/bin"}


def test_child_environment_keeps_innocent_values(tmp_path: Path) -> None:
    settings = load_settings(None, {"workspace_root": tmp_path, "api_key": "short"})
    innocent = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/home/runner",
        "OTHER_KEY": b64(hashlib.sha256(b"another key").digest()),
        "PART_OF_KEY": KEY_TEXT[:6],
        "SHORT_KEY_INSIDE": "not-short-at-all",  # a short secret is only matched whole
        "EMPTY": "",
    }
    assert child_environment(settings, innocent, BRIDGE_KEY) == innocent
    assert child_environment(settings, {**innocent, "COPY": " short\n"}, BRIDGE_KEY) == innocent


# --- nothing outlives a foreground command ------------------------------------------------


def process_gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


def pid_in(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else None


async def read_pid(path: Path) -> int:
    await until(lambda: pid_in(path))
    pid = pid_in(path)
    assert pid is not None
    return pid


def result_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.status == "completed", outcome.error
    assert outcome.result is not None
    return outcome.result


@contextlib.contextmanager
def killed_at_exit(pids: list[int]) -> Iterator[None]:
    """A failing test must not leave its sleepers (or their groups) behind."""
    try:
        yield
    finally:
        for pid in pids:
            if not process_gone(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if group_alive(pid):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "command",
    [
        "sleep 100 >/dev/null 2>&1 & echo $! > left.pid",
        "(trap '' TERM; exec sleep 100) >/dev/null 2>&1 & echo $! > left.pid",
        "nested() { sleep 100; }; nested </dev/null >/dev/null 2>&1 & echo $! > left.pid; exit 3",
    ],
    ids=["detached", "ignores_sigterm", "non_zero_exit"],
)
async def test_a_foreground_command_leaves_no_process_behind(workspace: Path, command: str) -> None:
    outcome = await executor_for(workspace).execute(
        BridgeCommand(command_id="c", type="Exec", args={"command": command})
    )
    left = await read_pid(workspace / "left.pid")
    with killed_at_exit([left]):
        assert result_of(outcome)["exit_code"] in (0, 3)
        await until(lambda: process_gone(left), timeout=20)
