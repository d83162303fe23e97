"""How layerwatch processes stop: on SIGTERM or SIGINT, cleanly and within a bound; children never outlive them.

- :func:`die_with_parent` runs in a child between fork and exec (``preexec_fn``): Linux
  sends the child SIGTERM when its parent dies, even by SIGKILL (``PR_SET_PDEATHSIG``),
  and the child gets its own process group, so a terminal's Ctrl-C reaches the parent
  only and the parent stops its children in order (publishers before the broker).
- :func:`stop_on_signals` turns the first SIGTERM or SIGINT of a plain (not asyncio)
  command into :class:`Terminated`, so ``finally`` blocks and context managers run (the
  demo's :class:`streams.stack.LocalStack` stops its children); later signals are
  ignored while that cleanup runs.
- :func:`exit_after` is the bound: once a stop began, a daemon timer ends the process
  with ``os._exit`` after ``seconds`` if the clean path hangs (a broker gone while a
  producer flushes, a store call that does not return). The worker and the model server
  start it from their own signal handling (Faust's and aiohttp's).
- :func:`exit_now` ends a process stopped by a signal once its cleanup is done, without
  interpreter finalisation: with torch loaded that took 2-7 s on a busy machine, during
  which no Python code runs (not even the watchdog) and nothing is left to flush.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

#: seconds a child process gets to stop cleanly before its watchdog ends it
SHUTDOWN_TIMEOUT_S = 6.5
#: seconds a parent waits for its children before SIGKILL (its own bound is a little longer)
CHILDREN_TIMEOUT_S = 7.5
PARENT_TIMEOUT_S = 9.5

_PR_SET_PDEATHSIG = 1
_signalled = threading.Event()


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGTERM, or SIGINT) arrived; raised once in the main thread."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


def _libc() -> Any:
    """libc, loaded in the parent: the child between fork and exec only calls into it (no dlopen there)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def die_with_parent() -> None:
    """Child-side (``preexec_fn``): SIGTERM me when my parent dies; my own process group."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    os.setpgrp()


def signalled() -> bool:
    """True once a stop signal started this process's shutdown (see :func:`exit_after`)."""
    return _signalled.is_set()


def exit_now(code: int) -> None:
    """Flush logs and standard streams, then ``os._exit(code)`` (the cleanup is done)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def exit_after(seconds: float, what: str, code: int = 70) -> threading.Timer:
    """Start the shutdown watchdog: ``os._exit(code)`` in ``seconds`` unless the process ended first."""
    _signalled.set()

    def expire() -> None:
        log.error("%s did not stop within %.0f s of the stop signal; exiting now", what, seconds)
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.name = "lw-shutdown-watchdog"
    timer.start()
    return timer


def stop_on_signals(what: str, timeout_s: float = PARENT_TIMEOUT_S) -> None:
    """Raise :class:`Terminated` in the main thread on the first SIGTERM/SIGINT, ignore the later ones.

    The watchdog (:func:`exit_after`) starts with the first signal, so the cleanup the
    exception triggers is bounded too.
    """
    stopping = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        exit_after(timeout_s, what, code=128 + signum)
        raise Terminated(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
