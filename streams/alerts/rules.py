"""Alert state machines: turn drift results, attack labels and probing hits into open/resolve events.

Pure: the alert agent feeds results in and publishes the returned :class:`AlertEvent` s to
``lw.alerts``. Alerts are debounced (a distribution shift opens only after ``consecutive``
windows over the threshold, and every alert resolves only after ``clear_windows`` windows
under it), there is at most one open alert per (model, kind) — per (model, client) for
probing — and the resolution carries the same ``alert_id`` as the opening. ``alert_id`` is
derived from the evidence that opened the alert (model, kind, first window id / client and
ts), never from a clock or a random source, so replaying the same results after a crash
yields the same ids and the idempotent ``alerts`` table collapses the duplicates.
"""

from __future__ import annotations

import datetime as _dt
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

KINDS = ("distribution_shift", "attack_classified", "probing", "hidden_attack")
STATES = ("open", "resolved")
SEVERITIES = ("info", "warning", "critical")


def _hms(ts_ms: int) -> str:
    return _dt.datetime.fromtimestamp(ts_ms / 1000, tz=_dt.timezone.utc).strftime("%H:%M:%S")


def alert_id(model_id: str, kind: str, origin: str) -> str:
    """Deterministic, readable alert id: ``kind/model/origin`` (origin: first window id, or client@ts).

    Example:
        >>> alert_id("cnn", "distribution_shift", "cnn@1:0-10000")
        'distribution_shift/cnn/cnn@1:0-10000'
    """
    return f"{kind}/{model_id}/{origin}"


@dataclass(frozen=True)
class AlertEvent:
    """One alert transition, with the fields of the Avro ``Alert`` record (schemas/alert.avsc).

    Example:
        >>> e = AlertEvent("probing/cnn/c1@5", 5, "cnn", "probing", "open", "warning", client_id="c1", message="m")
        >>> e.to_record()["event_ids"], e.to_record()["state"]
        ([], 'open')
    """

    alert_id: str
    ts_ms: int
    model_id: str
    kind: str
    state: str
    severity: str
    window_id: str = ""
    event_ids: tuple[str, ...] = ()
    client_id: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.state not in STATES or self.severity not in SEVERITIES:
            raise ValueError(f"invalid alert kind/state/severity: {self.kind}/{self.state}/{self.severity}")

    def to_record(self) -> dict[str, Any]:
        """The Avro ``Alert`` record as a dict (event_ids as a list of str)."""
        return {
            "alert_id": self.alert_id,
            "ts_ms": int(self.ts_ms),
            "model_id": self.model_id,
            "kind": self.kind,
            "state": self.state,
            "severity": self.severity,
            "window_id": self.window_id,
            "event_ids": [str(e) for e in self.event_ids],
            "client_id": self.client_id,
            "message": self.message,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "AlertEvent":
        """The event of a decoded Avro ``Alert`` record (the inverse of :meth:`to_record`).

        Example:
            >>> e = AlertEvent("probing/cnn/c1@5", 5, "cnn", "probing", "open", "warning", client_id="c1")
            >>> AlertEvent.from_record(e.to_record()) == e
            True
        """
        return cls(record["alert_id"], int(record["ts_ms"]), record["model_id"], record["kind"], record["state"],
                   record["severity"], window_id=record.get("window_id", ""),
                   event_ids=tuple(record.get("event_ids") or ()), client_id=record.get("client_id", ""),
                   message=record.get("message", ""))


@dataclass
class _Streak:
    """Debounce state of one (model, kind): runs of windows over / under the threshold."""

    above: int = 0
    below: int = 0
    first_origin: str = ""  # evidence id of the first window of the current run over the threshold
    first_ts: int = 0
    open: AlertEvent | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # windows already counted


def _severity(value: float, threshold: float) -> str:
    """critical when the value is past the midpoint between the threshold and 1, else warning."""
    return "critical" if value >= (1.0 + threshold) / 2 else "warning"


class AlertRules:
    """Debounced alert state per model: distribution shift, classified attack traffic, probing clients.

    - :meth:`on_drift`: distribution_shift opens when the window's detection rate is
      ``>= detection_threshold`` for ``consecutive`` consecutive windows of the model.
    - :meth:`on_labels`: attack_classified opens on a window with at least ``min_labelled``
      labelled events of which a share ``> adversarial_share`` is adversarial (the classifier
      already decides per event, so one such window suffices); a window with fewer labelled
      events counts as a window under the threshold.
    - both resolve after ``clear_windows`` consecutive windows under the threshold.
    - :meth:`on_count`: hidden_attack opens when a window's count of flagged events has
      p <= ``count_alpha`` for ``consecutive`` consecutive windows (a minority of crafted
      events among clean ones), and resolves like the others.
    - :meth:`on_probing` opens one alert per (model, client); :meth:`expire` resolves it
      when the client was not re-flagged for ``quiet_s``. :meth:`on_client` does the same
      for a heavy client whose own test (its flagged events) is positive in ``consecutive``
      windows: a hidden_attack alert that names the client.

    The same window reported twice (a replay, or one result per layer) counts once.

    Example:
        >>> rules = AlertRules(detection_threshold=0.5, consecutive=2, clear_windows=2)
        >>> rules.on_drift("cnn", "cnn@1:0-10000", 10_000, 0.97, ["e1"])
        []
        >>> [e.state for e in rules.on_drift("cnn", "cnn@1:5000-15000", 15_000, 0.92, ["e7"])]
        ['open']
        >>> rules.open_alerts()[0].message
        'distribution shift on model cnn: detection rate 0.92 ≥ 0.50 for 2 consecutive windows since 00:00:10 UTC'
        >>> rules.on_drift("cnn", "cnn@1:10000-20000", 20_000, 0.1, [])
        []
        >>> [(e.state, e.alert_id) for e in rules.on_drift("cnn", "cnn@1:15000-25000", 25_000, 0.0, [])]
        [('resolved', 'distribution_shift/cnn/cnn@1:0-10000')]
    """

    def __init__(
        self,
        detection_threshold: float = 0.5,
        consecutive: int = 2,
        clear_windows: int = 2,
        adversarial_share: float = 0.3,
        min_labelled: int = 20,
        count_alpha: float = 0.001,
        window_step_ms: int = 5_000,
    ) -> None:
        if consecutive < 1 or clear_windows < 1 or min_labelled < 1:
            raise ValueError("consecutive, clear_windows and min_labelled must be >= 1")
        self.detection_threshold = float(detection_threshold)
        self.consecutive = int(consecutive)
        self.clear_windows = int(clear_windows)
        self.adversarial_share = float(adversarial_share)
        self.min_labelled = int(min_labelled)
        self.count_alpha = float(count_alpha)
        self.window_step_ms = int(window_step_ms)
        self._shifted: dict[str, str] = {}  # model -> its last window over the distribution-shift threshold
        self._client_hits: dict[tuple[str, str], deque] = {}  # (model, client) -> (window id, end ms) of positives
        self._streaks: dict[tuple[str, str], _Streak] = {}
        # per-client alerts: (model, client, kind) -> (open event, last ts)
        self._per_client: dict[tuple[str, str, str], tuple[AlertEvent, int]] = {}

    # -- window-based alerts
    def _step(
        self,
        model_id: str,
        kind: str,
        window_key: str,
        ts_ms: int,
        over: bool,
        need: int,
        opening: Any,
        closing: Any,
    ) -> list[AlertEvent]:
        st = self._streaks.setdefault((model_id, kind), _Streak())
        if window_key in st.recent:
            return []
        st.recent.append(window_key)
        if over:
            if st.above == 0:
                st.first_origin, st.first_ts = window_key, int(ts_ms)
            st.above += 1
            st.below = 0
            if st.open is None and st.above >= need:
                st.open = opening(alert_id(model_id, kind, st.first_origin), st)
                return [st.open]
            return []
        st.above = 0
        st.below += 1
        if st.open is not None and st.below >= self.clear_windows:
            event = closing(st.open, st)
            st.open = None
            st.below = 0
            return [event]
        return []

    def on_drift(
        self,
        model_id: str,
        window_id: str,
        window_end_ms: int,
        detection_rate: float,
        top_event_ids: Sequence[str] = (),
    ) -> list[AlertEvent]:
        """Feed one tested window of a model; returns an opening or resolving event, or nothing."""
        thr, rate = self.detection_threshold, float(detection_rate)

        def opening(aid: str, st: _Streak) -> AlertEvent:
            return AlertEvent(
                aid, int(window_end_ms), model_id, "distribution_shift", "open", _severity(rate, thr),
                window_id=window_id, event_ids=tuple(map(str, top_event_ids)),
                message=(f"distribution shift on model {model_id}: detection rate {rate:.2f} ≥ {thr:.2f} "
                         f"for {st.above} consecutive windows since {_hms(st.first_ts)} UTC"),
            )

        def closing(opened: AlertEvent, st: _Streak) -> AlertEvent:
            return AlertEvent(
                opened.alert_id, int(window_end_ms), model_id, "distribution_shift", "resolved", "info",
                window_id=window_id,
                message=(f"distribution shift on model {model_id} resolved: detection rate {rate:.2f} < {thr:.2f} "
                         f"for {st.below} consecutive windows (opened {_hms(opened.ts_ms)} UTC)"),
            )

        if rate >= thr:
            self._shifted[model_id] = window_id
        return self._step(model_id, "distribution_shift", window_id, window_end_ms, rate >= thr,
                          self.consecutive, opening, closing)

    def on_labels(
        self,
        model_id: str,
        window_end_ms: int,
        n_events: int,
        n_adversarial: int,
        top_event_ids: Sequence[str] = (),
    ) -> list[AlertEvent]:
        """Feed the attack classifier's verdicts on one window of a model (counts of events and adversarial ones)."""
        thr = self.adversarial_share
        share = n_adversarial / n_events if n_events > 0 else 0.0
        over = n_events >= self.min_labelled and share > thr
        origin = f"{int(window_end_ms)}"

        def opening(aid: str, st: _Streak) -> AlertEvent:
            return AlertEvent(
                aid, int(window_end_ms), model_id, "attack_classified", "open", _severity(share, thr),
                event_ids=tuple(map(str, top_event_ids)),
                message=(f"attack traffic on model {model_id}: {n_adversarial} of {n_events} events ({share:.0%}) "
                         f"classified adversarial > {thr:.0%} in the window ending {_hms(window_end_ms)} UTC"),
            )

        def closing(opened: AlertEvent, st: _Streak) -> AlertEvent:
            return AlertEvent(
                opened.alert_id, int(window_end_ms), model_id, "attack_classified", "resolved", "info",
                message=(f"attack traffic on model {model_id} resolved: adversarial share ≤ {thr:.0%} "
                         f"for {st.below} consecutive windows (opened {_hms(opened.ts_ms)} UTC)"),
            )

        return self._step(model_id, "attack_classified", origin, window_end_ms, over, 1, opening, closing)

    def on_count(self, model_id: str, window_id: str, window_end_ms: int, p_value: float, flagged: int,
                 n_window: int, top_event_ids: Sequence[str] = ()) -> list[AlertEvent]:
        """Feed one window's count test (flagged events among ``n_window``); hidden_attack per model.

        A window whose own detection rate (fed before, by :meth:`on_drift`) is over the
        distribution-shift threshold is not counted either way: the shift alert covers it, and
        one incident pages once."""
        alpha, p = self.count_alpha, float(p_value)
        if self._shifted.get(model_id) == window_id:
            return []

        def opening(aid: str, st: _Streak) -> AlertEvent:
            return AlertEvent(
                aid, int(window_end_ms), model_id, "hidden_attack", "open", "critical" if p <= alpha / 100 else "warning",
                window_id=window_id, event_ids=tuple(map(str, top_event_ids)),
                message=(f"attack hidden in traffic on model {model_id}: {flagged} of {n_window} sampled events flagged "
                         f"(count test p = {p:.1e} ≤ {alpha:g}) for {st.above} consecutive windows since "
                         f"{_hms(st.first_ts)} UTC"),
            )

        def closing(opened: AlertEvent, st: _Streak) -> AlertEvent:
            return AlertEvent(
                opened.alert_id, int(window_end_ms), model_id, "hidden_attack", "resolved", "info", window_id=window_id,
                message=(f"attack hidden in traffic on model {model_id} resolved: flagged events as expected for "
                         f"{st.below} consecutive windows (opened {_hms(opened.ts_ms)} UTC)"),
            )

        return self._step(model_id, "hidden_attack", window_id, window_end_ms, p <= alpha, self.consecutive,
                          opening, closing)

    # -- client-based alerts
    def _refresh(self, key: tuple[str, str, str], ts_ms: int) -> bool:
        """Is this per-client alert open? If so, move its last sighting to ``ts_ms`` (it expires later)."""
        if key not in self._per_client:
            return False
        opened, last = self._per_client[key]
        self._per_client[key] = (opened, max(last, int(ts_ms)))
        return True

    def on_probing(self, model_id: str, client_id: str, ts_ms: int, count: int) -> list[AlertEvent]:
        """A probing hit for a client: opens its alert, or only refreshes an alert already open."""
        key = (model_id, client_id, "probing")
        if self._refresh(key, ts_ms):
            return []
        event = AlertEvent(
            alert_id(model_id, "probing", f"{client_id}@{int(ts_ms)}"), int(ts_ms), model_id, "probing", "open",
            "warning", client_id=client_id,
            message=(f"probing on model {model_id}: client {client_id} sent {count} near-duplicate queries "
                     f"at {_hms(ts_ms)} UTC"),
        )
        self._per_client[key] = (event, int(ts_ms))
        return [event]

    def on_client(self, model_id: str, client_id: str, window_id: str, ts_ms: int, p_value: float,
                  flagged: int, n_client: int, top_event_ids: Sequence[str] = ()) -> list[AlertEvent]:
        """A heavy client's own test in one window: ``consecutive`` positives open a hidden_attack alert
        naming it (one per (model, client)); it resolves through :meth:`expire` once the client is quiet."""
        if float(p_value) > self.count_alpha:
            return []
        key = (model_id, client_id, "hidden_attack")
        if self._refresh(key, ts_ms):
            return []
        hits = self._client_hits.setdefault(key[:2], deque(maxlen=self.consecutive))
        if any(w == window_id for w, _ in hits):
            return []
        hits.append((window_id, int(ts_ms)))
        # positives in `consecutive` windows in a row: their ends lie within (consecutive - 1) steps
        if len(hits) < self.consecutive or hits[-1][1] - hits[0][1] > (self.consecutive - 1) * self.window_step_ms:
            return []
        del self._client_hits[key[:2]]
        event = AlertEvent(
            alert_id(model_id, "hidden_attack", f"{client_id}@{int(ts_ms)}"), int(ts_ms), model_id, "hidden_attack",
            "open", "critical", window_id=window_id, event_ids=tuple(map(str, top_event_ids)), client_id=client_id,
            message=(f"attack hidden in traffic on model {model_id} by client {client_id}: {flagged} of its "
                     f"{n_client} sampled events flagged (adjusted p = {float(p_value):.1e}) in {self.consecutive} "
                     f"windows, the last ending {_hms(ts_ms)} UTC"),
        )
        self._per_client[key] = (event, int(ts_ms))
        return [event]

    def expire(self, now_ms: int, quiet_s: float) -> list[AlertEvent]:
        """Resolve the per-client alerts (probing, hidden_attack by a client) not re-triggered for ``quiet_s``
        seconds before ``now_ms``."""
        quiet_ms = int(round(quiet_s * 1000))
        out: list[AlertEvent] = []
        for key, (opened, last) in list(self._per_client.items()):
            if last + quiet_ms <= now_ms:
                del self._per_client[key]
                what = "probing" if opened.kind == "probing" else "attack hidden in traffic"
                out.append(AlertEvent(
                    opened.alert_id, int(now_ms), opened.model_id, opened.kind, "resolved", "info",
                    client_id=opened.client_id,
                    message=(f"{what} on model {opened.model_id} by client {opened.client_id} resolved: "
                             f"not re-flagged for {quiet_s:g} s"),
                ))
        return out

    def restore(self, events: Sequence[AlertEvent]) -> int:
        """Replay stored alert transitions (oldest first) after a restart; returns how many alerts are open.

        An open alert is kept open (its streak counts as over the threshold), so windows
        after the restart resolve it under its own id instead of opening a second alert.
        """
        for e in events:
            if e.client_id:  # per-client alerts: probing, and hidden_attack naming a client
                if e.state == "open":
                    self._per_client[(e.model_id, e.client_id, e.kind)] = (e, int(e.ts_ms))
                else:
                    self._per_client.pop((e.model_id, e.client_id, e.kind), None)
                continue
            st = self._streaks.setdefault((e.model_id, e.kind), _Streak())
            if e.state == "open":
                st.open, st.below = e, 0
                st.above = max(st.above, self.consecutive if e.kind == "distribution_shift" else 1)
            elif st.open is not None and st.open.alert_id == e.alert_id:
                st.open, st.above, st.below = None, 0, 0
        return len(self.open_alerts())

    def open_alerts(self) -> list[AlertEvent]:
        """The opening events of every alert still open, oldest first."""
        events = [st.open for st in self._streaks.values() if st.open is not None]
        events += [opened for opened, _ in self._per_client.values()]
        return sorted(events, key=lambda e: (e.ts_ms, e.alert_id))
