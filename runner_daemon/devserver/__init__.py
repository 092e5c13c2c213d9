"""An Opik-compatible server for the local-runner API, for the demo, the tests and development.

It speaks exactly the wire format of Opik's ``v1/private/local-runners`` routes, keeps its
state in memory, and adds a few ``/dev/...`` routes of its own (create a runner, inject
faults, read counters) that Opik does not have. Needs the ``devserver`` extra
(Starlette and uvicorn).
"""
