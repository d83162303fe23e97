"""Behavioural detection of attack probing: many highly similar, non-identical queries from one client.

An attacker crafting an adversarial example (or extracting a model) sends bursts of
near-duplicate inputs: one base input plus small perturbations. Their penultimate-layer
embeddings are then nearly parallel, while normal clients send unrelated inputs and a
client simply retrying sends *exact* repeats. Each new embedding counts its client's last
``sketch_size`` queries (within ``window_s``) whose cosine similarity is in
``[similarity, identical)``; a client whose count reaches ``min_queries`` is flagged once,
until it goes quiet (no near-duplicate for ``window_s``) or :meth:`ProbingDetector.clear`.

Cost independent of the number of clients. A detector holds **one shared, bounded buffer**
of recent queries, whatever client sent them: a ring of ``buffer_rows`` rows at most
(grown by doubling while its oldest row is still within ``window_s``), each row a sketch of
the embedding, its timestamp and a pointer to the previous row *of the same client*. An
ingest step is then a fixed number of array operations, none per client:

1. the batch's embeddings are projected to ``sketch_dim`` dimensions by one product with a
   fixed, seeded Gaussian matrix (Johnson-Lindenstrauss: cosines are kept to within
   about ``(1 - cos²) / sqrt(sketch_dim)``; embeddings of at most ``sketch_dim``
   dimensions are zero-padded, not projected) and L2-normalised;
2. the rows are written to the ring, each pointing at its client's previous row;
3. ``sketch_size`` pointer hops give every row the ring slots of its client's previous
   queries, and one batched product of the rows with those slots gives all similarities.

So a prediction costs ``O(sketch_size * sketch_dim + dim * sketch_dim)`` whatever the number
of clients: the per-client dictionary that maps a client id to its state is touched once
per distinct client of the batch, not per row. Memory is bounded by
``buffer_rows * (4 * sketch_dim + 16)`` bytes plus ``max_clients`` small slots (the
least-recently-seen clients are evicted). A client whose earlier queries fell out of the
ring (more than ``buffer_rows`` queries since) simply sees fewer of them.

One detector can hold several models (the worker's probing stage does): sketches of any
width share one space, and client ids that name the model keep models apart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

_NEVER = -(2**62)
_INITIAL_ROWS = 1024
_CHUNK = 1024  # rows scored at a time: 1024 x 64 x 32 float32 gathered = 8 MiB
_BLAS: Any = None


@dataclass(frozen=True)
class ProbingHit:
    """A client flagged for probing: when, with how many near-duplicates of one query, how similar."""

    client_id: str
    ts_ms: int
    count: int
    mean_similarity: float


@lru_cache(maxsize=16)
def projection(dim: int, sketch_dim: int, seed: int = 0) -> np.ndarray:
    """The fixed (dim, sketch_dim) Gaussian projection of a detector (seeded: same decisions after a restart)."""
    rng = np.random.default_rng([int(seed), int(dim), int(sketch_dim)])
    p = (rng.standard_normal((dim, sketch_dim)) / np.sqrt(sketch_dim)).astype(np.float32)
    p.flags.writeable = False
    return p


def one_blas_thread() -> Any:
    """Limit BLAS (numpy's OpenBLAS) to one thread while the small products below run.

    They are small ((n x dim) @ (dim x sketch_dim) and n products of (sketch_size x sketch_dim)):
    a BLAS or torch thread pool costs more than it saves there, and on a loaded machine its
    spinning threads made them ~40x slower (measured: torch's 4 x 64 x 32 product took 4 ms).
    threadpoolctl, ~30 µs per use.
    """
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


class ProbingDetector:
    """Flags clients that send many near-duplicate (similar, not identical) queries in a short time.

    For each new embedding, ``count`` = number of its client's previous ``sketch_size``
    queries within ``window_s`` whose cosine similarity is ``>= similarity`` and
    ``< identical``. Exact repeats (similarity ``>= identical``) do not count: retries are
    not probing. The first embedding whose count reaches ``min_queries`` yields a
    :class:`ProbingHit`; the client then stays flagged (no further hits) until it sends no
    near-duplicate for ``window_s`` or is :meth:`clear`-ed. Rows with an empty client id
    (unknown client) are ignored. ``min_queries`` should not exceed ``sketch_size``.

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
        *,
        buffer_rows: int = 65_536,
        sketch_dim: int = 32,
        seed: int = 0,
    ) -> None:
        if not -1.0 <= similarity < identical:
            raise ValueError(f"need -1 <= similarity < identical, got {similarity} and {identical}")
        if min(min_queries, sketch_size, max_clients, sketch_dim) < 1 or window_s <= 0:
            raise ValueError("min_queries, sketch_size, max_clients, sketch_dim and window_s must be positive")
        if buffer_rows < 4 * sketch_size:
            raise ValueError(f"buffer_rows must be at least 4 * sketch_size ({4 * sketch_size})")
        self.similarity = float(similarity)
        self.identical = float(identical)
        self.min_queries = int(min_queries)
        self.window_ms = int(round(window_s * 1000))
        self.sketch_size = int(sketch_size)
        self.max_clients = int(max_clients)
        self.buffer_rows = int(buffer_rows)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.evicted = 0
        self._clients: OrderedDict[str, int] = OrderedDict()  # client id -> slot, least recently seen first
        self._free: list[int] = []
        self._last = np.empty(0, np.int64)  # per slot: sequence number of the client's latest row, -1 none
        self._flagged = np.empty(0, bool)
        self._last_near = np.empty(0, np.int64)  # ts of the client's latest query that had a near-duplicate
        self._rows = 0
        self._head = 0  # sequence number of the next row; row s lives in ring slot s % rows
        self._emb = np.empty((0, self.sketch_dim), np.float32)
        self._ts = np.empty(0, np.int64)
        self._prev = np.empty(0, np.int64)

    # -- clients
    @property
    def flagged(self) -> frozenset[str]:
        """Clients currently flagged (hit reported, not yet quiet or cleared)."""
        return frozenset(c for c, slot in self._clients.items() if self._flagged[slot])

    def __len__(self) -> int:
        """Number of clients tracked."""
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def clear(self, client_id: str) -> None:
        """Forget a client (e.g. an operator cleared it): it must build up ``min_queries`` again."""
        slot = self._clients.pop(client_id, None)
        if slot is not None:
            self._release(slot)

    def _release(self, slot: int) -> None:
        self._last[slot], self._flagged[slot], self._last_near[slot] = -1, False, _NEVER  # its rows are unreachable
        self._free.append(slot)

    def _slot(self, client_id: str) -> int:
        slot = self._clients.get(client_id)
        if slot is None:
            if not self._free:
                self._grow_slots()
            slot = self._free.pop()
            self._clients[client_id] = slot
        else:
            self._clients.move_to_end(client_id)
        return slot

    def _grow_slots(self) -> None:
        old = self._last.size
        new = max(64, 2 * old)
        self._last = np.concatenate([self._last, np.full(new - old, -1, np.int64)])
        self._flagged = np.concatenate([self._flagged, np.zeros(new - old, bool)])
        self._last_near = np.concatenate([self._last_near, np.full(new - old, _NEVER, np.int64)])
        self._free.extend(range(new - 1, old - 1, -1))

    # -- the shared ring
    def _ensure_ring(self, n: int, first_ts: int) -> None:
        """Grow the ring (doubling, up to ``buffer_rows``) while writing ``n`` rows would overwrite a row
        still within the window of the new ones."""
        while self._rows < self.buffer_rows:
            lost = self._head + n - 1 - self._rows  # the newest row the write overwrites
            if self._rows >= max(_INITIAL_ROWS, 4 * n) and (
                    lost < 0 or self._ts[lost % self._rows] < first_ts - self.window_ms):
                return
            self._resize(min(self.buffer_rows, max(_INITIAL_ROWS, 2 * self._rows)))

    def _resize(self, rows: int) -> None:
        emb = np.zeros((rows, self._emb.shape[1]), np.float32)
        ts, prev = np.full(rows, _NEVER, np.int64), np.full(rows, -1, np.int64)
        if self._rows:
            seqs = np.arange(max(0, self._head - self._rows), self._head)
            old, new = seqs % self._rows, seqs % rows
            emb[new], ts[new], prev[new] = self._emb[old], self._ts[old], self._prev[old]
        self._rows, self._emb, self._ts, self._prev = rows, emb, ts, prev

    def sketch(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, sketch_dim) float32 L2-normalised sketches of the rows (one product, no per-row work).

        Embeddings of at most ``sketch_dim`` dimensions are kept as they are (zero-padded).
        Sketches of embeddings of different widths (models) share one space, so one
        detector can hold several models when its client ids say which model a row is of
        (see :meth:`update_sketches`)."""
        raw = np.asarray(embeddings)
        raw = raw.reshape(raw.shape[0], -1) if raw.ndim != 2 else raw
        if raw.dtype == np.float16:  # through torch: F16C, ~3x numpy's astype
            x = torch.from_numpy(np.ascontiguousarray(raw)).float().numpy()
        else:
            x = raw.astype(np.float32, copy=False)
        if x.shape[1] > self.sketch_dim:
            x = x @ projection(x.shape[1], self.sketch_dim, self.seed)
        elif x.shape[1] < self.sketch_dim:
            x = np.pad(x, ((0, 0), (0, self.sketch_dim - x.shape[1])))
        # not in place: x may be the caller's (read-only, decoded) array when no projection or padding was needed
        return x * (1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12))[:, None]

    # -- scoring
    def update(
        self,
        client_ids: Sequence[str] | np.ndarray,
        ts_ms: Sequence[int] | np.ndarray,
        embeddings: np.ndarray,
    ) -> list[ProbingHit]:
        """Score one batch of queries (rows aligned across the three arguments); return new hits."""
        raw = np.asarray(embeddings)
        if raw.shape[0] != np.size(ts_ms):
            raise ValueError(f"misaligned batch: {np.size(ts_ms)} ts, {raw.shape[0]} embeddings")
        with one_blas_thread():
            sketches = self.sketch(raw) if raw.shape[0] else np.empty((0, self.sketch_dim), np.float32)
        return self.update_sketches(client_ids, ts_ms, sketches)

    def update_sketches(
        self,
        client_ids: Sequence[str] | np.ndarray,
        ts_ms: Sequence[int] | np.ndarray,
        sketches: np.ndarray,
    ) -> list[ProbingHit]:
        """:meth:`update` with the rows already sketched (:meth:`sketch`): how a worker scores every model
        of an ingest step at once, with client ids that name the model too (model id, NUL, client id)."""
        ids = list(np.asarray(client_ids, dtype=object).ravel()) if not isinstance(client_ids, list) else client_ids
        ts = np.asarray(ts_ms, dtype=np.int64).ravel()
        raw = np.asarray(sketches, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] != self.sketch_dim:
            raise ValueError(f"sketches must be (n, {self.sketch_dim}), got {raw.shape}")
        if not (len(ids) == ts.size == raw.shape[0]):
            raise ValueError(f"misaligned batch: {len(ids)} client ids, {ts.size} ts, {raw.shape[0]} embeddings")
        if not ids:
            return []
        # client ids to dense codes in first-seen order (one dict operation per row, no sort of strings)
        codes: dict[str, int] = {}
        code = np.fromiter((codes.setdefault(c, len(codes)) for c in ids), np.int64, len(ids))
        known = np.ones(len(codes), bool)
        if "" in codes:
            known[codes[""]] = False
        keep = np.flatnonzero(known[code])
        if keep.size == 0:
            return []
        names = list(codes)
        hits: list[ProbingHit] = []
        step = self.buffer_rows // 4  # rows a chunk may write without overwriting what it reads
        for lo in range(0, keep.size, step):
            rows = keep[lo : lo + step]
            with one_blas_thread():
                hits += self._update(names, code[rows], ts[rows], raw[rows])
        while len(self._clients) > self.max_clients:
            _, slot = self._clients.popitem(last=False)
            self._release(slot)
            self.evicted += 1
        return hits

    def _update(self, names: list[str], code: np.ndarray, ts: np.ndarray, y: np.ndarray) -> list[ProbingHit]:
        present = np.unique(code)
        slot_of = np.full(len(names), -1, np.int64)
        slot_of[present] = [self._slot(names[c]) for c in present.tolist()]
        order = np.lexsort((ts, code))  # grouped by client, each group in time order
        code, ts = code[order], ts[order]
        slot = slot_of[code]
        n = ts.size
        y = y[order]
        self._ensure_ring(n, int(ts.min()))
        rows, head, k = self._rows, self._head, self.sketch_size
        seq = head + np.arange(n)
        first = np.ones(n, bool)
        first[1:] = code[1:] != code[:-1]
        prev = np.where(first, self._last[slot], seq - 1)
        at = seq % rows
        self._emb[at], self._ts[at], self._prev[at] = y, ts, prev
        last = np.flatnonzero(np.append(first[1:], True))
        self._last[slot[last]] = seq[last]
        self._head = head + n
        oldest = max(0, self._head - rows)
        # the client's previous sketch_size rows, by pointer hops (a hop past the ring's oldest row ends a chain)
        cand = np.full((n, k), -1, np.int64)
        c = prev
        for j in range(k):
            ok = c >= oldest
            if not ok.any():
                break
            c = np.where(ok, c, -1)
            cand[:, j] = c
            c = np.where(ok, self._prev[c % rows], -1)
        count = np.zeros(n, np.int64)
        mean_sim = np.zeros(n, np.float32)
        for lo in range(0, n, _CHUNK):  # the gathered sketches are (rows, k, sketch_dim): bounded per chunk
            hi = min(n, lo + _CHUNK)
            valid = cand[lo:hi] >= 0
            slots = np.where(valid, cand[lo:hi] % rows, 0)
            sim = np.matmul(self._emb[slots], y[lo:hi, :, None])[:, :, 0]  # (rows, k): one batched product
            near = valid & (sim >= self.similarity) & (sim < self.identical)
            near &= np.abs(ts[lo:hi, None] - self._ts[slots]) <= self.window_ms
            count[lo:hi] = np.count_nonzero(near, axis=1)
            mean_sim[lo:hi] = np.where(near, sim, 0.0).sum(axis=1) / np.maximum(count[lo:hi], 1)
        # flags, per client: quiet for a whole window before this batch -> unflagged; the first row reaching
        # min_queries of an unflagged client is a hit; the latest row with a near-duplicate is remembered
        starts = np.flatnonzero(first)
        s0 = slot[starts]
        quiet = self._flagged[s0] & (ts[starts] - self._last_near[s0] > self.window_ms)
        self._flagged[s0[quiet]] = False
        has = np.flatnonzero(count)
        np.maximum.at(self._last_near, slot[has], ts[has])
        reached = np.flatnonzero((count >= self.min_queries) & ~self._flagged[slot])
        if reached.size == 0:
            return []
        firsts = reached[np.append(True, code[reached[1:]] != code[reached[:-1]])]
        self._flagged[slot[firsts]] = True
        return [ProbingHit(names[int(code[i])], int(ts[i]), int(count[i]), float(mean_sim[i]))
                for i in firsts.tolist()]
