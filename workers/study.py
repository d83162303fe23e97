"""Layer study: the LADIS per-layer detection-rate table, measured on a demo model.

Seed 000 (LADIS) tests windows of layer activations against a clean reference with
an MMD two-sample test and reports, per layer, the *detection rate*: the share of
repeated tests on random subsamples that reject at alpha. Its table for PGD at
ε 0.003 on ResNet18 (ImageNet) rises with depth: layer 1: 3%, 4: 7%, 8: 84%,
12: 95%, 14: 100%, 15: 100%, which is why layerwatch taps the penultimate layer first.

:func:`layer_study` measures the same table on a demo model (see
:mod:`workers.inference.models`), with layerwatch's own MMD engine
(:class:`workers.mmd.MMDTester`, the drift agent's kernel settings):

- **reference**: activations of the *validation* split (what ``layerwatch reference``
  publishes);
- **false-positive rate**: clean *test* activations against that reference (the
  "baseline rate" of the seed, which should stay near alpha);
- **detection rate per preset**: activations of the adversarial versions of the *test*
  split (:func:`workers.attacks.generate`, cached under ``<state_dir>/attacks/``, the
  same sets the traffic simulator sends), every attacked input included, failed
  attacks too (an attacker sends them all), unless ``successful_only``;
- per tapped layer, shallow to deep (:func:`workers.inference.models.layer_names`:
  conv maps reduced by global average pooling, ending with the penultimate layer),
  plus the combined test of all layers (layerwatch's ``__combined__`` row: the
  engine's default combination, min-p over the same permutations) and, beside it,
  every other combination (``combined:<method>`` rows: Fisher, max, sum).

The kernel is the engine's default (:class:`workers.mmd.MMDTester`'s own defaults:
standardised features, five bandwidths median × 2^f, f = −2…2 — chosen by
``bench/detection.py``, see docs/detection.md); ``standardize`` and
``bandwidth_multipliers`` override it for comparisons.

All layers of a window are tested in one ``detection_rate`` call (same subsamples and
permutations for every layer); the clean and the adversarial windows have the same
size, so they are tested on the same subsample indices (a paired comparison).

Pure compute: no broker, no store. ``run_study_cli`` prints the table
(``layerwatch study layers --model resnet --json PATH``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from schemas.batch import COMBINED
from workers.progress import progress_bar

__all__ = [
    "CLEAN",
    "COMBINED",
    "combination_key",
    "LADIS_PGD_TABLE",
    "StudyResult",
    "format_table",
    "layer_study",
    "run_study_cli",
    "to_json",
    "to_markdown",
]

CLEAN = "clean"


def combination_key(method: str) -> str:
    """Stats key of a multi-layer combination's row (``COMBINED`` holds the engine's default)."""
    return f"combined:{method}"

#: Seed 000's table: PGD ε 0.003 on ResNet18, detection rate by layer index.
LADIS_PGD_TABLE: dict[int, float] = {1: 0.03, 4: 0.07, 8: 0.84, 12: 0.95, 14: 1.00, 15: 1.00}


@dataclass
class WindowStats:
    """One window (clean or one preset) at one layer: rate and what it rests on."""

    rate: float
    median_p: float
    median_mmd2: float


@dataclass
class StudyResult:
    """The measured layer table and everything needed to read it.

    ``rates[window][layer]`` is the detection rate of a window (``"clean"`` — the
    false-positive rate — or a preset name) at a layer, ``layers`` is shallow to deep,
    ``COMBINED`` holds the combined all-layers test. ``stats`` adds the median p-value
    and median MMD² per (window, layer); ``attacks`` the preset settings and success.
    """

    model: str
    model_version: str
    layers: list[str]
    dims: dict[str, int]
    presets: list[str]
    stats: dict[str, dict[str, WindowStats]]
    attacks: dict[str, dict[str, Any]]
    params: dict[str, Any]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rates(self) -> dict[str, dict[str, float]]:
        """Detection rate per window and layer (from ``stats``)."""
        return {w: {k: st.rate for k, st in per.items()} for w, per in self.stats.items()}

    @property
    def fpr(self) -> dict[str, float]:
        """False-positive rate per layer (clean test vs clean validation), COMBINED included."""
        return self.rates[CLEAN]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats, strings, lists)."""
        return {
            "model": self.model,
            "model_version": self.model_version,
            "layers": list(self.layers),
            "dims": dict(self.dims),
            "presets": list(self.presets),
            "rates": {w: dict(v) for w, v in self.rates.items()},
            "stats": {w: {k: asdict(s) for k, s in v.items()} for w, v in self.stats.items()},
            "attacks": self.attacks,
            "params": self.params,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "ladis_reference_table": {str(k): v for k, v in LADIS_PGD_TABLE.items()},
        }


# --------------------------------------------------------------------------------- compute


def _preset_label(name: str) -> str:
    """'pgd_small (ε 0.16)' for norm-bounded presets, else the name."""
    from workers.attacks import get_preset

    try:
        spec = get_preset(name)
    except KeyError:
        return name
    if spec.max_l2 is not None:
        return f"{name} (L2 ≤ {spec.max_l2:g})"
    eps = spec.params.get("eps")
    if eps is None:
        return name
    norm = "L∞" if math.isinf(spec.norm) else f"L{spec.norm:g}"
    return f"{name} ({norm} ε {eps:g})"


def _attack_info(name: str, result: Any, n_window: int) -> dict[str, Any]:
    from workers.attacks import get_preset

    spec = get_preset(name)
    return {
        "label": _preset_label(name),
        "config": spec.config(),
        "success_rate": float(result.success_rate),
        "adv_accuracy": float(result.adv_accuracy),
        "mean_linf": float(result.mean_linf),
        "mean_l2": float(result.mean_l2),
        "n": int(result.n),
        "n_window": int(n_window),
        "cached": bool(result.cached),
    }




def layer_study(
    state_dir: str | os.PathLike,
    model: str = "resnet",
    presets: Sequence[str] = ("pgd_small", "pgd_large"),
    repeats: int = 100,
    m: int = 100,
    n_permutations: int = 500,
    seed: int = 0,
    progress: bool = True,
    *,
    layers: Sequence[str] | None = None,
    alpha: float = 0.05,
    successful_only: bool = False,
    standardize: bool | None = None,
    bandwidth_multipliers: Sequence[float] | None = None,
    device: str | None = None,
) -> StudyResult:
    """Detection rate per tapped layer of ``model``: clean (FPR) and each attack preset.

    Loads (or trains and caches) the demo model in ``state_dir``, taps ``layers``
    (default: :func:`~workers.inference.models.layer_names`, shallow to deep), takes the
    validation split's activations as the reference and tests the clean test split and
    each preset's adversarial test split against it with
    ``MMDTester.detection_rate(repeats, m, alpha)`` and ``n_permutations`` permutations.
    Adversarial sets are generated once and cached under ``<state_dir>/attacks/``.

    ``successful_only`` keeps only the adversarial inputs that flipped the prediction;
    ``standardize`` and ``bandwidth_multipliers`` override the engine's default kernel
    (None: the default, as the drift stage runs it). Seeded throughout: the same
    arguments give the same table.
    """
    from workers.attacks import generate, get_preset
    from workers.inference.data import demo_split
    from workers.inference.models import layer_names, load_demo_models
    from workers.inference.tap import PENULTIMATE, LayerTap
    from workers.mmd import COMBINATIONS, MMDTester

    presets = list(presets)
    for name in presets:
        get_preset(name)  # KeyError listing the known presets
    if CLEAN in presets:
        raise ValueError(f"{CLEAN!r} is the false-positive column, not a preset")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    demo = load_demo_models(state_dir, [model], progress=progress, seed=seed)[model]
    timings["models"] = time.perf_counter() - t0
    study_layers = list(layers) if layers is not None else layer_names(model)
    if not study_layers:
        raise ValueError("no layers to study")
    if len(set(study_layers)) != len(study_layers):
        raise ValueError(f"duplicate layer names in {study_layers}")
    split = demo_split(seed)

    steps = 1 + len(presets) + (1 + len(presets))  # activations, attacks, one test per window
    with progress_bar(progress) as bar:
        task = bar.add_task(f"layer study: {model}", total=steps)
        t0 = time.perf_counter()
        tap = LayerTap(demo.module, [n for n in study_layers if n != PENULTIMATE],
                       penultimate=PENULTIMATE in study_layers)
        try:
            def acts(x: np.ndarray) -> dict[str, np.ndarray]:
                got = tap.tap(x).layers
                return {name: np.asarray(got[name], dtype=np.float32) for name in study_layers}

            reference = acts(split.x_val)
            windows: dict[str, dict[str, np.ndarray]] = {CLEAN: acts(split.x_test)}
            bar.advance(task)
            timings["activations"] = time.perf_counter() - t0
            attacks: dict[str, dict[str, Any]] = {}
            t0 = time.perf_counter()
            for name in presets:
                bar.update(task, description=f"layer study: {model}, attack {name}")
                result = generate(demo.module, split.x_test, split.y_test, name, seed=seed, state_dir=state_dir,
                                  model_name=model)
                x_adv = result.x_adv[result.success] if successful_only else result.x_adv
                if len(x_adv) < 2:
                    raise ValueError(f"preset {name!r}: fewer than 2 adversarial inputs to test")
                windows[name] = acts(x_adv)
                attacks[name] = _attack_info(name, result, len(x_adv))
                bar.advance(task)
            timings["attacks"] = time.perf_counter() - t0
        finally:
            tap.remove()

        t0 = time.perf_counter()
        bar.update(task, description=f"layer study: {model}, MMD tests")
        kernel: dict[str, Any] = {}
        if standardize is not None:
            kernel["standardize"] = bool(standardize)
        if bandwidth_multipliers is not None:
            kernel["bandwidth_multipliers"] = tuple(bandwidth_multipliers)
        tester = MMDTester(reference, n_permutations=n_permutations, seed=seed, device=device, **kernel)
        stats: dict[str, dict[str, WindowStats]] = {}
        for window_name, window in windows.items():
            res = tester.detection_rate(window, repeats=repeats, m=m, alpha=alpha)
            per = dict(res.layers) if res.layers else {study_layers[0]: res}
            per[COMBINED] = res
            row = {
                k: WindowStats(rate=float(per[k].rate), median_p=float(np.median(per[k].p_values)),
                               median_mmd2=float(np.median(per[k].mmd2)))
                for k in [*study_layers, COMBINED]
            }
            for method, p_values in res.combinations.items():
                if method != res.method:
                    row[combination_key(method)] = WindowStats(
                        rate=float(np.mean(p_values <= alpha)), median_p=float(np.median(p_values)),
                        median_mmd2=float(np.median(res.mmd2)))
            stats[window_name] = row
            bar.advance(task)
        timings["mmd"] = time.perf_counter() - t0
        bar.update(task, completed=steps, description=f"layer study: {model}, done")

    params = {
        "repeats": int(repeats),
        "m": int(m),
        "n_permutations": int(n_permutations),
        "alpha": float(alpha),
        "seed": int(seed),
        "n_reference": int(len(split.y_val)),
        "n_clean": int(len(split.y_test)),
        "successful_only": bool(successful_only),
        "standardize": bool(tester.standardize),
        "bandwidth_multipliers": list(tester.bandwidth_multipliers),
        "combination": tester.combine,
        "other_combinations": [m for m in COMBINATIONS if m != tester.combine and len(study_layers) > 1],
        "bandwidth": {k: float(v) for k, v in tester.bandwidth.items()} if isinstance(tester.bandwidth, dict)
        else float(tester.bandwidth),
        "device": str(tester.device),
        "reference": "validation split",
        "window": "test split (clean and adversarial)",
        "val_accuracy": float(demo.val_accuracy),
        "test_accuracy": float(demo.test_accuracy),
    }
    return StudyResult(
        model=model,
        model_version=str(demo.version),
        layers=study_layers,
        dims={k: int(v.shape[1]) for k, v in reference.items()},
        presets=presets,
        stats=stats,
        attacks=attacks,
        params=params,
        seconds=time.perf_counter() - started,
        timings=timings,
    )


# --------------------------------------------------------------------------------- output


def _pct(rate: float) -> str:
    return f"{rate * 100:.0f}%"


def _rows(result: StudyResult) -> list[tuple[str, str, str, list[float]]]:
    """(index, layer, dim, [fpr, rate per preset]) rows, then the combined rows (the default first)."""
    rows = []
    for i, name in enumerate(result.layers, start=1):
        rows.append((str(i), name, str(result.dims.get(name, "")),
                     [result.rates[CLEAN][name], *(result.rates[p][name] for p in result.presets)]))
    dim = str(sum(result.dims.values()))
    combined = [(COMBINED, f"all layers (combined: {result.params.get('combination', 'minp')}, default)")]
    combined += [(combination_key(m), f"all layers (combined: {m})")
                 for m in result.params.get("other_combinations", [])]
    for key, label in combined:
        rows.append(("", label, dim, [result.rates[CLEAN][key], *(result.rates[p][key] for p in result.presets)]))
    return rows


def _kernel(p: dict[str, Any]) -> str:
    mult = p.get("bandwidth_multipliers", [1.0])
    bws = "one median bandwidth" if list(mult) == [1.0] else (
        "median × " + ", ".join(f"{m:g}" for m in mult) + " (mean kernel)")
    return f"{'standardised' if p.get('standardize') else 'raw'} features, {bws}"


def _caption(result: StudyResult) -> str:
    p = result.params
    attacks = "; ".join(
        f"{a['label']}: attack success {a['success_rate'] * 100:.0f}%, mean L∞ {a['mean_linf']:.3f}, "
        f"n={a['n_window']}" for a in result.attacks.values()
    )
    return (
        f"Detection rate = share of {p['repeats']} MMD tests (m={p['m']} reference + m window rows, "
        f"{p['n_permutations']} permutations) rejecting at α={p['alpha']:g}. Reference: {p['n_reference']} "
        f"clean validation activations; FPR column: {p['n_clean']} clean test inputs; attack columns: the "
        f"adversarial test inputs ({attacks}). Kernel: {_kernel(p)}. Model {result.model} v{result.model_version} "
        f"(test accuracy {p['test_accuracy'] * 100:.1f}%), seed {p['seed']}, {result.seconds:.1f} s on "
        f"{p['device']}."
    )


def format_table(result: StudyResult) -> Any:
    """The layer table as a ``rich.table.Table`` (FPR column, then one column per preset)."""
    from rich.table import Table

    p = result.params
    table = Table(
        title=f"Layer study: {result.model} v{result.model_version} — detection rate per layer "
              f"(R={p['repeats']}, m={p['m']}, P={p['n_permutations']}, α={p['alpha']:g})",
        caption=_caption(result),
        caption_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("layer (shallow → deep)")
    table.add_column("dim", justify="right")
    table.add_column("clean test (FPR)", justify="right")
    for name in result.presets:
        table.add_column(result.attacks[name]["label"], justify="right")
    rows = _rows(result)
    for i, (idx, layer, dim, values) in enumerate(rows):
        cells = [_pct(values[0])]
        for v in values[1:]:
            style = "bold green" if v >= 0.9 else ("yellow" if v >= 0.5 else "red")
            cells.append(f"[{style}]{_pct(v)}[/]")
        table.add_row(idx, layer, dim, *cells, end_section=(i == len(result.layers) - 1))
    return table


def to_markdown(result: StudyResult) -> str:
    """The layer table as GitHub markdown (for the README), with a caption paragraph."""
    head = ["#", "layer (shallow → deep)", "dim", "clean test (FPR)",
            *(result.attacks[p]["label"] for p in result.presets)]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["--:", ":--", "--:"] + ["--:"] * (len(head) - 3)) + "|"]
    for idx, layer, dim, values in _rows(result):
        layer_cell = f"`{layer}`" if idx else f"*{layer}*"
        lines.append("| " + " | ".join([idx, layer_cell, dim, *(_pct(v) for v in values)]) + " |")
    return "\n".join(lines) + "\n\n" + _caption(result) + "\n"


def to_json(result: StudyResult, path: str | os.PathLike | None = None) -> str:
    """The result as indented JSON text; also written to ``path`` when given."""
    text = json.dumps(result.to_dict(), indent=2, sort_keys=False, ensure_ascii=False)
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
    return text


def run_study_cli(
    state_dir: str | os.PathLike,
    model: str = "resnet",
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    **study_kwargs: Any,
) -> StudyResult:
    """``layerwatch study layers``: run :func:`layer_study`, print the table, optionally write JSON/markdown.

    Extra keyword arguments (``presets``, ``repeats``, ``m``, ``n_permutations``, ``seed``,
    ``layers``, ...) go to :func:`layer_study`.
    """
    from rich.console import Console

    console = Console()
    result = layer_study(state_dir, model, **study_kwargs)
    console.print(format_table(result))
    if json_path is not None:
        to_json(result, json_path)
        console.print(f"wrote {json_path}")
    if markdown_path is not None:
        target = Path(markdown_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(to_markdown(result), encoding="utf-8")
        console.print(f"wrote {markdown_path}")
    return result
