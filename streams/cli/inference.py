"""Inference-side subcommands: serve (the demo model server), reference, simulate.

Each translates settings and arguments into a call of the pure code in `workers/`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from streams.cli.registry import UsageError, command, models_arg
from streams.kafka import kafka_python_config
from streams.settings import Settings


def client_config(settings: Settings) -> dict[str, Any]:
    """kafka-python security settings (bootstrap excluded) for the workers' Kafka clients."""
    config = kafka_python_config(settings)
    config.pop("bootstrap_servers")
    return config


@command
def _serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the demo model server (HTTP POST /predict), publishing every prediction")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--models", help="comma list of demo models (default: all)")
    p.add_argument("--rate", type=float, default=200.0, help="per-client predictions/s (0: no limit)")
    p.add_argument("--top-k", type=int, default=1, help="labels returned per input (default: top-1 only)")
    p.add_argument("--scores", action="store_true", help="also return probabilities (reveals more to attackers)")
    p.add_argument("--preprocess", default=None, help="e.g. bitdepth:4,median:3")
    p.add_argument("--mc-dropout", type=int, default=0, help="T stochastic passes for uncertainty (0: off)")
    p.add_argument("--no-publish", action="store_true", help="serve without Kafka")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.broker import require_broker
        from workers.inference.server import run_server

        bootstrap = None if args.no_publish else settings.kafka_bootstrap
        if bootstrap:
            require_broker(bootstrap)
        run_server(args.host, args.port, state_dir=settings.state_dir, model_names=models_arg(args.models),
                   bootstrap=bootstrap, predictions_topic=settings.topic("predictions"),
                   actions_topic=settings.topic("actions"), rate=args.rate or None, top_k=args.top_k,
                   return_scores=args.scores, preprocess=args.preprocess, mc_dropout=args.mc_dropout,
                   client_config=client_config(settings), progress=True)
        return 0

    p.set_defaults(func=run)


@command
def _reference(sub: Any) -> None:
    p = sub.add_parser("reference", help="publish each demo model's validation split as its clean reference")
    p.add_argument("--models", help="comma list of demo models (default: all)")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.broker import require_broker
        from workers.inference.traffic import publish_reference

        require_broker(settings.kafka_bootstrap)
        counts = publish_reference(settings.kafka_bootstrap, settings.state_dir, models=models_arg(args.models),
                                   topic=settings.topic("predictions"), progress=True, **client_config(settings))
        for model, n in counts.items():
            print(f"{model}: {n} reference events published")
        return 0

    p.set_defaults(func=run)


@command
def _simulate(sub: Any) -> None:
    p = sub.add_parser("simulate", help="send phased clean/adversarial traffic to the model server")
    p.add_argument("--phases", default="clean:60,pgd:30,clean:30,fgsm:30",
                   help="comma list of name:seconds, name = clean or an attack preset (pgd@cnn:30 attacks one model)")
    p.add_argument("--rate", type=float, default=50.0, help="events per second")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="model server URL")
    p.add_argument("--models", help="comma list of demo models (default: all served)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--no-probing", action="store_true", help="no probing client")
    p.add_argument("--via", choices=["http", "publisher"], default="http",
                   help="through the server, or publish directly to Kafka")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the simulation report here")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from workers.inference.traffic import parse_phases, simulate

        try:
            parse_phases(args.phases)
        except ValueError as exc:
            raise UsageError(f"layerwatch simulate: {exc}") from None
        target = args.url if args.via == "http" else settings.kafka_bootstrap
        report = simulate(target, args.phases, rate=args.rate, models=models_arg(args.models), clients=args.clients,
                          probing_client=not args.no_probing, via=args.via, seed=args.seed,
                          state_dir=settings.state_dir, topic=settings.topic("predictions"),
                          client_config=client_config(settings))
        for phase in report.phases:
            print(json.dumps(phase))
        print(f"sent {report.sent} events in {report.seconds:.1f} s ({report.rate_achieved:.1f}/s), "
              f"rejected {sum(report.rejected.values())}, errors {report.errors}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report.as_dict(), f, indent=2, default=str)
        return 0

    p.set_defaults(func=run)
