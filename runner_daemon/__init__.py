"""runner-daemon: a long-running local runner for Opik's bridge commands."""

__version__ = "0.1.0"
