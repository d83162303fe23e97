"""Offline subcommands: classifier (train, eval), report (PNGs from the store), study (layer table)."""

from __future__ import annotations

import argparse
from typing import Any

from streams.cli.registry import UsageError, command, models_arg, positive
from streams.settings import Settings


@command
def _classifier(sub: Any) -> None:
    p = sub.add_parser("classifier", help="train or evaluate the attack classifier (output vector → attack, target)")
    actions = p.add_subparsers(dest="action", required=True, parser_class=p.__class__)
    train = actions.add_parser("train", help="build the attack data set (cached), train the classifier and the "
                               "per-event detectors")
    train.add_argument("--kind", default=None, help="model kind (default: the measured best)")
    train.add_argument("--seed", type=int, default=0, help="random seed")
    evaluate = actions.add_parser("eval", help="the paper's tables on the held-out split, confusion matrix PNG, "
                                  "the per-event detector beside the output-only baseline")
    evaluate.add_argument("--json", help="write the figures as JSON")
    evaluate.add_argument("--png", help="confusion matrix PNG (default: <state_dir>/classifier/confusion.png)")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from workers.classifier import evaluation, fitting, training

        if args.action == "train":
            kwargs = {"model_kind": args.kind} if args.kind else {}
            training.train(settings.state_dir, seed=args.seed, progress=True, **kwargs)
            fitting.train_detectors(settings.state_dir, seed=args.seed, progress=True)
            return 0
        try:
            evaluation.evaluate(settings.state_dir, json_path=args.json, png_path=args.png)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"layerwatch classifier eval: {exc}") from None
        return 0

    p.set_defaults(func=run)


@command
def _report(sub: Any) -> None:
    p = sub.add_parser("report", help="write PNGs: t-SNE per layer, detection rate over time, attack confusion")
    p.add_argument("--out", default="layerwatch-report", help="output directory")
    p.add_argument("--model", help="one model (default: all)")
    p.add_argument("--minutes", type=positive(float), help="only the last N minutes of windows")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from streams.report import run_report_cli

        try:
            paths = run_report_cli(settings, args.out, settings.state_dir, model=args.model, minutes=args.minutes)
        except ValueError as exc:
            raise UsageError(f"layerwatch report: {exc}") from None
        if not paths:
            raise UsageError("layerwatch report: no figure written (the lines above say why; fill the store with "
                             "`layerwatch reference` and traffic first)")
        return 0

    p.set_defaults(func=run)


@command
def _study(sub: Any) -> None:
    p = sub.add_parser("study", help="offline studies on the demo models")
    studies = p.add_subparsers(dest="study", required=True, parser_class=p.__class__)
    layers = studies.add_parser("layers", help="LADIS layer table: detection rate per layer, PGD small/large ε, FPR")
    layers.add_argument("--model", default="resnet", help="demo model: cnn, resnet or mlp")
    layers.add_argument("--json", help="write the table as JSON")
    layers.add_argument("--markdown", help="write the table as Markdown")
    layers.add_argument("--repeats", type=positive(int), default=100, help="detection-rate repeats")
    layers.add_argument("--m", type=positive(int), default=100, help="subsample size per repeat")
    layers.add_argument("--permutations", type=positive(int), default=500, help="MMD permutations per test")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from workers.study import run_study_cli

        models_arg(args.model, "--model")
        run_study_cli(settings.state_dir, args.model, json_path=args.json, markdown_path=args.markdown,
                      repeats=args.repeats, m=args.m, n_permutations=args.permutations)
        return 0

    p.set_defaults(func=run)
