"""Rebuilding in-memory state after a worker (re)start: drift windows and open alerts.

Windows live in the drift stage's memory (never in Faust tables: a table write republishes the value), so
a worker that crashed — or stopped — loses the windows that were open. Faust resumes the
ingest agent at the consumer group's committed offset; everything *before* that offset
was processed by the previous incarnation, and what lies *after* it is replayed by the
ingest agent itself (at-least-once). So, for every partition of ``lw.predictions`` newly
assigned to this worker:

1. fetch the group's committed offset C (admin OffsetFetch; no group membership);
2. read the timestamp T of the record at C-1 (the last one the old worker finished);
3. find the first offset S whose record timestamp is >= T - (window size + step +
   lateness): ``offsets_for_times`` when the broker answers it credibly, else a binary
   search on record timestamps (Tansu answers every ListOffsets-by-time with offset 0);
4. read [S, C) with a plain aiokafka consumer (``group_id=None``, manual ``assign``:
   Tansu serves one consumer group at a time), decode each record once (bad records are
   skipped: the old worker dead-lettered them), and feed the live batches to the
   :class:`~workers.windows.WindowManager` only — not to the sink (those rows are in
   ClickHouse already), the classifier or the probing detector.

The drift stage holds its ``handle`` (``DriftStage.pause``) until the rebuild is done, so
events of the replay never run ahead of the older ones and the windows see every event
exactly once. Windows that *close* while the history is fed were closed (and handed to
the test loop) by the old worker as well: they are tested again only when their result
is not in ``drift_windows`` yet and their whole span lies inside the history read (a
window that closed just before the crash, still waiting for its test); the others are
dropped, so a complete result is never overwritten by one from a partial sample. A
window re-tested anyway gets the same deterministic ``window_id`` and collapses in the
ReplacingMergeTree table.

Alert rules are restored once per process start, before the alerts agent takes its
first record: the alerts still open in the ``alerts`` table, updated by the ``lw.alerts``
records past the group's committed offset (published, maybe not yet written to
ClickHouse when the worker died). A shift that goes on across a crash then keeps its
alert id and resolves it, instead of opening a second alert.

A failed or timed-out rebuild is logged and the stages go on with empty windows (the
behaviour without this module); it never stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from streams.alerts.rules import AlertEvent
from streams.kafka import aiokafka_config
from streams.store import statements as Q

log = logging.getLogger(__name__)

#: Upper bound on one rebuild (all partitions); past it the stages go on with what they have.
RECOVERY_TIMEOUT_S = 60.0
#: Records per fetch while reading the history.
FETCH_RECORDS = 500


@dataclass
class RecoveryStats:
    """What one rebuild did (logged, and kept on the runtime for tests and /health readers)."""

    partitions: int = 0
    records: int = 0
    events: int = 0
    skipped_records: int = 0
    windows_open: int = 0
    windows_retested: int = 0
    windows_dropped: int = 0
    alerts_restored: int = 0
    seconds: float = 0.0
    error: str = ""
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------- Kafka helpers


async def committed_offsets(settings: Any, group_id: str, tps: Iterable[Any]) -> dict[Any, int | None]:
    """The group's committed offset per partition (None: nothing committed), without joining the group."""
    from aiokafka.admin import AIOKafkaAdminClient

    tps = list(tps)
    if not tps:  # an empty list would ask for every partition, which Tansu does not answer
        return {}
    admin = AIOKafkaAdminClient(**aiokafka_config(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        answer = await admin.list_consumer_group_offsets(group_id, partitions=tps)
    finally:
        await admin.close()
    out: dict[Any, int | None] = {}
    for tp in tps:
        meta = answer.get(tp)
        out[tp] = meta.offset if meta is not None and meta.offset is not None and meta.offset >= 0 else None
    return out


async def _read_one(consumer: Any, tp: Any, offset: int, timeout_ms: int = 3000) -> tuple[int, int] | None:
    """(offset, record timestamp) of the first record at or after ``offset``; None when there is none."""
    consumer.seek(tp, offset)
    batches = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
    records = batches.get(tp) or []
    return (records[0].offset, records[0].timestamp) if records else None


async def start_offset(consumer: Any, tp: Any, target_ts: int, lo: int, hi: int) -> int:
    """The first offset in [lo, hi) whose record timestamp is >= ``target_ts`` (hi when none).

    Asks the broker first (``offsets_for_times``) and keeps its answer when it is credible
    (a real offset in range carrying a timestamp >= the target); otherwise — Tansu answers
    offset 0 for every time — binary-searches the record timestamps (assumed
    non-decreasing, as producer create times nearly are), one one-record read per step.
    """
    if hi <= lo:
        return hi
    try:
        answer = (await consumer.offsets_for_times({tp: max(0, int(target_ts))})).get(tp)
    except Exception as exc:  # noqa: BLE001 - an old or partial broker: fall back to the search
        log.debug("offsets_for_times failed on %s: %s", tp, exc)
        answer = None
    if answer is not None and answer.timestamp is not None and answer.timestamp >= target_ts and lo <= answer.offset <= hi:
        return int(answer.offset)
    left, right = lo, hi
    while left < right:
        mid = (left + right) // 2
        found = await _read_one(consumer, tp, mid)
        if found is None or found[0] >= hi or found[1] >= target_ts:
            right = mid
        else:
            left = found[0] + 1
    return left


# --------------------------------------------------------------------------- the rebuild


class Recovery:
    """Rebuilds the drift windows of newly assigned partitions and restores open alerts (see the module doc).

    It talks to the drift stage and the alert hub through their public methods only:
    ``pause``/``resume`` hold their input while the state is rebuilt, ``replay`` feeds a
    processed batch into the windows, ``enqueue`` queues windows for testing,
    ``drop_partitions`` forgets the windows of revoked partitions, ``restore`` replays
    alert transitions.
    """

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.drift = runtime.drift
        self.hub = runtime.alerts if "alerts" in runtime.agents else None
        self.settings = runtime.settings
        self.topic = self.settings.topic("predictions")
        self.alerts_topic = self.settings.topic("alerts")
        self.assigned: set[Any] = set()
        self.tasks: set[asyncio.Task] = set()
        self.alerts_restored = False
        self.history: list[RecoveryStats] = []

    # -- Faust signals
    async def on_assigned(self, sender: Any = None, assigned: Iterable[Any] = (), **_: Any) -> None:
        """Partitions assigned: rebuild the windows of the newly assigned predictions partitions."""
        from aiokafka import TopicPartition

        # Faust hands its own TP tuples; aiokafka asserts on its TopicPartition type
        mine = {TopicPartition(tp.topic, tp.partition) for tp in assigned if tp.topic == self.topic}
        new = mine - self.assigned
        self.assigned = mine
        restore_alerts = self.hub is not None and not self.alerts_restored
        if (not new or self.drift is None) and not restore_alerts:
            return
        if self.drift is not None and new:
            self.drift.pause()  # before any record of the new partitions reaches the stage
        if restore_alerts:
            self.alerts_restored = True
            self.hub.pause()
        async def offsets_now() -> tuple[list[Any], dict[Any, int | None]]:
            alert_tps = await self._alert_partitions() if restore_alerts else []
            tps = [*(new if self.drift else ()), *alert_tps]
            return alert_tps, await committed_offsets(self.settings, self.settings.app_id, tps)

        try:  # the offsets are read now, while Faust keeps the partitions paused
            alert_tps, offsets = await asyncio.wait_for(offsets_now(), 15)
        except Exception as exc:  # noqa: BLE001 - never block the worker on a rebuild
            log.warning("window recovery skipped: cannot read the committed offsets: %r", exc)
            if not self.tasks:
                self._open_gates()
            return
        task = asyncio.get_running_loop().create_task(
            self._run({tp: offsets.get(tp) for tp in new} if self.drift else {},
                      {tp: offsets.get(tp) for tp in alert_tps} if restore_alerts else None))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    async def on_revoked(self, sender: Any = None, revoked: Iterable[Any] = (), **_: Any) -> None:
        """Partitions revoked: forget them and the windows fed only by them (another worker rebuilds those)."""
        from aiokafka import TopicPartition

        gone = {TopicPartition(tp.topic, tp.partition) for tp in revoked if tp.topic == self.topic}
        self.assigned -= gone
        if self.drift is not None and gone:
            dropped = self.drift.drop_partitions({tp.partition for tp in gone})
            if dropped:
                log.info("dropped the windows of %d model version(s) of revoked partitions", dropped)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            self._open_gates()

    def _open_gates(self) -> None:
        if self.drift is not None:
            self.drift.resume()
        if self.hub is not None:
            self.hub.resume()

    async def _alert_partitions(self) -> list[Any]:
        from aiokafka import TopicPartition

        parts = await self._partitions(self.alerts_topic)
        return [TopicPartition(self.alerts_topic, p) for p in parts]

    async def _partitions(self, topic: str) -> list[int]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(**aiokafka_config(self.settings), group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()
            return sorted(consumer.partitions_for_topic(topic) or [])
        finally:
            await consumer.stop()

    async def _run(self, windows_from: dict[Any, int | None], alerts_from: dict[Any, int | None] | None) -> None:
        stats = RecoveryStats()
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self._rebuild(windows_from, alerts_from, stats), RECOVERY_TIMEOUT_S)
        except TimeoutError:
            stats.error = f"timed out after {RECOVERY_TIMEOUT_S:.0f} s"
        except Exception as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
            log.debug("window recovery failed", exc_info=True)
        stats.seconds = time.perf_counter() - started
        self.history.append(stats)
        if stats.error:
            log.warning("window recovery failed (%s); windows start from what was rebuilt", stats.error)
        log.info(
            "window recovery: %d partition(s), %d records, %d events in %.2f s; %d window(s) open, %d re-tested, "
            "%d already tested; %d alert(s) restored", stats.partitions, stats.records, stats.events, stats.seconds,
            stats.windows_open, stats.windows_retested, stats.windows_dropped, stats.alerts_restored)

    async def _rebuild(self, windows_from: dict[Any, int | None], alerts_from: dict[Any, int | None] | None,
                       stats: RecoveryStats) -> None:
        from aiokafka import AIOKafkaConsumer

        fetch = max(8 * 1024 * 1024, self.settings.max_record_bytes + 1024)
        consumer = AIOKafkaConsumer(**aiokafka_config(self.settings), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=fetch,
                                    fetch_max_bytes=fetch * 2)
        await consumer.start()
        try:
            todo = {tp: c for tp, c in windows_from.items() if c}
            if alerts_from is not None:
                if alerts_from:
                    consumer.assign(list(alerts_from))
                await self._restore_alerts(consumer, alerts_from, stats)
            if todo:
                consumer.assign(list(todo))  # replaces the alerts partitions
                await self._rebuild_windows(consumer, todo, stats)
        finally:
            await consumer.stop()

    # -- windows
    async def _rebuild_windows(self, consumer: Any, committed: dict[Any, int], stats: RecoveryStats) -> None:
        from streams.ingest import decode_records

        s = self.settings
        drift = self.drift
        horizon_ms = int(round((s.window_size_s + s.window_step_s) * 1000)) + drift.lateness_ms
        closed: list[Any] = []
        first_ts: dict[tuple[str, str], int] = {}
        known = s.known_models
        begins = await consumer.beginning_offsets(list(committed))
        for tp, end in sorted(committed.items(), key=lambda kv: kv[0].partition):
            lo = int(begins.get(tp, 0))
            last = await _read_one(consumer, tp, max(lo, end - 1))
            if last is None:
                continue
            start = await start_offset(consumer, tp, last[1] - horizon_ms, lo, end)
            stats.partitions += 1
            stats.ranges[f"{tp.topic}:{tp.partition}"] = (start, end)
            consumer.seek(tp, start)
            position, empty = start, 0
            while position < end and empty < 3:
                batches = await consumer.getmany(tp, timeout_ms=1000, max_records=FETCH_RECORDS)
                records = [r for r in batches.get(tp, []) if r.offset < end]
                if not records:
                    empty += 1
                    continue
                empty = 0
                position = records[-1].offset + 1
                raw = [(r.value, r.topic, r.partition, r.offset, r.timestamp) for r in records]
                good, dead = decode_records(raw, self.runtime.limits, known, getattr(self.runtime, "guard", None))
                stats.records += len(records)
                stats.skipped_records += len(dead)
                for d in good:
                    b = d.batch
                    if b.role != "live":
                        continue
                    key = (b.model_id, b.model_version)
                    t0 = int(b.ts_ms.min())
                    first_ts[key] = min(first_ts.get(key, t0), t0)
                    stats.events += b.n
                    closed.extend(drift.replay(b, d.partition))
                await asyncio.sleep(0)  # keep the loop (heartbeats, web) responsive
        stats.windows_open = drift.open_windows()
        await self._requeue(closed, first_ts, stats)

    async def _requeue(self, closed: list[Any], first_ts: dict[tuple[str, str], int], stats: RecoveryStats) -> None:
        """Test again only the windows that closed during the rebuild, are whole, and have no stored result."""
        covered = [w for w in closed if w.start_ms >= first_ts.get(w.key, w.start_ms + 1)]
        stats.windows_dropped = len(closed) - len(covered)
        if not covered:
            return
        stored: set[str] = set()
        try:
            rows = await self.runtime.writer.query(Q.STORED_WINDOW_IDS, {"ids": [w.window_id for w in covered]})
            stored = {r[0] for r in rows}
        except Exception as exc:  # noqa: BLE001 - store down: test them all (same ids collapse)
            log.warning("window recovery: cannot check drift_windows (%s); re-testing %d window(s)", exc, len(covered))
        retest = [w for w in covered if w.window_id not in stored]
        stats.windows_dropped += len(covered) - len(retest)
        stats.windows_retested = len(retest)
        if retest:
            self.drift.enqueue(retest)

    # -- alerts
    async def _restore_alerts(self, consumer: Any, committed: dict[Any, int | None], stats: RecoveryStats) -> None:
        from schemas.codec import CodecError, decode

        events: list[AlertEvent] = []
        try:
            rows = await self.runtime.writer.query(Q.OPEN_ALERTS)
            events += [AlertEvent(r[0], int(r[1]), r[2], r[3], "open", r[4], window_id=r[5],
                                  event_ids=tuple(r[6]), client_id=r[7], message=r[8]) for r in rows]
        except Exception as exc:  # noqa: BLE001 - the store may be down; the topic tail still helps
            log.warning("alert restore: cannot read open alerts from the store: %s", exc)
        tail: list[tuple[int, AlertEvent]] = []
        if committed:
            begins = await consumer.beginning_offsets(list(committed))
            for tp, offset in committed.items():
                consumer.seek(tp, offset if offset is not None else begins.get(tp, 0))
            while True:  # the tail past the committed offsets, to the end (empty fetch)
                batches = await consumer.getmany(*committed, timeout_ms=1500, max_records=FETCH_RECORDS)
                if not any(batches.values()):
                    break
                for records in batches.values():
                    for r in records:
                        try:
                            _, rec = decode(r.value or b"", expect="Alert")
                        except CodecError:
                            continue
                        tail.append((rec["ts_ms"], AlertEvent.from_record(rec)))
        events += [e for _, e in sorted(tail, key=lambda t: t[0])]
        stats.alerts_restored = self.hub.restore(events)
