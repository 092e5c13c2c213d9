"""A job's inputs checked against its agent's params before anything starts.

Values are cast as Opik's runner casts them (``opik.runner.in_process_loop.cast_input_value``,
2.2.x), with three differences, each a failed job instead of a surprise inside the agent:

- a required param that is missing fails (Opik calls the function without it);
- ``boolean`` takes only ``true``/``false``, ``1``/``0``, ``yes``/``no`` (in any case) or a
  JSON boolean (Opik turns any other text into ``False``);
- numbers must be finite (Opik lets ``NaN`` and ``Infinity`` through, which are not JSON).

``null`` is a value, passed on as it is (Opik too). Inputs no param names are passed on
unchanged, as Opik passes them: a function taking ``**kwargs`` (or ``opik_args``) gets them,
and a declared agent reads them from its JSON; a Python function without such a parameter
then fails with Python's own ``TypeError``, as under Opik. Inputs are data: they reach an
agent as JSON on its stdin, never through a shell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from runner_daemon.core.errors import InvalidInputs
from runner_daemon.jobs.agents import AgentSpec

BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# How much of a refused value a message quotes (the UI shows the message).
QUOTE_CHARS = 60


def validate_inputs(spec: AgentSpec, inputs: Any) -> dict[str, Any]:
    """The inputs the agent is called with, cast by param type, or :class:`InvalidInputs`.

    ``inputs`` is the job's: a JSON object, or absent (``None``), which means ``{}``.
    """
    if inputs is None:
        inputs = {}
    if not isinstance(inputs, Mapping):
        raise InvalidInputs(f"Inputs must be a JSON object, got {_json_type(inputs)}")
    values = dict(inputs)
    for param in spec.params:
        if param.name not in values:
            if param.presence != "optional":  # Opik's default presence is "required"
                raise InvalidInputs(f"Missing required param '{param.name}'")
            continue
        values[param.name] = cast_value(param.name, values[param.name], param.type)
    return values


def cast_value(name: str, value: Any, type_name: str) -> Any:
    """One value cast to ``type_name``; unknown types (``prompt``, ``prompt_commit``) as Opik:
    text as it is, objects and arrays as JSON text, anything else as ``str``."""
    if value is None:
        return None
    if type_name == "string":
        return json.dumps(value) if isinstance(value, (dict, list)) else _text(value)
    if type_name == "integer":
        return _integer(name, value)
    if type_name == "float":
        return float(_number(name, value, "a number"))
    if type_name == "number":  # TypeScript agents: any JSON number
        number = _number(name, value, "a number")
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else number
    if type_name == "boolean":
        return _boolean(name, value)
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (dict, list)) else _text(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _wrong(name, "an integer", value)
    if isinstance(value, int):
        return value
    number = _number(name, value, "an integer")
    if not number.is_integer():
        raise _wrong(name, "an integer", value)
    return int(number)


def _number(name: str, value: Any, what: str) -> float:
    if isinstance(value, (dict, list)):
        raise _wrong(name, what, value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _wrong(name, what, value) from None
    if not math.isfinite(number):
        raise _wrong(name, what, value)
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, str)):
        word = str(value).strip().lower()
        if word in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[word]
    raise _wrong(name, "a boolean", value)


def _text(value: Any) -> str:
    # Opik's str(): a JSON true becomes "True", as the Python function would print it.
    return str(value)


def _wrong(name: str, what: str, value: Any) -> InvalidInputs:
    shown = value if isinstance(value, str) else json.dumps(value)
    if len(shown) > QUOTE_CHARS:
        shown = shown[:QUOTE_CHARS] + "…"
    return InvalidInputs(f"Param '{name}' must be {what}, got {shown!r}")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
