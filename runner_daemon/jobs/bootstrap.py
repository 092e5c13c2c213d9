"""Run one job of a discovered Python agent: ``python bootstrap.py SOURCE_FILE FUNCTION``.

A standalone script, run by the agent's own interpreter (the workspace's virtual
environment): it imports only the standard library (and ``opik`` when the agent's module
imported it), never ``runner_daemon``, and works on any Python from 3.8 on.

- **Inputs**: one JSON object on stdin (empty stdin: ``{}``), passed to the function as
  keyword arguments. A coroutine function is awaited.
- **Module**: imported by path, never as ``__main__`` (its ``if __name__ == "__main__"``
  block does not run). Its name is its path relative to the working folder (the workspace
  root), dotted (``src/app/agent.py`` → ``src.app.agent``), or the file's stem when it lies
  outside; the workspace root and the file's folder are on ``sys.path``.
- **Trace**: when the function is tracked by ``opik`` (``@opik.track``), tracing is on
  and ``OPIK_TRACE_ID`` is set, the call gets ``opik_args={"trace": {"id": OPIK_TRACE_ID}}``
  merged into its inputs, as Opik's in-process runner does, so the job's trace carries the
  id the daemon reported; ``opik.flush_tracker()`` runs before the script exits.
- **Result file** (``OPIK_RESULT_FILE``), one JSON object, UTF-8:

  - success, exit status 0: ``{"result": R}``, where R is the value Opik's runner reports:
    a dict as it is, anything else as ``{"result": value}``; a value JSON cannot hold is
    given as ``str(value)`` (nested ones too); if the whole still cannot be encoded
    (a cycle, a non-finite float), ``{"result": str(value)}``.
  - failure, exit status 1: ``{"error": "<Type>: <message>"}`` for any exception raised
    while importing the module, finding the function or calling it (a ``SystemExit`` too);
    the traceback goes to stderr, which the job's logs show.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

FLUSH_SECONDS = 30
JSON_TYPES = (dict, str, int, float, bool, list, type(None))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: bootstrap.py SOURCE_FILE FUNCTION\n")
        return 2
    source, function = argv[1], argv[2]
    # Opik's decorator starts its own runner loop in this mode: never inside a job.
    os.environ.pop("OPIK_RUNNER_MODE", None)
    try:
        inputs = read_inputs()
        func = load_function(source, function)
        value = call(func, inputs)
    except BaseException as exc:  # the job fails with it, whatever it is
        traceback.print_exc()
        write_result({"error": f"{type(exc).__name__}: {exc}"})
        flush_opik()
        return 1
    write_result(encode_result(value))
    flush_opik()
    return 0


def read_inputs() -> dict[str, Any]:
    data = sys.stdin.buffer.read()
    inputs = json.loads(data) if data.strip() else {}
    if not isinstance(inputs, dict):
        raise ValueError("the job's inputs must be a JSON object")
    return inputs


def load_function(source: str, function: str) -> Callable[..., Any]:
    import importlib.util

    path = os.path.abspath(source)
    root = os.getcwd()
    # sys.path[0] is this script's folder: the agent must not import the daemon's modules.
    sys.path[0:1] = [os.path.dirname(path), root]
    name = module_name(path, root)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    target: Any = module
    for part in function.split("."):
        if not hasattr(target, part):
            raise AttributeError(f"{source} has no function {function!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{source}:{function} is not callable")
    return target  # type: ignore[no-any-return]


def module_name(path: str, root: str) -> str:
    relative = os.path.relpath(path, root)
    if relative.startswith(os.pardir + os.sep):
        return os.path.splitext(os.path.basename(path))[0]
    parts = os.path.splitext(relative)[0].split(os.sep)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def call(func: Callable[..., Any], inputs: dict[str, Any]) -> Any:
    trace_id = os.environ.get("OPIK_TRACE_ID")
    if trace_id and getattr(func, "opik_tracked", False) and tracing_active():
        inject_trace_id(inputs, trace_id)
    value = func(**inputs)
    if inspect.isawaitable(value):
        value = asyncio.run(wait_for(value))
    return value


def tracing_active() -> bool:
    """Whether opik traces calls: with tracing off (``OPIK_TRACK_DISABLE``) its decorator
    passes ``opik_args`` on to the function, which would fail on it."""
    opik = sys.modules.get("opik")
    is_active = getattr(opik, "is_tracing_active", None)
    return bool(is_active()) if callable(is_active) else True


async def wait_for(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def inject_trace_id(inputs: dict[str, Any], trace_id: str) -> None:
    """Opik's ``_inject_trace_id``: an ``opik_args`` set to None explicitly is left alone."""
    existing = inputs.get("opik_args")
    if existing is None and "opik_args" in inputs:
        return
    opik_args = dict(existing) if isinstance(existing, dict) else {}
    trace_args = dict(opik_args.get("trace") or {})
    trace_args["id"] = trace_id
    opik_args["trace"] = trace_args
    inputs["opik_args"] = opik_args


def encode_result(value: Any) -> str:
    if not isinstance(value, JSON_TYPES):
        value = str(value)
    shaped = value if isinstance(value, dict) else {"result": value}
    try:
        return json.dumps({"result": shaped}, default=str, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({"result": {"result": str(value)}})


def write_result(payload: str | dict[str, str]) -> None:
    path = os.environ.get("OPIK_RESULT_FILE")
    if not path:
        return
    text = payload if isinstance(payload, str) else json.dumps(payload)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)


def flush_opik() -> None:
    flush = getattr(sys.modules.get("opik"), "flush_tracker", None)
    if flush is None:  # no opik, or a module of that name that is not Opik's SDK
        return
    try:
        flush(timeout=FLUSH_SECONDS)
    except Exception:  # the result is written; a lost trace must not fail the job
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
