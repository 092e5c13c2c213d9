"""Prometheus metrics, read at scrape time from the daemon's own counters.

A custom collector over :class:`~runner_daemon.bridge.stats.LoopStats` keeps one source of truth:
nothing is counted twice, and each daemon has its own registry (no process globals).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from runner_daemon.bridge.stats import DURATION_BUCKETS, LoopStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonView(Protocol):
    stats: LoopStats

    @property
    def in_flight(self) -> int: ...

    def ready(self) -> bool: ...

    def seconds_since_contact(self) -> float: ...


class _DaemonCollector(Collector):
    def __init__(self, daemon: DaemonView) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        stats = self._daemon.stats
        commands = CounterMetricFamily(
            "runner_daemon_commands", "Commands reported, by type and status.", labels=["type", "status"]
        )
        for (command_type, status), count in sorted(stats.outcomes.items()):
            commands.add_metric([command_type, status], count)
        yield commands
        durations = HistogramMetricFamily(
            "runner_daemon_command_duration_seconds", "Handler run time, by command type.", labels=["type"]
        )
        for command_type, counts in sorted(stats.duration_buckets.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            durations.add_metric([command_type], cumulative, stats.duration_sums[command_type])
        yield durations
        yield GaugeMetricFamily(
            "runner_daemon_commands_in_flight",
            "Commands claimed, not yet reported.",
            value=self._daemon.in_flight,
        )
        yield GaugeMetricFamily(
            "runner_daemon_ready",
            "1 when connected and not draining.",
            value=1 if self._daemon.ready() else 0,
        )
        yield GaugeMetricFamily(
            "runner_daemon_seconds_since_contact",
            "Since Opik last answered a heartbeat or a poll (+Inf before it ever did): an outage.",
            value=self._daemon.seconds_since_contact(),
        )
        yield CounterMetricFamily("runner_daemon_poll_errors", "Failed polls.", value=stats.poll_errors)
        yield CounterMetricFamily(
            "runner_daemon_reports_retried", "Result reports sent again.", value=stats.report_retries
        )
        yield CounterMetricFamily(
            "runner_daemon_reports_already_done", "Reports answered 409.", value=stats.already_reported
        )
        yield CounterMetricFamily(
            "runner_daemon_results_dropped", "Results that could not be delivered.", value=stats.dropped
        )


def metrics_registry(daemon: DaemonView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DaemonCollector(daemon))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
