"""Who sent a request: client identities a model server can rely on (pure; no I/O, no settings).

Probing detection, throttling and blocking key on the client id, so the id must not be
whatever the client says it is. In order:

1. an API key (``Authorization: Bearer <key>`` or ``X-Api-Key: <key>``) found in the
   key table gives that key's client id; a key that is not in the table is refused;
2. ``X-Client-Id``, only when the server is told to trust it (``trust_header``: a proxy
   of yours authenticates clients and sets it, and strips it from outside requests);
3. otherwise the peer address: a client that rotates ``X-Client-Id`` stays one client.

With ``require_key`` every request needs a known key. The key table maps keys to client
ids; it holds SHA-256 digests only (:func:`parse_client_keys` hashes plain keys, or takes
``sha256:<hex>`` entries), so a key is never kept nor compared in the clear.

Ground truth (``X-Attack`` / ``X-Truth``, the columns a simulator fills so that
detection can be scored) is written only by a request that carries the ground-truth
token in ``X-Ground-Truth-Token`` (:func:`ground_truth_allowed`); without a configured
token no request may write it.

The module is shared: the model server (``workers/inference/server.py``) uses it, and an
application that wraps its own model with ``layerwatch.Monitor`` can resolve the client
id of each request the same way before passing it on.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Mapping

MAX_CLIENT_ID = 128
KEY_HEADER = "X-Api-Key"
CLIENT_HEADER = "X-Client-Id"
GROUND_TRUTH_HEADER = "X-Ground-Truth-Token"


class UnknownKey(ValueError):
    """The request carries an API key that is not in the key table (or none where one is required)."""


def key_digest(key: str) -> str:
    """The SHA-256 hex digest the key table stores for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_client_keys(text: str) -> dict[str, str]:
    """A ``LW_CLIENT_KEYS`` file's text as {sha256 digest of key: client id}.

    One entry per line, ``<key> <client id>`` (whitespace between); the key is a plain
    key or ``sha256:<64 hex digits>``; ``#`` starts a comment. A bad line is an error
    naming its line number (never its content: it holds a key).
    """
    table: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not valid_client_id(parts[1]):
            raise ValueError(f"client keys line {number}: expected '<key> <client id>'")
        key, client = parts
        if key.startswith("sha256:"):
            digest = key[7:].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"client keys line {number}: sha256: needs 64 hex digits")
        else:
            digest = key_digest(key)
        table[digest] = client
    return table


def keys_by_client(text: str) -> dict[str, str]:
    """{client id: plain key} of a key file's plain entries (a simulator sends them; hashed entries are skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and not parts[0].startswith("sha256:"):
            out[parts[1]] = parts[0]
    return out


def valid_client_id(value: str) -> bool:
    return 0 < len(value) <= MAX_CLIENT_ID and value.isprintable() and not value.isspace()


@dataclass(frozen=True)
class IdentityPolicy:
    """How a request's client id is decided (see the module doc)."""

    keys: Mapping[str, str] = field(default_factory=dict)  # sha256 digest of key -> client id
    trust_header: bool = False
    require_key: bool = False

    def client_id(self, headers: Mapping[str, str], peer: str | None) -> str:
        """The client id of a request with these headers from ``peer``; raises :class:`UnknownKey`."""
        key = presented_key(headers)
        if key:
            client = self.keys.get(key_digest(key))
            if client is None:
                raise UnknownKey("unknown API key")
            return client
        if self.require_key:
            raise UnknownKey("an API key is required")
        if self.trust_header:
            claimed = (headers.get(CLIENT_HEADER) or "").strip()
            if valid_client_id(claimed):
                return claimed
        return peer or "unknown"


def presented_key(headers: Mapping[str, str]) -> str:
    """The API key a request carries (``X-Api-Key`` or a bearer token), "" when none."""
    key = (headers.get(KEY_HEADER) or "").strip()
    if key:
        return key
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def ground_truth_allowed(headers: Mapping[str, str], token: str) -> bool:
    """True when ``token`` is configured and the request carries it in ``X-Ground-Truth-Token``."""
    given = (headers.get(GROUND_TRUTH_HEADER) or "").strip()
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())
