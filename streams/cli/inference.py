"""Inference-side subcommands: serve (the demo model server), reference, simulate, models.

Each translates settings and arguments into a call of the pure code in `workers/`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from streams.cli.registry import UsageError, command, models_arg, port, positive
from streams.kafka import kafka_python_config
from streams.settings import Settings


def client_config(settings: Settings) -> dict[str, Any]:
    """kafka-python security settings (bootstrap excluded) for the workers' Kafka clients."""
    config = kafka_python_config(settings)
    config.pop("bootstrap_servers")
    return config


def check_port_free(host: str, port_number: int) -> None:
    """UsageError when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port_number))
    except OSError as exc:
        raise UsageError(f"layerwatch serve: cannot listen on {host}:{port_number} ({exc.strerror or exc}): "
                         "pick another --port or stop what is using it") from None


def read_client_keys(settings: Settings) -> str:
    """The text of the ``LW_CLIENT_KEYS`` file ("" when unset); an unreadable file is a one-line error."""
    if not settings.client_keys:
        return ""
    try:
        with open(settings.client_keys, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"LW_CLIENT_KEYS: cannot read {settings.client_keys}: {exc.strerror}") from None


def identity_policy(settings: Settings) -> Any:
    """The model server's :class:`IdentityPolicy` from the settings (key file, header trust)."""
    from workers.inference.identity import IdentityPolicy, parse_client_keys

    try:
        keys = parse_client_keys(read_client_keys(settings))
    except ValueError as exc:
        raise UsageError(f"LW_CLIENT_KEYS {settings.client_keys}: {exc}") from None
    if settings.require_client_key and not keys:
        raise UsageError("LW_REQUIRE_CLIENT_KEY is set but LW_CLIENT_KEYS lists no key")
    return IdentityPolicy(keys=keys, trust_header=settings.trust_client_id_header,
                          require_key=settings.require_client_key)


@command
def _serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the demo model server (HTTP POST /predict), publishing every prediction")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=8080, help="port to listen on")
    p.add_argument("--models", help="comma list of demo models: cnn, resnet, mlp (default: all)")
    p.add_argument("--rate", type=positive(float, allow_zero=True), default=200.0,
                   help="per-client predictions/s (0: no limit)")
    p.add_argument("--top-k", type=positive(int), default=1, help="labels returned per input (default: top-1 only)")
    p.add_argument("--scores", action="store_true", help="also return probabilities (reveals more to attackers)")
    p.add_argument("--preprocess", default=None, help="defences before the model, e.g. bitdepth:4,median:3")
    p.add_argument("--mc-dropout", type=positive(int, allow_zero=True), default=0,
                   help="T >= 2 stochastic passes for uncertainty (0: off)")
    p.add_argument("--no-publish", action="store_true", help="serve without Kafka")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.broker import require_broker
        from streams.shutdown import SHUTDOWN_TIMEOUT_S, exit_after

        names = models_arg(args.models)
        if args.mc_dropout == 1:
            raise UsageError("layerwatch serve: --mc-dropout 1: use 0 (off) or at least 2 passes")
        check_port_free(args.host, args.port)
        bootstrap = None if args.no_publish else settings.kafka_bootstrap
        identity = identity_policy(settings)
        if bootstrap:
            require_broker(bootstrap)
        from workers.inference.defences import parse_preprocess  # torch: after the cheap checks
        from workers.inference.server import run_server

        try:
            parse_preprocess(args.preprocess)
        except ValueError as exc:
            raise UsageError(f"layerwatch serve: --preprocess {args.preprocess}: {exc}") from None
        run_server(args.host, args.port, state_dir=settings.state_dir, model_names=names,
                   bootstrap=bootstrap, predictions_topic=settings.topic("predictions"),
                   actions_topic=settings.topic("actions"), rate=args.rate or None, top_k=args.top_k,
                   return_scores=args.scores, preprocess=args.preprocess, mc_dropout=args.mc_dropout,
                   client_config=client_config(settings), progress=True, identity=identity,
                   ground_truth_token=settings.ground_truth_token,
                   on_stop=lambda: exit_after(SHUTDOWN_TIMEOUT_S, "the model server"))
        return 0

    p.set_defaults(func=run)


@command
def _reference(sub: Any) -> None:
    p = sub.add_parser("reference", help="publish a clean reference: the demo models' validation split, "
                                          "or --from FILE.npz for your own model")
    p.add_argument("--models", help="comma list of demo models (default: all)")
    p.add_argument("--model-id", help="your model's id (with --from)")
    p.add_argument("--model-version", default="1", help="your model's version (with --from)")
    p.add_argument("--from", dest="source", metavar="FILE.npz",
                   help="outputs + layer activations computed offline: arrays 'outputs' (n, classes), optional "
                        "'truth' (n,), every other array a layer named by its key")
    p.add_argument("--softmax", action="store_true", help="the file's outputs are logits")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.broker import require_broker

        if bool(args.source) != bool(args.model_id):
            raise UsageError("layerwatch reference: --from FILE.npz and --model-id go together")
        if args.source:
            return _reference_from_file(args, settings)

        names = models_arg(args.models)
        require_broker(settings.kafka_bootstrap)
        from workers.inference.traffic import publish_reference
        counts = publish_reference(settings.kafka_bootstrap, settings.state_dir, models=names,
                                   topic=settings.topic("predictions"), progress=True, **client_config(settings))
        for model, n in counts.items():
            print(f"{model}: {n} reference events published")
        return 0

    p.set_defaults(func=run)


def _reference_from_file(args: argparse.Namespace, settings: Settings) -> int:
    from streams.broker import require_broker
    from workers.inference.reference_file import ReferenceFileError, load_reference_npz, publish_reference_arrays
    from workers.progress import progress_bar

    try:
        reference = load_reference_npz(args.source, softmax=args.softmax)
    except ReferenceFileError as exc:
        raise UsageError(f"layerwatch reference: {exc}") from None
    require_broker(settings.kafka_bootstrap)
    with progress_bar(True) as progress:
        task = progress.add_task(f"reference {args.model_id}", total=reference.n)
        sent = publish_reference_arrays(settings.kafka_bootstrap, args.model_id, reference,
                                        model_version=args.model_version, topic=settings.topic("predictions"),
                                        on_batch=lambda k: progress.advance(task, k), **client_config(settings))
    layers = ", ".join(f"{name} ({values.shape[1]})" for name, values in reference.layers.items())
    print(f"{args.model_id} v{args.model_version}: {sent} reference events published; layers {layers}")
    return 0


@command
def _simulate(sub: Any) -> None:
    p = sub.add_parser("simulate", help="send phased clean/adversarial traffic to the model server")
    p.add_argument("--phases", default="clean:60,pgd:30,clean:30,fgsm:30",
                   help="comma list of name:seconds, name = clean or an attack preset (pgd@cnn:30 attacks one model)")
    p.add_argument("--rate", type=positive(float), default=50.0, help="events per second")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="model server URL (`layerwatch serve`)")
    p.add_argument("--models", help="comma list of demo models (default: all served)")
    p.add_argument("--clients", type=positive(int), default=4, help="clean clients")
    p.add_argument("--no-probing", action="store_true", help="no probing client")
    p.add_argument("--via", choices=["http", "publisher"], default="http",
                   help="through the server, or publish directly to Kafka")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", help="write the simulation report here")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.broker import require_broker
        from streams.client import http_json

        names = models_arg(args.models)
        if args.via == "http":
            status, _ = http_json(f"{args.url.rstrip('/')}/health", timeout=5.0)
            if status != 200:
                raise UsageError(f"layerwatch simulate: no model server answers at {args.url} "
                                 f"({'no connection' if status == 0 else f'HTTP {status}'}): start `layerwatch serve` "
                                 "or pass --url")
        else:
            require_broker(settings.kafka_bootstrap)
        from workers.inference.traffic import parse_phases, simulate  # torch (attack presets): after the cheap checks

        try:
            parse_phases(args.phases)
        except ValueError as exc:
            raise UsageError(f"layerwatch simulate: {exc}") from None
        from workers.inference.identity import keys_by_client

        target = args.url if args.via == "http" else settings.kafka_bootstrap
        report = simulate(target, args.phases, rate=args.rate, models=names, clients=args.clients,
                          probing_client=not args.no_probing, via=args.via, seed=args.seed,
                          state_dir=settings.state_dir, topic=settings.topic("predictions"),
                          client_config=client_config(settings),
                          client_keys=keys_by_client(read_client_keys(settings)),
                          ground_truth_token=settings.ground_truth_token)
        for phase in report.phases:
            print(json.dumps(phase))
        print(f"sent {report.sent} events in {report.seconds:.1f} s ({report.rate_achieved:.1f}/s), "
              f"rejected {sum(report.rejected.values())}, errors {report.errors}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report.as_dict(), f, indent=2, default=str)
        if report.sent and report.accepted == 0:
            raise UsageError(f"layerwatch simulate: no event was accepted ({report.errors} connection errors, "
                             f"rejected by status: {dict(report.rejected)}); check the server at {target}")
        return 0

    p.set_defaults(func=run)


@command
def _models(sub: Any) -> None:
    p = sub.add_parser("models", help="every model seen: versions, layers, reference, events/min, last window, alerts")
    p.add_argument("--json", action="store_true", help="print the overview as JSON")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.models import models_sync
        from streams.query import run_query

        models = models_sync(lambda sql, params: run_query(settings, sql, params))
        print(json.dumps(models, indent=2) if args.json else format_models(models))
        return 0

    p.set_defaults(func=run)


def format_models(models: list[dict[str, Any]]) -> str:
    """The overview as a table: one row per model version."""
    import io
    import time

    from rich.console import Console
    from rich.table import Table

    now = time.time() * 1000
    table = Table("model", "version", "status", "events", "events/min", "layers (dim)", "reference",
                  "last window", "open alerts")
    for model in models:
        for v in model["versions"] or [{"version": "", "status": "", "events": "", "events_per_min": "", "layers": [],
                                          "reference": None, "last_window": None}]:
            ref = v["reference"]
            window = v["last_window"]
            table.add_row(
                model["model_id"], v["version"], v["status"], str(v["events"]), str(v["events_per_min"]),
                ", ".join(f"{layer['name']} ({layer['dim'] or '?'})" for layer in v["layers"]),
                f"{ref['rows']} ({ref['source']})" if ref else "-",
                f"{(now - window['end_ms']) / 1000:.0f} s ago, rate {window['detection_rate']:.2f}" if window else "-",
                str(model["open_alerts"]))
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(table)
    return console.file.getvalue().rstrip("\n")

