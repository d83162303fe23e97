"""Subcommands that live outside the core CLI module; each registers itself on the subparsers."""

from __future__ import annotations

from typing import Any, Callable

REGISTRY: list[Callable[[Any], None]] = []


def command(register: Callable[[Any], None]) -> Callable[[Any], None]:
    """Decorator adding a subparser-registering function to the CLI."""
    REGISTRY.append(register)
    return register
