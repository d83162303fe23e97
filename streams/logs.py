"""Logging for every layerwatch process: one plain format, colours only on a terminal, third-party noise filtered.

``configure(level)`` is called by the CLI before a command runs; ``faust_logging_config``
gives the Faust worker the same handler (mode would otherwise install colorlog's, which
writes terminal control codes into log files).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (logger, message fragment): warnings that say nothing a layerwatch user can act on.
NOISE = (
    # kafka-python, with Tansu (or any user config it finds conflicting): the producers work the same without it
    ("kafka.producer.kafka", "Idempotence will be disabled"),
    # kafka-python's I/O thread timing itself on a busy machine: nothing the user can change
    ("kafka.net.selector", "It is blocking the event loop"),
    # Faust after the first rebalance of a fresh worker: an internal sensor's bookkeeping
    ("faust.app.base", "Missing sensor state for rebalance"),
)


THIRD_PARTY = ("faust", "mode", "aiokafka", "kafka", "aiohttp.access")


class _DropNoise(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in str(record.msg)


def quiet_third_party() -> None:
    """Attach the noise filters (idempotent)."""
    for name, fragment in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropNoise(fragment))


def level_from_env(default: str = "WARNING") -> int:
    """``LW_LOG_LEVEL`` (debug, info, warning, error) as a logging level; unknown names give ``default``."""
    name = os.environ.get("LW_LOG_LEVEL", "").strip().upper() or default
    level = logging.getLevelName("WARNING" if name == "WARN" else name)
    return level if isinstance(level, int) else logging.getLevelName(default)


def configure(level: int) -> None:
    """Root logging on stderr in the plain format."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    quiet_third_party()


def faust_logging_config(level: int) -> dict[str, Any]:
    """A dictConfig for the Faust worker: plain text unless stderr is a terminal."""
    colour = sys.stderr.isatty()
    formatter: dict[str, Any] = {"format": LOG_FORMAT}
    if colour:
        formatter = {"()": "mode.utils.logging.ExtensionFormatter", "format": LOG_FORMAT.replace(
            "%(message)s", "%(log_color)s%(message)s%(reset)s"), "stream": sys.stderr}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"layerwatch": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "layerwatch",
                                "stream": "ext://sys.stderr", "level": level}},
        "root": {"level": level, "handlers": ["stderr"]},
        # Faust, mode and the Kafka clients narrate every service start at INFO: only their warnings, unless debugging
        "loggers": {name: {"level": max(level, logging.WARNING) if level > logging.DEBUG else level}
                    for name in THIRD_PARTY},
    }
