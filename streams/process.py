"""Starting a Faust worker process for layerwatch's app, and stopping it within a bound.

Faust's worker handles SIGTERM and SIGINT itself: it stops the consumer (committing the
acked offsets), the stages (``runtime.stop`` on ``app.on_before_shutdown``), flushes the
producer and closes the loop. :class:`BoundedWorker` adds the watchdog of
:mod:`streams.shutdown`, so a shutdown that hangs (a broker that vanished, a running
store call) still ends the process within ``SHUTDOWN_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
from typing import Any

from streams.settings import Settings
from streams.shutdown import SHUTDOWN_TIMEOUT_S, exit_after

log = logging.getLogger(__name__)


def run_worker(settings: Settings, loglevel: str | None = None) -> int:
    """Check the broker, create the topics, open the store and run the worker until stopped."""
    from streams.broker import require_broker

    require_broker(settings.kafka_bootstrap)  # before the heavy imports: a missing broker is said at once
    from faust.worker import Worker

    from streams.app import create_app
    from streams.kafka import ensure_topics
    from streams.logs import faust_logging_config, level_from_env, quiet_third_party

    if settings.torch_threads > 0:
        limit_threads(settings.torch_threads)
    ensure_topics(settings)
    try:
        (settings.state_path / "faust").mkdir(parents=True, exist_ok=True)  # Faust's datadir: it does not create it
    except OSError as exc:
        from streams.settings import SettingsError

        raise SettingsError(f"LW_STATE_DIR={settings.state_dir}: cannot create it ({exc.strerror})") from None
    app, runtime = create_app(settings)
    level = logging.getLevelName({"warn": "WARNING", "crit": "CRITICAL"}.get(loglevel or "", (loglevel or "").upper())
                                 ) if loglevel else level_from_env(default="INFO")
    worker = bounded_worker(Worker)(app, loglevel=level, quiet=True, redirect_stdouts=False,
                                    logging_config=faust_logging_config(level))
    quiet_third_party()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        runtime.writer.close()
        runtime.store.close()  # releases the chDB path lock
    return 0


def bounded_worker(worker_class: Any) -> Any:
    """A subclass of Faust's Worker that starts the shutdown watchdog with the first stop signal."""

    class BoundedWorker(worker_class):  # type: ignore[misc, valid-type]
        def _schedule_shutdown(self, signal: Any) -> None:  # mode.Worker: called on SIGTERM and SIGINT
            if not self._signal_stop_time:
                exit_after(SHUTDOWN_TIMEOUT_S, "the worker", code=128 + int(signal))
            super()._schedule_shutdown(signal)

    return BoundedWorker


def limit_threads(n: int) -> None:
    """At most ``n`` torch intra-op threads and ``n`` numpy BLAS threads for this whole process.

    Window-sized kernels gain nothing from more threads; BLAS threads spin while they wait, so
    several stage threads (or several workers on one host) each calling a multi-threaded BLAS
    oversubscribe the cores.
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n, user_api="blas")  # applied when created, and kept: it is never exited
