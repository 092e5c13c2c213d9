"""The command line: parse flags, load settings, set up logging, turn signals into state.

This module is the only place that handles signals, prints to the terminal for the user and
picks exit statuses; the daemon itself only reacts to :meth:`Daemon.request_stop` and
:meth:`Daemon.force_stop`.

Over 400 lines on purpose: every subcommand's body is here, so that this stays the one module
that prints to the terminal, handles signals and chooses exit statuses.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from runner_daemon import __version__
from runner_daemon.bridge.handlers import HandlerRegistry, discover
from runner_daemon.core import eventloop
from runner_daemon.core.api import RunnerApi
from runner_daemon.core.errors import (
    ApiError,
    ConfigError,
    PairingExpired,
    Unauthorized,
    describe_validation_error,
)
from runner_daemon.core.logs import Secret, configure_logging, scrub
from runner_daemon.core.settings import SECRET_ENV_NAMES, Settings, load_settings, parse_listen
from runner_daemon.core.transport import probe
from runner_daemon.service import credentials, pairing
from runner_daemon.service.daemon import Daemon, ExitStatus
from runner_daemon.service.notify import Notifier
from runner_daemon.system.environment import child_environment
from runner_daemon.system.hardening import forbid_inspection
from runner_daemon.system.protection import ProtectionProbe
from runner_daemon.system.sandbox import SandboxPolicy, SandboxSupport, sandbox_for
from runner_daemon.system.workspace import Workspace

if TYPE_CHECKING:
    from runner_daemon.jobs.agents import AgentSpec

PROG = "runner-daemon"
# Flags that map one-to-one onto settings keys.
SETTING_FLAGS = {
    "url": "Opik API base URL (env OPIK_URL_OVERRIDE)",
    "runner_id": "the paired runner's id (env RUNNER_DAEMON_RUNNER_ID)",
    "state_directory": "where `pair` keeps the runner id and bridge key",
    "bridge_key_file": "a file holding the base64 bridge key (a mounted secret)",
    "workspace_root": "folder the handlers are confined to",
    "max_concurrency": "commands run at once (default 10)",
    "shutdown_grace_seconds": "how long a stop waits for in-flight commands (default 20)",
    "log_format": "auto, json or console",
    "log_level": "debug, info, warning or error",
}


def _print_error(message: str, secrets: Iterable[Secret] = ()) -> None:
    """One line to stderr, scrubbed of ``secrets`` and of the values of the secret variables
    (an error may quote a library's message, and a library may quote a header)."""
    known = [*secrets]
    for name in SECRET_ENV_NAMES:
        value = os.environ.get(name, "")
        known += [value, value.strip()]
    print(f"{PROG}: {scrub(message, known)}", file=sys.stderr)


def _fail_config(exc: ConfigError) -> int:
    _print_error(f"config error: {exc}")
    return ExitStatus.CONFIG


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {key: getattr(args, key, None) for key in SETTING_FLAGS}
    return load_settings(args.config, overrides)


# A hang-up (closed terminal, dropped SSH session) means "stop", as for any foreground process;
# left to its default action it would kill the daemon on the spot and orphan its Exec children.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def watch_signals(daemon: Daemon) -> None:
    """First SIGINT/SIGTERM/SIGHUP drains; a second one exits at once."""
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            if daemon.stop_requested:
                daemon.force_stop(signum)
                return
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and sys.stderr.isatty():
                print(
                    "\nStopping after in-flight commands and the open poll; press Ctrl-C again to exit now.",
                    file=sys.stderr,
                )
            daemon.request_stop(name)


async def serve(
    settings: Settings, registry: HandlerRegistry, bridge_key: bytes | None, sandbox: SandboxPolicy | None
) -> int:
    notifier = Notifier.from_environ(os.environ)
    daemon = Daemon(settings, registry, bridge_key=bridge_key, sandbox=sandbox, notifier=notifier)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals, daemon)
        status = await daemon.run()
        tg.cancel_scope.cancel()
    return int(status)


def start_daemon(settings: Settings, registry: HandlerRegistry, probe: ProtectionProbe | None = None) -> int:
    """Resolve credentials, set up logging, run until stopped; the ``run`` command's body."""
    try:
        settings, bridge_key = credentials.resolve(settings)
    except ConfigError as exc:
        return _fail_config(exc)
    secrets: tuple[Secret, ...] = (*settings.secret_values(), *([bridge_key] if bridge_key else []))
    # Before anything else may log (the outbox warns about a damaged journal): one pipeline.
    configure_logging(settings.log_level, settings.log_format, secrets)
    forbid_inspection()
    try:
        sandbox, support, left_out = sandbox_for(settings, probe)
    except ConfigError as exc:
        return _fail_config(exc)
    log_sandbox(sandbox, support, left_out)
    if bridge_key is None:
        structlog.get_logger(__name__).warning(
            "accepting unsigned commands (allow_unsigned_commands = true): anyone with the API key "
            "can run commands here"
        )
    try:
        loop = eventloop.choose(settings.event_loop)
    except ConfigError as exc:
        return _fail_config(exc)
    try:
        return anyio.run(
            serve, settings, registry, bridge_key, sandbox, backend=loop.backend, backend_options=loop.options
        )
    except ConfigError as exc:  # the state directory cannot hold the outbox
        return _fail_config(exc)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception:
        structlog.get_logger(__name__).exception("the daemon failed unexpectedly")
        return ExitStatus.FAILURE


def log_sandbox(sandbox: SandboxPolicy | None, support: SandboxSupport, left_out: list[str]) -> None:
    """One line at start: what confines the processes commands start, and what cannot."""
    logger = structlog.get_logger(__name__)
    if sandbox is None:
        logger.warning('exec sandbox off ([exec] sandbox = "off"): commands run with the daemon\'s rights')
        return
    logger.info(
        "exec sandbox: Landlock",
        abi=support.abi,
        not_enforced_here=list(support.missing),
        network=sandbox.network,
        left_out=left_out,
    )


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        return _fail_config(exc)
    return start_daemon(settings, discover(), args.protection_probe)


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the running daemon's health listener says healthy (or ready, with --ready)."""
    url = args.url
    if url is None:
        try:
            settings = _settings_from(args)
        except ConfigError as exc:
            return _fail_config(exc)
        if settings.health.listen is None:
            _print_error("no health listener configured ([health] listen, or --url)")
            return ExitStatus.USAGE
        host, port = parse_listen(settings.health.listen)
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{port}"
    endpoint = url.rstrip("/") + ("/readyz" if args.ready else "/healthz")
    status = anyio.run(probe, endpoint)
    if status == 200:
        return ExitStatus.OK
    _print_error(f"{endpoint} answered {status or 'nothing'}")
    return ExitStatus.FAILURE


def cmd_pair(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
        pairing.check_runner_name(args.name)
    except ConfigError as exc:
        return _fail_config(exc)
    except ValueError as exc:
        _print_error(str(exc))
        return ExitStatus.USAGE
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    try:
        return anyio.run(_pair, settings, args)
    except KeyboardInterrupt:
        print("\npairing interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


async def _pair(settings: Settings, args: argparse.Namespace) -> int:
    if args.type == "endpoint":
        return await _pair_endpoint(settings, args)
    async with RunnerApi.from_settings(settings) as api:
        try:
            pending = await pairing.start_pairing(
                api,
                settings.url,
                project_id=str(args.project_id),
                project_name=args.project_name or str(args.project_id),
                runner_name=args.name,
                workspace=settings.workspace,
                ttl_seconds=args.ttl,
            )
        except ApiError as exc:
            return _pairing_refused("could not start pairing", exc, settings)
        print(
            f"Open this link in a browser where you are signed in to Opik:\n\n  {pending.link}\n", flush=True
        )
        if sys.stdout.isatty():
            print(terminal_qr(pending.link), flush=True)
        interactive = sys.stderr.isatty()

        def tick(remaining: float) -> None:
            if interactive:
                print(
                    f"\rwaiting for approval... {remaining:4.0f}s left ", end="", file=sys.stderr, flush=True
                )

        try:
            key = await pairing.wait_until_connected(api, pending, args.ttl, tick)
        except PairingExpired as exc:
            print(file=sys.stderr)
            _print_error(f"{exc}; run `runner-daemon pair` again", settings.secret_values())
            return ExitStatus.PAIRING_EXPIRED
    path = credentials.store(
        settings.state_directory,
        credentials.Credentials(pending.runner_id, key, settings.url),
        project_id=pending.project_id,
    )
    print(f"\npaired runner {pending.runner_id}; credentials saved to {path}", flush=True)
    print("start it with: runner-daemon run", flush=True)
    return ExitStatus.OK


def _pairing_refused(what: str, exc: ApiError, settings: Settings) -> int:
    """One line for a pairing Opik refused or could not start, and the exit status it means."""
    if isinstance(exc, Unauthorized):
        _print_error(f"{what}: {exc}", settings.secret_values())
        return ExitStatus.UNAUTHORIZED
    _print_error(f"{what}: {exc}; try again", settings.secret_values())
    return ExitStatus.PAIRING_EXPIRED


async def _pair_endpoint(settings: Settings, args: argparse.Namespace) -> int:
    """Headless, as ``opik endpoint --headless``: no link, no browser, no bridge key."""
    async with RunnerApi.from_settings(settings) as api:
        try:
            pending = await pairing.pair_headless(
                api,
                settings.url,
                project_id=str(args.project_id),
                runner_name=args.name,
                workspace=settings.workspace,
                ttl_seconds=args.ttl,
            )
        except ApiError as exc:
            return _pairing_refused("could not pair", exc, settings)
    path = credentials.store(
        settings.state_directory,
        credentials.Credentials(pending.runner_id, None, settings.url),
        project_id=pending.project_id,
        endpoint=True,
    )
    print(f"paired endpoint runner {pending.runner_id} (jobs); saved to {path}", flush=True)
    print("serve jobs with: RUNNER_DAEMON_JOBS__ENABLED=true runner-daemon run", flush=True)
    return ExitStatus.OK


def _pairing_ttl(text: str) -> int:
    """``--ttl``: refused with one line, not a list of every allowed value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 60 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{value} is not between 60 and 600")
    return value


def terminal_qr(text: str) -> str:
    """The link as a QR code for a phone, when the optional ``segno`` package is installed."""
    try:
        import segno
    except ImportError:
        return ""
    buffer = io.StringIO()
    segno.make(text, error="l").terminal(out=buffer, compact=True)
    return buffer.getvalue()


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        return _fail_config(exc)
    try:
        sandbox, support, left_out = sandbox_for(settings)
    except ConfigError as exc:
        return _fail_config(exc)
    print(f"# effective settings of {PROG} {__version__}; secrets are masked")
    try:
        # What `run` would use: the paired runner's id and key too (the key masked).
        settings, bridge_key = credentials.resolve(settings)
    except ConfigError as exc:
        print(f"# credentials: {scrub(str(exc), settings.secret_values())} (run would exit 78)")
    else:
        if bridge_key is None:
            print("# bridge key: none (allow_unsigned_commands = true: commands are not verified)")
        else:
            source = settings.bridge_key_file or settings.state_directory / credentials.CREDENTIALS_FILE
            print(f"# bridge key: *** (from {source})")
    if sandbox is None:
        print("# exec sandbox: off (commands run with the daemon's rights)")
    else:
        print(f"# exec sandbox: {support.describe()}")
        if left_out:
            print(
                f"# exec sandbox: derived paths left out (home, or holding the state): {', '.join(left_out)}"
            )
    print(scrub(settings_as_toml(settings.model_dump(mode="json")), settings.secret_values()), end="")
    return ExitStatus.OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Run one command under the rules Exec's commands get, to see what it can and cannot do."""
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        _print_error("sandbox: give a command to run, e.g. runner-daemon sandbox -- cat ~/.ssh/id_ed25519")
        return ExitStatus.USAGE
    try:
        settings = _settings_from(args)
        sandbox, support, _ = sandbox_for(settings)
    except ConfigError as exc:
        return _fail_config(exc)
    if sandbox is None:
        _print_error('sandbox: [exec] sandbox = "off": commands run unconfined')
        return ExitStatus.CONFIG
    workspace = Workspace(settings.workspace_root, settings.deny_paths, settings.deny_write_paths)
    with tempfile.TemporaryDirectory(prefix="runner-daemon-cmd-") as temporary:
        policy = sandbox.for_command(workspace, Path(temporary))
        print(
            f"{PROG} sandbox: {support.describe()}\n"
            f"  read and execute: {' '.join(policy.read)}\n"
            f"  also write: {' '.join(policy.write)}\n"
            f"  read-only inside the workspace: {' '.join(policy.protected) or '-'}\n"
            f"  TCP connect: {'allowed' if policy.network else 'denied'}; TCP bind: denied",
            file=sys.stderr,
            flush=True,
        )
        env = {**child_environment(settings), "TMPDIR": temporary}
        done = subprocess.run(policy.wrap(command), cwd=settings.workspace_root, env=env, check=False)
    return done.returncode


def cmd_agents(args: argparse.Namespace) -> int:
    """What ``[jobs]`` would register with Opik, why each agent is served, and how it runs."""
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        return _fail_config(exc)
    from runner_daemon.jobs.agents import agents_for  # the jobs package loads only where it is used

    found = agents_for(settings)
    if args.json:
        registrations = {
            name: agent.model_dump(mode="json", exclude_none=True)
            for name, agent in found.registrations().items()
        }
        print(json.dumps({"agents": registrations, "warnings": list(found.warnings)}, indent=2))
        return ExitStatus.OK
    discovery = "on" if settings.jobs.discover else "off ([jobs] discover = false)"
    print(
        f"{len(found.specs)} agent(s) would be registered; discovery {discovery} "
        f"in {settings.workspace_root}; Python agents run with {found.python}"
    )
    for spec in found.specs:
        print(describe_agent(spec))
    if found.warnings:
        print("\nwarnings:")
        for warning in found.warnings:
            print(f"  - {_printable(warning)}")
    return ExitStatus.OK


def _printable(text: str) -> str:
    """Names and docstrings come from the workspace's files: no escape sequence reaches the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)


def describe_agent(spec: AgentSpec) -> str:
    """One agent for a person: name, why it is served, its params, how a job of it runs."""
    why = f"@opik.track(entrypoint=True) at {spec.source}" if spec.language == "python" else spec.source
    params = ", ".join(f"{p.name}: {p.type} ({p.presence or 'required'})" for p in spec.params) or "none"
    lines = [
        "",
        spec.name,
        f"  found:   {why}",
        *(f"  about:   {line}" for line in spec.description.splitlines()[:1]),
        f"  params:  {params}",
        f"  timeout: {f'{spec.timeout} s' if spec.timeout else 'Opik default (1800 s)'}",
        f"  runs:    {shlex.join(spec.argv)}",
        f"  sandbox: {'on' if spec.sandbox else 'off'}",
    ]
    return "\n".join(_printable(line) for line in lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    # JSON strings and arrays of them are valid TOML; numbers print the same in both.
    return json.dumps(value, ensure_ascii=False)


def settings_as_toml(values: dict[str, Any], prefix: str = "") -> str:
    """The settings as a TOML document (tables last, named by their dotted path), unset keys
    as comments."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            tables.append(f"\n[{prefix}{key}]\n" + settings_as_toml(value, f"{prefix}{key}."))
        elif isinstance(value, dict):
            lines.append(f"{key} = {{}}\n")
        elif value is None:
            lines.append(f"# {key} = (not set)\n")
        else:
            lines.append(f"{key} = {_toml_value(value)}\n")
    return "".join(lines) + "".join(tables)


def cmd_devserver(args: argparse.Namespace) -> int:
    try:
        from pydantic import ValidationError

        from runner_daemon.devserver.faults import FaultProfile
        from runner_daemon.devserver.server import DevServer, DevServerConfig
    except ImportError as exc:
        _print_error(
            f"the dev server needs the 'devserver' extra ({exc.name} is missing): "
            "pip install 'runner-daemon[devserver]'"
        )
        return ExitStatus.FAILURE
    config = DevServerConfig(
        poll_hold_seconds=args.poll_hold_seconds,
        heartbeat_ttl_seconds=args.heartbeat_ttl_seconds,
        reaper_interval_seconds=args.reaper_interval_seconds,
    )
    # Only the --fault-* flags given make up the profile; none given: no profile at all.
    fault_flags = {
        "latency_ms": args.fault_latency_ms,
        "error_rate": args.fault_error_rate,
        "rate_limit_rate": args.fault_429_rate,
        "retry_after": args.fault_retry_after,
        "reset_rate": args.fault_reset_rate,
        "reset_after_processing_rate": args.fault_reset_after_processing_rate,
        "routes": args.fault_routes.split(",") if args.fault_routes else None,
        "seed": args.fault_seed,
        "blackout_seconds": args.fault_blackout_seconds,
        "blackout_mode": args.fault_blackout_mode,
    }
    given = {key: value for key, value in fault_flags.items() if value is not None}
    try:
        faults = FaultProfile.model_validate(given) if given else None
    except ValidationError as exc:
        _print_error(f"bad --fault-* flags: {describe_validation_error(exc)}")
        return ExitStatus.USAGE
    try:
        server = DevServer(args.host, args.port, config, state_file=args.state_file, faults=faults)
    except OSError as exc:
        _print_error(f"cannot listen on {args.host}:{args.port}: {exc.strerror}")
        return ExitStatus.FAILURE
    for _ in range(args.create_runner):
        runner = server.state.create_runner("dev-runner")
        print(f"created runner {runner.id}", flush=True)
    if args.state_file is not None:
        print(f"state kept in {args.state_file} (read at start if present, written at exit)", flush=True)
    if faults is not None:
        print(f"injecting faults: {faults.model_dump_json(exclude_defaults=True)}", flush=True)
    print(f"Opik-compatible dev server listening on {server.url}", flush=True)
    print(f"create a runner with: curl -X POST {server.url}dev/runners", flush=True)
    try:
        server.serve_forever()
    except ValueError as exc:  # an unreadable state file
        _print_error(str(exc))
        return ExitStatus.FAILURE
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled (the state is saved)
        return 128 + signal.SIGINT
    return ExitStatus.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from runner_daemon.devserver.demo import run_demo

    return run_demo(args.log_format, args.verbose)


def cmd_bench(args: argparse.Namespace) -> int:
    """Dev server, daemon (and Opik's runner) in processes of their own; see runner_daemon.bench."""
    from runner_daemon.bench import run_bench

    return run_bench(args)


# The setting flags that mean something to `pair` (it neither runs commands nor polls).
PAIR_FLAGS = ("url", "state_directory", "log_format", "log_level")


def _add_setting_flags(parser: argparse.ArgumentParser, keys: Iterable[str] = SETTING_FLAGS) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (see config/runner-daemon.toml)")
    for key in keys:
        parser.add_argument("--" + key.replace("_", "-"), dest=key, help=SETTING_FLAGS[key])


class _VersionAction(argparse.Action):
    """``--version``, with the event loop ``event_loop = "auto"`` picks here.

    Looked up only when asked: every other command (a health probe every few seconds) is
    spared importing uvloop.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        print(f"{PROG} {__version__} (event loop: {eventloop.choose('auto').name})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A local runner daemon for Opik's bridge commands."
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and event loop, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    _add_setting_flags(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate and print the effective settings")
    _add_setting_flags(check)
    check.set_defaults(func=cmd_check_config)

    confined = sub.add_parser(
        "sandbox", help="run one command as Exec would (sandboxed), to see what it can and cannot do"
    )
    _add_setting_flags(confined)
    confined.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD...", help="the command")
    confined.set_defaults(func=cmd_sandbox)

    agents = sub.add_parser("agents", help="print the agents [jobs] would register, and why each was found")
    _add_setting_flags(agents)
    agents.add_argument("--json", action="store_true", help="print what PUT .../agents would send, as JSON")
    agents.set_defaults(func=cmd_agents)

    dev = sub.add_parser("devserver", help="serve the Opik-compatible dev server")
    dev.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    dev.add_argument("--port", type=int, default=5173, help="port to listen on (5173)")
    dev.add_argument("--poll-hold-seconds", type=float, default=30.0)
    dev.add_argument("--heartbeat-ttl-seconds", type=float, default=15.0)
    dev.add_argument("--reaper-interval-seconds", type=float, default=5.0)
    dev.add_argument("--create-runner", type=int, default=0, metavar="N", help="create N runners at start")
    dev.add_argument("--state-file", type=Path, metavar="PATH", help="load state at start, save it at exit")
    faults = dev.add_argument_group("fault injection (on --fault-routes; default heartbeat,poll,report)")
    faults.add_argument("--fault-latency-ms", type=float, metavar="MS", help="delay before handling")
    faults.add_argument("--fault-error-rate", type=float, metavar="P", help="answer 500/502/503")
    faults.add_argument("--fault-429-rate", type=float, metavar="P", help="answer 429 with Retry-After")
    faults.add_argument("--fault-retry-after", type=float, metavar="SECONDS", help="for 429 answers (1)")
    faults.add_argument("--fault-reset-rate", type=float, metavar="P", help="TCP reset before handling")
    faults.add_argument(
        "--fault-reset-after-processing-rate", type=float, metavar="P", help="TCP reset after handling"
    )
    faults.add_argument(
        "--fault-routes", metavar="A,B", help="of heartbeat,poll,report,submit,pairing,runner,command; or *"
    )
    faults.add_argument("--fault-seed", type=int, metavar="N", help="seed of the fault RNG (reproducible)")
    faults.add_argument(
        "--fault-blackout-seconds", type=float, metavar="SECONDS", help="fail every non-/dev request at first"
    )
    faults.add_argument("--fault-blackout-mode", choices=["reset", "503"], help="how a blackout fails")
    dev.set_defaults(func=cmd_devserver)

    health = sub.add_parser("health", help="probe a running daemon's health listener (exit 0/1)")
    health.add_argument("--config", type=Path, help="TOML settings file, to find [health] listen")
    health.add_argument("--ready", action="store_true", help="check readiness instead of liveness")
    health.add_argument("--url", help="the listener's base URL, e.g. http://127.0.0.1:9464")
    health.set_defaults(func=cmd_health)

    pair = sub.add_parser("pair", help="pair this machine with an Opik project (once)")
    _add_setting_flags(pair, PAIR_FLAGS)
    pair.add_argument("--project-id", required=True, type=uuid.UUID, help="the Opik project's id")
    pair.add_argument("--project-name", help="the project's name, shown on the pairing page")
    pair.add_argument(
        "--name", default=f"{socket.gethostname()}-runner-daemon", help="the runner's name in Opik"
    )
    pair.add_argument(
        "--type",
        choices=["connect", "endpoint"],
        default="connect",
        help="connect: the bridge (a browser approves; default); endpoint: jobs (paired headless)",
    )
    pair.add_argument(
        "--ttl", type=_pairing_ttl, default=300, metavar="60-600", help="seconds the link is valid (300)"
    )
    pair.set_defaults(func=cmd_pair)

    demo = sub.add_parser("demo", help="dev server + daemon in one process; a few commands and jobs")
    demo.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    demo.add_argument("--verbose", action="store_true", help="log lines on stderr, not in a file")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="measure throughput, latency, CPU, memory and start-up time")
    bench.add_argument(
        "-n", "--count", type=int, help="commands to run (default 1000; --link: 20; --jobs: jobs, 50)"
    )
    bench.add_argument("--concurrency", type=int, default=10, help="the daemon's max_concurrency (10)")
    bench.add_argument("--type", default="ReadFile", choices=["ReadFile", "ListFiles"], help="command type")
    bench.add_argument("--rate", type=float, help="submit this many per second (default: a burst)")
    bench.add_argument("--window", type=int, help="most commands unfinished at once (100; --link: 1)")
    bench.add_argument(
        "--warmup", type=int, help="commands run first, not measured (min(100, count); --link: 2)"
    )
    bench.add_argument("--idle", type=float, nargs="?", const=60.0, metavar="SECONDS", help="idle run (60)")
    bench.add_argument("--compare", choices=["opik"], help="also run Opik's own bridge loop, same workload")
    bench.add_argument("--opik-python", metavar="PATH", help="a Python that imports opik (default: this one)")
    bench.add_argument(
        "--daemon-python",
        metavar="PATH",
        help="the Python that runs the daemon, e.g. a venv with runner-daemon alone (default: this one)",
    )
    bench.add_argument(
        "--opik-client",
        choices=["rest", "sdk"],
        help="Opik()'s, as Opik's runner builds it, which gzips (sdk, the default) or a bare OpikApi (rest)",
    )
    bench.add_argument(
        "--opik-plain", action="store_true", help="Opik's client sends its request bodies plain (not gzipped)"
    )
    bench.add_argument(
        "--timeout",
        type=float,
        help="seconds allowed per runner's run (120 + 0.05 x count; --link: plus each result's time over it)",
    )
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="run each runner N times, alternating; medians (1)"
    )
    bench.add_argument(
        "--jobs", action="store_true", help="job start and cancel latency instead (an endpoint runner)"
    )
    bench.add_argument(
        "--heartbeat", type=float, metavar="SECONDS", help="--jobs: the daemon's heartbeat interval (its 5)"
    )
    bench.add_argument(
        "--link",
        metavar="RATE/DELAY",
        help="the runners reach the dev server over a simulated slow link, e.g. 2mbit/40ms: RATE each "
        "way (tc tbf), DELAY each way (a proxy); root, in a network namespace of its own",
    )
    bench.add_argument(
        "--size",
        type=int,
        metavar="BYTES",
        help="ReadFile reads this many bytes of source text (--link: 512000)",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None, *, probe: ProtectionProbe | None = None) -> int:
    """``probe``: the sandbox's protection probe, begun before the imports (runner_daemon.entry)."""
    args = build_parser().parse_args(argv)
    args.protection_probe = probe
    return int(args.func(args))
