"""The CLI's one command registry: each command module adds its subcommands with ``@command``.

A registered function gets the subparsers object, adds its parser and sets
``func(args, settings) -> exit code``. Errors a user can fix raise :class:`UsageError`.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


REGISTRY: list[Callable[[Any], None]] = []


def command(register: Callable[[Any], None]) -> Callable[[Any], None]:
    """Decorator adding a subparser-registering function to the CLI."""
    REGISTRY.append(register)
    return register


def models_arg(value: str | None) -> list[str] | None:
    """A comma list of model names (None when empty)."""
    return [m.strip() for m in value.split(",") if m.strip()] if value else None
