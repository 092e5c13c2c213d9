"""``runner-daemon bench``: throughput, latency, CPU, memory and start-up time of the daemon.

Every party runs in a process of its own, so their costs never mix:

- the dev server, started by :func:`~runner_daemon.bench.children.serve_devserver` in a child
  (``python -c``); its limits (pending commands, submissions per minute, how long finished
  commands are kept) are raised for the bench through the ``RD_BENCH_DEVSERVER`` variable,
  read only there;
- the daemon, ``python -m runner_daemon run`` configured by ``RUNNER_DAEMON_*`` variables,
  with a ``NOTIFY_SOCKET`` this process listens on to time spawn-to-``READY=1``;
- with ``--compare opik``, Opik's own ``BridgePollLoop`` in a driver
  (:mod:`runner_daemon.bench.opik_driver`, run by path, isolated, by the Python given with
  ``--opik-python``); ``opik`` is imported there and nowhere else;
- this process, which submits the commands as Opik's UI does and waits for each result.

With ``--repeat N`` the runners run N rounds against the one dev server, alternating (ours,
then Opik's, then ours...; each run a fresh process), and the report gives the medians of
each runner's figures and each ratio's median and min-max over the rounds' pairs.

With ``--jobs`` the daemon serves an endpoint runner instead, with one declared agent, and
this process creates and cancels jobs as Opik's playground does (:mod:`.jobs`).

With ``--link RATE/DELAY`` the bench runs itself again in a network namespace of its own,
where the runners reach the dev server through a delaying proxy whose port ``tc`` limits to
RATE (:mod:`.link`); the dev server and this process talk at loopback speed.

Latencies are the server's own times, ``completed_at - submitted_at`` of each command's
record; CPU is utime + stime and memory VmRSS / VmHWM of the runner process, from /proc.
Children are killed on any exit of the bench: an exception, Ctrl-C, SIGTERM or SIGHUP, and
(on Linux) they get SIGTERM from the kernel if the bench itself is killed.

One module per job: :mod:`.children` (spawning, killing and configuring the child processes),
:mod:`.probes` (/proc), :mod:`.load_client` (the load generator's HTTP client),
:mod:`.records` (options and figures), :mod:`.run` (the bench itself and the command's body),
:mod:`.jobs` (the ``--jobs`` run), :mod:`.link` (``--link``: the namespace, the shaping, the
proxy), :mod:`.report` (targets and output), :mod:`.opik_driver` (Opik's runner, in Opik's
venv).
"""

from runner_daemon.bench.run import run_bench

__all__ = ["run_bench"]
