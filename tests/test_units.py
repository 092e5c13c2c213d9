"""Pure logic: backoff, timeouts, parsing and encoding, logging."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import sys
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from runner_daemon.bridge.commands import MalformedCommand, clamp_timeout, parse_command
from runner_daemon.bridge.results import MAX_PAYLOAD_CHARS, Outcome, encode_report
from runner_daemon.core import errors
from runner_daemon.core.logs import configure_logging
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.retry import Backoff
from runner_daemon.service import notify
from tests.support import DaemonProcess


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [0.5, 1, 2, 4, 4, 4, 4, 4, 4, 4]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_backoff_survives_very_many_attempts() -> None:
    backoff = Backoff(1.0, 30.0)
    backoff.attempts = 10_000
    assert 15.0 <= backoff.next_delay() <= 30.0


@pytest.mark.parametrize(
    ("given_timeout", "expected"),
    [(None, 30.0), (0, 30.0), (-5, 30.0), (1, 1.0), (45, 45.0), (300, 300.0), (301, 300.0), (10**9, 300.0)],
)
def test_clamp_timeout(given_timeout: int | None, expected: float) -> None:
    assert clamp_timeout(given_timeout) == expected


def test_parse_command_accepts_a_wire_item() -> None:
    item = {
        "command_id": "0b6e1c64-4f5e-4d5e-9f6a-2f1e2d3c4b5a",
        "type": "ReadFile",
        "args": {"path": "a"},
        "timeout_seconds": 12,
        "submitted_at": "2026-11-28T10:00:00Z",
        "future_field": 1,
    }
    parsed = parse_command(item)
    assert isinstance(parsed, BridgeCommand)
    assert (parsed.type, parsed.args, parsed.timeout_seconds) == ("ReadFile", {"path": "a"}, 12)


@pytest.mark.parametrize(
    ("item", "answerable"),
    [
        ({"command_id": "abc", "type": "ReadFile", "args": []}, True),
        ({"command_id": "abc", "args": {}}, True),
        ({"command_id": "abc", "type": "X", "timeout_seconds": "soon"}, True),
        ({"command_id": "abc", "type": "WriteFile", "args": {"content": "x" * MAX_PAYLOAD_CHARS}}, True),
        ({"type": "ReadFile"}, False),
        ({"command_id": "", "type": "ReadFile"}, False),
        ({"command_id": "a/../b", "type": "ReadFile"}, False),
        ({"command_id": 5, "type": "ReadFile"}, False),
        (None, False),
        ("text", False),
    ],
)
def test_parse_command_rejects_malformed_items(item: Any, answerable: bool) -> None:
    parsed = parse_command(item)
    if answerable:
        assert isinstance(parsed, MalformedCommand)
        assert parsed.command_id == "abc"
    else:
        assert isinstance(parsed, str)


def test_encode_report_omits_missing_fields() -> None:
    body = json.loads(encode_report(Outcome.failed("unknown_type", "Unknown command type: X")))
    assert body == {
        "status": "failed",
        "error": {"code": "unknown_type", "message": "Unknown command type: X"},
    }
    body = json.loads(encode_report(Outcome.completed({"a": 1}, 5)))
    assert body == {"status": "completed", "result": {"a": 1}, "duration_ms": 5}


def test_encode_report_replaces_an_oversized_result() -> None:
    body = json.loads(encode_report(Outcome.completed({"content": "x" * MAX_PAYLOAD_CHARS}, 9)))
    assert body["status"] == "failed"
    assert body["error"]["code"] == "result_too_large"
    assert body["duration_ms"] == 9


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_clamped_timeout_is_always_in_range(value: int) -> None:
    assert 1 <= clamp_timeout(value) <= 300


def test_logs_are_json_when_not_a_tty_and_scrub_secrets() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", secrets=["sk-abc123", 'we"ird'], stream=stream)
    log = structlog.get_logger("t")
    log.debug("hidden at info")
    log.info("command finished", command_id="c1", type="ReadFile", duration_ms=3, header="sk-abc123")
    try:
        raise ValueError('key we"ird leaked into an exception')
    except ValueError:
        log.exception("boom")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["event"] == "command finished"
    assert (first["command_id"], first["type"], first["duration_ms"]) == ("c1", "ReadFile", 3)
    assert first["header"] == "***"
    assert "sk-abc123" not in stream.getvalue()
    assert 'we\\"ird' not in stream.getvalue() and 'we"ird' not in stream.getvalue()
    assert json.loads(lines[1])["level"] == "error"


def test_console_format_is_readable() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    structlog.get_logger("t").info("runner connected", runner_id="r1")
    line = stream.getvalue()
    assert "runner connected" in line and "runner_id=r1" in line
    assert not line.startswith("{")


def test_every_line_names_the_module_that_wrote_it() -> None:
    for log_format in ("json", "console"):
        stream = io.StringIO()
        configure_logging("info", log_format, stream=stream)
        notify.log.info("from our code")
        logging.getLogger("httpx").warning("from a dependency")
        lines = stream.getvalue().splitlines()
        if log_format == "json":
            assert [json.loads(line)["logger"] for line in lines] == ["runner_daemon.service.notify", "httpx"]
        else:
            assert "runner_daemon.service.notify" in lines[0] and "httpx" in lines[1]


def test_the_exception_tree_holds_pairing_expiry_and_abandoned_work() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == errors.__name__
    ]
    in_diagram = {line.strip(" │├└─").split(" ")[0] for line in str(errors.__doc__).splitlines()}
    assert {"Abandoned", "PairingExpired"} <= {cls.__name__ for cls in classes}
    for cls in classes:
        assert issubclass(cls, errors.RunnerDaemonError)
        assert cls.__name__ in in_diagram, f"{cls.__name__} is missing from the tree diagram"


def test_reading_a_daemon_process_output_never_moves_where_it_writes() -> None:
    """The harness reads a daemon's log while it writes; no line may be lost to the reads."""
    script = "import sys\nfor i in range(3000):\n    print(f'line {i}', file=sys.stderr, flush=True)\n"
    proc = DaemonProcess([sys.executable, "-c", script], dict(os.environ))
    try:
        while proc.poll() is None:
            proc.output()
        proc.wait()
        assert proc.output()[1].splitlines() == [f"line {i}" for i in range(3000)]
    finally:
        proc.close_output()
