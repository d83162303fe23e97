"""Store exceptions.

Messages never carry a password: the backends pass every message through
``redact`` with the secrets they know before raising.
"""

from __future__ import annotations

import re
from typing import Iterable

_CODE = re.compile(r"Code:\s*(\d+)")


class StoreError(Exception):
    """Any failure of the store: bad SQL, bad input, a server-side exception.

    ``code`` is the ClickHouse error code when the engine reported one.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreUnavailable(StoreError):
    """The server cannot be reached (connection refused, reset or timed out).

    Transient: the sink backs off and retries the same (idempotent) insert.
    """


def error_code(message: str) -> int | None:
    """The first ``Code: N`` in an engine message, if any."""
    m = _CODE.search(message)
    return int(m.group(1)) if m else None


def redact(message: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``message`` with ``***``."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message
