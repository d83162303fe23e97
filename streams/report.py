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
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from schemas.batch import COMBINED, is_layer

__all__ = ["COMBINED", "run_report_cli", "write_report"]

_CLEAN_LABELS = ("", "clean")
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


def _reference_models(store: Any, model: str | None) -> list[str]:
    rows = store.query("SELECT DISTINCT model_id FROM reference_embeddings ORDER BY model_id", readonly=True)
    found = [str(r[0]) for r in rows]
    return [m for m in found if model is None or m == model]


def _reference_version(store: Any, model: str, preferred: str) -> str | None:
    rows = store.query(
        "SELECT model_version, max(ts_ms) AS last FROM reference_embeddings WHERE model_id = {m} "
        "GROUP BY model_version ORDER BY last DESC", {"m": model}, readonly=True)
    versions = [str(r[0]) for r in rows]
    if not versions:
        return None
    return preferred if preferred in versions else versions[0]


def _reference_layer(store: Any, model: str, version: str, layer: str, limit: int) -> np.ndarray:
    """Up to ``limit`` reference vectors of one layer, a deterministic sample (by event id hash)."""
    rows = store.query(
        "SELECT event_id, any(vector) FROM reference_embeddings "
        "WHERE model_id = {m} AND model_version = {v} AND layer = {l} "
        "GROUP BY event_id ORDER BY cityHash64(event_id) LIMIT {n}",
        {"m": model, "v": version, "l": layer, "n": int(limit)}, readonly=True)
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.asarray([r[1] for r in rows], dtype=np.float32)


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

    models = _reference_models(store, model)
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


def _live_windows(store: Any, model: str, version: str, minutes: float | None) -> list[tuple[str, str, int, int, float]]:
    """The calmest and the most drifted tested window of ``model`` (label, window id, start, end, rate).

    Read from ``drift_windows`` (the combined row when there is one); ``minutes`` counts back from
    the newest window, as for the detection-rate figure. One entry when both are the same window.
    """
    rows = store.query(
        "SELECT window_id, any(window_start_ms), any(window_end_ms), "
        "if(countIf(layer = {c}) > 0, maxIf(detection_rate, layer = {c}), max(detection_rate)) "
        "FROM drift_windows FINAL WHERE model_id = {m} AND model_version = {v} GROUP BY window_id",
        {"m": model, "v": version, "c": COMBINED}, readonly=True)
    if not rows:
        return []
    if minutes is not None:
        newest = max(int(r[2]) for r in rows)
        rows = [r for r in rows if int(r[2]) >= newest - int(float(minutes) * 60_000)]
    calm = min(rows, key=lambda r: (float(r[3]), -int(r[2])))
    hot = max(rows, key=lambda r: (float(r[3]), int(r[2])))
    picked = [("calmest window", calm)] + ([("most drifted window", hot)] if hot[0] != calm[0] else [])
    return [(label, str(r[0]), int(r[1]), int(r[2]), float(r[3])) for label, r in picked]


def _window_inputs(store: Any, model: str, start_ms: int, end_ms: int, limit: int) -> np.ndarray:
    """Up to ``limit`` live inputs of ``model`` in [start_ms, end_ms) from ``predictions_inputs``."""
    rows = store.query(
        "SELECT event_id, any(input) FROM predictions_inputs WHERE model_id = {m} AND ts_ms >= {s} AND ts_ms < {e} "
        "GROUP BY event_id ORDER BY cityHash64(event_id) LIMIT {n}",
        {"m": model, "s": int(start_ms), "e": int(end_ms), "n": int(limit)}, readonly=True)
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.asarray([r[1] for r in rows], dtype=np.float32)


def _tsne_model(store: Any, out: Path, state_dir: str | os.PathLike, model: str, minutes: float | None,
                max_points: int, seed: int, echo: Echo) -> list[Path]:
    from workers.inference.models import load_demo_models
    from workers.inference.tap import PENULTIMATE, LayerTap

    demo = load_demo_models(state_dir, [model], progress=False, seed=seed)[model]
    version = _reference_version(store, model, str(demo.version))
    if version is None:
        echo(f"t-SNE: skipped model {model!r}: no reference rows")
        return []
    windows = _live_windows(store, model, version, minutes)
    groups_in: list[tuple[str, str, np.ndarray]] = []
    for label, window_id, start, end, rate in windows:
        x = _window_inputs(store, model, start, end, max_points)
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
        ref = _reference_layer(store, model, version, layer, max_points)
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


def _windows(store: Any, model: str | None, minutes: float | None) -> dict[str, dict[str, np.ndarray]]:
    """{model: {"layer", "end_ms", "rate"}} of drift_windows, deduplicated, oldest first."""
    where, params = [], {}
    if model is not None:
        where.append("model_id = {m}")
        params["m"] = model
    if minutes is not None:
        newest = store.query("SELECT max(window_end_ms), count() FROM drift_windows"
                             + (" WHERE model_id = {m}" if model is not None else ""), params, readonly=True)
        if newest and newest[0][1]:
            where.append("window_end_ms >= {since}")
            params["since"] = max(0, int(newest[0][0]) - int(float(minutes) * 60_000))
    sql = ("SELECT model_id, layer, window_end_ms, detection_rate FROM drift_windows FINAL"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY model_id, window_end_ms, layer")
    rows = store.query(sql, params, readonly=True)
    out: dict[str, dict[str, list]] = {}
    for model_id, layer, end_ms, rate in rows:
        d = out.setdefault(str(model_id), {"layer": [], "end_ms": [], "rate": []})
        d["layer"].append(str(layer))
        d["end_ms"].append(int(end_ms))
        d["rate"].append(float(rate))
    return {k: {"layer": np.asarray(v["layer"]), "end_ms": np.asarray(v["end_ms"], np.int64),
                "rate": np.asarray(v["rate"], np.float64)} for k, v in out.items()}


def _attack_spans(store: Any, model: str, start_ms: int, end_ms: int, bucket_ms: int = 5000
                  ) -> list[tuple[int, int, str]]:
    """(start_ms, end_ms, attack) spans where most predictions of ``model`` carry an attack label."""
    try:
        rows = store.query(
            "SELECT intDiv(ts_ms, {b}) AS bucket, attack, count() FROM predictions FINAL "
            "WHERE model_id = {m} AND ts_ms >= {s} AND ts_ms <= {e} GROUP BY bucket, attack ORDER BY bucket",
            {"b": int(bucket_ms), "m": model, "s": int(max(0, start_ms - bucket_ms)), "e": int(end_ms)},
            readonly=True)
    except Exception:  # noqa: BLE001 - shading is a bonus; the figure is drawn without it
        return []
    per: dict[int, dict[str, int]] = {}
    for bucket, attack, count in rows:
        per.setdefault(int(bucket), {})[str(attack)] = int(count)
    spans: list[tuple[int, int, str]] = []
    for bucket in sorted(per):
        counts = per[bucket]
        total = sum(counts.values())
        attacked = {a: c for a, c in counts.items() if a not in _CLEAN_LABELS}
        if not attacked or sum(attacked.values()) * 2 < total:
            continue
        name = max(attacked, key=attacked.get)
        lo, hi = bucket * bucket_ms, (bucket + 1) * bucket_ms
        if spans and spans[-1][2] == name and spans[-1][1] >= lo:
            spans[-1] = (spans[-1][0], hi, name)
        else:
            spans.append((lo, hi, name))
    return spans


def _ms_to_dt(ms: np.ndarray | Sequence[int]) -> list[_dt.datetime]:
    return [_dt.datetime.fromtimestamp(int(v) / 1000.0, tz=_dt.timezone.utc).replace(tzinfo=None) for v in ms]


def _detection_figures(store: Any, out: Path, model: str | None, minutes: float | None, threshold: float,
                       echo: Echo) -> list[Path]:
    import matplotlib.dates as mdates

    data = _windows(store, model, minutes)
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
        for s, e, attack in _attack_spans(store, name, lo, hi):
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


def _as_confusion(value: Any, siblings: Mapping[str, Any] | None) -> tuple[list[str], np.ndarray] | None:
    """(labels, square matrix) from a confusion entry: a matrix, or a dict holding one and its labels."""
    labels = None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, Mapping):
        for key in ("matrix", "confusion", "confusion_matrix", "counts", "values"):
            if key in value:
                labels = next((value[k] for k in ("labels", "classes", "names") if k in value), None)
                value = value[key]
                if hasattr(value, "tolist"):
                    value = value.tolist()
                break
        else:
            # {true: {pred: count}}
            if value and all(isinstance(v, Mapping) for v in value.values()):
                rows = list(value)
                cols = list(dict.fromkeys(c for v in value.values() for c in v))
                names = list(dict.fromkeys([*rows, *cols]))
                m = np.array([[float(value.get(r, {}).get(c, 0)) for c in names] for r in names])
                return [str(n) for n in names], m
            return None
    if labels is None and siblings is not None:
        labels = next((siblings[k] for k in ("labels", "classes", "attack_labels", "names") if k in siblings), None)
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        return None
    if labels is None or len(labels) != m.shape[0]:
        labels = [str(i) for i in range(m.shape[0])]
    return [str(x) for x in labels], m


def _find_confusions(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, list[str], np.ndarray]]:
    """Every confusion matrix inside a result / JSON document: (key path, labels, matrix)."""
    if depth > 4:
        return []
    if not isinstance(obj, Mapping):
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            obj = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        else:
            return []
    found = []
    for key, value in obj.items():
        here = f"{path}.{key}" if path else str(key)
        if "confusion" in str(key).lower():
            got = _as_confusion(value, obj)
            if got is not None:
                found.append((here, *got))
                continue
        if isinstance(value, Mapping) or (hasattr(value, "__dict__") and not isinstance(value, type)
                                          and not callable(value)):
            found += _find_confusions(value, here, depth + 1)
    return found


def _pick(found: list[tuple[str, list[str], np.ndarray]]) -> tuple[str, list[str], np.ndarray] | None:
    if not found:
        return None
    return sorted(found, key=lambda f: ("attack" not in f[0].lower(), "test" not in f[0].lower(), len(f[0])))[0]


def _confusion_from_evaluate(state_dir: str | os.PathLike, echo: Echo) -> tuple[str, list[str], np.ndarray] | None:
    """The confusion matrix of ``layerwatch classifier eval`` on the held-out split (None when there is none)."""
    import tempfile

    from workers.classifier.training import evaluate

    try:
        with tempfile.TemporaryDirectory(prefix="lw-report-") as scratch:  # evaluate draws its own PNG: not ours
            result = evaluate(state_dir, png_path=Path(scratch) / "confusion.png", print_tables=False)
    except FileNotFoundError:
        echo("confusion matrix: no trained attack classifier (run `layerwatch classifier train`); "
             "trying a saved evaluation JSON")
        return None
    except ValueError as exc:
        echo(f"confusion matrix: {exc}; trying a saved evaluation JSON")
        return None
    got = _pick(_find_confusions(result))
    if got is None:
        echo("confusion matrix: the classifier evaluation has no confusion matrix")
    return got


def _confusion_from_json(paths: Iterable[Path]) -> tuple[str, list[str], np.ndarray] | None:
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        got = _pick(_find_confusions(doc if isinstance(doc, Mapping) else {}))
        if got is not None:
            return f"{path.name}:{got[0]}", got[1], got[2]
    return None


def _confusion_figure(out: Path, state_dir: str | os.PathLike, source: str, confusion_json: str | os.PathLike | None,
                      echo: Echo) -> list[Path]:
    if source == "off":
        return []
    got = None
    if source == "auto" and confusion_json is None:
        got = _confusion_from_evaluate(state_dir, echo)
    if got is None:
        if confusion_json is not None:
            candidates = [Path(confusion_json)]
        else:
            base = Path(state_dir) / "classifier"
            candidates = sorted((p for p in base.glob("*.json") if p.name != "manifest.json"),
                                key=lambda p: ("eval" not in p.name, p.name)) if base.is_dir() else []
        got = _confusion_from_json(candidates)
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


def report_models(store: Any) -> list[str]:
    """Model ids the store has predictions, references or windows of."""
    rows = store.query("SELECT DISTINCT model_id FROM (SELECT model_id FROM predictions UNION ALL "
                       "SELECT model_id FROM reference_embeddings UNION ALL SELECT model_id FROM drift_windows) "
                       "ORDER BY model_id", readonly=True)
    return [str(r[0]) for r in rows]


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
