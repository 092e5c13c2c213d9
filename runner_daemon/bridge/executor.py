"""Execute: one command through its handler, under its time limit, into an :class:`Outcome`.

It knows nothing of polling or reporting: given a parsed command it checks its signature
(and, when asked, that the signature was never used before), finds the handler, validates
the arguments and runs it; every way this can end is an outcome, never an exception.
"""

from __future__ import annotations

import time

import anyio
import structlog
from pydantic import ValidationError

from runner_daemon.bridge.commands import clamp_timeout
from runner_daemon.bridge.handlers import HandlerRegistry
from runner_daemon.bridge.handlers.base import HandlerContext, HandlerServices
from runner_daemon.bridge.results import Outcome
from runner_daemon.bridge.signing import HMAC_FIELD, verify_command
from runner_daemon.core.errors import CommandFailed, JournalUnavailable, describe_validation_error
from runner_daemon.core.models import BridgeCommand
from runner_daemon.core.outbox import Outbox, signature_digest
from runner_daemon.core.settings import Settings
from runner_daemon.system.workspace import Workspace

log = structlog.get_logger(__name__)


def elapsed_ms(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


class Executor:
    """Runs one command through its handler under its time limit; never raises."""

    def __init__(
        self,
        registry: HandlerRegistry,
        settings: Settings,
        services: HandlerServices,
        bridge_key: bytes | None = None,
        *,
        signatures: Outbox | None = None,
    ) -> None:
        """``signatures``: where accepted signatures are remembered (``reject_replayed_signatures``)."""
        if settings.reject_replayed_signatures and bridge_key is not None and signatures is None:
            raise ValueError("reject_replayed_signatures needs the outbox to remember signatures")
        self._registry = registry
        self._settings = settings
        self._services = services
        self._signatures = signatures
        self._bridge_key = bridge_key
        self._workspace = Workspace(settings.workspace_root, settings.deny_paths, settings.deny_write_paths)

    async def execute(self, command: BridgeCommand) -> Outcome:
        # Authenticity first: an unsigned or tampered command touches nothing.
        if self._bridge_key is not None and not verify_command(self._bridge_key, command.type, command.args):
            log.warning("rejected a command whose signature does not verify", command_id=command.command_id)
            return Outcome.failed("auth_failed", "Invalid command HMAC")
        if self._signatures is not None and self._bridge_key is not None:
            refused = await self._claim_signature(self._signatures, command)
            if refused is not None:
                return refused
        raw_args = {key: value for key, value in command.args.items() if key != HMAC_FIELD}
        handler = self._registry.get(command.type)
        if handler is None:
            # No duration, as Opik's runner: nothing ran.
            return Outcome.failed("unknown_type", f"Unknown command type: {command.type}")
        if handler.mutating and self._settings.read_only:
            return Outcome.failed(
                "read_only", f"{command.type} is disabled: the runner is read-only (read_only = true)"
            )
        try:
            args = handler.parse(raw_args)
        except ValidationError as exc:
            return Outcome.failed("invalid_args", describe_validation_error(exc))
        limit = clamp_timeout(command.timeout_seconds)
        ctx = HandlerContext(self._workspace, self._settings, self._services)
        start = time.monotonic()
        try:
            with anyio.move_on_after(limit) as deadline:
                result = await handler.run(args, ctx)
        except CommandFailed as exc:
            return Outcome.failed(exc.code, exc.message, elapsed_ms(start))
        except Exception:
            log.exception("handler raised", command_id=command.command_id, type=command.type)
            return Outcome.failed("internal", "Internal error", elapsed_ms(start))
        finally:
            ctx.stop.set()  # tells an abandoned worker thread to give up
        if deadline.cancelled_caught:
            return Outcome.failed("timeout", f"Command timed out after {limit:g}s", elapsed_ms(start))
        return Outcome.completed(result, elapsed_ms(start))

    @staticmethod
    async def _claim_signature(signatures: Outbox, command: BridgeCommand) -> Outcome | None:
        """Refuse a signature accepted before: a verbatim replay by whoever holds the API key."""
        digest = signature_digest(str(command.args.get(HMAC_FIELD)))
        try:
            fresh = await signatures.claim_signature(digest)
        except JournalUnavailable as exc:
            return Outcome.failed("internal", f"Not run: {exc}")
        if fresh:
            return None
        log.warning("refused a replayed command signature", command_id=command.command_id, type=command.type)
        return Outcome.failed(
            "auth_failed",
            "Replayed command: this runner already accepted a command with this signature "
            "(reject_replayed_signatures = true)",
        )
