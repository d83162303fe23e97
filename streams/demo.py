"""`layerwatch demo`: the whole pipeline on this machine, with nothing configured.

Starts the embedded broker, the worker (all agents, chDB store) and the model server as
child processes; trains or loads the demo models, their attack sets and the attack
classifier (cached under the state dir); publishes the reference; sends clean → PGD →
clean → FGSM traffic with one probing client while a live table shows the windows,
label mix and alerts; then answers "since when, which model, which requests" from
ClickHouse and writes the figures with ``--summary``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from streams.broker import free_port
from streams.settings import Settings
from streams.client import WorkerClient, http_json
from streams.stack import LocalStack, StackError, wait_for
from streams.store import statements as Q

console = Console()

DEFAULT_PHASES = "clean:16,pgd@cnn:12,clean:16,fgsm@resnet:12"
DEFAULT_RATE = 150.0
WINDOW_S, STEP_S = 4.0, 2.0
DEMO_CLASSIFIER_ATTACKS = ("fgsm", "fgm", "pgd", "pgd_small", "pgd_l2", "deepfool")


def publish_round_trip(bootstrap: str, topic: str, n_batches: int = 10, batch_size: int = 64, seed: int = 0) -> list[str]:
    """Publish synthetic micro-batches of predictions with kafka-python; returns the event ids sent."""
    from kafka import KafkaProducer

    from schemas import PredictionBatch, encode_batch

    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip", max_request_size=8 * 1024 * 1024)
    sent: list[str] = []
    for _ in range(n_batches):
        ids = [uuid.uuid4().hex for _ in range(batch_size)]
        logits = rng.normal(size=(batch_size, 10)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        batch = PredictionBatch.build("synthetic", ids, outputs=probs,
                                      layers={"penultimate": rng.normal(size=(batch_size, 32)).astype(np.float16)},
                                      client_ids=[f"client-{i % 4}" for i in range(batch_size)])
        producer.send(topic, key=b"synthetic", value=encode_batch(batch))
        sent.extend(ids)
    producer.flush()
    producer.close()
    return sent


def scaled_phases(spec: str, seconds: float | None, overhead_s: float = 20.0) -> str:
    """The phases stretched or shrunk so traffic fits ``seconds`` minus start-up overhead (each ≥ 4 s)."""
    from workers.inference.traffic import parse_phases

    phases = parse_phases(spec)
    if seconds is None:
        return spec
    total = sum(p.seconds for p in phases)
    factor = max(seconds - overhead_s, 4.0 * len(phases)) / total
    return ",".join(f"{p.name}:{max(4.0, round(p.seconds * factor, 1))}" for p in phases)


@dataclass
class DemoState:
    """What the live view shows, refreshed from the worker's API."""

    windows: list[list] = field(default_factory=list)
    labels: list[list] = field(default_factory=list)
    alerts: list[list] = field(default_factory=list)
    phase: str = "starting"


def _prepare(state_dir: Path, phases: str) -> None:
    """Models, attack sets and the classifier, trained once and cached (progress bars on first run)."""
    from workers.attacks import generate
    from workers.inference.data import demo_split
    from workers.inference.models import load_demo_models
    from workers.inference.traffic import parse_phases

    models = load_demo_models(state_dir, progress=True)
    split = demo_split(0)
    needed = {(p.target, p.attack) for p in parse_phases(phases) if p.attack}
    for target, attack in sorted(needed, key=str):
        for name in ([target] if target else sorted(models)):
            with console.status(f"adversarial test set: {attack} on {name}"):
                generate(models[name].module, split.x_test, split.y_test, attack, seed=0, state_dir=state_dir,
                         model_name=name)
    from workers.classifier.training import default_path, train

    if not default_path(state_dir).exists():
        console.print("training the attack classifier on the fast attacks (first run only; "
                      "`layerwatch classifier train` trains on all presets)")
        train(state_dir, progress=True, attacks=DEMO_CLASSIFIER_ATTACKS)
    from workers.classifier.dataset import load_manifest
    from workers.classifier.fitting import detectors_dir, train_detectors

    if not any(detectors_dir(state_dir).glob("*.skops")):
        console.print("fitting the per-event detectors on the classifier's attack data set (first run only)")
        built = load_manifest(state_dir) or {}  # the set the classifier trained on: attacks already cached
        train_detectors(state_dir, progress=True, models=built.get("models"),
                        attacks=built.get("attacks", DEMO_CLASSIFIER_ATTACKS), n_inputs=built.get("n_inputs"))


def _demo_identities(demo_dir: Path, clients: int = 4) -> tuple[dict[str, str], str]:
    """API keys of the simulated clients (written to ``demo_dir/client-keys`` for the model server) and a
    ground-truth token: the demo's clients are identified by key, not by the X-Client-Id they could forge."""
    import secrets

    names = [f"client-{i}" for i in range(clients)] + ["prober-0"]
    keys = {name: secrets.token_urlsafe(24) for name in names}
    demo_dir.mkdir(parents=True, exist_ok=True)
    path = demo_dir / "client-keys"
    path.touch(mode=0o600)
    path.write_text("".join(f"{key} {name}\n" for name, key in keys.items()))
    return keys, secrets.token_urlsafe(24)


def _live_view(state: DemoState) -> Group:
    windows = Table(title=f"windows (penultimate layer) — phase: {state.phase}", expand=False)
    for column in ("model", "window end", "n", "detection rate", "p-value"):
        windows.add_column(column)
    for model, end_ms, n, rate, p in state.windows[-8:]:
        style = "bold red" if rate >= 0.5 else ""
        windows.add_row(model, time.strftime("%H:%M:%S", time.gmtime(end_ms / 1000)), str(n), f"{rate:.2f}", f"{p:.3f}",
                        style=style)
    labels = Table(title="per-event labels (last 10 s)")
    for column in ("model", "score", "attack type", "events", "target model"):
        labels.add_column(column)
    for row in state.labels:
        labels.add_row(*(str(v) for v in row))
    alerts = Table(title="open alerts")
    for column in ("kind", "model", "client", "opened"):
        alerts.add_column(column)
    for kind, model, client, opened in state.alerts:
        alerts.add_row(kind, model, client, time.strftime("%H:%M:%S", time.gmtime(opened / 1000)), style="red")
    return Group(windows, labels, alerts)


def _refresh(api: WorkerClient, state: DemoState, run_since: int) -> None:
    state.windows = api.rows(Q.DEMO_RECENT_WINDOWS, since=run_since)[::-1]
    since = max(run_since, int(time.time() * 1000) - 10_000)
    state.labels = api.rows(Q.DEMO_LABEL_MIX, since=since)
    state.alerts = api.rows(Q.DEMO_OPEN_ALERTS, since=run_since)


def attribute_windows(windows: np.ndarray, phases: list[dict[str, Any]]) -> np.ndarray:
    """Index of the phase holding most of each window's span (-1: the window overlaps no phase)."""
    if windows.size == 0 or not phases:
        return np.full(windows.size, -1, np.int64)
    p_start = np.array([p["start_ms"] for p in phases], np.int64)
    p_end = np.array([p["end_ms"] for p in phases], np.int64)
    overlap = (np.minimum(windows["end"][:, None], p_end[None, :])
               - np.maximum(windows["start"][:, None], p_start[None, :])).clip(min=0)
    best = overlap.argmax(axis=1)
    return np.where(overlap.max(axis=1) > 0, best, -1)


def phase_figures(windows: np.ndarray, models: list[str], phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per phase: the penultimate-layer windows attributed to it (the phase holding most of the
    window's span), of its target model only for a targeted attack."""
    owner = attribute_windows(windows, phases)
    figures = []
    for i, phase in enumerate(phases):
        wanted = [phase["target"]] if phase.get("target") else models
        inside = (owner == i) & np.isin(windows["model"], wanted) if windows.size else np.zeros(0, bool)
        rates = windows["rate"][inside] if windows.size else np.zeros(0)
        figures.append({
            "name": phase["name"], "attack": phase["attack"], "target": phase.get("target"),
            "start_ms": phase["start_ms"], "end_ms": phase["end_ms"], "windows": int(inside.sum()),
            "detection_rate_mean": float(rates.mean()) if rates.size else None,
            "detection_rate_median": float(np.median(rates)) if rates.size else None,
            "detection_rate_max": float(rates.max()) if rates.size else None,
        })
    return figures


def run_demo(settings: Settings, seconds: float | None = None, summary_path: str | None = None,
             phases: str = DEFAULT_PHASES, rate: float = DEFAULT_RATE, keep: bool = False) -> int:
    """Run the demo scenario end to end; returns the exit code."""
    from workers.inference.traffic import publish_reference, simulate

    started = time.monotonic()
    state_dir = Path(settings.state_dir)
    demo_dir = state_dir / "demo"
    shutil.rmtree(demo_dir / "store", ignore_errors=True)  # each demo run starts from an empty store
    phases = scaled_phases(phases, seconds)
    _prepare(state_dir, phases)
    token = settings.web_token
    client_keys, ground_truth_token = _demo_identities(demo_dir)
    with LocalStack(state_dir=state_dir, log_dir=demo_dir, clickhouse_url=f"chdb://{demo_dir / 'store'}") as stack:
        stack.env = {"LW_WINDOW_SIZE_S": str(WINDOW_S), "LW_WINDOW_STEP_S": str(STEP_S),
                     "LW_CLIENT_KEYS": str(demo_dir / "client-keys"), "LW_GROUND_TRUTH_TOKEN": ground_truth_token}
        with console.status("starting the embedded broker, the worker and the model server"):
            bootstrap = stack.start_broker()
            server_port = free_port()
            server = stack.spawn("server", ["serve", "--port", str(server_port)])
            _, worker_url = stack.start_worker(web_port=settings.web_port if keep else None)
            server_url = f"http://127.0.0.1:{server_port}"
            wait_for(lambda: http_json(f"{server_url}/health", timeout=1.0)[0] == 200, 120, "the model server",
                     alive=server.check)
        api = WorkerClient(worker_url, token)
        console.print(f"broker [bold]{bootstrap}[/]  worker [bold]{worker_url}[/]  model server [bold]{server_url}[/]")
        console.print(f"dashboard: [bold underline]{worker_url}/{'#token=' + token if token else ''}[/]")
        run_since = int(time.time() * 1000)  # everything this run writes is newer: its answers cover it only
        counts = publish_reference(bootstrap, state_dir, topic=settings.topic("predictions"), progress=True)
        expected = sum(counts.values())
        wait_for(lambda: api.rows(Q.DEMO_REFERENCE_ROWS, since=run_since)[0][0] >= expected, 60,
                 "the reference in ClickHouse")
        models = sorted(counts)

        result: dict[str, Any] = {}

        def traffic() -> None:
            try:
                result["report"] = simulate(server_url, phases, rate=rate, models=models, clients=4,
                                            probing_client=True, probing_share=0.05, progress=False,
                                            state_dir=state_dir, client_keys=client_keys,
                                            ground_truth_token=ground_truth_token)
            except Exception as exc:  # reported by the main thread
                result["error"] = exc

        sender = threading.Thread(target=traffic, name="demo-traffic", daemon=True)
        view = DemoState(phase=phases)
        sender.start()
        with Live(_live_view(view), console=console, refresh_per_second=2) as live:
            while sender.is_alive():
                sender.join(timeout=1.0)
                try:
                    _refresh(api, view, run_since)
                except StackError:
                    pass
                live.update(_live_view(view))
            if "error" in result:
                raise StackError(f"traffic simulation failed: {result['error']}")
            report = result["report"]
            last_end = max(p["end_ms"] for p in report.phases)
            wait_for(lambda: (api.rows(Q.DEMO_LAST_WINDOW_END, since=run_since)[0][0] or 0) >= last_end,
                     timeout=30, message="the last windows")
            _refresh(api, view, run_since)
            live.update(_live_view(view))
        summary = _summary(api, report, models, counts, worker_url, server_url, run_since)
        summary["seconds"] = round(time.monotonic() - started, 1)
        _print_answers(api, summary)
        if summary_path:
            Path(summary_path).write_text(json.dumps(summary, indent=2))
            console.print(f"summary written to {summary_path}")
        console.print(f"demo finished in {summary['seconds']:.0f} s; logs in {demo_dir}")
        if keep:
            console.print(f"still serving; dashboard at {worker_url}/ — Ctrl-C stops everything")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def _summary(api: WorkerClient, report: Any, models: list[str], counts: dict[str, int], url: str,
             server_url: str, run_since: int) -> dict[str, Any]:
    """The run's figures: only windows, alerts and events from ``run_since`` to the end of its traffic."""
    until = max(p["end_ms"] for p in report.phases) + int(WINDOW_S * 1000)
    rows = api.rows(Q.DEMO_WINDOWS, since=run_since, until=until, models=models)
    windows = np.array([tuple(r) for r in rows], dtype=[("model", "U64"), ("start", "i8"), ("end", "i8"), ("rate", "f8")])
    alerts = api.rows(Q.DEMO_ALERTS, since=run_since)
    stored = api.rows(Q.DEMO_EVENTS_SINCE, since=min(p["start_ms"] for p in report.phases), until=until,
                      models=models)[0][0]
    _, server_health = http_json(f"{server_url}/health", timeout=5)
    restricted = sorted(server_health.get("restricted_clients", {}))
    probing = sorted({a[2] for a in alerts if a[0] == "probing"})
    return {
        "phases": phase_figures(windows, models, report.phases),
        "alerts": [{"kind": k, "model_id": m, "client_id": c, "opened_ms": o, "resolved_ms": r or None,
                    "window_id": w or None} for k, m, c, o, r, w in alerts],
        "throttled_clients": sorted(set(restricted) | set(probing)),
        "events_published": int(report.accepted),
        "events_stored": int(stored),
        "reference_events": int(sum(counts.values())),
        "dashboard_url": f"{url}/",
        "rate": report.rate_achieved,
    }


def _print_answers(api: WorkerClient, summary: dict[str, Any]) -> None:
    from streams.query import format_result

    console.rule("what ClickHouse says")
    shift = [a for a in summary["alerts"] if a["kind"] == "distribution_shift"]
    console.print("[bold]since when, which model[/] (distribution-shift alerts and the window that opened each):")
    for alert in shift:
        window_id = alert["window_id"]
        opened = time.strftime("%H:%M:%S", time.gmtime(alert["opened_ms"] / 1000))
        console.print(f"  model [bold]{alert['model_id']}[/] since {opened} UTC (window {window_id or '?'})")
        if window_id:
            columns, top = api.shipped("top_suspicious_events", window_id=window_id, limit=5)
            keep = [c for c in ("event_id", "score", "client_id", "predicted", "attack") if c in columns]
            idx = [columns.index(c) for c in keep]
            console.print("  [bold]which requests[/]: the most suspicious events of that window")
            console.print(format_result(keep, [[r[i] for i in idx] for r in top]))
    console.print("[bold]alerts[/]:")
    console.print(format_result(["kind", "model", "client", "opened_ms", "resolved_ms"],
                                [[a["kind"], a["model_id"], a["client_id"], a["opened_ms"], a["resolved_ms"]]
                                 for a in summary["alerts"]]))
    table = Table(title="phases (penultimate layer; a window counts for the phase holding most of its span)")
    for column in ("phase", "windows", "mean detection rate", "median", "max"):
        table.add_column(column)
    for p in summary["phases"]:
        figures = [p[f"detection_rate_{k}"] for k in ("mean", "median", "max")]
        table.add_row(p["name"], str(p["windows"]), *("-" if v is None else f"{v:.2f}" for v in figures))
    console.print(table)
    console.print(f"throttled clients: {', '.join(summary['throttled_clients']) or 'none'}; "
                  f"events published {summary['events_published']}, stored {summary['events_stored']}")
    console.print(f"dashboard: {summary['dashboard_url']}")
