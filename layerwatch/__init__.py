"""layerwatch: monitor production ML models for adversarial attacks.

The public API for an inference server, importable without the worker's dependencies
(Faust, chDB, clickhouse-driver, ART, plotly, matplotlib are never imported here):

- :class:`Monitor` — tap a torch model, publish its predictions in micro-batches, never block serving;
- :func:`top1` — labels only, for answering clients without scores;
- :class:`LayerTap` — the layer-activation hooks Monitor uses;
- :class:`MMDTester` — the kernel two-sample tests the worker runs (LADIS);
- :class:`Settings`, :func:`load_settings` — the ``LW_*`` settings;
- :class:`IdentityPolicy` — who is asking: an API key, a trusted proxy's ``X-Client-Id``, else the peer.

Names are imported on first use, so ``import layerwatch`` itself costs next to nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Monitor": "layerwatch.monitor",
    "top1": "layerwatch.monitor",
    "LayerTap": "workers.inference.tap",
    "MMDTester": "workers.mmd.tester",
    "Settings": "streams.settings",
    "SettingsError": "streams.settings",
    "load_settings": "streams.settings",
    "IdentityPolicy": "workers.inference.identity",
    "UnknownKey": "workers.inference.identity",
}

__all__ = ["IdentityPolicy", "LayerTap", "MMDTester", "Monitor", "Settings", "SettingsError", "UnknownKey",
           "load_settings", "top1"]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from layerwatch.monitor import Monitor, top1
    from streams.settings import Settings, SettingsError, load_settings
    from workers.inference.identity import IdentityPolicy, UnknownKey
    from workers.inference.tap import LayerTap
    from workers.mmd.tester import MMDTester


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'layerwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
