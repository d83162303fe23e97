"""Clean references per model version, read from ``reference_embeddings`` and fitted once."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from streams.plugins import load
from streams.rows import now_ms
from streams.store import statements as Q
from streams.writer import StoreWriter
from workers.drift import DriftTest
from workers.hidden_attacks import HiddenAttackTest

log = logging.getLogger(__name__)

Key = tuple[str, str]

BUILTIN_TESTS = {"mmd": "workers.mmd.drift_test:fit"}


@dataclass
class Reference:
    """A fitted test for one model version and what it was fitted on."""

    test: DriftTest
    layers: tuple[str, ...]
    n: int
    built_ms: int
    hidden: HiddenAttackTest | None = None  # count and heavy-client tests (LW_HIDDEN_ATTACK_TESTS)


def fit_hidden(layers: Mapping[str, np.ndarray], classes: np.ndarray, settings: Any) -> HiddenAttackTest | None:
    """The hidden-attack tests of a reference, or None when they are off or cannot be fitted (logged)."""
    if not settings.hidden_attack_tests:
        return None
    try:
        # BLAS threads: the worker caps them process-wide (LW_TORCH_THREADS, streams.process.limit_threads)
        return HiddenAttackTest(layers, classes, flag_rate=settings.event_flag_rate,
                                min_client_events=settings.client_min_events, rest_alpha=settings.count_alpha)
    except (ValueError, np.linalg.LinAlgError) as exc:
        log.warning("hidden-attack tests off for this reference (%s)", exc)
        return None


def drift_layers(layers: Mapping[str, Any], spec: str) -> dict[str, Any]:
    """The layers the window test uses: ``spec`` is ``all`` or a comma list of layer names (``LW_DRIFT_LAYERS``).

    Example:
        >>> sorted(drift_layers({"penultimate": 1, "stem": 2}, "penultimate"))
        ['penultimate']
    """
    if spec.strip() == "all":
        return dict(layers)
    wanted = {name.strip() for name in spec.split(",") if name.strip()}
    return {name: value for name, value in layers.items() if name in wanted}


def reference_arrays(rows: Sequence[Sequence[Any]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(event_id, layer, predicted, vector) rows → aligned {layer: (n, d)} and predicted classes.

    Only events present in every layer are kept, in one event order shared by all layers.
    """
    by_layer: dict[str, dict[str, tuple[int, Any]]] = {}
    for event_id, layer, predicted, vector in rows:
        by_layer.setdefault(layer, {})[event_id] = (predicted, vector)
    if not by_layer:
        return {}, np.empty(0, np.int64)
    common = sorted(set.intersection(*(set(v) for v in by_layer.values())))
    layers = {
        layer: np.asarray([values[e][1] for e in common], dtype=np.float32).reshape(len(common), -1)
        for layer, values in by_layer.items()
    }
    first = next(iter(by_layer.values()))
    predicted = np.asarray([first[e][0] for e in common], dtype=np.int64)
    return layers, predicted


class ReferenceCache:
    """References per model version: loaded from the store on first use, refitted when new reference data lands.

    The test is built by the factory ``settings.drift_test`` names (``mmd``, or
    ``package.module:factory``), in the given executor (fitting may be heavy). The
    hidden-attack tests are fitted afterwards in a thread of their own: a worker that meets
    a hundred models at once starts testing their windows at once, and each model's count
    rows begin with its first window after that fit (a few tenths of a second per model).
    """

    def __init__(self, settings: Any, writer: StoreWriter, metrics: Any = None):
        self.settings, self.writer, self.metrics = settings, writer, metrics
        self._hidden_fits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-hidden-fit")
        self.factory = load(settings.drift_test, BUILTIN_TESTS, "LW_DRIFT_TEST")
        self._cache: dict[Key, Reference] = {}
        self._loading: dict[Key, asyncio.Future] = {}  # a window and the preload may ask for the same key at once
        self._stale: set[Key] = set()
        self._warned: set[Key] = set()

    def _pending(self, change: int) -> None:
        if self.metrics is not None:
            self.metrics.hidden_fits.inc(change)

    def close(self) -> None:
        self._hidden_fits.shutdown(wait=False, cancel_futures=True)

    def mark_stale(self, key: Key) -> None:
        self._stale.add(key)

    async def get(self, key: Key, executor: ThreadPoolExecutor) -> Reference | None:
        """The fitted reference of a model version (None when it has none yet); one load per key at a time."""
        if key in self._cache and key not in self._stale:
            return self._cache[key]
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.ensure_future(self._load(key, executor))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, key: Key, executor: ThreadPoolExecutor) -> Reference | None:
        s = self.settings
        params = {"model_id": key[0], "model_version": key[1], "limit": s.reference_max}
        ids = [r[0] for r in await self.writer.query(Q.REFERENCE_IDS, params)]
        if len(ids) < max(2, s.detection_m // 2):
            if key not in self._warned:
                log.warning("model %s version %s has %d reference events: not tested until `layerwatch reference` "
                            "publishes its validation data", key[0], key[1], len(ids))
                self._warned.add(key)
            return None
        layers, classes = reference_arrays(await self.writer.query(Q.REFERENCE_ROWS, {**params, "ids": ids}))
        layers = drift_layers(layers, s.drift_layers)
        if not layers:
            if key not in self._warned:
                log.warning("model %s version %s publishes none of the layers LW_DRIFT_LAYERS=%s names: not tested",
                            key[0], key[1], s.drift_layers)
                self._warned.add(key)
            return None
        loop = asyncio.get_running_loop()
        test = await loop.run_in_executor(executor, self.factory, layers, classes, s)
        self._stale.discard(key)
        self._warned.discard(key)
        reference = Reference(test, tuple(layers), len(classes), now_ms())
        if s.hidden_attack_tests:
            fit = loop.run_in_executor(self._hidden_fits, fit_hidden, layers, classes, s)
            self._pending(+1)

            def fitted(f: asyncio.Future) -> None:
                self._pending(-1)
                if not f.cancelled() and f.exception() is None:
                    reference.hidden = f.result()

            fit.add_done_callback(fitted)
        self._cache[key] = reference
        log.info("reference for %s@%s: %d events, layers %s", key[0], key[1], reference.n, ", ".join(layers))
        return reference
