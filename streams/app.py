"""The Faust app: topics, the ingest agent (decode once, fan out to stages) and the results sink.

One Kafka record carries a micro-batch of predictions. The ingest agent takes up to
``sink_batch_records`` records at a time, decodes each once, dead-letters what does not
validate, writes the slim columns to ClickHouse and hands the decoded batches to the
enabled stages (drift windows, classifier, probing), which work on one step while the
agent decodes and writes the next (``StagePipeline``). Faust acks the records only after
the sink wrote them and the stages finished with them, so a crash replays them;
idempotent tables (ReplacingMergeTree keyed by event id) turn the replay into
exactly-once rows.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import faust

from schemas.codec import CodecError, decode, labels_from_record
from streams import rows as R
from streams.alerts.feed import AlertFeed
from streams.event_guard import record_time_ms
from streams.ingest import MAX_DEAD_LETTER_BYTES, dead_letter, decode_records
from streams.kafka import faust_credentials
from streams.lag import report_lag_forever
from streams.pipeline import StagePipeline
from streams.repartition import Router
from streams.runtime import INGEST_AGENTS, Runtime, parse_agents
from streams.settings import Settings
from streams.store import Store, open_store_from_settings
from streams.web import register_views
from streams.writer import RowsRejected

log = logging.getLogger(__name__)

DRIFT_COLUMNS = (
    "window_id", "model_id", "model_version", "layer", "window_start_ms", "window_end_ms", "n_reference",
    "n_window", "mmd2", "p_value", "detection_rate", "alpha", "bandwidth", "n_permutations", "compute_ms", "device",
)


def faust_settings(settings: Settings) -> dict[str, Any]:
    """Faust App keyword arguments from layerwatch settings."""
    config: dict[str, Any] = dict(
        broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")],
        store="memory://",
        processing_guarantee="at_least_once",
        topic_partitions=settings.topic_partitions,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        datadir=str(settings.state_path / "faust"),
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(64, settings.sink_batch_records * 2),
        consumer_max_fetch_size=8 * 1024 * 1024,
        # a dead letter carries up to MAX_DEAD_LETTER_BYTES of the raw record plus its reason
        producer_max_request_size=max(settings.max_record_bytes, MAX_DEAD_LETTER_BYTES) + 64 * 1024,
        consumer_auto_offset_reset="earliest",
        autodiscover=False,
        topic_disable_leader=True,
    )
    credentials = faust_credentials(settings)
    if credentials is not None:
        config["broker_credentials"] = credentials
    return config


def app_id(settings: Settings) -> str:
    """The Faust app id, which is the consumer group: test-only workers form a group of their own."""
    return f"{settings.app_id}-tests" if parse_agents(settings.agents) == {"test"} else settings.app_id


def create_app(settings: Settings, *, store: Store | None = None) -> tuple[faust.App, Runtime]:
    """Build the Faust app and its runtime (the store is opened and migrated here)."""
    app = faust.App(app_id(settings), **faust_settings(settings))
    store = store or open_store_from_settings(settings)
    store.migrate()
    runtime = Runtime.create(app, settings, store)
    if runtime.agents & INGEST_AGENTS:
        _add_ingest_agent(app, runtime)
    if "test" in runtime.agents:
        _add_window_test_agent(app, runtime)
    if "sink" in runtime.agents:
        _add_results_sink(app, runtime)
    if "alerts" in runtime.agents:
        _add_alerts_agent(app, runtime)
    _add_lifecycle(app, runtime)
    register_views(app, runtime)
    return app, runtime


def _add_lifecycle(app: faust.App, runtime: Runtime) -> None:
    """Start the stages with the app, stop them before it shuts down; recovery follows partition assignments."""

    @app.task
    async def start_stages() -> None:
        await runtime.start()

    @app.task
    async def report_lag() -> None:
        consumed = ["predictions"] if runtime.agents & INGEST_AGENTS else []
        consumed += ["windows"] if "test" in runtime.agents else []
        await report_lag_forever(app, runtime.metrics.consumer_lag, [runtime.settings.topic(t) for t in consumed],
                                 runtime.settings.lag_interval_s)

    @app.on_before_shutdown.connect
    async def stop_stages(sender: Any, **_: Any) -> None:
        await runtime.stop()

    assigned = asyncio.Event()

    async def first_assignment(sender: Any = None, assigned_tps: Any = (), **_: Any) -> None:
        assigned.set()

    @app.task
    async def announce_ready() -> None:
        await assigned.wait()
        settings = runtime.settings
        await wait_for_port(settings.web_host, settings.web_port)
        host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "") else settings.web_host
        print(f"layerwatch worker ready: dashboard http://{host}:{settings.web_port}/ · agents "
              f"{','.join(sorted(runtime.agents))} · store {runtime.store.url}", flush=True)

    assert runtime.recovery is not None
    app.on_partitions_assigned.connect(first_assignment)
    app.on_partitions_assigned.connect(runtime.recovery.on_assigned)
    app.on_partitions_revoked.connect(runtime.recovery.on_revoked)


async def wait_for_port(host: str, port: int, timeout_s: float = 60.0) -> bool:
    """True once ``host:port`` accepts a TCP connection (False after ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host if host not in ("0.0.0.0", "") else "127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return True
    return False


def _add_ingest_agent(app: faust.App, runtime: Runtime) -> None:
    settings, metrics = runtime.settings, runtime.metrics

    t = runtime.topics
    router = Router(settings.topic_partitions, t.predictions.get_topic_name()) if settings.repartition else None
    source = app.topic(t.predictions.get_topic_name(), t.by_model.get_topic_name(), key_serializer="raw",
                       value_serializer="raw") if router else t.predictions

    @app.agent(source, name="layerwatch.ingest")
    async def ingest(stream: faust.StreamT) -> None:
        pipeline = StagePipeline(runtime)
        known_models = settings.known_models
        try:
            async for events in stream.take_events(settings.sink_batch_records, within=settings.sink_within_s):
                raw = [(e.message.value, e.message.topic, e.message.partition, e.message.offset,
                        record_time_ms(e.message.timestamp, seconds=True)) for e in events]
                good, dead = decode_records(raw, runtime.limits, known_models, runtime.guard)
                for record in dead:
                    await runtime.dead_letter(record)
                metrics.last_ingest.set_to_current_time()
                if router is not None:
                    good = await _forward(runtime, router, good, raw)
                for d in good:
                    metrics.records.labels(d.topic).inc()
                    metrics.events.labels(d.batch.model_id, d.batch.role).inc(d.batch.n)
                if "sink" in runtime.agents and good:
                    good, rejected = await _write_or_split(runtime, good)
                    values = {(t, p, o): v for v, t, p, o, _ in raw}
                    for d, reason in rejected:
                        await runtime.dead_letter(dead_letter(values[(d.topic, d.partition, d.offset)], reason,
                                                              d.topic, d.partition, d.offset))
                await pipeline.submit(events, good)
                runtime.health_board.clear("ingest")
        except Exception as exc:
            runtime.health_board.fail("ingest", f"ingest agent crashed: {exc!r}")
            raise


async def _forward(runtime: Runtime, router: Router, good: list[R.Delivered], raw: list[tuple]) -> list[R.Delivered]:
    """Forward the records that are not on their model's home partition (raw, keyed by model id); the rest."""
    here, away = router.split(good)
    if away:
        values = {(topic, partition, offset): value for value, topic, partition, offset, *_ in raw}
        sent = [await runtime.topics.by_model.send(key=d.batch.model_id.encode(), partition=home,
                                                   value=values[(d.topic, d.partition, d.offset)])
                for d, home in away]
        for fut in sent:
            await fut  # acked by the broker before this step's records are
        for d, _ in away:
            runtime.metrics.forwarded.labels(d.batch.model_id).inc()
    return here


async def _write_or_split(runtime: Runtime, good: list[R.Delivered]
                          ) -> tuple[list[R.Delivered], list[tuple[R.Delivered, str]]]:
    """Write one step; when the store refuses it, write record by record: (stored, [(refused, reason)]).

    Only the records whose rows the store refuses are dead-lettered; the others of the same
    step are stored and go on to the stages (a record written twice is one row under FINAL).
    """
    try:
        await _write_step(runtime, good, count_rejected=len(good) == 1)
        return good, []
    except RowsRejected as exc:
        if len(good) == 1:
            return [], [(good[0], str(exc))]
    stored, rejected = [], []
    for d in good:
        try:
            await _write_step(runtime, [d])
            stored.append(d)
        except RowsRejected as exc:
            rejected.append((d, str(exc)))
    return stored, rejected


async def _write_step(runtime: Runtime, good: Sequence[R.Delivered], count_rejected: bool = True) -> None:
    live = [d for d in good if d.batch.role == "live"]
    reference = [d for d in good if d.batch.role == "reference"]
    w = runtime.writer
    await w.write("predictions", R.prediction_rows(good), count_rejected=count_rejected)
    await w.write("predictions_inputs", R.input_rows(live), count_rejected=count_rejected)
    await w.write("reference_embeddings", R.reference_rows(reference), count_rejected=count_rejected)


def result_rows(records: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Decoded result events grouped into {table: columns} (pure)."""
    by_table: dict[str, list] = {}
    for name, record in records:
        by_table.setdefault(name, []).append(record)
    out: dict[str, dict[str, Any]] = {}
    if drift := by_table.get("DriftResult"):
        columns = R.records_to_columns(drift, DRIFT_COLUMNS)
        columns["ts"] = [r["window_end_ms"] // 1000 for r in drift]
        out["drift_windows"] = columns
        scores = [(r, rank, s) for r in drift for rank, s in enumerate(r["top_samples"], start=1)]
        if scores:
            out["sample_scores"] = {
                "window_id": [r["window_id"] for r, _, _ in scores],
                "model_id": [r["model_id"] for r, _, _ in scores],
                "model_version": [r["model_version"] for r, _, _ in scores],
                "layer": [r["layer"] for r, _, _ in scores],
                "event_id": [s["event_id"] for _, _, s in scores],
                "rank": [rank for _, rank, _ in scores],
                "score": [s["score"] for _, _, s in scores],
                "ts": [r["window_end_ms"] // 1000 for r, _, _ in scores],
            }
    if labels := by_table.get("AttackLabels"):
        out["attack_labels"] = R.label_rows([labels_from_record(r) for r in labels])
    if alerts := by_table.get("Alert"):
        columns = R.records_to_columns(
            alerts, ("alert_id", "ts_ms", "model_id", "kind", "state", "severity", "window_id", "event_ids", "client_id", "message"))
        columns["ts"] = [r["ts_ms"] // 1000 for r in alerts]
        out["alerts"] = columns
    if dead := by_table.get("DeadLetter"):
        out["dead_letters"] = {
            "dl_id": [f"{r['topic']}:{r['partition']}:{r['offset']}" for r in dead],
            "ts": [r["ts_ms"] // 1000 for r in dead],
            "ts_ms": [r["ts_ms"] for r in dead],
            "topic": [r["topic"] for r in dead],
            "partition": [r["partition"] for r in dead],
            "offset": [r["offset"] for r in dead],
            "reason": [r["reason"] for r in dead],
            "raw": [r["raw"] for r in dead],
        }
    return out


def _decoded(runtime: Runtime, events: Sequence[Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[dict]]:
    """The result records of ``events``, and dead letters for those that do not decode."""
    decoded, dead = [], []
    for e in events:
        m = e.message
        try:
            decoded.append(decode(m.value or b""))
        except CodecError as exc:
            dead.append(dead_letter(m.value, str(exc), m.topic, m.partition, m.offset))
    return decoded, dead


def _add_results_sink(app: faust.App, runtime: Runtime) -> None:
    t = runtime.topics
    dlq_name = t.dlq.get_topic_name()
    topics = app.topic(*(topic.get_topic_name() for topic in (t.drift, t.labels, t.alerts, t.dlq)),
                       key_serializer="raw", value_serializer="raw")

    @app.agent(topics, name="layerwatch.results_sink")
    async def results_sink(stream: faust.StreamT) -> None:
        async for events in stream.take_events(256, within=0.5):
            decoded, dead = _decoded(runtime, events)
            for record in dead:
                if record["topic"] == dlq_name:  # a dead letter of the dead-letter topic would loop
                    log.warning("undecodable record on %s:%s:%s skipped: %s", record["topic"], record["partition"],
                                record["offset"], record["reason"])
                    runtime.metrics.dlq.labels(record["topic"]).inc()
                else:
                    await runtime.dead_letter(record)
            rows = result_rows(decoded)
            try:
                for table, columns in rows.items():
                    await runtime.writer.write(table, columns)
            except RowsRejected as exc:
                for e in events:
                    m = e.message
                    if m.topic != dlq_name:
                        await runtime.dead_letter(dead_letter(m.value, str(exc), m.topic, m.partition, m.offset))


def _add_alerts_agent(app: faust.App, runtime: Runtime) -> None:
    """Feeds the combined drift rows and the classifier's labels to the alert rules."""
    assert runtime.alerts is not None
    hub = runtime.alerts
    feed = AlertFeed(hub, label_bucket_ms=int(runtime.settings.window_size_s * 1000))
    topics = app.topic(runtime.topics.drift.get_topic_name(), runtime.topics.labels.get_topic_name(),
                       key_serializer="raw", value_serializer="raw")

    @app.agent(topics, name="layerwatch.alerts")
    async def alerts(stream: faust.StreamT) -> None:
        async for value in stream:
            await hub.ready.wait()
            try:
                name, record = decode(value or b"")
            except CodecError:  # the results sink dead-letters it (same topic, partition and offset)
                continue
            await feed.handle(name, record)


def _add_window_test_agent(app: faust.App, runtime: Runtime) -> None:
    """Tests the windows ingest workers publish (see streams/window_tests.py)."""
    assert runtime.window_tests is not None
    tests = runtime.window_tests
    app.on_partitions_assigned.connect(tests.on_assigned)

    @app.agent(runtime.topics.windows, name="layerwatch.window_tests")
    async def window_tests(stream: faust.StreamT) -> None:
        async for events in stream.take_events(runtime.settings.test_batch_windows, within=0.2):
            await tests.handle(events)
