"""The `layerwatch` command line: one subcommand per process a user starts.

Commands live in streams/cli/core.py (demo, broker, worker, query, config),
inference.py (serve, reference, simulate) and analysis.py (classifier, report, study),
each registered with :func:`streams.cli.registry.command`. Every error is one line on
stderr, ``layerwatch <command>: <what is wrong and what to do>``, with a non-zero exit
(2 for errors a user can fix, 1 for anything unexpected); the traceback only with
``--debug`` or ``LW_LOG_LEVEL=debug``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Sequence

from streams.cli import core, inference, analysis  # noqa: F401, I001 - importing registers their commands, in help order
from streams.cli.registry import REGISTRY, Parser, UsageError
from streams.logs import configure, level_from_env
from streams.settings import SettingsError, load_settings

__all__ = ["build_parser", "main", "UsageError", "one_line"]

def build_parser() -> Parser:
    parser = Parser(prog="layerwatch", description="Monitor ML models for adversarial attacks.")
    parser.add_argument("--config", help="TOML settings file (default: LW_CONFIG or ./layerwatch.toml)")
    parser.add_argument("--debug", action="store_true",
                        help="log at debug level and show tracebacks (same as LW_LOG_LEVEL=debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in REGISTRY:
        register(sub)
    return parser


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (a KeyError's without its quotes), at most ``limit`` characters."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(str(text).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `layerwatch` console script."""
    from streams.broker import BrokerUnavailable
    from streams.shutdown import Terminated, exit_now, signalled
    from streams.store import StoreError

    from streams import secrets

    secrets.install()  # URL passwords and tokens are masked in every log line and traceback from here on
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LW_LOG_LEVEL", "").strip().lower() == "debug"
    configure(logging.DEBUG if debug else level_from_env())
    prefix = "layerwatch"
    try:
        args = build_parser().parse_args(argv)
        prefix = f"layerwatch {args.command}"
        settings = load_settings(toml_path=args.config)
        secrets.install(settings)
        code = int(args.func(args, settings) or 0)
    except Terminated as exc:
        code = 128 + exc.signum
    except KeyboardInterrupt:
        code = 130
    except (UsageError, SettingsError, BrokerUnavailable, StoreError) as exc:
        if debug:
            sys.stderr.write(secrets.mask(traceback.format_exc()))
        message = secrets.mask(one_line(exc))
        print(message if message.startswith("layerwatch") else f"{prefix}: {message}", file=sys.stderr)
        code = 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            sys.stderr.write(secrets.mask(traceback.format_exc()))
        else:
            print(f"{prefix}: {type(exc).__name__}: {secrets.mask(one_line(exc))} "
                  "(run `layerwatch --debug ...` for the traceback)", file=sys.stderr)
        code = 1
    if signalled():  # stopped by a signal and cleaned up: skip the slow interpreter teardown
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
