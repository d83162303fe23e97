"""Extension points named in settings: a built-in name, or ``package.module:attribute`` for your own.

The drift test (``LW_DRIFT_TEST``) and the alert sinks (``LW_ALERT_SINKS``) are chosen this
way, so adding one is a new file plus a setting (docs/architecture.md, "Extending").
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping


class PluginError(ValueError):
    """A plugin spec that names nothing importable; the message says which and why."""


def names(spec: str) -> list[str]:
    """The comma-separated entries of a setting, stripped, empty ones dropped."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def load(spec: str, builtins: Mapping[str, str], setting: str) -> Any:
    """The object ``spec`` names: a key of ``builtins`` (itself a ``module:attribute``) or ``module:attribute``.

    Example:
        >>> load("dumps", {"dumps": "json:dumps"}, "LW_X").__name__
        'dumps'
    """
    target = builtins.get(spec, spec)
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise PluginError(f"{setting}: {spec!r} is neither one of {', '.join(sorted(builtins))} "
                          "nor a 'package.module:attribute' path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{setting}: cannot import {module_name!r} for {spec!r}: {exc}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise PluginError(f"{setting}: module {module_name!r} has no attribute {attribute!r}") from None
