"""Starting a Faust worker process for layerwatch's app."""

from __future__ import annotations

import logging

from streams.settings import Settings

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
        import torch

        torch.set_num_threads(settings.torch_threads)  # small kernels: extra threads only wait for a busy core
    ensure_topics(settings)
    try:
        (settings.state_path / "faust").mkdir(parents=True, exist_ok=True)  # Faust's datadir: it does not create it
    except OSError as exc:
        from streams.settings import SettingsError

        raise SettingsError(f"LW_STATE_DIR={settings.state_dir}: cannot create it ({exc.strerror})") from None
    app, runtime = create_app(settings)
    level = logging.getLevelName({"warn": "WARNING", "crit": "CRITICAL"}.get(loglevel or "", (loglevel or "").upper())
                                 ) if loglevel else level_from_env(default="INFO")
    worker = Worker(app, loglevel=level, quiet=True, redirect_stdouts=False, logging_config=faust_logging_config(level))
    quiet_third_party()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        runtime.writer.close()
        runtime.store.close()
    return 0
