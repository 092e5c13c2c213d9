"""Command authenticity: the bridge key, HMAC signatures of commands and results.

The bridge key is derived during pairing from a secret only the runner and the user's
browser hold. The browser signs every command with it; the runner refuses a command whose
signature does not verify, and signs its results so the browser can tell them genuine. A
stolen Opik API key alone can queue commands, but cannot sign them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from typing import Any

HMAC_FIELD = "_hmac"
BRIDGE_KEY_INFO = b"opik-bridge-v1"
BRIDGE_KEY_BYTES = 32


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 extract-then-expand; one block is enough for the 32-byte key."""
    if not 0 < length <= hashlib.sha256().digest_size:
        raise ValueError("one HKDF-SHA256 block yields 1 to 32 bytes")
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def derive_bridge_key(activation_key: bytes, session_id: str) -> bytes:
    return hkdf_sha256(activation_key, uuid.UUID(session_id).bytes, BRIDGE_KEY_INFO, BRIDGE_KEY_BYTES)


def _canonical(label: str, payload: dict[str, Any]) -> bytes:
    # Opik's form: the label, then JSON with sorted keys, no spaces, ASCII escapes.
    return label.encode("utf-8") + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(bridge_key: bytes, label: str, payload: dict[str, Any]) -> str:
    """base64(HMAC-SHA256(key, label ‖ canonical JSON of payload))."""
    return base64.b64encode(
        hmac.new(bridge_key, _canonical(label, payload), hashlib.sha256).digest()
    ).decode()


def verify_command(bridge_key: bytes, command_type: str, args: dict[str, Any]) -> bool:
    """Whether ``args[_hmac]`` signs the command; compared in constant time."""
    claimed = args.get(HMAC_FIELD)
    if not isinstance(claimed, str) or not claimed:
        return False
    unsigned = {key: value for key, value in args.items() if key != HMAC_FIELD}
    try:
        expected = sign(bridge_key, command_type, unsigned)
    except (TypeError, ValueError):  # args JSON cannot encode: it was never signed
        return False
    return hmac.compare_digest(expected.encode(), claimed.encode("utf-8", "replace"))


def sign_result(bridge_key: bytes, status: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """The result with its ``_hmac``; an absent result is signed as ``{}``."""
    unsigned = {key: value for key, value in (result or {}).items() if key != HMAC_FIELD}
    return {**unsigned, HMAC_FIELD: sign(bridge_key, status, unsigned)}


def decode_bridge_key(text: str) -> bytes:
    """A bridge key from its base64 form, as stored in a key file or the state directory."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the bridge key is not valid base64") from None
    if len(key) != BRIDGE_KEY_BYTES:
        raise ValueError(f"the bridge key must be {BRIDGE_KEY_BYTES} bytes, got {len(key)}")
    return key


def encode_bridge_key(key: bytes) -> str:
    return base64.b64encode(key).decode()
