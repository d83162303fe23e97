"""Polling helper for tests: wait for a condition instead of sleeping."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05,
               message: str = "") -> T:
    """Call ``predicate`` until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet" (a server that is
    still starting refuses connections); the last one is reported if the
    deadline passes. Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
            result = None  # type: ignore[assignment]
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", repr(predicate))
            detail = f" (last error: {type(last_exc).__name__}: {last_exc})" if last_exc else ""
            raise TimeoutError(f"{what}: not true after {timeout:g}s{detail}")
        time.sleep(min(interval, remaining))
