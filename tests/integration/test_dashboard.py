"""The live dashboard end to end: records on the worker's topics → ClickHouse → JSON views → headless Chromium.

The browser test walks the page's states: no model yet, a model awaiting its reference,
then a finished run of three hours ago (shown whole by the default data-span range, a
single-layer model as one chart, a long run downsampled, times with their zone). Its
screenshots are kept under the test's tmp dir (the path is printed; set
LW_DASHBOARD_SCREENSHOTS=DIR to write them there instead).

Also runs every dashboard query on both store engines (chDB 26 and a ClickHouse 18.16 server).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import LabelBatch, PredictionBatch, decode, encode, encode_batch, encode_labels
from streams.web import dashboard as D
from streams.web import payloads as P
from streams.client import http_json
from streams.stack import LocalStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
TOKEN = "s3cret"
PREFIX = "dash."
STEP_MS = 5_000
N_WINDOWS = 120  # ten minutes of windows, one every 5 s
EVENTS_PER_STEP = 6
TOP_K = 5
LAYERS = {"digits-cnn": ["__combined__", "penultimate", "conv2"], "digits-mlp": ["__combined__", "penultimate"]}
CHARTS = {"digits-cnn": ["__combined__", "penultimate", "conv2"], "digits-mlp": ["penultimate"]}  # one layer: one chart
LONG_MODEL, LONG_WINDOWS, LONG_STEP_MS = "long-run", 3000, 200  # thousands of windows in the same ten minutes
AGO_MS = 3 * 3600 * 1000  # the browser's run ended three hours ago
ATTACKS = ("fgsm", "pgd")


# ------------------------------------------------------------------ the scenario


@dataclass
class Scenario:
    """Everything a worker would have produced over ten minutes, as records for its topics."""

    now_ms: int
    batches: list[PredictionBatch] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    labels: list[LabelBatch] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    attacked_window: str = ""

    @property
    def n_events(self) -> int:
        return sum(b.n for b in self.batches)

    def n_events_of(self, model_id: str) -> int:
        return sum(b.n for b in self.batches if b.model_id == model_id)


def digit_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n of scikit-learn's bundled 8x8 digits (no download) as (n, 64) floats in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = rng.integers(0, len(digits.images), n)
    return (digits.images[idx].reshape(n, 64) / 16.0).astype(np.float32), digits.target[idx]


def build_scenario(now_ms: int, seed: int = 0, long_run: bool = False) -> Scenario:
    """Two models; digits-cnn is attacked from minute -7 to -4 (alert opened and resolved),
    digits-mlp drifts from minute -1.5 on (alert still open); plus a classifier and a probing alert."""
    rng = np.random.default_rng(seed)
    sc = Scenario(now_ms=now_ms)
    start = now_ms - N_WINDOWS * STEP_MS
    attack_span = {"digits-cnn": (now_ms - 420_000, now_ms - 240_000), "digits-mlp": (now_ms - 90_000, now_ms + 1)}
    for model_id, layers in LAYERS.items():
        lo, hi = attack_span[model_id]
        for k in range(1, N_WINDOWS + 1):
            end = start + k * STEP_MS
            attacked = lo <= end < hi
            ids = [f"{model_id}-{k:03d}-{i}" for i in range(EVENTS_PER_STEP)]
            ts = np.linspace(end - STEP_MS, end - 1, EVENTS_PER_STEP).astype(np.int64)
            images, truth = digit_images(EVENTS_PER_STEP, rng)
            attack = [str(rng.choice(ATTACKS)) if attacked and i % 2 == 0 else "" for i in range(EVENTS_PER_STEP)]
            noisy = np.array([a != "" for a in attack])
            images[noisy] = np.clip(images[noisy] + rng.normal(0, 0.35, (int(noisy.sum()), 64)), 0, 1).astype(np.float32)
            logits = rng.normal(size=(EVENTS_PER_STEP, 10)).astype(np.float32)
            logits[np.arange(EVENTS_PER_STEP), truth] += 4
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            sc.batches.append(PredictionBatch.build(
                model_id, ids, outputs=probs, layers={"penultimate": rng.normal(size=(EVENTS_PER_STEP, 8)).astype(np.float32)},
                client_ids=[f"client-{i % 3}" for i in range(EVENTS_PER_STEP)], ts_ms=ts, truth=truth,
                attack=attack, inputs=images))
            window_id = f"{model_id}:1:{end - 10_000}:{end}"
            if model_id == "digits-cnn" and attacked and not sc.attacked_window and end >= lo + 60_000:
                sc.attacked_window = window_id
            order = sorted(range(EVENTS_PER_STEP), key=lambda i: (attack[i] == "", i))[:TOP_K]
            for layer in layers:
                rate = float(np.clip(rng.normal(0.92 if attacked else 0.05, 0.04), 0, 1))
                p = float(rng.uniform(0.0005, 0.01) if attacked else rng.uniform(0.15, 0.95))
                sc.drift.append({
                    "window_id": window_id, "model_id": model_id, "model_version": "1", "layer": layer,
                    "window_start_ms": end - 10_000, "window_end_ms": end, "n_reference": 1000, "n_window": 60 + k % 7,
                    "mmd2": rate / 50, "p_value": p, "detection_rate": rate, "alpha": 0.05, "bandwidth": 1.0,
                    "n_permutations": 200, "compute_ms": 12.5, "device": "cpu",
                    "top_samples": [{"event_id": ids[i], "score": float(0.05 * (TOP_K - r) + (0.4 if attack[i] else 0.0))}
                                    for r, i in enumerate(order)],
                })
            predicted_type = [a if a and rng.random() < 0.85 else ("clean" if not a else "pgd") for a in attack]
            # digits-cnn has a supervised detector; digits-mlp only its own reference's score (flags, no family)
            kind = "supervised" if model_id == "digits-cnn" else "unsupervised"
            if kind == "unsupervised":
                predicted_type = ["clean" if t == "clean" else "unknown" for t in predicted_type]
            sc.labels.append(LabelBatch(
                model_id=model_id, model_version="1", classifier_version="rf-1", event_ids=ids, ts_ms=np.asarray(ts),
                p_adversarial=np.array([0.9 if t != "clean" else 0.05 for t in predicted_type], np.float32),
                attack_type=np.array(predicted_type), attack_prob=np.full(EVENTS_PER_STEP, 0.8, np.float32),
                target_model=np.array([model_id if t != "clean" else "" for t in predicted_type]),
                target_prob=np.full(EVENTS_PER_STEP, 0.7, np.float32), score_kind=kind,
            ))

    def alert(alert_id: str, ts: int, model_id: str, kind: str, state: str, severity: str, message: str, **extra: Any) -> None:
        sc.alerts.append({"alert_id": alert_id, "ts_ms": ts, "model_id": model_id, "kind": kind, "state": state,
                          "severity": severity, "message": message, "window_id": extra.get("window_id", ""),
                          "event_ids": extra.get("event_ids", []), "client_id": extra.get("client_id", "")})

    lo, hi = attack_span["digits-cnn"]
    alert("shift-cnn", lo + 10_000, "digits-cnn", "distribution_shift", "open", "critical",
          "distribution shift on model digits-cnn: detection rate 0.93 ≥ 0.50 for 2 consecutive windows",
          window_id=sc.attacked_window)
    alert("shift-cnn", hi + 10_000, "digits-cnn", "distribution_shift", "resolved", "info",
          "distribution shift on model digits-cnn resolved: detection rate 0.04 < 0.50 for 2 consecutive windows")
    alert("labels-cnn", lo + 20_000, "digits-cnn", "attack_classified", "open", "warning",
          "digits-cnn: 48% of labels adversarial (fgsm, pgd) ≥ 30%")
    alert("labels-cnn", hi + 20_000, "digits-cnn", "attack_classified", "resolved", "info",
          "digits-cnn: adversarial share back below 30%")
    if long_run:  # a single-layer model tested every 200 ms: only its drift results, no top events
        for k in range(1, LONG_WINDOWS + 1):
            end = start + k * LONG_STEP_MS
            rate = 0.97 if k == LONG_WINDOWS // 2 else float(rng.uniform(0.0, 0.2))
            for layer in ("__combined__", "penultimate"):
                sc.drift.append({
                    "window_id": f"{LONG_MODEL}:1:{end - 10_000}:{end}", "model_id": LONG_MODEL, "model_version": "1",
                    "layer": layer, "window_start_ms": end - 10_000, "window_end_ms": end, "n_reference": 500,
                    "n_window": 50, "mmd2": rate / 50, "p_value": 0.5, "detection_rate": rate, "alpha": 0.05,
                    "bandwidth": 1.0, "n_permutations": 200, "compute_ms": 3.0, "device": "cpu", "top_samples": []})
    mlp_lo = attack_span["digits-mlp"][0]
    alert("shift-mlp", mlp_lo + 10_000, "digits-mlp", "distribution_shift", "open", "warning",
          "distribution shift on model digits-mlp: detection rate 0.88 ≥ 0.50 for 2 consecutive windows",
          window_id=f"digits-mlp:1:{mlp_lo}:{mlp_lo + 10_000}")
    alert("probe-7", now_ms - 50_000, "digits-mlp", "probing", "open", "warning",
          "client-7 sent 31 near-identical queries within 30 s", client_id="client-7")
    return sc


def publish(bootstrap: str, sc: Scenario) -> None:
    """Produce the scenario to the topics the worker consumes, as the agents would."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 * 1024 * 1024)
    for b in sc.batches:
        producer.send(PREFIX + "predictions", key=b.model_id.encode(), value=encode_batch(b))
    for r in sc.drift:
        producer.send(PREFIX + "drift", key=r["model_id"].encode(), value=encode("DriftResult", r))
    for r in sc.labels:
        producer.send(PREFIX + "labels", key=r.model_id.encode(), value=encode_labels(r))
    for r in sc.alerts:
        producer.send(PREFIX + "alerts", key=r["alert_id"].encode(), value=encode("Alert", r))
    producer.flush()
    producer.close()


# ------------------------------------------------------------------ browser


class DomSummary(HTMLParser):
    """What the page wrote into data attributes: charts, alert rows, window images, body state."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.charts: list[dict[str, str]] = []
        self.alert_rows: list[dict[str, str]] = []
        self.window_panel: dict[str, str] = {}
        self.images: list[str] = []
        self.empty: dict[str, str] = {}
        self.waiting: dict[str, str] = {}  # model -> state of the drift section's notes
        self.tz = ""
        self._in_tz = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if "data-chart" in a:
            self.charts.append(a)
        if tag == "tr" and "data-alert-id" in a:
            self.alert_rows.append(a)
        if a.get("id") == "window-panel":
            self.window_panel = a
        if tag == "img" and a.get("class") == "digit":
            self.images.append(a.get("src", ""))
        if a.get("id") == "drift-empty":
            self.empty = a
        if tag == "li" and "data-state" in a:
            self.waiting[a["data-model"]] = a["data-state"]
        self._in_tz = a.get("id") == "tz"

    def handle_data(self, data: str) -> None:
        if self._in_tz:
            self.tz += data
            self._in_tz = False


def chromium(url: str, profile: Path, *extra: str, timeout: float = 90, tz: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, **({"TZ": tz} if tz else {})}
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def page_state(url: str, profile: Path, tz: str = "") -> "DomSummary":
    """The page's DOM after it rendered (chromium --dump-dom)."""
    dom = DomSummary()
    dom.feed(chromium(url, profile, "--dump-dom", tz=tz).stdout)
    return dom


def screenshot(url: str, profile: Path, name: str, tz: str = "", height: int = 1000) -> Path:
    """A 1400-pixel wide screenshot of the page, kept as a test artefact (path printed)."""
    directory = Path(os.environ.get("LW_DASHBOARD_SCREENSHOTS") or profile.parent / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    chromium(url, profile, f"--screenshot={path}", f"--window-size=1400,{height}", tz=tz)
    assert path.stat().st_size > 10_000, path
    print(f"dashboard screenshot: {path}")
    return path


class DevTools:
    """A Chromium page driven through the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, ws: Any):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        mid = self.next_id
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate until truthy; a script error (page still loading) counts as "not yet"
        (the async twin of tests.waiting.wait_until)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value, error = await self.eval(expression), None
            except RuntimeError as exc:
                value, error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout:g}s: {expression} (last error: {error})")
            await asyncio.sleep(0.1)  # poll interval

    async def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=0 if kind == "mouseMoved" else 1)


# Where a window's point of a drift chart is on screen (plotly's own axis conversions).
POINT_XY_JS = """(() => {
  const card = [...document.querySelectorAll('[data-chart=drift]')]
    .find((c) => c.dataset.model === %(model)s && c.dataset.layer === %(layer)s);
  card.scrollIntoView({block: 'center'});
  const gd = card.querySelector('.js-plotly-plot'), fl = gd._fullLayout, tr = gd._fullData[0];
  const i = tr.customdata.findIndex((c) => c[0] === %(window)s);
  const box = gd.getBoundingClientRect();
  return [box.left + fl._size.l + fl.xaxis.d2p(tr.x[i]), box.top + fl._size.t + fl.yaxis.d2p(tr.y[i])];
})()"""


async def click_through(url: str, window_id: str, profile: Path) -> dict:
    """Open the page without a token, enter it in the form, click a window's point; return what the page shows."""
    import aiohttp

    from streams.broker import free_port

    port = free_port()
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--window-size=1400,1000", url + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        def page_ws() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                pages = [t for t in json.loads(resp.read()) if t["type"] == "page" and t["url"].startswith(url)]
            return pages[0]["webSocketDebuggerUrl"] if pages else ""

        ws_url = wait_until(page_ws, timeout=30, message="chromium's DevTools endpoint")
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.until("document.body.dataset.status === 'auth' && !document.getElementById('auth').hidden")
            await page.eval(f"document.getElementById('auth-token').value = {json.dumps(TOKEN)};"
                            "document.getElementById('auth-form').requestSubmit(); true")
            await page.until("document.querySelectorAll('[data-chart=drift][data-points=\"%d\"]').length === %d"
                             % (N_WINDOWS, sum(len(v) for v in CHARTS.values())))
            x, y = await page.eval(POINT_XY_JS % {"model": json.dumps("digits-cnn"), "layer": json.dumps("__combined__"),
                                                  "window": json.dumps(window_id)})
            await page.click(x, y)
            await page.until("document.getElementById('window-panel').dataset.images === '%d'" % TOP_K)
            return await page.eval("""({
                window: document.getElementById('window-panel').dataset.window,
                hidden: document.getElementById('window-panel').hidden,
                href: location.href,
                stored: sessionStorage.getItem('layerwatch.token'),
                status: document.body.dataset.status,
            })""")
    finally:
        browser.terminate()
        browser.wait(timeout=15)


def get(url: str, token: str = "") -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


# ------------------------------------------------------------------ tests


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_shows_live_drift_alerts_and_events(broker: str, tmp_path: Path) -> None:
    sc = build_scenario(int(time.time() * 1000) - AGO_MS, long_run=True)
    store = f"chdb://{tmp_path / 'dash-store'}"
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=store, bootstrap=broker) as stack:
        stack.env = {"LW_WEB_TOKEN": TOKEN, "LW_TOPIC_PREFIX": PREFIX, "LW_APP_ID": "layerwatch-dash",
                     "LW_AGENTS": "sink"}  # the sink alone: no agent adds its own alerts to the fed ones
        child, url = stack.start_worker()
        page = f"{url}/#token={TOKEN}"

        def count(sql: str) -> int:
            status, body = http_json(f"{url}/api/query", {"sql": sql}, token=TOKEN)
            return int(body["rows"][0][0]) if status == 200 else -1

        # Nothing stored yet: the page says what to do first.
        empty = page_state(page, tmp_path / "chromium-empty")
        assert empty.body.get("data-status") == "ok" and empty.empty.get("data-empty") == "no-model", empty.empty
        screenshot(page, tmp_path / "chromium-empty", "1-no-model")

        # Live predictions of a model without a reference: it waits for its reference.
        fresh = PredictionBatch.build("fresh-model", [f"fresh-{i}" for i in range(8)],
                                      outputs=np.full((8, 10), 0.1, np.float32),
                                      layers={"penultimate": np.zeros((8, 8), np.float32)},
                                      ts_ms=np.full(8, sc.now_ms - 60_000, np.int64))
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=broker)
        producer.send(PREFIX + "predictions", key=b"fresh-model", value=encode_batch(fresh)).get(timeout=10)
        producer.close()
        wait_until(lambda: count("SELECT uniqExact(event_id) FROM predictions") == 8, timeout=90, message="fresh model stored")
        waiting = page_state(page, tmp_path / "chromium-waiting")
        assert waiting.empty.get("data-empty") == "awaiting-reference", waiting.empty
        assert waiting.waiting == {"fresh-model": "awaiting_reference"}
        screenshot(page, tmp_path / "chromium-waiting", "2-awaiting-reference")

        publish(broker, sc)
        n_drift = sum(len(v) for v in LAYERS.values()) * N_WINDOWS
        expected = {
            "SELECT count() FROM drift_windows FINAL": n_drift + 2 * LONG_WINDOWS,
            "SELECT count() FROM alerts FINAL": len(sc.alerts),
            "SELECT uniqExact(event_id) FROM attack_labels": sc.n_events,
            "SELECT uniqExact(event_id) FROM predictions_inputs": sc.n_events,
            "SELECT uniqExact(event_id) FROM predictions": sc.n_events + fresh.n,
            "SELECT count() FROM sample_scores FINAL": n_drift * TOP_K,
        }
        for sql, n in expected.items():
            wait_until(lambda: count(sql) == n, timeout=120, message=f"{sql} == {n}")

        # The page loads without a token; the data views do not answer without one.
        status, html, headers = get(url + "/")
        assert status == 200 and b"static/dashboard.js" in html and headers["Content-Type"].startswith("text/html")
        assert get(url + "/dashboard")[0] == 200
        status, js, _ = get(url + "/static/plotly.min.js")
        assert status == 200 and js == D.plotly_js_path().read_bytes()
        assert get(url + "/static/../dashboard.py")[0] == 404
        for view in ("models", "drift", "labels", "alerts", f"window?window_id={sc.attacked_window}"):
            assert get(f"{url}/api/dashboard/{view}")[0] == 401, view
            assert get(f"{url}/api/dashboard/{view}", token="wrong")[0] == 401, view
            assert get(f"{url}/api/dashboard/{view}", token=TOKEN)[0] == 200, view
        status, body, _ = get(f"{url}/api/dashboard/drift?minutes=100000", token=TOKEN)
        assert status == 200 and json.loads(body)["minutes"] == P.MAX_MINUTES
        assert get(f"{url}/api/dashboard/drift?minutes=abc", token=TOKEN)[0] == 400
        assert get(f"{url}/api/dashboard/drift?range=week", token=TOKEN)[0] == 400
        # the default range is the data's span: three hours ago, not the last 15 minutes
        status, body, _ = get(f"{url}/api/dashboard/drift?range=data", token=TOKEN)
        span = json.loads(body)
        first_start = min(r["window_start_ms"] for r in sc.drift)
        assert span["since_ms"] <= first_start and sc.now_ms <= span["now_ms"] <= sc.now_ms + 60_000
        assert span["clock_ms"] - span["now_ms"] > AGO_MS - 120_000
        recent = json.loads(get(f"{url}/api/dashboard/drift?minutes=15", token=TOKEN)[1])
        assert recent["series"] == []  # what the old 15-minute default showed of this run

        # The browser, in another time zone: every chart holds its windows, the single-layer
        # model one chart, the long run downsampled, the alerts listed, the window of the
        # fragment with its events and images, times labelled with the zone.
        profile = tmp_path / "chromium"
        window_page = f"{page}&window={sc.attacked_window}&layer=__combined__"
        started = time.monotonic()
        result = chromium(window_page, profile, "--dump-dom", tz="Asia/Kolkata")
        dom = DomSummary()
        dom.feed(result.stdout)
        assert dom.body.get("data-status") == "ok", (dom.body, result.stderr[-2000:])
        assert int(dom.body.get("data-refreshes", "0")) >= 1
        assert dom.tz.startswith("times in ") and "(UTC+05:30)" in dom.tz, dom.tz  # ICU may call it Asia/Calcutta
        drift_charts = [c for c in dom.charts if c["data-chart"] == "drift"]
        drawn = {(c["data-model"], c["data-layer"]): c for c in drift_charts}
        # one chart per (model, layer), in model order with the combined test first, drawn once
        assert list(drawn) == [(m, layer) for m in sorted(CHARTS) for layer in CHARTS[m]] + [(LONG_MODEL, "penultimate")]
        assert len(drift_charts) == len(drawn)
        for key, chart in drawn.items():
            if key[0] == LONG_MODEL:
                assert int(chart["data-windows"]) == LONG_WINDOWS and int(chart["data-points"]) <= P.MAX_SERIES_POINTS + 1
                continue
            assert int(chart["data-points"]) == N_WINDOWS == int(chart["data-windows"]), key
            assert int(chart["data-bands"]) == 1, key  # one distribution_shift band per model
        assert dom.waiting == {"fresh-model": "awaiting_reference"}  # still said, beside the charts
        labels = next(c for c in dom.charts if c["data-chart"] == "labels")
        assert int(labels["data-points"]) > 0 and "clean" in labels["data-types"] and "fgsm" in labels["data-types"]
        drawn_kinds = {k.split(":")[0]: int(k.split(":")[1]) for k in labels["data-kinds"].split(",")}
        assert drawn_kinds == {"supervised": sc.n_events_of("digits-cnn"), "unsupervised": sc.n_events_of("digits-mlp")}
        rows = {r["data-alert-id"]: r["data-state"] for r in dom.alert_rows}
        assert rows == {"shift-cnn": "resolved", "labels-cnn": "resolved", "shift-mlp": "open", "probe-7": "open"}
        assert dom.window_panel.get("data-window") == sc.attacked_window
        assert int(dom.window_panel["data-events"]) == TOP_K
        assert len(dom.images) == TOP_K and all(src.startswith("data:image/png;base64,") for src in dom.images)
        print(f"chromium --dump-dom took {time.monotonic() - started:.1f} s")
        screenshot(window_page, profile, "3-finished-run", tz="Asia/Kolkata", height=2600)

        # Interactively: the token typed into the form, then a click on a point of a chart.
        shown = asyncio.run(click_through(url, sc.attacked_window, tmp_path / "chromium-cdp"))
        assert shown["window"] == sc.attacked_window and not shown["hidden"] and shown["status"] == "ok"
        assert TOKEN not in shown["href"] and shown["stored"] == TOKEN

        # Without the token the page loads but asks for it and draws nothing.
        dom = DomSummary()
        dom.feed(chromium(url + "/", tmp_path / "chromium-anon", "--dump-dom").stdout)
        assert dom.body.get("data-status") == "auth" and not [c for c in dom.charts if c["data-chart"] == "drift"]

        child.check()
        assert TOKEN not in child.log_path.read_text(errors="replace")


def test_dashboard_queries_on_both_engines(store_url: str) -> None:
    """Every dashboard query runs on chDB 26 and ClickHouse 18.16, and the payloads agree with the data."""
    from streams.app import result_rows
    from streams.rows import Delivered, input_rows, prediction_rows
    from streams.store import open_store
    from streams.writer import jsonable

    sc = build_scenario(int(time.time() * 1000), seed=1)
    store = open_store(store_url)
    try:
        store.migrate()
        delivered = [Delivered(b, PREFIX + "predictions", 0, i) for i, b in enumerate(sc.batches)]
        store.insert("predictions", prediction_rows(delivered))
        store.insert("predictions_inputs", input_rows(delivered))
        decoded = [("DriftResult", r) for r in sc.drift] + [decode(encode_labels(r)) for r in sc.labels] + [
            ("Alert", {**r}) for r in sc.alerts]
        for table, columns in result_rows(decoded).items():
            store.insert(table, columns)
        # a replayed alert row must not double a band or a table row
        store.insert("alerts", result_rows([("Alert", sc.alerts[0])])["alerts"])

        async def query(sql: str, params: dict) -> tuple[list[str], list[list]]:
            names, rows = store.query_columns(sql, params, readonly=True)
            return list(names), [[jsonable(v) for v in row] for row in rows]

        run = asyncio.run
        now = sc.now_ms
        models = run(P.models_payload(query, minutes=15, now=now))
        assert [m["model_id"] for m in models["models"]] == sorted(LAYERS)
        for m in models["models"]:
            assert [layer["layer"] for layer in m["layers"]] == LAYERS[m["model_id"]]
            assert m["events"] == N_WINDOWS * EVENTS_PER_STEP

        drift = run(P.drift_payload(query, minutes=15, now=now, threshold=0.5, alpha=0.05))
        assert [(s["model_id"], s["layer"]) for s in drift["series"]] == [(m, la) for m in sorted(CHARTS) for la in CHARTS[m]]
        assert all(len(s["window_id"]) == N_WINDOWS == s["windows"] for s in drift["series"])
        assert all(s["window_end_ms"] == sorted(s["window_end_ms"]) for s in drift["series"])
        cnn, mlp = drift["bands"]["digits-cnn"], drift["bands"]["digits-mlp"]
        assert len(cnn) == 1 and not cnn[0]["open"] and cnn[0]["end_ms"] - cnn[0]["start_ms"] == 180_000
        assert len(mlp) == 1 and mlp[0]["open"] and mlp[0]["end_ms"] == now
        narrow = run(P.drift_payload(query, minutes=2, now=now, threshold=0.5, alpha=0.05, model_id="digits-cnn",
                                     layer="conv2"))
        assert [(s["model_id"], s["layer"], len(s["window_id"])) for s in narrow["series"]] == [("digits-cnn", "conv2", 25)]
        assert narrow["bands"] == {}  # resolved before the range

        labels = run(P.labels_payload(query, minutes=15, now=now))
        assert labels["series"][0]["attack_type"] == "clean"
        assert sum(sum(s["events"]) for s in labels["series"]) == sc.n_events
        assert all(len(s["events"]) == len(labels["buckets"]) for s in labels["series"])
        # split by score kind: the supervised detector's families for digits-cnn, the reference score's flags for mlp
        flagged = {kind: sum(int((lb.p_adversarial >= 0.5).sum()) for lb in sc.labels if lb.score_kind == kind)
                   for kind in ("supervised", "unsupervised")}
        assert labels["kinds"] == [
            {"score_kind": "supervised", "events": sc.n_events_of("digits-cnn"), "flagged": flagged["supervised"]},
            {"score_kind": "unsupervised", "events": sc.n_events_of("digits-mlp"), "flagged": flagged["unsupervised"]}]
        series = {(s["score_kind"], s["attack_type"]) for s in labels["series"]}
        assert {t for k, t in series if k == "unsupervised"} == {"clean", "unknown"}
        assert {t for k, t in series if k == "supervised"} == {"clean", *ATTACKS}
        only_mlp = run(P.labels_payload(query, minutes=15, now=now, model_id="digits-mlp"))
        assert [k["score_kind"] for k in only_mlp["kinds"]] == ["unsupervised"]

        alerts = run(P.alerts_payload(query, minutes=15, now=now))
        assert [a["alert_id"] for a in alerts["alerts"][:2]] == ["probe-7", "shift-mlp"]  # open, newest first
        assert alerts["open"] == 2 and len(alerts["alerts"]) == 4
        shift = next(a for a in alerts["alerts"] if a["alert_id"] == "shift-cnn")
        assert shift["severity"] == "critical" and shift["duration_ms"] == 180_000 and shift["window_id"] == sc.attacked_window
        recent = run(P.alerts_payload(query, minutes=1, now=now))
        assert {a["alert_id"] for a in recent["alerts"]} == {"probe-7", "shift-mlp"}  # open ones whatever their age

        window = run(P.window_payload(query, window_id=sc.attacked_window, layer="__combined__", limit=20))
        assert [la["layer"] for la in window["layers"]] == LAYERS["digits-cnn"]
        assert window["model_id"] == "digits-cnn" and len(window["events"]) == TOP_K
        first = window["events"][0]
        assert first["attack"] in ATTACKS and first["label"] is not None and len(first["input"]) == 64
        assert all(0.0 <= v <= 1.0 for v in first["input"]) and first["ts_ms"] > 0
        scores = [e["score"] for e in window["events"]]
        assert scores == sorted(scores, reverse=True)
        missing = run(P.window_payload(query, window_id="no-such-window"))
        assert missing["events"] == [] and missing["layers"] == []
    finally:
        store.close()
