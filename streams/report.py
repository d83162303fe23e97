"""``layerwatch report``: PNG figures of what the store recorded, in the spirit of the LADIS post.

Three kinds of figure (matplotlib, Agg backend, no display needed):

(a) ``tsne_<model>_<layer>.png`` — a t-SNE map (scikit-learn ``TSNE``, perplexity ≤ 30,
    fixed ``random_state``) per model and tapped layer of three groups of activations:

    * **reference**: rows of ``reference_embeddings`` (the clean validation activations the
      drift agent tests against; the layers are the ones the reference was published with);
    * **calmest window** and **most drifted window**: the tested windows of that model
      (``drift_windows``, combined row; within ``minutes`` of the newest one) with the
      lowest and the highest detection rate. The store keeps the live *inputs* of the demo
      server (``predictions_inputs``), not live activations, so the activations of those
      windows' events are **recomputed** here from their stored inputs with the demo model
      of the same name (``<state_dir>/models``).

    Only demo models (cnn, resnet, mlp) can be recomputed; other model ids are skipped with
    a message, as are layers whose stored dimension differs from the model's and models
    without tested windows or stored inputs.

(b) ``detection_rate_<model>.png`` — the detection rate of every window over time from
    ``drift_windows`` (one line per layer, the combined test in black), with the alert
    threshold (``LW_ALERT_DETECTION_RATE``) as a dashed line and, when ``predictions``
    carries simulation labels, the attack phases shaded. ``minutes`` keeps the last N
    minutes **counted back from the newest window** (a report of a finished run still
    shows it).

(c) ``attack_confusion.png`` — the attack classifier's confusion matrix: from
    ``workers.classifier.training.evaluate`` on ``state_dir``, else from
    an evaluation JSON under ``<state_dir>/classifier/`` (any ``*.json`` holding a
    ``confusion`` entry), else skipped with a message.

Every figure that cannot be drawn is skipped with a one-line message (``echo``), never an
exception, so a partly filled store still gives the figures it can.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from schemas.batch import COMBINED, is_layer
from streams.report_confusion import confusion_from_evaluate, confusion_from_json
from streams.report_store import (
    attack_spans, live_windows, reference_layer, reference_models, reference_version, report_models, window_inputs,
    window_rates,
)

__all__ = ["COMBINED", "run_report_cli", "write_report"]

_COLORS = {"reference": "#4c72b0", "calmest window": "#55a868", "most drifted window": "#c44e52"}

Echo = Callable[[str], None]


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _layer_label(layer: str) -> str:
    return "all layers (combined)" if layer == COMBINED else layer


# ============================================================== (a) t-SNE of activations


def _tsne(points: np.ndarray, seed: int) -> np.ndarray:
    """2-d t-SNE embedding, perplexity ≤ 30, fixed random_state, on one thread.

    One thread: the OpenMP/BLAS pools of scikit-learn and torch spin against each other
    on a busy machine (a 120-point map took 12 s with 2 threads, 0.5 s with one).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3.0)))
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca",
                    learning_rate="auto").fit_transform(points.astype(np.float64))


def _tsne_figures(store: Any, out: Path, state_dir: str | os.PathLike, model: str | None, minutes: float | None,
                  max_points: int, seed: int, echo: Echo) -> list[Path]:
    from workers.inference.models import MODEL_NAMES

    models = reference_models(store, model)
    if not models:
        echo("t-SNE: skipped, reference_embeddings is empty" + (f" for model {model!r}" if model else "")
             + " (publish one with `layerwatch reference`)")
        return []
    written: list[Path] = []
    for name in models:
        if name not in MODEL_NAMES:
            echo(f"t-SNE: skipped model {name!r}: not a demo model, its activations cannot be recomputed here")
            continue
        written += _tsne_model(store, out, state_dir, name, minutes, max_points, seed, echo)
    return written


def _tsne_model(store: Any, out: Path, state_dir: str | os.PathLike, model: str, minutes: float | None,
                max_points: int, seed: int, echo: Echo) -> list[Path]:
    from workers.inference.models import load_demo_models
    from workers.inference.tap import PENULTIMATE, LayerTap

    demo = load_demo_models(state_dir, [model], progress=False, seed=seed)[model]
    version = reference_version(store, model, str(demo.version))
    if version is None:
        echo(f"t-SNE: skipped model {model!r}: no reference rows")
        return []
    windows = live_windows(store, model, version, minutes)
    groups_in: list[tuple[str, str, np.ndarray]] = []
    for label, window_id, start, end, rate in windows:
        x = window_inputs(store, model, start, end, max_points)
        if len(x):
            ends = _ms_to_dt([end])[0]
            groups_in.append((label, f"{label}, ending {ends:%H:%M:%S} UTC (rate {rate:.2f}, n={len(x)})", x))
    if not groups_in:
        echo(f"t-SNE: skipped model {model!r}: no tested window with stored inputs (predictions_inputs) "
             "for its reference version")
        return []
    layers = [str(r[0]) for r in store.query(
        "SELECT DISTINCT layer FROM reference_embeddings WHERE model_id = {m} AND model_version = {v} ORDER BY layer",
        {"m": model, "v": version}, readonly=True)]
    modules = dict(demo.module.named_modules())
    usable = [layer for layer in layers if layer == PENULTIMATE or layer in modules]
    for layer in layers:
        if layer not in usable:
            echo(f"t-SNE: skipped {model}/{layer}: the demo model has no such layer")
    if not usable:
        return []
    # The store keeps live inputs, not live activations: the demo model recomputes them from those inputs.
    shape = tuple(getattr(demo, "input_shape", (1, 8, 8)))
    tap = LayerTap(demo.module, [n for n in usable if n != PENULTIMATE], penultimate=PENULTIMATE in usable)
    try:
        live = [(label, text, tap.tap(x.reshape(-1, *shape)).layers) for label, text, x in groups_in]
    finally:
        tap.remove()
    order = [n for n in demo.layer_names() if n in usable] + [n for n in usable if n not in demo.layer_names()]
    written = []
    for layer in order:
        ref = reference_layer(store, model, version, layer, max_points)
        if len(ref) < 2:
            echo(f"t-SNE: skipped {model}/{layer}: fewer than 2 reference rows")
            continue
        if ref.shape[1] != live[0][2][layer].shape[1]:
            echo(f"t-SNE: skipped {model}/{layer}: stored vectors have {ref.shape[1]} dims, "
                 f"the demo model's layer has {live[0][2][layer].shape[1]}")
            continue
        groups = [("reference", f"reference (store, n={len(ref)})", ref)] + [
            (label, text, acts[layer]) for label, text, acts in live]
        emb = _tsne(np.vstack([g for _, _, g in groups]), seed)
        fig = _figure(6.4, 5.6)
        ax = fig.add_subplot(1, 1, 1)
        at = 0
        for label, text, g in groups:
            part = emb[at: at + len(g)]
            at += len(g)
            ax.scatter(part[:, 0], part[:, 1], s=9, alpha=0.6, color=_COLORS[label], label=text, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{model} v{version} · {layer}: t-SNE of reference vs live window activations\n"
                     f"(live inputs from the store, activations recomputed by the demo model; "
                     f"perplexity {min(30.0, max(2.0, (len(emb) - 1) / 3.0)):.0f}, random_state {seed})", fontsize=9)
        ax.legend(loc="best", fontsize=8, markerscale=1.8, framealpha=0.85)
        if version != str(demo.version):
            fig.text(0.01, 0.01, f"note: reference version {version} ≠ demo model version {demo.version}",
                     fontsize=7, color="#aa3333")
        written.append(_save(fig, out / f"tsne_{_slug(model)}_{_slug(layer)}.png"))
    return written


# ============================================================== (b) detection rate over time


def _ms_to_dt(ms: np.ndarray | Sequence[int]) -> list[_dt.datetime]:
    return [_dt.datetime.fromtimestamp(int(v) / 1000.0, tz=_dt.timezone.utc).replace(tzinfo=None) for v in ms]


def _detection_figures(store: Any, out: Path, model: str | None, minutes: float | None, threshold: float,
                       echo: Echo) -> list[Path]:
    import matplotlib.dates as mdates

    data = window_rates(store, model, minutes)
    if not data:
        echo("detection rate: skipped, drift_windows has no rows"
             + (f" for model {model!r}" if model else "") + (f" in the last {minutes:g} minutes" if minutes else ""))
        return []
    written = []
    for name, d in data.items():
        layers = list(dict.fromkeys(d["layer"].tolist()))
        layers = [x for x in layers if is_layer(x)] + ([COMBINED] if COMBINED in layers else [])
        fig = _figure(9.0, 4.4)
        ax = fig.add_subplot(1, 1, 1)
        lo, hi = int(d["end_ms"].min()), int(d["end_ms"].max())
        shaded = set()
        for s, e, attack in attack_spans(store, name, lo, hi):
            ax.axvspan(*_ms_to_dt([s, e]), color="#f2c4c4", alpha=0.45, linewidth=0,
                       label=None if attack in shaded else f"attack phase: {attack}")
            shaded.add(attack)
        cmap = __import__("matplotlib").colormaps["viridis"]
        plain = [x for x in layers if x != COMBINED]
        for i, layer in enumerate(layers):
            sel = d["layer"] == layer
            x, y = _ms_to_dt(d["end_ms"][sel]), d["rate"][sel]
            if layer == COMBINED:
                ax.plot(x, y, color="black", linewidth=2.0, marker=".", markersize=4, label=_layer_label(layer))
            else:
                color = cmap(i / max(1, len(plain) - 1) * 0.8) if len(plain) > 1 else "#4c72b0"
                ax.plot(x, y, color=color, linewidth=1.2, marker=".", markersize=3, alpha=0.9, label=layer)
        ax.axhline(threshold, color="#c44e52", linestyle="--", linewidth=1.2,
                   label=f"alert threshold {threshold:g}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("detection rate")
        ax.set_xlabel("window end (UTC)")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        n_windows = int((d["layer"] == (COMBINED if COMBINED in layers else layers[0])).sum())
        ax.set_title(f"{name}: LADIS detection rate per window ({n_windows} windows, "
                     f"{_ms_to_dt([lo])[0]:%Y-%m-%d %H:%M} → {_ms_to_dt([hi])[0]:%H:%M} UTC)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.autofmt_xdate()
        written.append(_save(fig, out / f"detection_rate_{_slug(name)}.png"))
    return written


# ============================================================== (c) attack confusion matrix


def _confusion_figure(out: Path, state_dir: str | os.PathLike, source: str, confusion_json: str | os.PathLike | None,
                      echo: Echo) -> list[Path]:
    if source == "off":
        return []
    got = None
    if source == "auto" and confusion_json is None:
        got = confusion_from_evaluate(state_dir, echo)
    if got is None:
        if confusion_json is not None:
            candidates = [Path(confusion_json)]
        else:
            base = Path(state_dir) / "classifier"
            candidates = sorted((p for p in base.glob("*.json") if p.name != "manifest.json"),
                                key=lambda p: ("eval" not in p.name, p.name)) if base.is_dir() else []
        got = confusion_from_json(candidates)
    if got is None:
        echo("confusion matrix: skipped, no classifier evaluation found (train and evaluate the attack "
             "classifier first; looked for workers.classifier.training.evaluate and "
             f"{confusion_json or Path(state_dir) / 'classifier' / '*.json'})")
        return []
    where, labels, m = got
    n = len(labels)
    totals = m.sum(axis=1, keepdims=True)
    share = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    size = max(4.8, 0.62 * n + 2.4)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    integer = bool(np.all(np.equal(np.mod(m, 1), 0)))
    for i in range(n):
        for j in range(n):
            if m[i, j] == 0:
                continue
            text = f"{int(m[i, j])}" if integer else f"{m[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    diag = float(np.trace(m) / m.sum()) if m.sum() else float("nan")
    ax.set_title(f"attack classifier: confusion matrix (row-normalised colour)\n"
                 f"accuracy {diag * 100:.1f}% · source {where}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return [_save(fig, out / "attack_confusion.png")]


# ============================================================== entry points


def write_report(
    store: Any,
    out_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    model: str | None = None,
    minutes: float | None = None,
    *,
    threshold: float = 0.5,
    max_points: int = 300,
    seed: int = 0,
    classifier: str = "auto",
    confusion_json: str | os.PathLike | None = None,
    echo: Echo | None = None,
) -> list[Path]:
    """Write the report's PNG figures into ``out_dir``; return their paths (see the module docstring).

    ``store`` is an open :class:`streams.store.Store` (not closed here). ``model`` limits
    every figure to one model id; ``minutes`` the detection-rate figure to the last N
    minutes before the newest window. ``max_points``: points per group; ``threshold``: the alert line;
    ``classifier``: ``"auto"`` (evaluate, then JSON), ``"json"`` (``confusion_json`` or
    ``<state_dir>/classifier/*.json`` only) or ``"off"``. Skipped figures are reported
    through ``echo`` (default: ignored).
    """
    if classifier not in ("auto", "json", "off"):
        raise ValueError("classifier must be 'auto', 'json' or 'off'")
    say: Echo = echo or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for part, run in (
        ("t-SNE", lambda: _tsne_figures(store, out, state_dir, model, minutes, max_points, seed, say)),
        ("detection rate", lambda: _detection_figures(store, out, model, minutes, threshold, say)),
        ("confusion matrix", lambda: _confusion_figure(out, state_dir, classifier, confusion_json, say)),
    ):
        try:
            written += run()
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the others
            say(f"{part}: failed ({type(exc).__name__}: {exc})")
    return written


def run_report_cli(
    settings_like_store_url: Any,
    out_dir: str | os.PathLike,
    state_dir: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    minutes: float | None = None,
    **options: Any,
) -> list[Path]:
    """``layerwatch report --out DIR``: open the store, write the figures, print what was written.

    The first argument is a store URL (``chdb://…``, ``clickhouse://…``), a settings object
    (:class:`streams.settings.Settings`: its ``clickhouse_*`` fields, ``state_dir`` and
    ``alert_detection_rate``) or an already open store (left open). With settings, the
    report reads through the worker's API when a worker holds the chDB path
    (:func:`streams.query.open_reader`).
    """
    from rich.console import Console

    from streams.store import open_store

    console = Console()
    source = settings_like_store_url
    if isinstance(source, str):
        store, owned = open_store(source), True
    elif hasattr(source, "clickhouse_url"):
        from streams.query import open_reader

        store, owned = open_reader(source), True
    else:
        store, owned = source, False
    if state_dir is None:
        state_dir = getattr(source, "state_dir", None) or "./.layerwatch"
    if "threshold" not in options and hasattr(source, "alert_detection_rate"):
        options["threshold"] = float(source.alert_detection_rate)
    try:
        known = report_models(store) if model is not None else []
        if model is not None and model not in known:
            raise ValueError(f"--model {model}: no such model in the store ("
                             + (f"models: {', '.join(known)}" if known else "the store has no predictions yet") + ")")
        paths = write_report(store, out_dir, state_dir, model=model, minutes=minutes,
                             echo=lambda msg: console.print(f"[yellow]{msg}[/]"), **options)
    finally:
        if owned:
            store.close()
    for p in paths:
        console.print(f"wrote {p}")
    return paths
