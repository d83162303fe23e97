"""Core subcommands: demo, broker, worker, query, config."""

from __future__ import annotations

import argparse
import json
from typing import Any

from streams.cli.registry import UsageError, command, port, positive
from streams.settings import Settings


def _cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.broker import BrokerUnavailable, EmbeddedBroker, split_bootstrap
    from streams.shutdown import stop_on_signals

    stop_on_signals("layerwatch broker")  # SIGTERM runs the `finally` below: the Tansu child stops too
    host, port = split_bootstrap(args.listen or settings.kafka_bootstrap)
    broker = EmbeddedBroker(host=host, port=port)
    try:
        broker.start()
    except BrokerUnavailable as exc:
        raise UsageError(str(exc)) from None
    print(f"Tansu broker (memory only) listening at {broker.bootstrap}; Ctrl-C stops it", flush=True)
    try:
        broker.process.wait()
    finally:
        broker.stop()
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.process import run_worker
    from streams.runtime import parse_agents

    try:
        parse_agents(args.agents or settings.agents)
    except ValueError as exc:
        raise UsageError(f"layerwatch worker: {exc}") from None
    if args.agents:
        settings = settings.replace(agents=args.agents)
    if args.web_port:
        settings = settings.replace(web_port=args.web_port)
    return run_worker(settings, loglevel=args.loglevel)


def parse_params(pairs: list[str] | None) -> dict[str, str]:
    """``-p NAME=VALUE`` pairs as a dict; a pair without ``=`` is a UsageError."""
    params = {}
    for pair in pairs or []:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"layerwatch query: parameter {pair!r} is not NAME=VALUE (e.g. -p layer=penultimate)")
        params[name.strip()] = value
    return params


def _cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    import re

    from streams.query import format_result, run_query

    params = parse_params(args.param)
    if re.search(r"(?is)\bFORMAT\s+\w+\s*;?\s*$", args.sql):
        raise UsageError("layerwatch query: the query ends in a FORMAT clause; drop it and pick the output "
                         "with --format table|json|csv")
    names, rows = run_query(settings, args.sql, params)
    print(format_result(names, rows, args.format))
    return 0


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.safe_dict(), indent=2))  # effective values: derived defaults filled in, secrets masked
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.demo import run_demo
    from streams.shutdown import stop_on_signals
    from workers.inference.traffic import parse_phases

    try:
        parse_phases(args.phases)
    except ValueError as exc:
        raise UsageError(f"layerwatch demo: {exc}") from None
    stop_on_signals("layerwatch demo")  # SIGTERM or Ctrl-C: the LocalStack stops the children it started
    return run_demo(settings, seconds=args.seconds, summary_path=args.summary, phases=args.phases,
                    rate=args.rate, keep=args.keep)



@command
def _register_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on this machine and show what it detects")
    p.add_argument("--seconds", type=positive(float), default=None, help="bound the run (default: the full scenario)")
    p.add_argument("--summary", help="write the figures as JSON to this path")
    p.add_argument("--phases", default="clean:16,pgd@cnn:12,clean:16,fgsm@resnet:12",
                   help="traffic phases, name:seconds (attack@model targets one model)")
    p.add_argument("--rate", type=positive(float), default=150.0, help="events per second over all models")
    p.add_argument("--keep", action="store_true", help="keep everything running after the scenario (Ctrl-C stops)")
    p.set_defaults(func=_cmd_demo)


@command
def _register_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help="run the embedded Tansu broker in the foreground (memory only)")
    p.add_argument("--listen", help="host:port (default: LW_KAFKA_BOOTSTRAP, 127.0.0.1:9092)")
    p.set_defaults(func=_cmd_broker)


@command
def _register_worker(sub: Any) -> None:
    p = sub.add_parser("worker", help="run the Faust worker (sink, drift, classify, probing, alerts)")
    p.add_argument("--agents", help="a role (all, ingest, test) or a comma list of agents (default: all)")
    p.add_argument("--web-port", type=port, help="HTTP port for /health, /metrics, the API and dashboard "
                   "(default: LW_WEB_PORT, 6066)")
    p.add_argument("--loglevel", default=None, choices=["crit", "error", "warn", "info", "debug"],
                   help="log level (default: LW_LOG_LEVEL, else info)")
    p.set_defaults(func=_cmd_worker)


@command
def _register_query(sub: Any) -> None:
    p = sub.add_parser("query", help="run a read-only SQL query against the store")
    p.add_argument("sql", help="a SELECT query, or @name for a shipped query (see deploy/clickhouse/queries)")
    p.add_argument("--param", "-p", action="append", metavar="NAME=VALUE", help="query parameter")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=_cmd_query)


@command
def _register_config(sub: Any) -> None:
    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.set_defaults(func=_cmd_config)
