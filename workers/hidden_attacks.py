"""Window statistics that see attacks hidden in clean traffic (a minority of a window's events).

The MMD window test compares whole distributions: when one event in four is adversarial
the window still looks like the reference (issue 18 measured detection rates of 0.01–0.06
at 25% strong PGD). Three statistics look at the events themselves instead:

* :func:`count_test` — how many events a per-event detector flags in the window, against
  the count its clean false-positive rate predicts (exact binomial tail). Ten flagged
  events among 200 where four are expected is already p ≈ 0.01, whatever the window's
  distribution looks like as a whole.
* :func:`heavy_client_tests` — a client that sends at least ``min_events`` events in a
  window is tested alone against the reference (MMD on its own events, and the count test
  on its own flags), Bonferroni-corrected over the clients tested. An attacker who hides
  behind other clients' clean traffic is exposed as soon as its own events are enough.
* :func:`rank_events` — "which requests": orders the events by the per-event score and
  the MMD witness score, each standardised by its clean scale (or by the sum of their
  within-window ranks when the clean scales are not given).

:func:`alert_opens` is the alert rule's "``consecutive`` positive windows in a row",
vectorised over many simulated episodes (the benchmark's minimum detectable share).
:class:`HiddenAttackTest` bundles the count and heavy-client tests for one model version,
fitted once on its clean reference, as the drift stage runs them on every window.
Pure numpy/scipy; the stream wiring lives in ``streams/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.drift import Verdict
from workers.eventscore import EventScorer

__all__ = ["ClientTest", "HiddenAttackTest", "alert_opens", "count_test", "heavy_client_tests", "rank_events",
           "rate_bound"]


def count_test(flagged: Any, n: Any, rate: float) -> np.ndarray:
    """Exact binomial p-value ``P(Bin(n, rate) ≥ flagged)`` of ``flagged`` events among ``n``.

    ``rate`` is the per-event detector's clean false-positive rate. Broadcasts over arrays
    (one p-value per window); a window with no events has p = 1.

        >>> float(count_test(10, 200, 0.02).round(4))
        0.0075
    """
    from scipy.stats import binom

    if not 0.0 < rate < 1.0:
        raise ValueError("rate must be in (0, 1)")
    k = np.asarray(flagged)
    n = np.asarray(n)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("flagged must be between 0 and n")
    return np.where(k > 0, binom.sf(k - 1, n, rate), 1.0)


def rate_bound(exceed: int, n_calibration: int, confidence: float = 0.5) -> float:
    """Clean flag rate of a threshold that ``exceed`` of ``n_calibration`` clean rows exceeded.

    A new clean event exceeds a threshold set between calibration order statistics with
    probability ``Beta(exceed + 1, n_calibration − exceed)`` distributed (the rate is a
    uniform order statistic); ``confidence`` picks its quantile: 0.5 the median (close to
    the point estimate), 0.95 a conservative upper bound (fewer false alerts, less power).
    """
    from scipy.stats import beta

    if not 0 <= exceed < n_calibration:
        raise ValueError("need 0 <= exceed < n_calibration")
    return float(beta.ppf(confidence, exceed + 1, n_calibration - exceed))


@dataclass(frozen=True)
class ClientTest:
    """One heavy client's window tested alone: MMD p-value, count p-value, both Bonferroni-adjusted."""

    client: str
    n: int
    flagged: int
    mmd_p: float
    count_p: float
    mmd_p_adjusted: float
    count_p_adjusted: float

    @property
    def p_adjusted(self) -> float:
        """The smaller adjusted p-value, itself doubled (two tests per client)."""
        return min(1.0, 2.0 * min(self.mmd_p_adjusted, self.count_p_adjusted))


def heavy_client_tests(
    client_ids: Any,
    min_events: int,
    *,
    tester: Any = None,
    layers: Mapping[str, np.ndarray] | np.ndarray | None = None,
    flags: Any = None,
    rate: float | None = None,
) -> list[ClientTest]:
    """Test every client with at least ``min_events`` events in the window on its own events.

    ``tester`` (a :class:`workers.mmd.MMDTester`) and ``layers`` (the window's activations,
    rows aligned with ``client_ids``) give the MMD p-value of the client's rows against the
    reference (the tester's combined test for several layers); ``flags`` (per-event bool)
    and ``rate`` give the count test of the client's flagged events. Either may be omitted
    (its p-value is then 1). p-values are Bonferroni-adjusted over the clients tested.
    Clients are returned most suspicious first.
    """
    ids = np.asarray(client_ids).astype(str)
    if min_events < 2:
        raise ValueError("min_events must be >= 2")
    names, counts = np.unique(ids, return_counts=True)
    heavy = names[counts >= min_events]
    if flags is not None:
        flags = np.asarray(flags, dtype=bool)
        if flags.shape != ids.shape or rate is None:
            raise ValueError("flags need one entry per event and the detector's clean rate")
    raw = []
    for client in heavy:  # a handful of heavy clients per window, each one a tensor op
        rows = np.flatnonzero(ids == client)
        mmd_p = 1.0
        if tester is not None and layers is not None:
            sub = {k: v[rows] for k, v in layers.items()} if isinstance(layers, Mapping) else layers[rows]
            mmd_p = float(tester.test(sub).p_value)
        k = int(flags[rows].sum()) if flags is not None else 0
        count_p = float(count_test(k, len(rows), rate)) if flags is not None else 1.0
        raw.append((str(client), len(rows), k, mmd_p, count_p))
    m = max(1, len(raw))
    out = [ClientTest(c, n, k, mp, cp, min(1.0, mp * m), min(1.0, cp * m)) for c, n, k, mp, cp in raw]
    return sorted(out, key=lambda t: t.p_adjusted)


def rank_events(
    event_score: Any,
    witness: Any,
    *,
    event_reference: Any = None,
    witness_reference: Any = None,
) -> np.ndarray:
    """Indices of the window's events, most suspicious first, combining the two scores.

    With the clean scales of both scores — ``event_reference`` (the per-event score of clean
    reference events, e.g. :attr:`workers.eventscore.EventScorer.calibration`) and
    ``witness_reference`` (the witness at the reference rows,
    :attr:`workers.mmd.ScoresResult.reference_witness`) — each score is standardised by its
    clean mean/sd and the events are ordered by the sum: a score that does not separate
    this window's events from clean ones (a witness near its clean values) adds little, a
    score far outside its clean range dominates. Without them, the Borda count: the sum of
    the two within-window ranks (scale-free; equal weight whatever each score's quality).
    Ties are broken by the per-event score.
    """
    from scipy.stats import rankdata

    a, b = np.asarray(event_score, dtype=np.float64), np.asarray(witness, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("event_score and witness must be 1-d arrays of the same length")
    if (event_reference is None) != (witness_reference is None):
        raise ValueError("give both clean references or neither")
    if event_reference is None:
        total = rankdata(a) + rankdata(b)
    else:
        total = _clean_z(a, event_reference) + _clean_z(b, witness_reference)
    return np.lexsort((-a, -total))


def _clean_z(x: np.ndarray, clean: Any) -> np.ndarray:
    c = np.asarray(clean, dtype=np.float64)
    sd = c.std()
    return (x - c.mean()) / (sd if sd > 0 else 1.0)


def alert_opens(positive: Any, consecutive: int = 2) -> np.ndarray:
    """Per row of ``positive`` (episodes × windows, bool): does a run of ``consecutive`` positives occur?

    The alert rule opens after ``consecutive`` positive windows in a row; vectorised over
    episodes with a cumulative sum (a run of c ends at j when the sum over (j−c, j] is c).
    """
    pos = np.asarray(positive, dtype=bool)
    if pos.ndim != 2:
        raise ValueError("positive must be (episodes, windows)")
    if consecutive < 1:
        raise ValueError("consecutive must be >= 1")
    if pos.shape[1] < consecutive:
        return np.zeros(pos.shape[0], dtype=bool)
    c = np.concatenate([np.zeros((pos.shape[0], 1), dtype=np.int64), np.cumsum(pos, axis=1)], axis=1)
    return ((c[:, consecutive:] - c[:, :-consecutive]) == consecutive).any(axis=1)


class HiddenAttackTest:
    """The count test and the heavy-client tests of one model version, fitted on its clean reference.

    The per-event score is :class:`~workers.eventscore.EventScorer` (unsupervised: it needs
    no attack examples); its threshold flags about ``flag_rate`` of clean events, and the
    clean rate the count test assumes is a 90% upper bound of that rate from the calibration.
    ``analyze`` answers, for one window: ``"count"``, the binomial test of the flagged
    events among all the window's rows, and one :class:`ClientTest` per client with at
    least ``min_client_events`` rows (count test on its own flags) that stands out: the count test of the *other* clients'
    events stays above ``rest_alpha`` (when the whole model shifts, every client is flagged
    and singling one out would page once per client for one incident).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> test = HiddenAttackTest({"pen": rng.normal(size=(500, 8))}, rng.integers(0, 3, 500))
        >>> window = rng.normal(size=(200, 8))
        >>> window[:20] += 4.0                      # 10% of the events, all from one client
        >>> clients = np.array(["mallory"] * 20 + ["c%d" % (i % 9) for i in range(180)])
        >>> count, per_client = test.analyze({"pen": window}, np.zeros(200, int), clients)
        >>> bool(count.p_value < 1e-6), per_client[0].client, per_client[0].flagged
        (True, 'mallory', 20)
    """

    def __init__(self, reference: Mapping[str, np.ndarray], classes: np.ndarray, *, flag_rate: float = 0.02,
                 min_client_events: int = 20, rest_alpha: float = 0.001, folds: int = 3, seed: int = 0) -> None:
        self.scorer = EventScorer(reference, classes, folds=folds, seed=seed)
        self.threshold = self.scorer.threshold(flag_rate)
        # a 90% upper bound on the clean rate: a few hundred calibration rows leave it uncertain,
        # and an underestimated rate pages on clean traffic
        self.rate = min(max(rate_bound(*self.scorer.flag_rate(self.threshold), confidence=0.9), 1e-6), 0.5)
        self.min_client_events = int(min_client_events)
        self.rest_alpha = float(rest_alpha)

    def analyze(self, layers: Mapping[str, np.ndarray], classes: np.ndarray,
                client_ids: Any = None, top_k: int = 20) -> tuple[Verdict, list[ClientTest]]:
        """(count verdict, heavy clients most suspicious first) of one window's rows.

        The count verdict's statistic is the number of flagged rows, its detection rate their
        share, its top rows the highest per-event scores (the "which requests" list)."""
        scores = self.scorer.score(layers, classes)
        flags = scores > self.threshold
        n, k = len(scores), int(flags.sum())
        top = np.argsort(-scores, kind="stable")[:top_k]
        count = Verdict(float(k), float(count_test(k, n, self.rate)), k / n if n else 0.0, top, scores[top])
        clients: list[ClientTest] = []
        if client_ids is not None and len(client_ids) == n and n >= self.min_client_events:
            clients = heavy_client_tests(client_ids, self.min_client_events, flags=flags, rate=self.rate)
            # a client stands out only while the rest of the window looks clean: when every client's
            # events are flagged (the whole model shifted) no client is singled out
            clients = [c for c in clients if float(count_test(k - c.flagged, n - c.n, self.rate)) > self.rest_alpha]
        return count, clients
