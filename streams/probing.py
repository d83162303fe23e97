"""Behavioural detection of attack probing: many highly similar, non-identical queries from one client.

An attacker crafting an adversarial example (or extracting a model) sends bursts of
near-duplicate inputs: one base input plus small perturbations. Their penultimate-layer
embeddings are then nearly parallel, while normal clients send unrelated inputs and a
client simply retrying sends *exact* repeats. So, per client, a small ring buffer (the
sketch) keeps its last ``sketch_size`` L2-normalised embeddings with their timestamps; each
new embedding counts the recent entries (within ``window_s``) whose cosine similarity is in
``[similarity, identical)``; a client whose count reaches ``min_queries`` is flagged once,
until it goes quiet (no near-duplicate for ``window_s``) or :meth:`ProbingDetector.clear`.

Pure and bounded: no I/O, memory ``max_clients * sketch_size * dim`` float16 values at most
(least-recently-seen clients are evicted). One detector serves one model (embeddings of
different models are not comparable). Vectorised: the batch is grouped by client with
``np.unique(..., return_inverse=True)``; per client, one matrix product against its sketch
plus the within-batch Gram matrix, in chunks of ``sketch_size`` rows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

_NEVER = -(2**62)
_BLAS: Any = None


def _one_blas_thread() -> Any:
    """Limit BLAS (numpy's OpenBLAS) to one thread while the small products below run.

    The products are at most (sketch_size x d) @ (d x sketch_size): OpenBLAS's thread pool
    costs more than it saves there, and on a loaded machine its spinning threads made
    :meth:`ProbingDetector.update` ~40x slower (measured: 420 ms instead of 10 ms for a
    1024-row, 512-dim batch of 8 clients, 2 shared cores). threadpoolctl, ~30 µs per use.
    """
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class ProbingHit:
    """A client flagged for probing: when, with how many near-duplicates of one query, how similar."""

    client_id: str
    ts_ms: int
    count: int
    mean_similarity: float


@dataclass
class _Client:
    emb: np.ndarray  # (sketch_size, dim) float16, L2-normalised rows
    ts: np.ndarray  # (sketch_size,) int64, _NEVER for empty slots
    pos: int = 0  # next slot to overwrite
    flagged: bool = False
    last_near_ms: int = _NEVER  # ts of the latest query that had a near-duplicate


class ProbingDetector:
    """Flags clients that send many near-duplicate (similar, not identical) queries in a short time.

    For each new embedding, ``count`` = number of the client's recent queries (its sketch,
    plus earlier rows of the same batch) within ``window_s`` whose cosine similarity is
    ``>= similarity`` and ``< identical``. Exact repeats (similarity ``>= identical``) do not
    count: retries are not probing. The first embedding whose count reaches ``min_queries``
    yields a :class:`ProbingHit`; the client then stays flagged (no further hits) until it
    sends no near-duplicate for ``window_s`` or is :meth:`clear`-ed. Rows with an empty
    client id (unknown client) are ignored. ``min_queries`` should not exceed
    ``sketch_size``: a query only sees the last ``sketch_size`` to ``2*sketch_size - 1``
    queries of its client.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> det = ProbingDetector(min_queries=20)
        >>> base = rng.normal(size=64)
        >>> probe = base + 0.01 * rng.normal(size=(30, 64))        # one input, tiny perturbations
        >>> normal = rng.normal(size=(30, 64))                     # unrelated inputs
        >>> ts = np.arange(30) * 100
        >>> hits = det.update(["mallory"] * 30 + ["alice"] * 30, np.concatenate([ts, ts]), np.vstack([probe, normal]))
        >>> [(h.client_id, h.count, h.ts_ms) for h in hits]
        [('mallory', 20, 2000)]
        >>> det.update(["mallory"], [3000], probe[:1] + 0.01), det.flagged   # flagged once until quiet
        ([], frozenset({'mallory'}))
    """

    def __init__(
        self,
        similarity: float = 0.98,
        identical: float = 0.99999,
        min_queries: int = 20,
        window_s: float = 30.0,
        sketch_size: int = 64,
        max_clients: int = 10_000,
    ) -> None:
        if not -1.0 <= similarity < identical:
            raise ValueError(f"need -1 <= similarity < identical, got {similarity} and {identical}")
        if min_queries < 1 or sketch_size < 1 or max_clients < 1 or window_s <= 0:
            raise ValueError("min_queries, sketch_size, max_clients and window_s must be positive")
        self.similarity = float(similarity)
        self.identical = float(identical)
        self.min_queries = int(min_queries)
        self.window_ms = int(round(window_s * 1000))
        self.sketch_size = int(sketch_size)
        self.max_clients = int(max_clients)
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.evicted = 0

    @property
    def flagged(self) -> frozenset[str]:
        """Clients currently flagged (hit reported, not yet quiet or cleared)."""
        return frozenset(c for c, st in self._clients.items() if st.flagged)

    def __len__(self) -> int:
        """Number of clients tracked."""
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def clear(self, client_id: str) -> None:
        """Forget a client (e.g. an operator cleared it): it must build up ``min_queries`` again."""
        self._clients.pop(client_id, None)

    def update(
        self,
        client_ids: Sequence[str] | np.ndarray,
        ts_ms: Sequence[int] | np.ndarray,
        embeddings: np.ndarray,
    ) -> list[ProbingHit]:
        """Score one batch of queries (rows aligned across the three arguments); return new hits."""
        ids = np.asarray(client_ids, dtype=str).ravel()
        ts = np.asarray(ts_ms, dtype=np.int64).ravel()
        emb = np.asarray(embeddings, dtype=np.float32)
        emb = emb.reshape(emb.shape[0], -1) if emb.ndim != 2 else emb
        if not (ids.size == ts.size == emb.shape[0]):
            raise ValueError(f"misaligned batch: {ids.size} client ids, {ts.size} ts, {emb.shape[0]} embeddings")
        if ids.size == 0:
            return []
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        uniq, inv = np.unique(ids, return_inverse=True)
        order = np.lexsort((ts, inv))  # grouped by client, each group in time order
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=uniq.size))])
        hits: list[ProbingHit] = []
        with _one_blas_thread():
            for g, cid in enumerate(uniq.tolist()):
                if cid == "":
                    continue
                rows = order[bounds[g] : bounds[g + 1]]
                hit = self._update_client(cid, ts[rows], emb[rows])
                if hit is not None:
                    hits.append(hit)
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
            self.evicted += 1
        return hits

    def _state(self, cid: str, dim: int) -> _Client:
        st = self._clients.get(cid)
        if st is None or st.emb.shape[1] != dim:
            st = _Client(np.zeros((self.sketch_size, dim), np.float16), np.full(self.sketch_size, _NEVER, np.int64))
            self._clients[cid] = st
        self._clients.move_to_end(cid)
        return st

    def _near(self, sim: np.ndarray) -> np.ndarray:
        """Similar enough to be a perturbation of the same input, yet not an exact repeat."""
        return (sim >= self.similarity) & (sim < self.identical)

    def _update_client(self, cid: str, ts: np.ndarray, emb: np.ndarray) -> ProbingHit | None:
        st = self._state(cid, emb.shape[1])
        k, w = self.sketch_size, self.window_ms
        hit: ProbingHit | None = None
        for lo in range(0, ts.size, k):  # chunks of at most sketch_size rows bound the Gram matrix
            t, e = ts[lo : lo + k], emb[lo : lo + k]
            if st.flagged and t[0] - st.last_near_ms > w:
                st.flagged = False  # quiet for a whole window: the next burst is a new hit
            # only sketch entries that can fall within the window of some row of the chunk
            live = np.flatnonzero((st.ts >= t[0] - w) & (st.ts <= t[-1] + w))
            sketch = st.emb[live].astype(np.float32)
            # renormalise after the float16 round trip, else an exact repeat scores 1 - O(1e-5), not 1 - O(1e-8)
            sketch /= np.maximum(np.linalg.norm(sketch, axis=1, keepdims=True), 1e-12)
            sim_s = e @ sketch.T  # (c, live)
            near_s = (np.abs(t[:, None] - st.ts[live][None, :]) <= w) & self._near(sim_s)
            gram = e @ e.T  # (c, c); only earlier rows of the chunk count (strict lower triangle)
            earlier = np.tri(t.size, t.size, -1, dtype=bool)
            near_b = earlier & (np.abs(t[:, None] - t[None, :]) <= w) & self._near(gram)
            count = near_s.sum(axis=1) + near_b.sum(axis=1)
            total = np.where(near_s, sim_s, 0.0).sum(axis=1) + np.where(near_b, gram, 0.0).sum(axis=1)
            has = count > 0
            if has.any():
                st.last_near_ms = max(st.last_near_ms, int(t[has].max()))
            if not st.flagged:
                reached = np.flatnonzero(count >= self.min_queries)
                if reached.size:
                    i = int(reached[0])
                    hit = ProbingHit(cid, int(t[i]), int(count[i]), float(total[i] / count[i]))
                    st.flagged = True
            slots = (st.pos + np.arange(t.size)) % k
            st.emb[slots] = e
            st.ts[slots] = t
            st.pos = int((st.pos + t.size) % k)
        return hit
