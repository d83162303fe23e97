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
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import faust

from schemas.codec import CodecError, Limits, decode, labels_from_record
from streams import rows as R
from streams.ingest import MAX_DEAD_LETTER_BYTES, decode_records, encode_dead_letter
from streams.metrics import Metrics
from streams.settings import Settings
from streams.store import Store, open_store_from_settings
from streams.writer import StoreWriter

log = logging.getLogger(__name__)

AGENTS = ("sink", "drift", "classify", "probing", "alerts")

DRIFT_COLUMNS = (
    "window_id", "model_id", "model_version", "layer", "window_start_ms", "window_end_ms", "n_reference",
    "n_window", "mmd2", "p_value", "detection_rate", "alpha", "bandwidth", "n_permutations", "compute_ms", "device",
)


class Stage(Protocol):
    """A consumer of decoded prediction batches inside the ingest agent."""

    async def handle(self, items: Sequence[R.Delivered]) -> None: ...


@dataclass
class Runtime:
    """What the agents of one worker process share."""

    settings: Settings
    store: Store
    writer: StoreWriter
    metrics: Metrics
    limits: Limits
    agents: frozenset[str]
    stages: list[Stage] = field(default_factory=list)
    topics: dict[str, Any] = field(default_factory=dict)
    stage_failure: str = ""  # the last detection stage failure, until a later step's stages succeed

    def health(self) -> dict[str, Any]:
        reason = self.writer.degraded_reason or self.stage_failure
        return {"status": "degraded" if reason else "ok", "reason": reason, "agents": sorted(self.agents)}


def parse_agents(spec: str) -> frozenset[str]:
    """'all' or a comma list of agent names; unknown names are an error naming them."""
    names = {a.strip() for a in spec.split(",") if a.strip()}
    if not names or names == {"all"}:
        return frozenset(AGENTS)
    unknown = sorted(names - set(AGENTS))
    if unknown:
        raise ValueError(f"unknown agent(s) {', '.join(unknown)}; choose from {', '.join(AGENTS)}")
    return frozenset(names)


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
    if settings.kafka_security_protocol != "PLAINTEXT":
        import ssl

        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if settings.kafka_security_protocol.startswith("SASL"):
            config["broker_credentials"] = faust.SASLCredentials(
                username=settings.kafka_sasl_username,
                password=settings.kafka_sasl_password,
                ssl_context=context if "SSL" in settings.kafka_security_protocol else None,
                mechanism=settings.kafka_sasl_mechanism,
            )
        else:
            config["broker_credentials"] = context
    return config


def create_app(settings: Settings, *, store: Store | None = None) -> tuple[faust.App, Runtime]:
    """Build the Faust app and its runtime (the store is opened and migrated here)."""
    agents = parse_agents(settings.agents)
    app = faust.App(settings.app_id, **faust_settings(settings))
    store = store or open_store_from_settings(settings)
    store.migrate()
    metrics = Metrics()
    runtime = Runtime(
        settings=settings,
        store=store,
        writer=StoreWriter(store, metrics),
        metrics=metrics,
        limits=Limits(max_record_bytes=settings.max_record_bytes, max_rows=settings.max_batch_rows, max_dim=settings.max_dim),
        agents=agents,
    )
    t = runtime.topics
    for name in ("predictions", "drift", "labels", "alerts", "actions", "dlq"):
        t[name] = app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw",
                            partitions=settings.topic_partitions)

    _add_ingest_agent(app, runtime)
    if "sink" in agents:
        _add_results_sink(app, runtime)

    from streams.web.views import register_views

    register_views(app, runtime)
    from streams import dashboard, detection

    dashboard.install(app, runtime)
    detection.install(app, runtime)
    return app, runtime


def _add_ingest_agent(app: faust.App, runtime: Runtime) -> None:
    settings, metrics = runtime.settings, runtime.metrics
    dlq = runtime.topics["dlq"]

    @app.agent(runtime.topics["predictions"], name="layerwatch.ingest")
    async def ingest(stream: faust.StreamT) -> None:
        pipeline = StagePipeline(runtime)
        known_models = settings.known_models
        async for events in stream.take_events(settings.sink_batch_records, within=settings.sink_within_s):
            raw = [(e.message.value, e.message.topic, e.message.partition, e.message.offset) for e in events]
            good, dead = decode_records(raw, runtime.limits, known_models)
            for record in dead:
                log.warning("dead letter %s:%s:%s: %s", record["topic"], record["partition"], record["offset"], record["reason"])
                metrics.dlq.labels(record["topic"]).inc()
                await dlq.send(key=f"{record['topic']}:{record['partition']}:{record['offset']}".encode(),
                               value=encode_dead_letter(record))
            for d in good:
                metrics.records.labels(d.topic).inc()
                metrics.events.labels(d.batch.model_id, d.batch.role).inc(d.batch.n)
            if "sink" in runtime.agents and good:
                live = [d for d in good if d.batch.role == "live"]
                reference = [d for d in good if d.batch.role == "reference"]
                await runtime.writer.write("predictions", R.prediction_rows(good))
                await runtime.writer.write("predictions_inputs", R.input_rows(live))
                await runtime.writer.write("reference_embeddings", R.reference_rows(reference))
            await pipeline.submit(events, good)


class StagePipeline:
    """Runs one step's stages while the ingest agent takes, decodes and writes the next step.

    The stages of a step run after the sink wrote it and after the previous step's stages
    finished, so every stage sees the batches in order; meanwhile the event loop is free to
    decode and write the next step (the stages' heavy work runs in threads). A step's
    records are acked only when its stages are done (each record's reference is held until
    then), so a crash replays them. A stage failure is logged at once and raised by the
    next ``submit`` (Faust then restarts the agent, which replays the records); until a
    later step's stages succeed, the runtime's health reads "degraded" with the reason.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._task: asyncio.Future | None = None

    async def submit(self, events: Sequence[Any], good: Sequence[R.Delivered]) -> None:
        """Start the stages of one step (whose sink writes are done); waits for the previous step."""
        await self.wait()
        if not self.runtime.stages or not good:
            return
        for event in events:
            event.message.incref()  # released in _run: Faust acks the record when both let go
        self._task = asyncio.ensure_future(self._run(events, good))
        self._task.add_done_callback(self._done)

    async def wait(self) -> None:
        """Wait for the step in flight, raising its failure."""
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self, events: Sequence[Any], good: Sequence[R.Delivered]) -> None:
        try:
            await _run_stages(self.runtime.stages, good)
        finally:
            for event in events:
                event.ack()

    def _done(self, task: asyncio.Future) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("a detection stage failed", exc_info=exc)
        self.runtime.stage_failure = "" if exc is None else f"detection stage failed: {exc!r}"[:300]


async def _run_stages(stages: Sequence[Stage], good: Sequence[R.Delivered]) -> None:
    """Hand the decoded batches to every stage at once, after the sink wrote them (the drift stage
    reads the reference back from the store): the classifier and probing work in their threads
    while the windows run on the loop. Returns when all are done (the records are acked after
    that); the first failure is raised then."""
    results = await asyncio.gather(*(stage.handle(good) for stage in stages), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


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


def _add_results_sink(app: faust.App, runtime: Runtime) -> None:
    t = runtime.topics
    topics = app.topic(*(t[n].get_topic_name() for n in ("drift", "labels", "alerts", "dlq")),
                       key_serializer="raw", value_serializer="raw")

    @app.agent(topics, name="layerwatch.results_sink")
    async def results_sink(stream: faust.StreamT) -> None:
        async for events in stream.take_events(256, within=0.5):
            decoded = []
            for e in events:
                try:
                    decoded.append(decode(e.message.value or b""))
                except CodecError as exc:  # results topics are ours; a foreign record is logged, not looped
                    log.warning("skipping undecodable record on %s:%s:%s: %s",
                                e.message.topic, e.message.partition, e.message.offset, exc)
            for table, columns in result_rows(decoded).items():
                await runtime.writer.write(table, columns)
