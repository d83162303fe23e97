"""Behavioural detection of attack probing: many highly similar, non-identical queries from one client.

An attacker crafting an adversarial example (or extracting a model) sends bursts of
near-duplicate inputs: one base input plus small perturbations. Their penultimate-layer
embeddings are then nearly parallel, while normal clients send unrelated inputs and a
client simply retrying sends *exact* repeats. So, per client, a small ring buffer (the
sketch) keeps its last ``sketch_size`` embeddings (float16, L2-normalised when read) with their timestamps; each
new embedding counts the recent entries (within ``window_s``) whose cosine similarity is in
``[similarity, identical)``; a client whose count reaches ``min_queries`` is flagged once,
until it goes quiet (no near-duplicate for ``window_s``) or :meth:`ProbingDetector.clear`.

Pure and bounded: no I/O, memory ``max_clients * sketch_size * dim`` float16 values at most
(least-recently-seen clients are evicted). One detector serves one model (embeddings of
different models are not comparable). Vectorised: the batch is grouped by client with
``np.unique(..., return_inverse=True)`` and gathered once in client order; per client and
chunk of ``sketch_size`` rows, one matrix product against the rows before it (the sketch,
or the previous chunk) and its own earlier rows. The products run with one BLAS thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
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


def _float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32; float16 through torch, whose F16C conversion is ~3x numpy's ``astype``."""
    if a.dtype != np.float16:
        return a.astype(np.float32)
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).numpy()


@dataclass(frozen=True)
class ProbingHit:
    """A client flagged for probing: when, with how many near-duplicates of one query, how similar."""

    client_id: str
    ts_ms: int
    count: int
    mean_similarity: float


@dataclass
class _Client:
    emb: np.ndarray  # (sketch_size, dim) float16 rows (renormalised when read)
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
        raw = np.asarray(embeddings)
        raw = raw.reshape(raw.shape[0], -1) if raw.ndim != 2 else raw
        if not (ids.size == ts.size == raw.shape[0]):
            raise ValueError(f"misaligned batch: {ids.size} client ids, {ts.size} ts, {raw.shape[0]} embeddings")
        if ids.size == 0:
            return []
        uniq, inv = np.unique(ids, return_inverse=True)
        order = np.lexsort((ts, inv))  # grouped by client, each group in time order
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=uniq.size))])
        # one gather in client order (in the input dtype, float16 is half the bytes), one conversion,
        # then L2-normalised in place: no per-client copies of the batch
        grouped = raw[order]
        emb = _float32(grouped)
        emb *= (1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", emb, emb)), 1e-12))[:, None]
        # the sketch keeps float16 rows and renormalises what it reads: float16 input rows go in as they
        # came (no float32 -> float16 conversion), anything else normalised first (no float16 overflow)
        keep = grouped if grouped.dtype == np.float16 else emb
        ts = ts[order]
        hits: list[ProbingHit] = []
        with _one_blas_thread():
            for g, cid in enumerate(uniq.tolist()):
                if cid == "":
                    continue
                lo, hi = int(bounds[g]), int(bounds[g + 1])
                hit = self._update_client(cid, ts[lo:hi], emb[lo:hi], keep[lo:hi])
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

    def _update_client(self, cid: str, ts: np.ndarray, emb: np.ndarray, keep: np.ndarray) -> ProbingHit | None:
        """Score one client's rows (time order, L2-normalised float32) against its sketch and each other.

        Rows go in chunks of ``sketch_size``: a chunk sees the sketch as it was before the
        chunk plus the chunk's earlier rows. As a chunk fills the whole ring, the sketch a
        later chunk sees is exactly the previous chunk, which is at hand in float32 just
        before it: one product ``chunk @ [previous; chunk].T`` per chunk, a "column before
        my row" mask, and a time mask only when the rows span more than the window. The
        float16 sketch is read (and renormalised) once per call and written once, with the
        last ``sketch_size`` rows of ``keep`` (the same rows as stored: ``emb`` before
        normalisation when that is float16 already), at the end.
        """
        st = self._state(cid, emb.shape[1])
        k, w = self.sketch_size, self.window_ms
        n = ts.size
        hit: ProbingHit | None = None
        # chunk 0 sees the sketch entries that can fall within the window of one of its rows
        first_hi = min(n, k)
        live = np.flatnonzero((st.ts >= ts[0] - w) & (st.ts <= ts[first_hi - 1] + w))
        sketch = _float32(st.emb[live])
        # renormalise after the float16 round trip, else an exact repeat scores 1 - O(1e-5), not 1 - O(1e-8)
        sketch *= (1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", sketch, sketch)), 1e-12))[:, None]
        x = np.concatenate([sketch, emb[:first_hi]])
        x_ts = np.concatenate([st.ts[live], ts[:first_hi]])
        for lo in range(0, n, k):  # chunks of at most sketch_size rows bound the product
            hi = min(n, lo + k)
            t, e = ts[lo:hi], emb[lo:hi]
            if lo:  # the previous chunk (a full ring) is the sketch now: contiguous with this chunk
                x, x_ts = emb[lo - k : hi], ts[lo - k : hi]
            if st.flagged and t[0] - st.last_near_ms > w:
                st.flagged = False  # quiet for a whole window: the next burst is a new hit
            sim = e @ x.T  # (c, before + c): row i sees the columns before its own position
            near = self._near(sim) & _before(x.shape[0] - t.size, t.size)
            if int(x_ts.max()) - int(x_ts.min()) > w:
                near &= np.abs(t[:, None] - x_ts[None, :]) <= w
            count = np.count_nonzero(near, axis=1)
            has = np.flatnonzero(count)
            if has.size:  # rows are in time order: the last row with a near-duplicate is the latest
                st.last_near_ms = max(st.last_near_ms, int(t[has[-1]]))
            if not st.flagged:
                reached = np.flatnonzero(count >= self.min_queries)
                if reached.size:
                    i = int(reached[0])
                    hit = ProbingHit(cid, int(t[i]), int(count[i]), float(sim[i][near[i]].sum()) / int(count[i]))
                    st.flagged = True
        # ring buffer: row g of this call goes to slot (pos + g) % k; only the last k rows survive
        first = max(0, n - k)
        slots = (st.pos + np.arange(first, n)) % k
        st.emb[slots] = keep[first:]
        st.ts[slots] = ts[first:]
        st.pos = int((st.pos + n) % k)
        return hit


@lru_cache(maxsize=256)
def _before(before: int, c: int) -> np.ndarray:
    """(c, before + c) mask: row i sees the ``before`` columns and the chunk's rows earlier than i."""
    mask = np.arange(before + c)[None, :] < (before + np.arange(c))[:, None]
    mask.flags.writeable = False
    return mask
