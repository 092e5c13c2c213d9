"""The environment of the processes the daemon starts: its own, without its secrets.

Exec's commands, SearchFiles' git and the jobs' agents all start from
:func:`child_environment`: the daemon's variables minus its secrets, found by name and by
value in any encoding (an agent is then given back what it needs to log traces).
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import Collection, Mapping

from runner_daemon.core.settings import SECRET_ENV_NAMES, Settings

# A secret at least this long is found inside longer values too; a shorter one only whole
# (a short one would match innocent text).
MIN_SECRET_SUBSTRING = 8


def child_environment(
    settings: Settings, environ: Mapping[str, str] | None = None, bridge_key: bytes | None = None
) -> dict[str, str]:
    """The daemon's environment without its secrets: by name, and by value in any encoding.

    A variable is dropped when its value holds the API key or the bridge key (raw bytes or
    its base64 text) raw, in hex, in base64 (standard or URL-safe, padded or not, also
    inside a longer encoded text such as ``user:key``), percent-encoded or split by white
    space. Secrets shorter than :data:`MIN_SECRET_SUBSTRING` bytes are only matched whole.
    """
    names = {*SECRET_ENV_NAMES, *settings.exec.secret_env}
    secrets = [value.encode() for value in settings.secret_values() if value]
    if bridge_key:
        secrets += [bridge_key, base64.b64encode(bridge_key)]
    needles = frozenset(form for secret in secrets for form in secret_forms(secret))
    source = os.environ if environ is None else environ
    return {
        name: value
        for name, value in source.items()
        if name not in names and not holds_secret(value, needles, secrets)
    }


def secret_forms(secret: bytes) -> set[bytes]:
    """What to look for in a value that may hold ``secret`` (empty for a short secret)."""
    if len(secret) < MIN_SECRET_SUBSTRING:
        return set()
    # Hex is matched in lower case (values are searched lower-cased too).
    forms = {secret, secret.decode("latin-1").encode(), secret.hex().encode()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        # Inside a longer encoded text the secret starts at one of three byte offsets: keep
        # the characters that depend on the secret's bytes alone.
        for offset in range(3):
            total = offset + len(secret)
            encoded = encode(bytes(offset) + secret)
            forms.add(encoded[4 if offset else 0 : 4 * (total // 3)])
    return {form for form in forms if len(form) >= MIN_SECRET_SUBSTRING}


def holds_secret(value: str, needles: Collection[bytes], secrets: Collection[bytes]) -> bool:
    """Whether ``value``, as it is or decoded, holds a needle or is a (short) secret whole."""
    raw = value.encode("utf-8", "surrogateescape")  # the bytes the child would see
    variants = {
        raw,
        b"".join(raw.split()),
        raw.lower(),
        urllib.parse.unquote_to_bytes(raw),
        raw.replace(b"\\/", b"/"),  # JSON may escape the slashes of base64 text
    }
    if any(variant.strip() in secrets for variant in variants):
        return True
    return any(needle in variant for needle in needles for variant in variants)
