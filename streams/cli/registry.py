"""The CLI's one command registry: each command module adds its subcommands with ``@command``.

A registered function gets the subparsers object, adds its parser and sets
``func(args, settings) -> exit code``. Errors a user can fix raise :class:`UsageError`.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


class DefaultsFormatter(argparse.HelpFormatter):
    """Help text with each option's default appended, unless it is empty or already mentioned."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


REGISTRY: list[Callable[[Any], None]] = []


def command(register: Callable[[Any], None]) -> Callable[[Any], None]:
    """Decorator adding a subparser-registering function to the CLI."""
    REGISTRY.append(register)
    return register


def models_arg(value: str | None, option: str = "--models") -> list[str] | None:
    """A comma list of demo model names (None when empty); an unknown name is a UsageError."""
    names = [m.strip() for m in value.split(",") if m.strip()] if value else None
    if names:
        from workers.inference.names import MODEL_NAMES

        unknown = [m for m in names if m not in MODEL_NAMES]
        if unknown:
            raise UsageError(f"{option} {','.join(unknown)}: unknown demo model; known models are "
                             f"{', '.join(MODEL_NAMES)}")
    return names


def positive(kind: type = float, allow_zero: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` accepting only positive numbers (or zero when ``allow_zero``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text} must be {'>= 0' if allow_zero else '> 0'}")
        return value

    parse.__name__ = kind.__name__
    return parse


def port(text: str) -> int:
    """An argparse ``type`` for a TCP port (1-65535)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value
