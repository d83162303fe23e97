"""Attack-classifier verdicts counted per model and time bucket, for the attack_classified rule (pure)."""

from __future__ import annotations

import numpy as np

from schemas.batch import LabelBatch


class LabelTally:
    """Classifier verdicts counted per model and time bucket, so attack_classified judges whole buckets.

    One AttackLabels record covers one micro-batch; judging each alone makes the alert flap.
    A bucket (``step_ms`` of event time) is judged once, when an event of a later bucket arrives.

    Example:
        >>> from schemas.batch import LabelBatch
        >>> def rec(ts, p):
        ...     n = len(ts)
        ...     return LabelBatch("m", "1", "c", [str(t) for t in ts], np.array(ts), np.array(p, np.float32),
        ...                       np.array(["x"] * n), np.ones(n, np.float32), np.array(["m"] * n), np.ones(n, np.float32))
        >>> tally = LabelTally(step_ms=1000)
        >>> tally.add(rec([100, 200], [0.9, 0.1]))
        []
        >>> [(m, end, n, adv) for m, end, n, adv, _ in tally.add(rec([1100], [0.9]))]
        [('m', 1000, 2, 1)]
    """

    def __init__(self, step_ms: int, top: int = 20):
        self.step_ms, self.top = step_ms, top
        self.open: dict[str, tuple[int, int, int, list[tuple[float, str]]]] = {}  # model -> bucket, n, n_adv, top

    def add(self, labels: LabelBatch) -> list[tuple[str, int, int, int, list[str]]]:
        """Count one micro-batch's verdicts; (model, bucket end, events, flagged, top event ids) of closed buckets."""
        model = labels.model_id
        ts = labels.ts_ms
        if ts.size == 0:
            return []
        p = labels.p_adversarial
        ids = np.asarray(labels.event_ids, dtype=object)
        buckets = ts // self.step_ms
        verdicts = []
        for bucket in np.unique(buckets):
            mask = buckets == bucket
            current = self.open.get(model)
            if current is not None and bucket < current[0]:
                bucket = current[0]  # late events count in the open bucket
            if current is not None and bucket > current[0]:
                verdicts.append(self._verdict(model, current))
                current = None
            b, n, adv, best = current or (int(bucket), 0, 0, [])
            pm, im = p[mask], ids[mask]
            order = np.argsort(-pm)[: self.top]
            best = sorted(best + list(zip(pm[order].tolist(), im[order].tolist())), reverse=True)[: self.top]
            self.open[model] = (b, n + pm.size, adv + int((pm >= 0.5).sum()), best)
        return verdicts

    def _verdict(self, model: str, state: tuple[int, int, int, list]) -> tuple[str, int, int, int, list[str]]:
        bucket, n, adv, best = state
        return model, int((bucket + 1) * self.step_ms), n, adv, [event for _, event in best]
