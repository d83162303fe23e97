"""The `layerwatch` command line: one subcommand per process a user starts.

Commands live in streams/cli/core.py (demo, broker, worker, query, config),
inference.py (serve, reference, simulate) and analysis.py (classifier, report, study),
each registered with :func:`streams.cli.registry.command`. Errors a user can fix (bad
argument, no broker, bad setting) are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from streams.cli import core, inference, analysis  # noqa: F401, I001 - importing registers their commands, in help order
from streams.cli.registry import REGISTRY, Parser, UsageError
from streams.settings import SettingsError, load_settings

__all__ = ["build_parser", "main", "UsageError"]


def build_parser() -> Parser:
    parser = Parser(prog="layerwatch", description="Monitor ML models for adversarial attacks.")
    parser.add_argument("--config", help="TOML settings file (default: LW_CONFIG or ./layerwatch.toml)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in REGISTRY:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `layerwatch` console script."""
    from streams.broker import BrokerUnavailable
    from streams.store import StoreError

    from streams import secrets

    secrets.install()  # URL passwords and tokens are masked in every log line and traceback from here on
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        settings = load_settings(toml_path=args.config)
        secrets.install(settings)
        code = args.func(args, settings)
    except (UsageError, SettingsError, BrokerUnavailable, StoreError) as exc:
        text = secrets.mask(exc)
        print(f"layerwatch: {text}" if not text.startswith("layerwatch") else text, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
