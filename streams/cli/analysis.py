"""Offline subcommands: classifier (train, eval, fit), report (PNGs from the store), study (layer table)."""

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
    fit = actions.add_parser("fit", help="fit the supervised per-event detector of your model version from its stored "
                             "reference and attacks crafted against the torch model")
    fit.add_argument("--model-id", required=True, help="the model id its events carry")
    fit.add_argument("--model-version", help="the version (default: the one whose reference arrived last)")
    fit.add_argument("--model-factory", required=True, metavar="PACKAGE.MODULE:CALLABLE",
                     help="your code: called with no arguments, returns the torch.nn.Module (logits out)")
    fit.add_argument("--weights", metavar="FILE.pt", help="a state dict, read with torch.load(weights_only=True)")
    fit.add_argument("--inputs", required=True, metavar="FILE.npz",
                     help="clean inputs to attack: x (n, *input_shape) and optional labels y (n,); no pickles")
    fit.add_argument("--attacks", help="comma list of attack presets (default: fgsm,pgd,fgm,pgd_l2,deepfool,square)")
    fit.add_argument("--clip", nargs=2, type=float, metavar=("LOW", "HIGH"),
                     help="the input range attacks stay in (default: [min(x, 0), max(x, 1)])")
    fit.add_argument("--limit", type=positive(int), default=1000, help="at most this many inputs (seeded sample)")
    fit.add_argument("--target-fpr", type=positive(float), default=0.02, help="clean false-positive rate at 0.5")
    fit.add_argument("--seed", type=int, default=0, help="random seed")
    fit.add_argument("--force", action="store_true", help="fit even when the model disagrees with its reference")

    def run(args: argparse.Namespace, settings: Settings) -> int:
        from workers.classifier import evaluation, fitting, training

        if args.action == "fit":
            return _fit(args, settings)
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


def _fit(args: argparse.Namespace, settings: Settings) -> int:
    from streams.detector_fit import FitError, fit_model_detector
    from streams.query import open_reader

    if not 0 < args.target_fpr < 0.5:
        raise UsageError(f"layerwatch classifier fit: --target-fpr {args.target_fpr} must lie in (0, 0.5)")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    store = open_reader(settings)
    try:
        result = fit_model_detector(settings, store, model_id=args.model_id, model_version=args.model_version,
                                    factory=args.model_factory, weights=args.weights, inputs=args.inputs,
                                    attacks=attacks, clip=tuple(args.clip) if args.clip else None, limit=args.limit,
                                    target_fpr=args.target_fpr, seed=args.seed, force=args.force)
    except FitError as exc:
        raise UsageError(f"layerwatch classifier fit: {exc}") from None
    finally:
        store.close()
    r = result
    print(f"supervised detector for {r.model_id}@{r.model_version}: {r.n_inputs} clean inputs x {len(r.attacks)} "
          f"attacks ({', '.join(r.attacks)}), layers {', '.join(r.layers)}; out-of-fold clean FPR "
          f"{r.oof_clean_fpr:.3f}, adversarial flagged {r.oof_adversarial_tpr:.3f}; the stored reference "
          f"({r.reference_rows} events) flags {r.reference_flagged:.1%} of the clean inputs; {r.seconds:.1f} s")
    was = " (replacing the one fitted before)" if r.replaced else ""
    print(f"saved {r.path}{was}: the worker labels {r.model_id}@{r.model_version} with it within a minute; "
          "other models and versions keep their own detectors or reference-only score")
    return 0


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
