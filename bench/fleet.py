"""A fleet, not a demo: many models, thousands of clients, every window tested on time (a benchmark).

    python bench/fleet.py [--models 100] [--layers 2] [--clients 5000] [--predictions 300000]
                          [--workers 1,2] [--paced-seconds 60] [--attacked 3] [--json PATH]
    python bench/fleet.py --test-workers 1,2 [--ingest-workers 1] [--replay-windows 400] [--replay-rounds 2] …

For each worker count in ``--workers`` (1, then 2) a fresh Tansu broker, a fresh database on
one Debian clickhouse-server (started once), fresh worker(s) with every agent on:

1. **references and warm-up**: a clean reference per model (``--reference`` rows, 512-dim
   float16 penultimate plus one 64-dim layer with ``--layers 2``), then two live batches per
   model 40 s and 20 s of event time back, so every model's reference is fitted before the
   clock starts (waits until every model has a drift row);
2. **throughput**: a pre-encoded backlog of ``--predictions`` predictions in micro-batches of
   ``--batch`` rows, each batch of one model picked by Zipf over the models (exponent
   ``--zipf``), each row's client by Zipf over ``--clients`` clients (one of them a prober
   sending near-duplicates), published with the workers stopped (SIGSTOP, as bench/pipeline.py),
   then drained: ``predictions_per_s`` (all workers and per worker), the worker CPU per
   prediction, the broker's and ClickHouse's CPU over the drain; ``ceiling_per_s`` is a raw
   aiokafka consumer of the same records in the same run, ``ratio`` the quotient;
   ``probing_us_per_prediction`` is the probing detector's own time over the rows it scored
   (``layerwatch_probing_seconds_total``);
3. **windows on time**: once the throughput backlog's windows are all tested (``backlog_tests_s``:
   drift queues empty, hidden-attack fits done, a test pool's lag on ``lw.windows`` at zero),
   ``--paced-seconds`` of traffic at ``--paced-rate`` predictions/s with
   event time = wall clock, so every model's windows close in real time; ``--attacked``
   models (spread over the Zipf ranks) get a mean shift of their activations for the second
   half. ``windows_due`` counts every (model, tested layer, window) of that phase with at least
   ``window_min_samples`` events that closed before the end (computed from what was
   published, with the worker's window arithmetic), ``windows_tested`` those with a drift
   row of exactly that window (a coalesced window's row has a merged id and does not
   count; ``windows_coalesced`` and ``windows_untested`` come from the workers' metrics;
   tested layers: ``LW_DRIFT_LAYERS``, by default the penultimate only);
   ``test_lag_p50_s`` / ``p99`` = drift row written − the wall time the window could close
   (its end plus the lateness), over the phase's windows; ``alerts_opened`` counts
   distribution-shift alerts opened on attacked and on clean models, ``hidden_attack_alerts``
   the models with a hidden_attack alert (the whole-model shift is the distribution-shift
   alert's, so attacked models should have none either). ``test_lag_p99_s_second_half`` is the
   p99 over the windows due in the phase's second half (a fresh test pool loads its references
   in the first); with test workers, ``publish_lag_*`` (close → on ``lw.windows``) and
   ``pool_lag_*`` (on ``lw.windows`` → DriftResult) say where the lag goes.

``worker_rss_mib`` is the largest resident set of a worker seen during the run. Helpers (broker
and ClickHouse start-up, producer, CPU sampler, raw consumer) are bench/pipeline.py's. The
machine's cores are shared by the broker, ClickHouse, the publisher and the workers: the
JSON says where the CPU went. Not run by pytest.

**Test workers** (``--test-workers 1,2``): one run instead, with ``--ingest-workers`` workers
``--agents ingest`` (they publish closed windows to ``lw.windows``) and a pool of ``--agents test``
workers; phases 1 and 2 as above (with K = the first size), then, the ingest workers held fixed:

3. for each K a fresh pool of K test workers, warm (``pool_warm_s``: each has preloaded the
   references of its partitions and fitted their hidden-attack tests), and the paced phase (the
   same seeded records for every K): windows due / tested, test lag p50 / p99 in seconds and in window steps, the pool's
   window tests per second, per-process CPU over the phase;
4. **capacity**: for each K, a fresh consumer group of K test workers re-tests ``lw.windows``
   from its start (the very records the ingest workers published, so the ingest side is
   identical for every K); after ``--replay-skip`` windows (the reference loads) the next
   ``--replay-windows`` give ``window_tests_per_s`` and the CPU seconds of every process (ingest
   worker, each test worker, broker, ClickHouse, this script) and of the rest of the machine
   (``other``, from /proc/stat). ``--replay-rounds`` alternate the order (1, 2, 2, 1) and the
   median is reported, so a change in the machine's other load hits every K alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import (  # noqa: E402
    CLK_TCK,
    CpuSampler,
    console,
    load,
    metric_total,
    producer,
    publish_records,
    query,
    raw_consume,
    start_workers,
    wait_rows,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas import PredictionBatch, encode_batch  # noqa: E402
from streams.kafka import ensure_topics  # noqa: E402
from streams.repartition import murmur2_partition  # noqa: E402
from streams.rows import now_ms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stages.references import drift_layers  # noqa: E402
from streams.stack import LocalStack  # noqa: E402
from workers.windows import window_id, window_starts  # noqa: E402

PEN, AUX = "penultimate", "block3"
PROBER = "prober"


# ----------------------------------------------------------------------------- the fleet


class Fleet:
    """Models with their own class means per layer; Zipf over models and clients; a few attacked models."""

    def __init__(self, models: int, layers: int, clients: int, batch: int, zipf: float, attacked: int,
                 classes: int = 10, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.names = [f"m{i:03d}" for i in range(models)]
        self.dims = {PEN: 512, AUX: 64} if layers == 2 else {PEN: 512}
        self.batch, self.classes = batch, classes
        w = 1.0 / np.arange(1, models + 1) ** zipf
        self.model_p = w / w.sum()
        c = 1.0 / np.arange(1, clients + 1) ** zipf
        self.client_p = c / c.sum()
        # the prober is the 50th most active client (~0.2 % of rows with 5,000 clients): enough to be found,
        # too few to shift a model's windows away from its reference
        names = [f"client-{i}" for i in range(clients)]
        names[min(49, clients - 1)] = PROBER
        self.clients = np.array(names, dtype=object)
        self.means = {m: {name: self.rng.normal(size=(classes, d)).astype(np.float32) for name, d in self.dims.items()}
                      for m in self.names}
        self.heads = {m: self.rng.normal(size=(512, classes)).astype(np.float32) / np.sqrt(512) for m in self.names}
        self.probe_base = self.rng.normal(size=512).astype(np.float32) * 2
        step = max(1, models // max(1, attacked))
        self.attacked = [self.names[i] for i in range(0, models, step)][:attacked]
        self._noise = {name: self.rng.normal(size=(8192, d)).astype(np.float32) for name, d in self.dims.items()}

    def sample(self, model: str, n: int, shift: float = 0.0, clients: bool = True) -> tuple:
        labels = self.rng.integers(0, self.classes, n)
        off = int(self.rng.integers(0, 8192 - n + 1))
        layers = {name: self.means[model][name][labels] + self._noise[name][off : off + n] + shift
                  for name in self.dims}
        ids = self.clients[self.rng.choice(len(self.clients), size=n, p=self.client_p)] if clients else None
        if ids is not None:
            probe = ids == PROBER
            layers[PEN][probe] = self.probe_base + 0.02 * self._noise[PEN][: int(probe.sum())]
        logits = layers[PEN] @ self.heads[model] * 3
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return ({k: v.astype(np.float16) for k, v in layers.items()}, probs.astype(np.float32),
                probs.argmax(axis=1).astype(np.int32), ids)

    def reference(self, model: str, n: int, tag: str, ts_ms: int) -> bytes:
        layers, probs, predicted, _ = self.sample(model, n, clients=False)
        return encode_batch(PredictionBatch.build(model, [f"{tag}-{model}-ref-{i}" for i in range(n)], outputs=probs,
                                                  layers=layers, role="reference", predicted=predicted,
                                                  ts_ms=np.full(n, ts_ms, np.int64)))

    def live(self, model: str, n: int, tag: str, start: int, ts_ms: int, shift: float = 0.0) -> bytes:
        layers, probs, predicted, ids = self.sample(model, n, shift)
        return encode_batch(PredictionBatch.build(model, [f"{tag}-{start + i:012d}" for i in range(n)], outputs=probs,
                                                  layers=layers, predicted=predicted, client_ids=list(ids),
                                                  ts_ms=np.full(n, ts_ms, np.int64)))

    def pick(self) -> str:
        return self.names[int(self.rng.choice(len(self.names), p=self.model_p))]


def metric_sum(url: str, name: str) -> float:
    """Sum of a metric's samples, labelled or not (bench/pipeline.py's metric_total needs labels)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def partition_of(model: str, partitions: int) -> int:
    """kafka-python's default partitioner (murmur2 of the key), as the worker's own producers."""
    return murmur2_partition(model.encode(), partitions)


# ----------------------------------------------------------------------------- phases


class RssSampler(threading.Thread):
    """The largest resident set (MiB) of each worker process seen every 0.5 s."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids, self.peak, self._stop_event = pids, {k: 0.0 for k in pids}, threading.Event()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop_event.wait(0.5):
            for name, pid in self.pids.items():
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        self.peak[name] = max(self.peak[name], int(f.read().split()[1]) * page / 2**20)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop_event.set()


class DriftWatcher(threading.Thread):
    """Wall time (ms) at which each DriftResult (model, layer, window id) reaches ``lw.drift``: read from the
    topic (not the store: ``drift_windows.ts`` is the window's end, and polling the store would load the worker)."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                      fetch_max_wait_ms=100)
        parts = self.consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)
        self.arrived: dict[tuple[str, str, str], int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for batch in self.consumer.poll(timeout_ms=200).values():
                at = now_ms()
                for msg in batch:
                    self.arrived.setdefault(self.key(msg.value), at)
        self.consumer.close()

    @staticmethod
    def key(value: bytes) -> tuple[str, ...]:
        from schemas.codec import decode

        _, r = decode(value)
        return r["model_id"], r["layer"], r["window_id"]

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


class WindowWatcher(DriftWatcher):
    """Wall time (ms) at which each closed window (model, window id) reaches ``lw.windows`` (split roles)."""

    @staticmethod
    def key(value: bytes) -> tuple[str, ...]:
        from schemas.codec import decode

        _, r = decode(value, expect="WindowSample")
        return r["model_id"], r["window_id"]


async def publish_paced(fleet: Fleet, bootstrap: str, topic: str, partitions: int, tag: str, rate: float,
                        seconds: float, batch: int) -> dict[str, Any]:
    """Micro-batches at ``rate`` predictions/s, event time = publish time; attacked models shifted in the
    second half. Returns the (model, ts_ms, rows) of every batch sent."""
    prod = await producer(bootstrap)
    interval = batch / rate
    n = max(1, int(seconds / interval))
    sent, pending = [], []
    try:
        t0 = time.perf_counter()
        with Progress(TextColumn(f"paced fleet traffic at {rate:,.0f}/s"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("paced", total=n)
            for i in range(n):
                delay = t0 + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                model = fleet.pick()
                shift = 0.8 if (model in fleet.attacked and i >= n // 2) else 0.0
                ts = now_ms()
                pending.append(await prod.send(topic, key=model.encode(), partition=partition_of(model, partitions),
                                               value=fleet.live(model, batch, tag, i * batch, ts, shift)))
                sent.append((model, ts, batch))
                if len(pending) >= 64:
                    await asyncio.gather(*pending)
                    pending.clear()
                progress.advance(task)
            await asyncio.gather(*pending)
        wall = time.perf_counter() - t0
    finally:
        await prod.stop()
    return {"sent": sent, "wall_s": wall, "predictions": n * batch, "attack_from_ms": sent[n // 2][1]}


def due_windows(sent: list[tuple[str, int, int]], settings: Settings, until_ms: int, layers: list[str]) -> dict:
    """{(model, layer, window id): end_ms} of windows with enough events that could close before ``until_ms``."""
    size, step = int(settings.window_size_s * 1000), int(settings.window_step_s * 1000)
    by_model: dict[str, list[tuple[int, int]]] = {}
    for model, ts, n in sent:
        by_model.setdefault(model, []).append((ts, n))
    due = {}
    for model, rows in by_model.items():
        ts = np.repeat([t for t, _ in rows], [n for _, n in rows])
        _, starts = window_starts(ts, size, step)
        uniq, counts = np.unique(starts, return_counts=True)
        for start, count in zip(uniq.tolist(), counts.tolist()):
            end = start + size
            # windows wholly inside the phase (earlier ones also hold the backlog's events), closed before its end
            if count >= settings.window_min_samples and start >= ts.min() and end + 1000 <= until_ms:
                for layer in layers:
                    due[(model, layer, window_id(model, "1", start, end))] = end
    return due


def paced_windows(opts: argparse.Namespace, fleet: Fleet, settings: Settings, bootstrap: str, url: str,
                  metric_urls: list[str], tag: str, split: bool = False) -> dict[str, Any]:
    """Phase 3: paced traffic, the windows due in it, those tested, the test lag and the alerts opened."""
    coalesced0 = sum(metric_sum(u, "layerwatch_windows_coalesced_total") for u in metric_urls)
    untested0 = sum(metric_sum(u, "layerwatch_windows_untested_total") for u in metric_urls)
    watcher = DriftWatcher(bootstrap, settings.topic("drift"))
    watcher.start()
    published = WindowWatcher(bootstrap, settings.topic("windows")) if split else None
    if published is not None:
        published.start()
    paced = asyncio.run(publish_paced(fleet, bootstrap, settings.topic("predictions"), opts.partitions, tag,
                                      opts.paced_rate, opts.paced_seconds, opts.paced_batch))
    paced_end = now_ms()
    # the layers the workers test (LW_DRIFT_LAYERS, default the penultimate only): the others have no drift row
    tested_layers = list(drift_layers(dict.fromkeys(fleet.dims), os.environ.get("LW_DRIFT_LAYERS", settings.drift_layers)))
    due = due_windows(paced["sent"], settings, paced_end, tested_layers)
    # wait for the drift rows of the due windows (or until none came for four window steps)
    deadline, last_n, stable_since = time.monotonic() + opts.drain_timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        arrived = dict(watcher.arrived)
        if all(k in arrived for k in due):
            break
        if len(arrived) != last_n:
            last_n, stable_since = len(arrived), time.monotonic()
        elif time.monotonic() - stable_since > 4 * settings.window_step_s:
            break
        time.sleep(1.0)
    watcher.stop()
    arrived = dict(watcher.arrived)
    tested_keys = [k for k in due if k in arrived]
    lags = np.array([(arrived[k] - due[k] - 1000) / 1000 for k in tested_keys]) if tested_keys else np.zeros(0)
    half = paced["sent"][0][1] + (paced_end - paced["sent"][0][1]) / 2
    late_lags = np.array([(arrived[k] - due[k] - 1000) / 1000 for k in tested_keys if due[k] >= half])
    stages: dict[str, Any] = {}
    if published is not None:  # where the lag goes: close -> on lw.windows (ingest) -> drift row (test pool)
        published.stop()
        on_topic = {k: published.arrived.get((k[0], k[2])) for k in tested_keys}
        both = [k for k, at in on_topic.items() if at is not None]
        ingest = np.array([(on_topic[k] - due[k] - 1000) / 1000 for k in both]) if both else np.zeros(0)
        tests = np.array([(arrived[k] - on_topic[k]) / 1000 for k in both]) if both else np.zeros(0)
        for name, v in (("publish", ingest), ("pool", tests)):
            stages[f"{name}_lag_p50_s"] = float(np.percentile(v, 50)) if v.size else float("nan")
            stages[f"{name}_lag_p99_s"] = float(np.percentile(v, 99)) if v.size else float("nan")

    def opened_alerts(kind: str = "distribution_shift") -> dict[str, int]:
        rows = query(url, "SELECT model_id, count() FROM alerts FINAL WHERE kind = {k} "
                          "AND state = 'open' AND ts_ms >= {t} GROUP BY model_id", {"k": kind, "t": paced["sent"][0][1]})
        return {r[0]: int(r[1]) for r in rows}

    deadline = time.monotonic() + 30  # the alerts agent follows the drift rows
    while not all(m in (opened := opened_alerts()) for m in fleet.attacked) and time.monotonic() < deadline:
        time.sleep(2.0)
    hidden = opened_alerts("hidden_attack")
    hidden_clients = query(url, "SELECT model_id, client_id FROM alerts FINAL WHERE kind = 'hidden_attack' "
                                "AND state = 'open' AND ts_ms >= {t} ORDER BY model_id", {"t": paced["sent"][0][1]})
    # window tests (model, window id) of the phase's due windows, over the phase from its first publish
    due_windows_n = len({(m, w) for m, _, w in due})
    tested_windows = {(m, w) for m, _, w in tested_keys}
    phase_end = max(arrived[k] for k in tested_keys) if tested_keys else paced_end
    phase_s = (phase_end - paced["sent"][0][1]) / 1000
    return {
        "phase_start_ms": paced["sent"][0][1], "phase_end_ms": phase_end,
        "paced_rate": opts.paced_rate, "paced_actual_per_s": paced["predictions"] / paced["wall_s"],
        "windows_due": len(due), "windows_tested": len(tested_keys),
        "window_tests_due": due_windows_n, "window_tests_done": len(tested_windows),
        "paced_window_tests_per_s": len(tested_windows) / phase_s if tested_keys else float("nan"),
        "windows_coalesced": sum(metric_sum(u, "layerwatch_windows_coalesced_total") for u in metric_urls) - coalesced0,
        "windows_untested": sum(metric_sum(u, "layerwatch_windows_untested_total") for u in metric_urls) - untested0,
        "drift_records_paced": len(arrived),
        "test_lag_p50_s": float(np.percentile(lags, 50)) if lags.size else float("nan"),
        "test_lag_p99_s": float(np.percentile(lags, 99)) if lags.size else float("nan"),
        "test_lag_p50_steps": float(np.percentile(lags, 50)) / settings.window_step_s if lags.size else float("nan"),
        "test_lag_p99_steps": float(np.percentile(lags, 99)) / settings.window_step_s if lags.size else float("nan"),
        # the same over the windows due in the phase's second half: a fresh pool's reference loads are behind it
        "test_lag_p99_s_second_half": float(np.percentile(late_lags, 99)) if late_lags.size else float("nan"),
        **stages,
        "window_step_s": settings.window_step_s,
        "attacked": fleet.attacked,
        "alerts_opened": {"attacked": sum(opened.get(m, 0) for m in fleet.attacked),
                          "attacked_models_alerted": sum(1 for m in fleet.attacked if opened.get(m)),
                          "clean": sum(n for m, n in opened.items() if m not in fleet.attacked),
                          "clean_models_alerted": sorted(m for m in opened if m not in fleet.attacked)},
        "hidden_attack_alerts": {"attacked_models": sorted(m for m in hidden if m in fleet.attacked),
                                 "clean_models": sorted(m for m in hidden if m not in fleet.attacked),
                                 # (model, client): the prober's off-distribution near-duplicates may be named
                                 "clients": [list(r) for r in hidden_clients]},
        "test_seconds_mean": (sum(metric_sum(u, "layerwatch_window_test_duration_seconds_sum") for u in metric_urls)
                              / max(1.0, sum(metric_sum(u, "layerwatch_window_test_duration_seconds_count") for u in metric_urls))),
    }


# ----------------------------------------------------------------------------- the test pool (--test-workers)


MACHINE = -1  # CpuSampler "pid" of the whole machine's busy CPU time


class FleetCpu(CpuSampler):
    """CpuSampler that also samples the machine's busy CPU seconds (/proc/stat) under the pid ``MACHINE``."""

    @staticmethod
    def cpu_seconds(pid: int) -> float | None:
        if pid != MACHINE:
            return CpuSampler.cpu_seconds(pid)
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / CLK_TCK


def cpu_breakdown(sampler: CpuSampler, t0: float, t1: float) -> dict[str, Any]:
    """CPU seconds of each sampled process over [t0, t1], the machine's busy seconds and the rest ("other":
    processes not of this benchmark, e.g. other work on a shared machine), and the same as cores."""
    seconds = {n: round(sampler.between(t0, t1, [n]), 2) for n in sampler.pids if n != "machine"}
    machine = sampler.between(t0, t1, ["machine"])
    seconds["other"] = round(machine - sum(seconds.values()), 2)
    wall = max(1e-9, t1 - t0)
    return {"wall_s": round(wall, 2), "machine_busy_s": round(machine, 2), "cores_available": os.cpu_count(),
            "cpu_s": seconds, "cores": {n: round(v / wall, 2) for n, v in seconds.items()}}


def wait_backlog_tested(settings: Settings, worker_urls: list[str], pool_urls: list[str], timeout: float = 600) -> float:
    """Seconds until the throughput backlog's windows are all tested, so phase 3 measures windows on time, not
    a queue left over from phase 2: every worker's drift queue empty, no hidden-attack fit pending, and with a
    test pool, its consumer lag on ``lw.windows`` at zero (refreshed every ``LW_LAG_INTERVAL_S``)."""
    started = time.monotonic()
    time.sleep(settings.window_size_s + settings.window_lateness_s + 1.0)  # a timer: the last windows close by the clock

    def drained() -> bool:
        queued = sum(metric_sum(u, "layerwatch_drift_queue_windows") + metric_sum(u, "layerwatch_hidden_fits_pending")
                     for u in worker_urls + pool_urls)
        lag = sum(metric_sum(u, "layerwatch_consumer_lag_records") for u in pool_urls)  # NaN while unknown
        return queued == 0 and lag == 0

    with console.status("waiting for the backlog's windows to be tested"):
        while not drained():
            if time.monotonic() - started > timeout:
                console.print(f"[yellow]the backlog's windows were not all tested after {timeout:.0f} s")
                break
            time.sleep(1.0)
    return round(time.monotonic() - started, 1)


def spawn_test_workers(stack: LocalStack, k: int, env: dict[str, str], prefix: str) -> list[tuple[Any, str]]:
    """Spawn ``k`` ``--agents test`` workers (one consumer group, named by ``LW_APP_ID``); no waiting."""
    from streams.broker import free_port

    spawned = []
    for i in range(k):
        port = free_port()
        child = stack.spawn(f"{prefix}{i}", ["worker"], LW_WEB_PORT=str(port), **(env | {"LW_AGENTS": "test"}))
        spawned.append((child, f"http://127.0.0.1:{port}"))
    return spawned


def wait_test_workers(pool: list[tuple[Any, str]], timeout: float = 180) -> None:
    """Until every test worker announced its first partition assignment (its log's "worker ready" line)."""
    from streams.stack import wait_for

    for child, _ in pool:
        wait_for(lambda child=child: "layerwatch worker ready" in child.log_path.read_text(errors="replace"),
                 timeout, f"{child.name} ready", interval=0.5, alive=child.check)


def wait_pool_warm(pool: list[tuple[Any, str]], timeout: float = 600) -> float:
    """Seconds until every test worker has preloaded the references of its partitions and their hidden-attack
    fits are done (a long-lived pool is warm; phase 3 measures it on time, not starting up)."""
    started = time.monotonic()
    with console.status("test pool loading the references of its partitions"):
        while time.monotonic() - started < timeout:
            logs = [c.log_path.read_text(errors="replace") for c, _ in pool]
            if all("references preloaded for" in text for text in logs) and \
                    sum(metric_sum(u, "layerwatch_hidden_fits_pending") for _, u in pool) == 0:
                break
            time.sleep(1.0)
    return round(time.monotonic() - started, 1)


def start_test_workers(stack: LocalStack, k: int, env: dict[str, str], prefix: str) -> list[tuple[Any, str]]:
    pool = spawn_test_workers(stack, k, env, prefix)
    wait_test_workers(pool)
    return pool


def stop_test_workers(pool: list[tuple[Any, str]]) -> None:
    for child, _ in pool:
        child.terminate()
    for child, _ in pool:
        child.stop()


def replay_capacity(opts: argparse.Namespace, stack: LocalStack, settings: Settings, env: dict[str, str], k: int,
                    base_pids: dict[str, int], ingest_urls: list[str], round_: int = 0) -> dict[str, Any]:
    """Test capacity of K test workers: a fresh consumer group re-tests ``lw.windows`` from its start.

    Every K drains the same records (the windows the ingest workers published during the run), so the
    ingest side is held fixed exactly. Distinct windows whose DriftResults reached ``lw.drift`` are
    counted; the first ``--replay-skip`` windows (default: one per model) load and fit the references
    (``window_tests_per_s_cold`` includes them), the next ``--replay-windows`` give the warm rate
    ``window_tests_per_s`` and the CPU breakdown.
    """
    published = int(sum(metric_sum(u, "layerwatch_windows_published_total") for u in ingest_urls))
    skip = opts.models if opts.replay_skip is None else opts.replay_skip
    target = max(skip + 2, min(published, skip + opts.replay_windows))
    watcher = DriftWatcher(stack.start_broker(), settings.topic("drift"))
    watcher.start()
    pool = spawn_test_workers(stack, k, env | {"LW_APP_ID": f"{env['LW_APP_ID']}-replay{round_}"},
                              f"replay-{round_}-k{k}-")
    sampler = FleetCpu(base_pids | {c.name: c.process.pid for c, _ in pool}).start()

    def windows() -> dict[tuple[str, str], int]:
        first: dict[tuple[str, str], int] = {}
        for (model, _, wid), at in list(watcher.arrived.items()):
            first[(model, wid)] = min(at, first.get((model, wid), at))
        return first

    deadline, last_n, stable_since = time.monotonic() + opts.replay_timeout, -1, time.monotonic()
    fits_done_ms = 0  # when the pool's hidden-attack fits (background, per reference) were all done
    with Progress(TextColumn(f"K={k}: re-testing lw.windows"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("replay", total=target)
        while time.monotonic() < deadline:
            for c, _ in pool:
                c.check()
            n = len(windows())
            if not fits_done_ms and n > skip and sum(metric_sum(u, "layerwatch_hidden_fits_pending") for _, u in pool) == 0:
                fits_done_ms = int(time.time() * 1000)
            progress.update(task, completed=min(n, target))
            if n >= target:
                break
            if n != last_n:
                last_n, stable_since = n, time.monotonic()
            elif n and time.monotonic() - stable_since > 30:
                break
            time.sleep(0.5)
    watcher.stop()
    sampler.stop()
    per_worker = {c.name: int(metric_sum(u, "layerwatch_windows_tested_total")) for c, u in pool}
    test_seconds = [metric_sum(u, "layerwatch_window_test_duration_seconds_sum") for _, u in pool]
    stop_test_workers(pool)
    times = np.sort(np.array(list(windows().values()), dtype=np.int64))[:target]
    result: dict[str, Any] = {"test_workers": k, "round": round_, "windows_published": published, "target": target,
                              "windows_tested": int(times.size), "tested_per_worker": per_worker}
    if times.size <= skip + 1 or times[-1] <= max(int(times[skip]), fits_done_ms):
        return result | {"window_tests_per_s": float("nan")}
    # the windows of the poll that starts the clock are not counted (tested before it)
    cold = int(np.count_nonzero(times > times[0])) / ((times[-1] - times[0]) / 1000)
    # the clock starts after the reference loads and after their hidden-attack fits (start-up, not capacity)
    start = max(int(times[skip]), fits_done_ms) if fits_done_ms else int(times[skip])
    t0, t1 = start / 1000, times[-1] / 1000
    measured = int(np.count_nonzero(times > start))
    cpu = cpu_breakdown(sampler, t0, t1)
    tests_cpu = sum(v for n, v in cpu["cpu_s"].items() if n.startswith("replay-"))  # this round's test workers
    return result | {
        "skipped_windows": skip, "fits_done_ms": fits_done_ms, "window_tests_per_s_cold": round(cold, 2),
        "measured_windows": measured, "seconds": round(t1 - t0, 2), "window_tests_per_s": round(measured / (t1 - t0), 2),
        "test_worker_cpu_s_per_window": round(tests_cpu / max(1, measured), 4),
        "test_compute_s_per_window": round(sum(test_seconds) / max(1, sum(per_worker.values())), 4),
        "cpu": cpu,
    }


def capacity_summary(k: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median tests/s and CPU per test of K's rounds; the mean cores per role (tests, ingest, broker, ...)."""
    def role(name: str) -> str:
        return "tests" if name.startswith("replay-") else "ingest" if name.startswith("worker") else name

    cores: dict[str, float] = {}
    for r in rounds:
        for name, v in r.get("cpu", {}).get("cores", {}).items():
            cores[role(name)] = cores.get(role(name), 0.0) + v / len(rounds)
    def med(key: str) -> float:
        return float(np.median([r.get(key, float("nan")) for r in rounds]))

    return {"test_workers": k, "rounds": len(rounds),
            "window_tests_per_s": round(med("window_tests_per_s"), 2),
            "window_tests_per_s_rounds": [r.get("window_tests_per_s") for r in rounds],
            "window_tests_per_s_cold": round(med("window_tests_per_s_cold"), 2),
            "test_worker_cpu_s_per_window": round(med("test_worker_cpu_s_per_window"), 4),
            "test_compute_s_per_window": round(med("test_compute_s_per_window"), 4),
            "cores": {n: round(v, 2) for n, v in cores.items()}}


def test_pool(opts: argparse.Namespace, fleet: Fleet, stack: LocalStack, settings: Settings, env: dict[str, str],
              workers: list[tuple[Any, str]], pool: list[tuple[Any, str]], ks: list[int], server: Any,
              tag: str) -> dict[str, Any]:
    """Phase 3 once per pool size K (the same ingest workers, the same paced records), then the capacity
    of each K re-testing the same ``lw.windows`` backlog (:func:`replay_capacity`)."""
    url, ingest_urls = workers[0][1], [u for _, u in workers]
    base_pids = {c.name: c.process.pid for c, _ in workers} | {"broker": stack.broker.process.pid,
                                                               "bench": os.getpid(), "machine": MACHINE}
    if server._proc is not None:
        base_pids["clickhouse"] = server._proc.pid
    paced_runs = []
    for k in ks:
        stop_test_workers(pool)  # a fresh pool of K per phase: every K starts with cold reference caches
        pool = start_test_workers(stack, k, env, f"tests-k{k}-")
        warm_s = wait_pool_warm(pool)
        fleet.rng = np.random.default_rng(1)  # the same paced records for every K
        sampler = FleetCpu(base_pids | {c.name: c.process.pid for c, _ in pool}).start()
        r = paced_windows(opts, fleet, settings, stack.start_broker(), url, ingest_urls + [u for _, u in pool],
                          f"{tag}p{k}", split=True)
        sampler.stop()
        tested = {c.name: int(metric_sum(u, "layerwatch_windows_tested_total")) for c, u in pool}
        r |= {"test_workers": k, "tested_per_worker": tested, "pool_warm_s": warm_s,
              # every window the fresh pool tested (also those not wholly inside the phase), over the phase
              "pool_window_tests_per_s": sum(tested.values()) / max(1e-9, (r["phase_end_ms"] - r["phase_start_ms"]) / 1000),
              "cpu": cpu_breakdown(sampler, r["phase_start_ms"] / 1000, r["phase_end_ms"] / 1000)}
        paced_runs.append(r)
        console.print(f"paced K={k}: due {r['windows_due']}, tested {r['windows_tested']}, "
                      f"lag p99 {r['test_lag_p99_s']:.1f} s ({r['test_lag_p99_steps']:.1f} steps)")
    stop_test_workers(pool)
    # rounds alternate the order (1, 2, 2, 1, …) so a change of the machine's other load hits every K alike
    order = [k for r in range(opts.replay_rounds) for k in (ks if r % 2 == 0 else ks[::-1])]
    rounds = []
    for i, k in enumerate(order):
        rounds.append(replay_capacity(opts, stack, settings, env, k, base_pids, ingest_urls, i))
        console.print(f"capacity K={k} (round {i}): {rounds[-1].get('window_tests_per_s')} window tests/s, "
                      f"cores {rounds[-1].get('cpu', {}).get('cores')}")
    capacity = [capacity_summary(k, [r for r in rounds if r["test_workers"] == k]) for k in ks]
    base = capacity[0]["window_tests_per_s"] or float("nan")
    for c in capacity:
        c["speedup"] = round(c["window_tests_per_s"] / base, 2)
    return {"ingest_workers": len(workers), "test_workers": ks, "paced": paced_runs, "capacity": capacity,
            "capacity_rounds": rounds,
            "windows_published": int(sum(metric_sum(u, "layerwatch_windows_published_total") for u in ingest_urls)),
            "windows_downsampled": int(sum(metric_sum(u, "layerwatch_windows_downsampled_total") for u in ingest_urls))}


def run_fleet(opts: argparse.Namespace, fleet: Fleet, workers_n: int, server: Any, tmp: Path,
              test_ks: list[int] | None = None) -> dict[str, Any]:
    """One fleet run with ``workers_n`` workers: every agent on each, or, with ``test_ks``, ingest workers
    plus a pool of test workers (phase 3 then runs once per pool size K, see :func:`test_pool`)."""
    split = "s" if test_ks else ""
    tag = f"f{split}{workers_n}{os.getpid() % 1000}"
    prefix = f"fleet{split}{workers_n}."
    state = tmp / f"fleet{split}{workers_n}"
    store_url = server.url_for(f"lw_fleet_{os.getpid()}_{split}{workers_n}")
    env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"lw-fleet-{tag}", "LW_TOPIC_PARTITIONS": str(opts.partitions),
           "LW_REFERENCE_MAX": str(opts.reference), "LW_AGENTS": "ingest" if test_ks else "all",
           "LW_MMD_PERMUTATIONS": str(opts.perms), "LW_LAG_INTERVAL_S": "1"}
    result: dict[str, Any] = {"workers": workers_n, "load_before": load()}
    if test_ks:
        result["agents"] = "ingest"
    opts_like = argparse.Namespace(workers=workers_n)
    with LocalStack(state_dir=state, clickhouse_url=store_url) as stack:
        bootstrap = stack.start_broker()
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, topic_partitions=opts.partitions)
        ensure_topics(settings)
        topic = settings.topic("predictions")
        # 1. references and warm-up
        base = now_ms() - int(1000 * opts.predictions / opts.event_rate)
        warm = [(fleet.reference(m, opts.reference, tag, base - 60_000), partition_of(m, opts.partitions))
                for m in fleet.names]
        for k, ago in enumerate((40_000, 20_000)):
            warm += [(fleet.live(m, 64, tag + "w", (k * len(fleet.names) + i) * 64, base - ago),
                      partition_of(m, opts.partitions)) for i, m in enumerate(fleet.names)]
        n_warm = len(fleet.names) * (opts.reference + 128)
        asyncio.run(publish_records(bootstrap, topic, warm, "publishing references and warm-up"))
        workers = start_workers(stack, opts_like, env)
        children = [c for c, _ in workers]
        url = workers[0][1]
        # the test pool of the warm-up and the throughput phase (phase 3 starts its own)
        pool = start_test_workers(stack, test_ks[0], env, "tests") if test_ks else []
        pids = {c.name: c.process.pid for c in children + [c for c, _ in pool]}
        pids["broker"] = stack.broker.process.pid
        if server._proc is not None:
            pids["clickhouse"] = server._proc.pid
        sampler = CpuSampler(pids).start()
        rss = RssSampler({c.name: c.process.pid for c in children})
        rss.start()
        wait_rows(url, workers, n_warm, children, "warm-up rows", timeout=600)
        deadline = time.monotonic() + opts.warm_timeout
        fitted = 0
        while time.monotonic() < deadline:
            fitted = int(query(url, "SELECT uniqExact(model_id) FROM drift_windows")[0][0])
            if fitted >= len(fleet.names):
                break
            time.sleep(1.0)
        result["warm_models_tested"] = fitted
        # the hidden-attack tests are fitted after the drift tests, in a thread of their own: wait for them,
        # so the throughput phase measures the steady state, not a worker's start-up
        while time.monotonic() < deadline and sum(metric_sum(u, "layerwatch_hidden_fits_pending")
                                                  for _, u in workers + pool) > 0:
            time.sleep(1.0)
        # 2. throughput: a backlog published while the workers are stopped, then drained
        step_ms = 1000 * opts.batch / opts.event_rate
        backlog, per_model = [], {}
        for i in range(-(-opts.predictions // opts.batch)):
            m = fleet.pick()
            per_model[m] = per_model.get(m, 0) + opts.batch
            backlog.append((fleet.live(m, opts.batch, tag, i * opts.batch, base + int(i * step_ms)),
                            partition_of(m, opts.partitions)))
        pub = {"records": len(backlog), "bytes": sum(len(v) for v, _ in backlog),
               "predictions": len(backlog) * opts.batch, "models": len(per_model)}
        probing0 = sum(metric_sum(u, "layerwatch_probing_seconds_total") for _, u in workers)
        probing_rows0 = sum(metric_sum(u, "layerwatch_probing_rows_total") for _, u in workers)
        before = {c.name: metric_total(u, "layerwatch_events_total", 'role="live"') for c, u in workers}
        stopped = children + [c for c, _ in pool]
        for c in stopped:
            c.process.send_signal(signal.SIGSTOP)
        try:
            pub["seconds"] = asyncio.run(publish_records(bootstrap, topic, backlog, "publishing backlog"))
        finally:
            for c in stopped:
                c.process.send_signal(signal.SIGCONT)
        del backlog
        expected = n_warm + pub["predictions"]
        done_at = wait_rows(url, workers, expected, children, "draining backlog", timeout=max(600, expected / 300))[-1]
        count, first, last = (int(v) for v in query(
            url, "SELECT count(), min(ingested_ms), max(ingested_ms) FROM predictions WHERE ts_ms >= {base}",
            {"base": base})[0])
        n_last = int(query(url, "SELECT count() FROM predictions WHERE ingested_ms = {t}", {"t": last})[0][0])
        seconds = (last - first) / 1000
        rate = (count - n_last) / seconds if seconds > 0 else float("nan")
        names = [c.name for c in children]
        cpu = {n: sampler.between(first / 1000, done_at, [n]) for n in pids}
        per_worker = {c.name: metric_total(u, "layerwatch_events_total", 'role="live"') - before[c.name]
                      for c, u in workers}
        probing_s = sum(metric_sum(u, "layerwatch_probing_seconds_total") for _, u in workers) - probing0
        probing_rows = sum(metric_sum(u, "layerwatch_probing_rows_total") for _, u in workers) - probing_rows0
        worker_cpu = sum(cpu[n] for n in names)
        result.update(
            publish=pub, predictions_per_s=rate, rows=count, seconds=seconds, drain_s=done_at - first / 1000,
            predictions_per_s_per_worker={n: per_worker[n] / seconds for n in names} if seconds > 0 else {},
            cpu_s=cpu, worker_cpu_us_per_prediction=1e6 * worker_cpu / max(1, count),
            cpu_cores_over_drain={n: cpu[n] / max(1e-9, done_at - first / 1000) for n in pids},
            probing_us_per_prediction=1e6 * probing_s / max(1.0, probing_rows),
        )
        time.sleep(1.0)
        raw = asyncio.run(raw_consume(bootstrap, topic, 8 * 1024 * 1024))
        complete = raw["records"] >= len(warm) + pub["records"]
        result["ceiling_per_s"] = (n_warm + pub["predictions"]) / raw["seconds"] if complete else float("nan")
        result["ratio"] = rate / result["ceiling_per_s"]
        # 3. windows on time: paced traffic with event time = wall clock, attacked models shifted mid-phase
        result["backlog_tests_s"] = wait_backlog_tested(settings, [u for _, u in workers], [u for _, u in pool])
        result["drift_rows_after_backlog"] = int(query(url, "SELECT count() FROM drift_windows")[0][0])
        if not test_ks:
            result.update(paced_windows(opts, fleet, settings, bootstrap, url, [u for _, u in workers], tag + "p"))
        else:
            result["test_pool"] = test_pool(opts, fleet, stack, settings, env, workers, pool, test_ks, server, tag)
        rss.stop()
        sampler.stop()
        result["worker_rss_mib"] = rss.peak
        result["load_after"] = load()
        stack.stop()
    return result


def report(runs: list[dict]) -> None:
    table = Table(title="fleet")
    cols = [("workers", "workers", "{}"), ("pred/s", "predictions_per_s", "{:,.0f}"),
            ("ceiling/s", "ceiling_per_s", "{:,.0f}"), ("ratio", "ratio", "{:.2f}"),
            ("µs cpu/pred", "worker_cpu_us_per_prediction", "{:.1f}"),
            ("probing µs/pred", "probing_us_per_prediction", "{:.2f}"), ("due", "windows_due", "{}"),
            ("tested", "windows_tested", "{}"), ("coalesced", "windows_coalesced", "{:.0f}"),
            ("lag p50 s", "test_lag_p50_s", "{:.1f}"), ("lag p99 s", "test_lag_p99_s", "{:.1f}")]
    for name, _, _ in cols:
        table.add_column(name, justify="right")
    for r in runs:
        table.add_row(*[fmt.format(r[k]) if k in r else "-" for _, k, fmt in cols])
    console.print(table)
    for r in runs:
        console.print(f"workers={r['workers']}: rss {r['worker_rss_mib']}, alerts {r.get('alerts_opened')}, "
                      f"cores {r['cpu_cores_over_drain']}")
        if "test_pool" in r:
            report_pool(r["test_pool"])


def report_pool(pool: dict[str, Any]) -> None:
    """The K = 1, 2, … comparison: capacity (re-testing the same lw.windows), then the paced phase."""
    table = Table(title=f"test workers (ingest workers: {pool['ingest_workers']})")
    for name in ("K", "tests/s", "× K=1", "cpu s/test", "cores: tests", "ingest", "broker", "clickhouse", "other",
                 "paced tests/s", "due", "tested", "lag p50 s", "lag p99 s", "p99 steps", "2nd half p99 s",
                 "p99 s: publish", "pool"):
        table.add_column(name, justify="right")
    for cap, paced in zip(pool["capacity"], pool["paced"]):
        cores = cap["cores"]
        table.add_row(str(cap["test_workers"]), f"{cap['window_tests_per_s']:.2f}", f"{cap['speedup']:.2f}",
                      f"{cap['test_worker_cpu_s_per_window']:.3f}",
                      *[f"{cores.get(n, 0.0):.2f}" for n in ("tests", "ingest", "broker", "clickhouse", "other")],
                      f"{paced['pool_window_tests_per_s']:.2f}",
                      f"{paced['window_tests_due']}", f"{paced['window_tests_done']}",
                      f"{paced['test_lag_p50_s']:.1f}", f"{paced['test_lag_p99_s']:.1f}",
                      f"{paced['test_lag_p99_steps']:.2f}", f"{paced['test_lag_p99_s_second_half']:.1f}",
                      f"{paced.get('publish_lag_p99_s', float('nan')):.1f}", f"{paced.get('pool_lag_p99_s', float('nan')):.1f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--layers", type=int, choices=(1, 2), default=2)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--predictions", type=int, default=300_000)
    ap.add_argument("--batch", type=int, default=256, help="rows per micro-batch (one model each)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--reference", type=int, default=300, help="reference events per model (LW_REFERENCE_MAX)")
    ap.add_argument("--perms", type=int, default=200, help="LW_MMD_PERMUTATIONS")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--event-rate", type=float, default=50_000.0)
    ap.add_argument("--paced-rate", type=float, default=5_000.0)
    ap.add_argument("--paced-seconds", type=float, default=60.0)
    ap.add_argument("--paced-batch", type=int, default=64)
    ap.add_argument("--attacked", type=int, default=3)
    ap.add_argument("--warm-timeout", type=float, default=300.0)
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--test-workers", default="",
                    help="comma list of test-pool sizes K (e.g. 1,2): one run with --ingest-workers workers "
                         "(--agents ingest) and K test workers (--agents test) per K; --workers is then ignored")
    ap.add_argument("--ingest-workers", type=int, default=1, help="ingest workers with --test-workers")
    ap.add_argument("--replay-windows", type=int, default=400,
                    help="windows each K re-tests from lw.windows for its capacity figure")
    ap.add_argument("--replay-skip", type=int, default=None,
                    help="windows re-tested before the capacity clock starts (reference loads; default --models)")
    ap.add_argument("--replay-rounds", type=int, default=2,
                    help="capacity rounds per K, in alternating order (1,2 then 2,1); the median is reported")
    ap.add_argument("--replay-timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, default=None)
    opts = ap.parse_args()
    test_ks = [int(k) for k in opts.test_workers.split(",") if k.strip()]
    if any(k < 1 for k in test_ks):
        ap.error("--test-workers: every K must be at least 1")
    fleet = Fleet(opts.models, opts.layers, opts.clients, opts.batch, opts.zipf, opts.attacked)
    runs = []
    from tests.clickhouse_server import ClickHouseServer

    with tempfile.TemporaryDirectory(prefix="lw-fleet-") as tmp:
        server = ClickHouseServer(Path(tmp) / "clickhouse").start()
        try:
            if test_ks:
                runs.append(run_fleet(opts, fleet, opts.ingest_workers, server, Path(tmp), test_ks))
            for n in [] if test_ks else [int(w) for w in opts.workers.split(",")]:
                runs.append(run_fleet(opts, fleet, n, server, Path(tmp)))
                console.print(json.dumps({k: v for k, v in runs[-1].items() if k != "publish"}, default=str)[:2000])
        finally:
            server.close()
    report(runs)
    out = {"models": opts.models, "layers": opts.layers, "clients": opts.clients, "predictions": opts.predictions,
           "batch": opts.batch, "partitions": opts.partitions, "reference": opts.reference, "perms": opts.perms,
           "cores": os.cpu_count(), "test_workers": test_ks, "runs": runs}
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
