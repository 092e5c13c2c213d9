"""The jobs capability: the user's own agents, run for Opik's Agent Playground.

A sibling of :mod:`runner_daemon.bridge` on the same core: an endpoint runner polls
``jobs/next``, runs each job in a process group of its own, streams its logs and reports its
result and trace through the outbox (``../shared/JOBS.md``).
"""
