"""Soak test of the whole pipeline: fixed-rate traffic for N minutes, worker memory and lag over time.

    python bench/soak.py --minutes 10 --rate 2000 [--batch 64] [--dim 128] [--json PATH]

Starts the local stack (embedded Tansu broker and a `layerwatch worker` child with every
agent, chDB store unless ``--clickhouse-url``), publishes a reference of the synthetic
model, then publishes live micro-batches from this process at ``--rate`` predictions/s.
Every ``--sample-s`` seconds it prints the worker's RSS (psutil if installed, else
/proc/PID/status VmRSS), the broker's RSS, events published, events stored (count()
of `predictions`, no FINAL, cheap) and the lag between the two. At the end it waits for
the backlog to drain and counts exactly (uniqExact), plus the dead letters.

Memory verdict: after a warm-up (``--warmup-frac`` of the run, default 20 %) the
largest RSS sample must stay within 10 % of the RSS at the end of the warm-up.

Not a test (never run by pytest).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas import PredictionBatch, encode_batch
from streams.client import http_json
from streams.stack import LocalStack

MODEL = "soak"


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB."""
    try:
        import psutil  # type: ignore[import-not-found]

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def query_value(url: str, sql: str, default: int = -1) -> int:
    status, body = http_json(f"{url}/api/query", {"sql": sql}, timeout=60)
    return int(body["rows"][0][0]) if status == 200 and body.get("rows") else default


def synthetic_pool(rng: np.random.Generator, n_pool: int, batch: int, dim: int, classes: int = 10
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-generated (outputs, penultimate) pairs so the publisher spends its CPU on sending."""
    pool = []
    for _ in range(n_pool):
        logits = rng.normal(size=(batch, classes)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        pool.append((probs.astype(np.float32), rng.normal(size=(batch, dim)).astype(np.float16)))
    return pool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2000.0, help="predictions per second")
    p.add_argument("--batch", type=int, default=64, help="predictions per record")
    p.add_argument("--dim", type=int, default=128, help="penultimate layer width")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup-frac", type=float, default=0.2)
    p.add_argument("--clickhouse-url", default=None, help="default: a chDB path in a temp dir")
    p.add_argument("--agents", default="all")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--dir", default=None, help="state/log dir (default: a temp dir, kept)")
    args = p.parse_args(argv)

    state = Path(args.dir or tempfile.mkdtemp(prefix="lw-soak-"))
    rng = np.random.default_rng(0)
    pool = synthetic_pool(rng, 32, args.batch, args.dim)
    interval = args.batch / args.rate
    duration = args.minutes * 60.0
    samples: list[dict] = []
    sent = 0
    with LocalStack(state_dir=state / "stack", log_dir=state / "logs", clickhouse_url=args.clickhouse_url) as stack:
        bootstrap = stack.start_broker()
        stack.env = {"LW_TOPIC_PREFIX": "soak.", "LW_APP_ID": "layerwatch-soak", "LW_AGENTS": args.agents}
        worker, url = stack.start_worker()
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type="lz4", linger_ms=5, acks=1,
                                 max_request_size=8 * 1024 * 1024)
        topic = "soak.predictions"
        now = int(time.time() * 1000)
        for i in range(4):  # reference: 256 clean events
            outputs, pen = pool[i]
            ref = PredictionBatch.build(MODEL, [f"ref-{i}-{j}" for j in range(args.batch)], outputs,
                                        {"penultimate": pen}, role="reference",
                                        ts_ms=np.full(args.batch, now, np.int64))
            producer.send(topic, key=MODEL.encode(), value=encode_batch(ref))
        producer.flush()
        n_ref = 4 * args.batch
        print(f"soak: {args.rate:.0f} predictions/s in batches of {args.batch}, d={args.dim}, "
              f"{args.minutes:g} min; worker pid {worker.process.pid}; logs in {state / 'logs'}", flush=True)
        print(f"{'t_s':>6} {'worker_mb':>10} {'broker_mb':>10} {'sent':>10} {'stored':>10} {'lag':>8}", flush=True)
        start = time.monotonic()
        next_send = start
        next_sample = start
        seq = 0
        while True:
            t = time.monotonic()
            if t - start >= duration:
                break
            if t >= next_sample:
                stored = query_value(url, f"SELECT count() FROM predictions WHERE model_id = '{MODEL}'")
                stored_live = max(0, stored - n_ref) if stored >= 0 else stored
                sample = {"t_s": round(t - start, 1), "worker_mb": round(rss_mb(worker.process.pid), 1),
                          "broker_mb": round(rss_mb(stack.broker.process.pid), 1) if stack.broker else None,
                          "sent": sent, "stored": stored_live, "lag": sent - stored_live if stored >= 0 else None}
                samples.append(sample)
                print(f"{sample['t_s']:>6.0f} {sample['worker_mb']:>10.1f} {sample['broker_mb'] or 0:>10.1f} "
                      f"{sent:>10} {stored_live:>10} {sample['lag'] if sample['lag'] is not None else '?':>8}",
                      flush=True)
                next_sample += args.sample_s
                worker.check()
            if t < next_send:
                time.sleep(min(next_send - t, 0.05))  # pacing, not synchronisation
                continue
            outputs, pen = pool[seq % len(pool)]
            ts = np.full(args.batch, int(time.time() * 1000), np.int64)
            batch = PredictionBatch.build(MODEL, [f"s{seq}-{j}" for j in range(args.batch)], outputs,
                                          {"penultimate": pen}, client_ids=[f"c{j % 16}" for j in range(args.batch)],
                                          ts_ms=ts)
            producer.send(topic, key=MODEL.encode(), value=encode_batch(batch))
            sent += args.batch
            seq += 1
            next_send += interval
        producer.flush()
        producer.close()
        publish_s = time.monotonic() - start
        drain_deadline = time.monotonic() + 300
        stored = -1
        while time.monotonic() < drain_deadline:
            stored = query_value(url, f"SELECT count() FROM predictions WHERE model_id = '{MODEL}'") - n_ref
            if stored >= sent:
                break
            time.sleep(1.0)  # polling the drain
        drain_s = time.monotonic() - start - publish_s
        exact = query_value(url, f"SELECT uniqExact(event_id) FROM predictions WHERE model_id = '{MODEL}'") - n_ref
        dlq = query_value(url, "SELECT count() FROM dead_letters FINAL")
        windows = query_value(url, f"SELECT uniqExact(window_id) FROM drift_windows WHERE model_id = '{MODEL}'")
        final_rss = rss_mb(worker.process.pid)

    warm_n = max(1, int(len(samples) * args.warmup_frac))
    baseline = samples[warm_n - 1]["worker_mb"] if samples else float("nan")
    after = [s["worker_mb"] for s in samples[warm_n:]] or [baseline]
    growth = (max(after) - baseline) / baseline if baseline else float("nan")
    result = {
        "minutes": args.minutes, "rate": args.rate, "batch": args.batch, "dim": args.dim,
        "sent": sent, "stored": exact, "dlq": dlq, "windows": windows,
        "achieved_rate": round(sent / publish_s, 1), "drain_s": round(drain_s, 1),
        "rss_mb": [s["worker_mb"] for s in samples], "samples": samples,
        "rss_baseline_mb": baseline, "rss_max_after_warmup_mb": max(after), "rss_final_mb": round(final_rss, 1),
        "rss_growth_after_warmup": round(growth, 4), "memory_flat": bool(growth <= 0.10),
        "max_lag": max((s["lag"] or 0) for s in samples) if samples else None,
    }
    print(f"sent {sent}, stored {exact} (exactly-once count), dead letters {dlq}, drift windows {windows}; "
          f"achieved {result['achieved_rate']:.0f}/s, drained in {drain_s:.1f} s, max lag {result['max_lag']}")
    print(f"worker RSS: {baseline:.0f} MiB after warm-up, max {max(after):.0f} MiB after it "
          f"({growth * 100:+.1f} %): {'flat' if result['memory_flat'] else 'GROWING'}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0 if exact == sent and result["memory_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
