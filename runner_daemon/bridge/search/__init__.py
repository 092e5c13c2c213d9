"""What only ``SearchFiles`` (:mod:`runner_daemon.bridge.handlers.search_files`) uses.

Kept out of ``bridge/handlers/`` so that package holds one module per command type, as its
discovery expects: the git-backed search, the pure-Python walk, and the lines they share.
"""
