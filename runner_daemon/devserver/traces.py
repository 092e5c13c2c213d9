"""The traces and spans Opik's SDK sends from inside an agent, kept so a job's trace reads back.

Only what the SDK needs to work unchanged (``is-alive/ping``, ``traces/batch``,
``spans/batch``) and what the tests and the demo read (``GET /dev/traces/{id}``). Bounded: the
oldest trace goes when a new one would pass ``max_traces``, and spans past
``max_spans_per_trace`` are dropped.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from runner_daemon.devserver.records import ApiFailure

# What Opik answers on GET is-alive/ping when healthy.
PING_ANSWER = {"message": "Healthy Server", "healthy": True}


@dataclass
class TraceRecord:
    trace: dict[str, Any] | None = None
    spans: dict[str, dict[str, Any]] = field(default_factory=dict)  # by span id, in arrival order

    def as_view(self) -> dict[str, Any]:
        return {"trace": self.trace, "spans": list(self.spans.values())}


def _v7(value: Any, what: str) -> str:
    """Opik refuses ingested ids that are not version-7 UUIDs (it also checks their time)."""
    try:
        parsed = uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != 7:
        raise ApiFailure(400, f"{what} must be a version 7 UUID")
    return str(parsed)


def _items(body: Any, key: str) -> list[dict[str, Any]]:
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ApiFailure(422, f"{key} must be a list of objects")
    return items


class TraceStore:
    def __init__(self, max_traces: int, max_spans_per_trace: int) -> None:
        self._traces: OrderedDict[str, TraceRecord] = OrderedDict()
        self._max_traces = max_traces
        self._max_spans = max_spans_per_trace

    def _record(self, trace_id: str) -> TraceRecord:
        record = self._traces.get(trace_id)
        if record is None:
            record = self._traces[trace_id] = TraceRecord()
            while len(self._traces) > self._max_traces:
                self._traces.popitem(last=False)
        return record

    def add_traces(self, body: Any) -> None:
        """``POST v1/private/traces/batch``: all or nothing, a repeated id in one batch is 422."""
        items = _items(body, "traces")
        ids = [_v7(item.get("id"), "id") for item in items]
        for trace_id in ids:
            if ids.count(trace_id) > 1:
                raise ApiFailure(422, f"Duplicate trace id '{trace_id}'")
        for trace_id, item in zip(ids, items, strict=True):
            record = self._record(trace_id)
            record.trace = {**(record.trace or {}), **item, "id": trace_id}

    def add_spans(self, body: Any) -> None:
        """``POST v1/private/spans/batch``; a span may come before its trace."""
        items = _items(body, "spans")
        keyed = [(_v7(item.get("trace_id"), "trace_id"), _v7(item.get("id"), "id"), item) for item in items]
        for trace_id, span_id, item in keyed:
            spans = self._record(trace_id).spans
            if span_id in spans or len(spans) < self._max_spans:
                spans[span_id] = {**spans.get(span_id, {}), **item, "id": span_id, "trace_id": trace_id}

    def ids(self) -> list[str]:
        """The ids of the traces kept, oldest first."""
        return list(self._traces)

    def view(self, trace_id: str) -> dict[str, Any]:
        try:
            record = self._traces[str(uuid.UUID(trace_id))]
        except (KeyError, ValueError):
            raise ApiFailure(404, "Trace not found") from None
        return record.as_view()
