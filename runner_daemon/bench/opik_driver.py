"""Opik's own runner for ``runner-daemon bench --compare opik``, run in Opik's venv.

The bench runs this file by path with the ``--opik-python`` interpreter, isolated (``-I``), so
it imports ``opik`` and the standard library only, never ``runner_daemon``: a heartbeat thread
(as Opik's Supervisor keeps) and Opik's BridgePollLoop with its ReadFile and ListFiles handlers
over the bench's workspace. It sends READY=1 to $NOTIFY_SOCKET once the first heartbeat was
answered, as runner-daemon does, so both runners' start-up times are measured alike.

argv: base URL, runner id, workspace root, "rest" (a bare OpikApi) or "sdk" (Opik().rest_client).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from opik.rest_api.client import OpikApi
from opik.runner.bridge_handlers.list_files import ListFilesHandler
from opik.runner.bridge_handlers.read_file import ReadFileHandler
from opik.runner.bridge_loop import BridgePollLoop

FIRST_HEARTBEAT_SECONDS = 30.0
HEARTBEAT_INTERVAL_SECONDS = 5.0


def make_api(url: str, client_kind: str) -> Any:
    """Opik's REST client, bare or as the SDK builds it."""
    if client_kind == "sdk":
        import opik

        client = opik.Opik(host=url, project_name="runner-daemon-bench", _show_misconfiguration_message=False)
        return client.rest_client
    return OpikApi(base_url=url.rstrip("/"))


def first_heartbeat(api: Any, runner_id: str) -> None:
    """Heartbeat until the server answers (it may still be starting), for at most 30 s."""
    deadline = time.monotonic() + FIRST_HEARTBEAT_SECONDS
    while True:
        try:
            api.runners.heartbeat(runner_id, capabilities=["bridge"])
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def beat(api: Any, runner_id: str, stop: threading.Event) -> None:
    """Heartbeat every 5 s until stopped; a missed one is retried at the next."""
    while not stop.wait(HEARTBEAT_INTERVAL_SECONDS):
        with suppress(Exception):
            api.runners.heartbeat(runner_id, capabilities=["bridge"])


def main() -> None:
    url, runner_id, root, client_kind = sys.argv[1:5]
    api = make_api(url, client_kind)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    first_heartbeat(api, runner_id)
    threading.Thread(target=beat, args=(api, runner_id, stop), name="heartbeat", daemon=True).start()
    handlers = {"ReadFile": ReadFileHandler(Path(root)), "ListFiles": ListFilesHandler(Path(root))}
    loop = BridgePollLoop(api, runner_id, handlers, stop)
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(b"READY=1", address)
    loop.run()


if __name__ == "__main__":
    main()
