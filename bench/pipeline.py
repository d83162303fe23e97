"""End-to-end worker throughput: Kafka → Faust ingest → ClickHouse, all agents on (a benchmark, not a test).

    python bench/pipeline.py [--predictions 500000] [--batch 1024] [--workers 1|2]
                             [--store chdb|server] [--repeats 3] [--json PATH]

Each repeat starts a fresh Tansu broker and fresh worker(s) (chDB at a new path, or a new
database on one Debian clickhouse-server started for the whole benchmark), then:

1. publishes a reference for the synthetic model (``role=reference``, first in every
   partition) and a warm-up (two live micro-batches per partition, 40 s and 20 s of event
   time before the backlog), starts the worker(s) with every agent on and waits until the
   warm-up window was tested and, when a classifier could be trained, labels landed: the
   one-time costs (reference load, torch import, skops import and classifier load) stay
   out of the measurement;
2. publishes a pre-encoded backlog of ``--predictions`` live predictions in micro-batches
   of ``--batch`` (d = 512 float16 penultimate activations, a 10-class output vector,
   ``--clients`` client ids of which one sends near-duplicate queries, so the probing
   stage has something to find; event time advancing at ``--event-rate``, so hopping
   windows close and are tested during the run), round-robin over the partitions, as fast
   as aiokafka's producer goes, while the warm worker(s) are stopped with SIGSTOP (a few
   seconds, well within the 10 s session timeout; on a 2-core machine the producer would
   otherwise take the worker's CPU), then continued with SIGCONT;
3. measures the sustained rate from the first consume to the last row in ClickHouse: the
   workers' ``/metrics`` are polled for the rows written (a SQL ``count()`` every 0.2 s
   would run on the worker's store thread, between its inserts, and take the measured
   worker's CPU); then ``min``/``max(ingested_ms)`` of
   the backlog's rows give the interval. The rows of the first ingest step
   (``ingested_ms = min``) mark the first consume, so the rate is
   ``(rows - last step rows) / (max - min)`` (rows are stamped when their step builds
   them, so every step but the last was done within the interval); ``steady_per_s`` is
   the rate between the 10th and 90th percentile of ``ingested_ms`` (no start-up or tail);
   ``drain_per_s`` is all rows over the time from the first step to the poll (every
   0.2 s) that saw the last row written. Worker CPU (utime + stime from ``/proc/PID/stat``,
   sampled every 50 ms) is taken over that drain and divided by all rows;
4. reads all records with a plain ``AIOKafkaConsumer`` (manual assign, from the beginning
   to the end offsets, ``max_partition_fetch_bytes`` as the worker's, no decoding): the
   consume ceiling of this machine;
5. publishes at 50 % of the measured rate for ``--paced-seconds`` with ``ts_ms`` = publish
   time and reports p50/p99 of ``ingested_ms - ts_ms`` over those rows (``ingested_ms`` is
   stamped when the sink builds the rows, just before the insert).

The classify stage needs ``<state_dir>/classifier/classifier.skops``: the benchmark
trains a small random forest on synthetic outputs once (``classify`` in the JSON says
whether that worked; without it the stage labels nothing).
``--profile DIR`` records the worker(s) with py-spy (``--format raw``, collapsed stacks)
during step 2 of the first repeat and prints the heaviest frames.
The machine is shared: the load average before and after each repeat is in the JSON.
Not run by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table  # noqa: E402

from schemas import PredictionBatch, encode_batch  # noqa: E402
from streams.broker import free_port  # noqa: E402
from streams.rows import now_ms  # noqa: E402
from streams.runtime import parse_agents  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.client import http_json  # noqa: E402
from streams.stack import Child, LocalStack, wait_for  # noqa: E402

console = Console(width=160)
MODEL = "synthetic"
LAYER = "penultimate"
PROBER = "prober"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Synthetic micro-batches: a pool of activation matrices reused with fresh ids and timestamps."""

    batch: int
    dim: int = 512
    classes: int = 10
    clients: int = 8
    pool_size: int = 8
    seed: int = 0
    pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.means = rng.normal(size=(self.classes, self.dim)).astype(np.float32)
        self.head = rng.normal(size=(self.dim, self.classes)).astype(np.float32) / np.sqrt(self.dim)
        base = rng.normal(size=self.dim).astype(np.float32) * 2
        clients = np.array([f"client-{i}" for i in range(self.clients - 1)] + [PROBER], dtype=object)
        self.client_ids = [str(c) for c in clients[np.arange(self.batch) % self.clients]]
        probe_rows = np.array([c == PROBER for c in self.client_ids])
        for _ in range(self.pool_size):
            self.pool.append(self._sample(rng, self.batch, base, probe_rows))

    def _sample(self, rng: np.random.Generator, n: int, base: np.ndarray, probe_rows: np.ndarray | None):
        labels = rng.integers(0, self.classes, n)
        emb = self.means[labels] + rng.normal(size=(n, self.dim)).astype(np.float32)
        if probe_rows is not None:  # one client sends one input with tiny perturbations
            emb[probe_rows] = base + 0.02 * rng.normal(size=(int(probe_rows.sum()), self.dim))
        logits = emb @ self.head * 3
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return emb.astype(np.float16), probs.astype(np.float32), probs.argmax(axis=1).astype(np.int32)

    def reference(self, n: int, tag: str, ts_ms: int) -> PredictionBatch:
        emb, probs, predicted = self._sample(np.random.default_rng(self.seed + 1), n, self.means[0], None)
        return PredictionBatch.build(MODEL, [f"{tag}-ref-{i:06d}" for i in range(n)], outputs=probs,
                                     layers={LAYER: emb}, role="reference", predicted=predicted,
                                     ts_ms=np.full(n, ts_ms, np.int64))

    def live(self, index: int, tag: str, ts_ms: int) -> bytes:
        emb, probs, predicted = self.pool[index % len(self.pool)]
        start = index * self.batch
        ids = [f"{tag}-{i:012d}" for i in range(start, start + self.batch)]
        batch = PredictionBatch.build(MODEL, ids, outputs=probs, layers={LAYER: emb}, predicted=predicted,
                                      client_ids=self.client_ids, ts_ms=np.full(self.batch, ts_ms, np.int64))
        return encode_batch(batch)


def train_classifier(work: Workload, path: Path) -> str:
    """A small attack classifier on synthetic 10-class outputs, so the classify stage really labels.

    Clean rows: the workload's own output vectors; "adversarial" rows: flattened ones
    (temperature-scaled), two fake attacks on two fake target models. Returns its version.
    """
    from workers.classifier.model import AttackClassifier

    rng = np.random.default_rng(work.seed + 2)
    clean = np.concatenate([probs for _, probs, _ in work.pool])[:4000]
    logits = np.log(np.clip(clean, 1e-9, None))
    adv = np.exp(logits / rng.uniform(2, 6, size=(len(clean), 1)))
    adv /= adv.sum(axis=1, keepdims=True)
    outputs = np.concatenate([clean, adv]).astype(np.float32)
    n = len(clean)
    adversarial = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    attack = np.r_[np.full(n, "clean"), rng.choice(["fgsm", "pgd"], n)].astype(object)
    target = np.r_[np.full(n, MODEL), rng.choice([MODEL, "other"], n)].astype(object)
    clf = AttackClassifier("rf", seed=0, n_jobs=1).fit(outputs, adversarial, attack, target)
    clf.save(path)
    return clf.version


async def producer(bootstrap: str):
    """aiokafka's producer: kafka-python computes the record CRC32C in pure Python (~8 MB/s here)
    unless the optional ``crc32c`` package is installed; aiokafka does it in C."""
    from aiokafka import AIOKafkaProducer

    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_request_size=16 * 1024 * 1024)
    await prod.start()
    return prod


# ----------------------------------------------------------------------------- measuring


class CpuSampler:
    """(wall time, cpu seconds) of some processes every ``interval`` s, interpolated afterwards."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float]]] = {k: [] for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def cpu_seconds(pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            for name, pid in self.pids.items():
                cpu = self.cpu_seconds(pid)
                if cpu is not None:
                    self.samples[name].append((t, cpu))
            self._stop.wait(self.interval)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, name: str, t: float) -> float:
        s = self.samples[name]
        if not s:
            return float("nan")
        return float(np.interp(t, [x[0] for x in s], [x[1] for x in s]))

    def between(self, t0: float, t1: float, names: list[str] | None = None) -> float:
        return sum(self.at(n, t1) - self.at(n, t0) for n in (names or list(self.pids)))


def query(url: str, sql: str, params: dict | None = None, attempts: int = 3) -> list[list]:
    """Rows of a read-only query through the worker's API (retried: a busy worker may time out)."""
    for _ in range(attempts):
        status, body = http_json(f"{url}/api/query", {"sql": sql, "params": params or {}}, timeout=30.0)
        if status == 200:
            return body["rows"]
    raise RuntimeError(f"/api/query answered {status}: {body}")


def metric_total(url: str, name: str, label: str = "") -> float:
    """A counter from the worker's /metrics, summed over the series whose labels contain ``label``."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


async def raw_consume(bootstrap: str, topic: str, fetch_bytes: int) -> dict[str, float]:
    """Read every record of ``topic`` with a plain AIOKafkaConsumer: the consume ceiling."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=fetch_bytes)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        while not partitions:
            await consumer.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records = nbytes = 0
        started = time.perf_counter()
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            got = await consumer.getmany(timeout_ms=1000)
            for tp, messages in got.items():
                records += len(messages)
                nbytes += sum(len(m.value or b"") for m in messages)
                if messages and messages[-1].offset + 1 >= end[tp]:
                    remaining.discard(tp)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {"records": records, "bytes": nbytes, "seconds": elapsed}


# ----------------------------------------------------------------------------- one run


@dataclass
class Options:
    predictions: int
    batch: int
    workers: int
    store: str
    repeats: int
    partitions: int
    reference: int
    paced_seconds: float
    env: dict[str, str]
    profile: Path | None
    log_dir: Path | None
    event_rate: float = 50_000.0
    classifier: Path | None = None
    fetch_bytes: int = 8 * 1024 * 1024


def load() -> float:
    return os.getloadavg()[0]


def encode_backlog(opts: Options, work: Workload, tag: str, base_ms: int) -> list[bytes]:
    """The backlog's records, encoded before the clock starts; event time advances at ``opts.event_rate``."""
    n_batches = -(-opts.predictions // opts.batch)
    step_ms = 1000 * opts.batch / opts.event_rate
    with Progress(TextColumn("encoding backlog"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("encode", total=n_batches)
        out = []
        for i in range(n_batches):
            out.append(work.live(i, tag, base_ms + int(i * step_ms)))
            progress.advance(task)
    return out


async def publish_records(bootstrap: str, topic: str, records: list[tuple[bytes, int]], label: str) -> float:
    """Send (value, partition) records as fast as the producer goes; returns the seconds taken."""
    prod = await producer(bootstrap)
    try:
        started = time.perf_counter()
        pending = []
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task(label, total=len(records))
            for value, partition in records:
                pending.append(await prod.send(topic, value=value, partition=partition))
                if len(pending) >= 64:
                    await asyncio.gather(*pending)
                    pending.clear()
                progress.advance(task)
            await asyncio.gather(*pending)
        return time.perf_counter() - started
    finally:
        await prod.stop()


def warmup_records(opts: Options, work: Workload, tag: str, base_ms: int) -> tuple[list[tuple[bytes, int]], int]:
    """The reference (first in every partition), then two live batches per partition 40 s and 20 s of
    event time before the backlog: the second closes the first's windows, so the worker loads the
    reference, imports the MMD engine and runs a test (and loads the classifier) before the clock starts."""
    per_part = max(1, opts.reference // opts.partitions)
    ref = work.reference(per_part * opts.partitions, tag, base_ms - 60_000)
    records = [(encode_batch(ref.slice(p * per_part, (p + 1) * per_part)), p) for p in range(opts.partitions)]
    for k, ago in enumerate((40_000, 20_000)):
        for p in range(opts.partitions):
            records.append((work.live(50_000 + k * opts.partitions + p, tag + "w", base_ms - ago), p))
    return records, per_part * opts.partitions + 2 * opts.partitions * opts.batch


async def publish_paced(work: Workload, bootstrap: str, topic: str, tag: str, batch: int, target: float,
                        seconds: float, partitions: int) -> tuple[int, float]:
    """Publish micro-batches at ``target`` predictions/s with ts_ms = publish time; (batches, wall seconds)."""
    interval = batch / target
    n = max(1, int(seconds / interval))
    prod = await producer(bootstrap)
    pending = []
    try:
        t0 = time.perf_counter()
        with Progress(TextColumn(f"paced publish at {target:,.0f}/s"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("paced", total=n)
            for i in range(n):
                delay = t0 + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(await prod.send(topic, value=work.live(100_000 + i, tag, now_ms()),
                                               partition=i % partitions))
                progress.advance(task)
            await asyncio.gather(*pending)
        wall = time.perf_counter() - t0
    finally:
        await prod.stop()
    return n, wall


def start_workers(stack: LocalStack, opts: Options, env: dict[str, str]) -> list[tuple[Child, str]]:
    """Spawn every worker first, then wait for all (so they join the group together)."""
    spawned = []
    for w in range(opts.workers):
        port = free_port()
        child = stack.spawn(f"worker{w}", ["worker"], LW_WEB_PORT=str(port), **env)
        spawned.append((child, f"http://127.0.0.1:{port}"))
    for child, url in spawned:
        wait_for(lambda url=url: http_json(f"{url}/health", timeout=1.0)[0] in (200, 503), 120,
                 f"{child.name} /health", alive=child.check)
    return spawned


def wait_rows(url: str, workers: list, expected: int, children: list[Child], label: str, timeout: float) -> list:
    """Wait until ``expected`` rows are in predictions; returns [count, min, max(ingested_ms), time seen].

    Progress is read from the workers' /metrics (rows written), not from ClickHouse: a
    count() every 0.2 s through /api/query would run on the worker's store thread between
    its inserts and take CPU from the worker being measured. One query confirms at the end.
    """
    deadline = time.monotonic() + timeout
    seen = 0.0
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(label, total=expected)
        while time.monotonic() < deadline:
            for c in children:
                c.check()
            seen = sum(metric_total(u, "layerwatch_rows_written_total", 'table="predictions"') for _, u in workers)
            progress.update(task, completed=min(seen, expected))
            if seen >= expected:
                at = time.time()
                row = query(url, "SELECT count(), min(ingested_ms), max(ingested_ms) FROM predictions")[0]
                if int(row[0]) >= expected:
                    return [*row, at]
            time.sleep(0.2)
    raise RuntimeError(f"{label}: {seen:.0f} of {expected} rows written after {timeout:.0f} s")


def wait_warm(url: str, opts: Options, children: list[Child], timeout: float = 180) -> dict[str, Any]:
    """Until the warm-up window was tested and (with a classifier) labels landed; what was reached."""
    deadline = time.monotonic() + timeout
    need_labels = opts.classifier is not None and "classify" in parse_agents(opts.env.get("LW_AGENTS", "all"))
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for c in children:
            c.check()
        state = {"drift_windows": int(query(url, "SELECT count() FROM drift_windows")[0][0]),
                 "attack_labels": int(query(url, "SELECT count() FROM attack_labels")[0][0])}
        if state["drift_windows"] > 0 and (not need_labels or state["attack_labels"] > 0):
            return state
        time.sleep(0.5)
    console.print(f"[yellow]warm-up incomplete after {timeout:.0f} s: {state}[/]")
    return state


def opts_extra_pyspy() -> list[str]:
    """Extra py-spy record flags from LW_BENCH_PYSPY (e.g. "--idle" or "--gil")."""
    return os.environ.get("LW_BENCH_PYSPY", "").split()


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([py_spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "-r", "97",
                             "--threads", "--nonblocking", *opts_extra_pyspy()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def summarize_profile(path: Path, top: int = 25) -> list[tuple[str, float]]:
    """Own ('self') and inclusive shares of the heaviest frames in a py-spy raw file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    console.print(f"[bold]py-spy {path.name}[/]: {total} samples; heaviest inclusive frames:")
    for f, n in incl.most_common(top):
        console.print(f"  {100 * n / total:5.1f}%  {f}")
    console.print("heaviest own frames:")
    for f, n in own.most_common(top):
        console.print(f"  {100 * n / total:5.1f}%  {f}")
    return [(f, n / total) for f, n in incl.most_common(top)]


def run_once(opts: Options, work: Workload, index: int, server: Any, tmp: Path) -> dict[str, Any]:
    tag = f"r{index}{os.getpid() % 1000}"
    prefix = f"bench{index}."
    state = tmp / f"run{index}"
    if opts.store == "server":
        store_url = server.url_for(f"lw_bench_{os.getpid()}_{index}")
    else:
        store_url = f"chdb://{state / 'store'}"
    env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"lw-bench-{tag}", "LW_TOPIC_PARTITIONS": str(opts.partitions),
           "LW_REFERENCE_MAX": str(opts.reference), "LW_AGENTS": "all", **opts.env}
    result: dict[str, Any] = {"repeat": index, "load_before": load(), "store_url": store_url.split("?")[0]}
    log_dir = (opts.log_dir / f"run{index}") if opts.log_dir else None
    with LocalStack(state_dir=state, clickhouse_url=store_url, log_dir=log_dir) as stack:
        bootstrap = stack.start_broker()
        from streams.kafka import ensure_topics

        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, topic_partitions=opts.partitions)
        ensure_topics(settings)
        topic = settings.topic("predictions")
        span_ms = int(1000 * opts.predictions / opts.event_rate)
        base = now_ms() - span_ms  # the backlog's event time ends about when it is published
        warm, n_warm = warmup_records(opts, work, tag, base)
        asyncio.run(publish_records(bootstrap, topic, warm, "publishing reference and warm-up"))
        backlog = encode_backlog(opts, work, tag, base)
        pub = {"records": len(backlog), "bytes": sum(map(len, backlog)), "predictions": len(backlog) * opts.batch}
        if opts.classifier is not None:  # the classify stage reads <state_dir>/classifier/classifier.skops
            (state / "classifier").mkdir(parents=True, exist_ok=True)
            shutil.copy(opts.classifier, state / "classifier" / "classifier.skops")
        workers = start_workers(stack, opts, env)
        children = [c for c, _ in workers]
        url = workers[0][1]
        pids = {c.name: c.process.pid for c in children}
        pids["broker"] = stack.broker.process.pid
        if server is not None and server._proc is not None:
            pids["clickhouse"] = server._proc.pid
        sampler = CpuSampler(pids).start()
        wait_rows(url, workers, n_warm, children, "warm-up rows", timeout=180)
        result["warmup"] = wait_warm(url, opts, children)
        profilers = []
        if opts.profile and index == 0:
            opts.profile.mkdir(parents=True, exist_ok=True)
            profilers = [(start_profiler(c.process.pid, opts.profile / f"{c.name}.txt"), opts.profile / f"{c.name}.txt")
                         for c in children]
        try:
            # the warm worker(s) are stopped (SIGSTOP) while the backlog is published, so the producer's
            # CPU is not taken from them; continued (SIGCONT) at once, well within the 10 s session timeout
            for c in children:
                c.process.send_signal(signal.SIGSTOP)
            try:
                pub["seconds"] = asyncio.run(publish_records(
                    bootstrap, topic, [(v, i % opts.partitions) for i, v in enumerate(backlog)], "publishing backlog"))
            finally:
                for c in children:
                    c.process.send_signal(signal.SIGCONT)
            note = " [yellow](longer than 8 s: the group may have rebalanced)[/]" if pub["seconds"] > 8 else ""
            console.print(f"[dim]repeat {index}: published {pub['predictions']:,} predictions in {pub['records']} records, "
                          f"{pub['bytes'] / 1e6:,.0f} MB in {pub['seconds']:.1f} s with the worker(s) stopped[/]{note}")
            del backlog
            expected = n_warm + pub["predictions"]
            done_at = wait_rows(url, workers, expected, children, "draining backlog", timeout=max(300, expected / 500))[-1]
        finally:
            for p, _ in profilers:
                p.send_signal(signal.SIGINT)
            for p, _ in profilers:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        result["publish"] = pub
        count, first, last, q10, q90 = (int(v) for v in query(
            url, "SELECT count(), min(ingested_ms), max(ingested_ms), quantileExact(0.1)(ingested_ms), "
                 "quantileExact(0.9)(ingested_ms) FROM predictions WHERE ts_ms >= {base}", {"base": base})[0])
        result["steady_per_s"] = 0.8 * count / ((q90 - q10) / 1000) if q90 > q10 else float("nan")
        steps = query(url, "SELECT ingested_ms, count() FROM predictions WHERE ts_ms >= {base} "
                           "GROUP BY ingested_ms ORDER BY ingested_ms", {"base": base})
        result["steps"] = [[int(t) - first, int(n)] for t, n in steps]  # ms after the first step, rows
        # rows are stamped when their ingest step builds them: the rows of every step but the last
        # were done in (last - first)
        n_last = int(steps[-1][1])
        seconds = (last - first) / 1000
        rate = (count - n_last) / seconds if seconds > 0 else float("nan")
        bytes_per_prediction = pub["bytes"] / pub["predictions"]
        names = [c.name for c in children]
        # CPU over the whole drain: from the first step to the moment every row was written (polled
        # every 0.2 s), over all rows; the last step's work is in it
        drain = done_at - first / 1000
        cpu = sampler.between(first / 1000, done_at, names)
        result.update(
            rows=count, last_step_rows=n_last, seconds=seconds, predictions_per_s=rate,
            mb_per_s=rate * bytes_per_prediction / 1e6, drain_s=drain, drain_per_s=count / drain,
            cpu_s=cpu, cpu_s_per_1k=1000 * cpu / count, cpu_cores=cpu / drain,
            other_cpu_s={n: sampler.between(first / 1000, done_at, [n]) for n in pids if n not in names},
            per_worker_events={c.name: metric_total(u, "layerwatch_events_total") for c, u in workers},
        )
        time.sleep(1.0)  # let the windows close before the ceiling run (they close on the wall clock)
        raw = asyncio.run(raw_consume(bootstrap, topic, opts.fetch_bytes))
        result["ceiling"] = raw
        all_predictions = n_warm + pub["predictions"]
        complete = raw["records"] >= len(warm) + pub["records"]
        result["ceiling_per_s"] = all_predictions / raw["seconds"] if complete else float("nan")
        result["ceiling_mb_per_s"] = raw["bytes"] / raw["seconds"] / 1e6
        result["ratio"] = rate / result["ceiling_per_s"]
        # paced run: 50 % of the measured rate, ts_ms = publish time
        target = 0.5 * rate if np.isfinite(rate) and rate > 0 else 0.5 * count / max(1.0, seconds)
        paced_start = now_ms()
        n_paced, paced_wall = asyncio.run(publish_paced(work, bootstrap, topic, tag + "p", opts.batch, target,
                                                        opts.paced_seconds, opts.partitions))
        wait_rows(url, workers, expected + n_paced * opts.batch, children, "paced rows", timeout=120)
        lat = query(url, "SELECT quantilesExact(0.5, 0.9, 0.99)(toInt64(ingested_ms) - toInt64(ts_ms)), "
                         "max(toInt64(ingested_ms) - toInt64(ts_ms)), count() FROM predictions WHERE ts_ms >= {t}",
                    {"t": paced_start})[0]
        q = lat[0]
        result.update(paced_target_per_s=target, paced_actual_per_s=n_paced * opts.batch / paced_wall,
                      p50_latency_s=q[0] / 1000, p90_latency_s=q[1] / 1000, p99_latency_s=q[2] / 1000,
                      max_latency_s=int(lat[1]) / 1000, paced_rows=int(lat[2]))
        time.sleep(2.0)
        result["drift_windows"] = int(query(url, "SELECT uniqExact(window_id) FROM drift_windows")[0][0])
        result["alerts"] = query(url, "SELECT kind, count() FROM alerts GROUP BY kind ORDER BY kind")
        result["labelled_events"] = int(query(url, "SELECT count() FROM attack_labels")[0][0])
        result["unique_events"] = int(query(url, "SELECT uniqExact(event_id) FROM predictions")[0][0])
        sampler.stop()
        result["load_after"] = load()
        for p, path in profilers:
            if path.exists():
                result.setdefault("profile", {})[path.name] = summarize_profile(path)
        stack.stop()
    if opts.store == "chdb":
        shutil.rmtree(state / "store", ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- report


def median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return float(statistics.median(values)) if values else float("nan")


def report(opts: Options, runs: list[dict]) -> dict[str, Any]:
    table = Table(title=f"pipeline: {opts.predictions:,} predictions, batch {opts.batch}, "
                        f"{opts.workers} worker(s), store {opts.store}")
    cols = [("repeat", None), ("pred/s", "predictions_per_s"), ("MB/s", "mb_per_s"), ("ceiling/s", "ceiling_per_s"),
            ("ratio", "ratio"), ("steady/s", "steady_per_s"), ("drain/s", "drain_per_s"),
            ("cpu s/1k", "cpu_s_per_1k"), ("cores", "cpu_cores"), ("p50 s", "p50_latency_s"),
            ("p99 s", "p99_latency_s"), ("windows", "drift_windows"), ("load", "load_before")]
    for name, _ in cols:
        table.add_column(name, justify="right")
    fmt = {"predictions_per_s": "{:,.0f}", "steady_per_s": "{:,.0f}", "drain_per_s": "{:,.0f}",
           "ceiling_per_s": "{:,.0f}", "mb_per_s": "{:,.1f}", "ratio": "{:.2f}", "cpu_s_per_1k": "{:.3f}",
           "cpu_cores": "{:.2f}", "p50_latency_s": "{:.2f}", "p99_latency_s": "{:.2f}", "drift_windows": "{:.0f}",
           "load_before": "{:.1f}"}
    for r in runs:
        table.add_row(str(r["repeat"]), *[fmt[k].format(r[k]) for _, k in cols[1:]])
    summary = {k: median(runs, k) for _, k in cols[1:]}
    table.add_row("median", *[fmt[k].format(summary[k]) for _, k in cols[1:]], style="bold")
    console.print(table)
    return {
        "predictions_per_s": summary["predictions_per_s"],
        "ceiling_per_s": summary["ceiling_per_s"],
        "ratio": median(runs, "ratio"),
        "p50_latency_s": summary["p50_latency_s"],
        "p99_latency_s": summary["p99_latency_s"],
        "workers": opts.workers,
        "mb_per_s": summary["mb_per_s"],
        "steady_per_s": summary["steady_per_s"],
        "drain_per_s": summary["drain_per_s"],
        "cpu_s_per_1k": summary["cpu_s_per_1k"],
        "store": opts.store,
        "predictions": opts.predictions,
        "batch": opts.batch,
        "dim": 512,
        "partitions": opts.partitions,
        "repeats": opts.repeats,
        "env": opts.env,
        "cores": os.cpu_count(),
        "load_before": [r["load_before"] for r in runs],
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--workers", type=int, choices=(1, 2), default=1)
    ap.add_argument("--store", choices=("chdb", "server"), default="chdb")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--reference", type=int, default=1000, help="reference events (LW_REFERENCE_MAX)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--paced-seconds", type=float, default=20.0)
    ap.add_argument("--event-rate", type=float, default=50_000.0,
                    help="predictions per second of event time in the backlog (how many windows it spans)")
    ap.add_argument("--env", action="append", default=[], metavar="LW_NAME=VALUE",
                    help="extra worker setting, e.g. LW_SINK_BATCH_RECORDS=64 (repeatable)")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy raw profiles of the first repeat go here")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the broker and worker logs here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.workers == 2 and args.store == "chdb":
        ap.error("two worker processes cannot open one chDB path: use --store server")
    opts = Options(args.predictions, args.batch, args.workers, args.store, args.repeats, args.partitions,
                   args.reference, args.paced_seconds,
                   dict(kv.split("=", 1) for kv in args.env), args.profile, args.log_dir, args.event_rate)
    work = Workload(batch=args.batch, clients=args.clients)
    runs = []
    server = None
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        classify = "off"
        try:
            opts.classifier = Path(tmp) / "classifier.skops"
            classify = f"on ({train_classifier(work, opts.classifier)})"
        except Exception as exc:  # the classifier is another engineer's work in progress: run without it
            opts.classifier = None
            classify = f"unavailable: {type(exc).__name__}: {exc}"[:300]
        console.print(f"[dim]classify stage: {classify}[/]")
        try:
            if args.store == "server":
                from tests.clickhouse_server import ClickHouseServer

                server = ClickHouseServer(Path(tmp) / "clickhouse").start()
            for i in range(args.repeats):
                runs.append(run_once(opts, work, i, server, Path(tmp)))
                r = runs[-1]
                console.print(f"repeat {i}: {r['predictions_per_s']:,.0f} pred/s, ceiling {r['ceiling_per_s']:,.0f}/s, "
                              f"p99 {r['p99_latency_s']:.2f} s, per worker {r['per_worker_events']}, "
                              f"load {r['load_before']:.1f}→{r['load_after']:.1f}")
        finally:
            if server is not None:
                server.close()
    out = report(opts, runs)
    out["classify"] = classify
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
