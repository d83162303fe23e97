"""The demo model server: HTTP predictions, serving-side defences, every prediction published to Kafka.

``POST /predict?model=<name>`` takes a batch of 8x8 images, either JSON
``{"inputs": [[64 floats], ...]}`` (rows of 64, or nested (n, 1, 8, 8) / (n, 8, 8)) or
the compact binary form (``Content-Type: application/octet-stream``, float32
little-endian, shape in header ``X-Shape: n,1,8,8`` or ``n,64``). Pixel values are
clipped to the model's [0, 1] domain. ``GET /health`` reports liveness.

Defences (seed 003):

- *target concealment*: the answer is ``{"labels": [...], "event_ids": [...]}`` — top-1
  labels only, unless ``top_k`` > 1 or ``return_scores`` is configured; every error is
  JSON ``{"error": ...}``: ``bad request: <field, expected, got>`` (400), ``not found``
  (404; ``: model 'x' is not served: one of …`` for a model), ``method not allowed``
  (405), ``too many requests`` (429, with Retry-After), ``forbidden`` (403), ``payload
  too large`` (413) or ``internal error`` (500), never a traceback; the reason of a
  4xx is also logged at INFO. ``model=`` is required when more than one model is served;
- *identities*: the client id comes from an API key (``Authorization: Bearer`` or
  ``X-Api-Key``, mapped by ``identity``'s key table; an unknown key gets 401), from
  ``X-Client-Id`` only when ``identity.trust_header`` (behind a proxy of yours that sets
  it), else from the peer address (``workers/inference/identity.py``);
- *throttling*: a per-client token bucket counting predictions (``rate`` per second,
  ``burst``), keyed by that client id: rotating ``X-Client-Id`` does not make new clients;
- *actions*: an :class:`~workers.inference.actions.ActionListener` thread consumes the
  actions topic and the server throttles the client to ``throttle_rate`` or blocks it
  (403) until the action expires; ``clear`` lifts both (see ``workers.inference.actions``);
- *preprocessing* (``preprocess="bitdepth:4,median:3"``) before the model;
- *MC-dropout uncertainty* (``mc_dropout=T``): T stochastic passes, recorded per event.

Publishing: each prediction joins its model's pending micro-batch, flushed to the
predictions topic every ``flush_every`` predictions or ``flush_interval_ms`` — Kafka
records carry micro-batches, not single predictions. An event holds the client id, the
outputs (softmax), the tapped layers (penultimate first, plus ``extra_layers``), event
id, timestamp, optionally the inputs (``include_inputs``) and — only when a request
carries ``X-Attack`` (simulation ground truth) with the ``ground_truth_token`` in
``X-Ground-Truth-Token`` (403 without it) — the attack name (``clean``/``none`` mean
clean) and the true labels from ``X-Truth: 3,1,4``.

Threads: inference runs in one worker thread (torch uses its own intra-op threads),
encoding and sending in another, Kafka actions in a third; the event loop only parses,
rate-limits and answers.

``workers/`` does not import ``streams/``: bootstrap address and client settings are arguments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from aiohttp import web

from workers.inference.actions import ActionListener, ClientPolicy
from workers.inference.identity import IdentityPolicy, UnknownKey, ground_truth_allowed
from workers.inference.defences import (
    apply_preprocess,
    mc_dropout_uncertainty,
    parse_preprocess,
)
from workers.inference.publisher import Publisher
from workers.inference.tap import LayerTap

log = logging.getLogger("layerwatch.server")

MAX_ATTACK_NAME = 64
CLEAN_NAMES = ("", "clean", "none")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _reject(kind: type[web.HTTPException], detail: str) -> web.HTTPException:
    """An HTTP error whose JSON body will say ``detail`` (what was wrong, what was expected)."""
    exc = kind()
    exc.detail = detail  # type: ignore[attr-defined]
    return exc


class BadRequest(Exception):
    """Internal: the request is malformed (the reason is logged at debug level, never sent)."""


# --- per-model state ----------------------------------------------------------------------------


@dataclass
class _Pending:
    """Predictions of one model waiting to be published as one micro-batch."""

    parts: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    since: float = 0.0


@dataclass
class _Served:
    name: str
    version: str
    module: torch.nn.Module
    tap: LayerTap
    input_shape: tuple[int, ...]
    publisher: Publisher | None
    pending: _Pending = field(default_factory=_Pending)


# --- the server ---------------------------------------------------------------------------------


class ModelServer:
    """The aiohttp application around the demo models (see the module docstring for the protocol).

    Args:
        models: {name: DemoModel-like} (``.version``, ``.module``, optional ``.input_shape``);
            None loads the demo models from ``state_dir`` (training missing ones).
        bootstrap: Kafka bootstrap address; None serves without publishing or actions.
        rate, burst: per-client token bucket in predictions/s and predictions (rate None/0: off).
        throttle_rate, throttle_burst: the bucket of a client under a throttle action.
        top_k, return_scores: what the answer reveals (default: top-1 label only).
        preprocess: e.g. "bitdepth:4,median:3" (see workers.inference.defences).
        mc_dropout: T > 1 records MC-dropout uncertainty per event (0: off).
        extra_layers: layer names (or {model: names}) tapped besides the penultimate layer (None: the
            layers the model's own ``tap`` reads — a demo model's shallow and middle layer).
        layer_dtype: "float32" or "float16" for published layers.
        include_inputs: publish the inputs in each batch (a dashboard can show them).
        flush_every, flush_interval_ms: micro-batch size / age that triggers a publish.
        max_batch: the most inputs one request may carry.
        identity: how a request's client id is decided (default: API keys none, X-Client-Id
            not trusted, so the peer address); see workers/inference/identity.py.
        ground_truth_token: requests carrying X-Attack / X-Truth (simulation ground truth)
            must carry this token in X-Ground-Truth-Token; empty: none may.
        client_config: extra kafka-python settings (security) for producer and consumer.
        torch_threads: torch intra-op CPU threads for the process, set when the server starts
            (None: leave). One thread serves small batches of tiny models fastest and does not
            fight the event loop for cores (measured: ~35x more requests/s than two threads
            on a busy 2-core machine, see bench/server.py).
    """

    def __init__(
        self,
        models: Mapping[str, Any] | None = None,
        *,
        state_dir: str = "./.layerwatch",
        model_names: Iterable[str] | None = None,
        bootstrap: str | None = None,
        predictions_topic: str = "lw.predictions",
        actions_topic: str = "lw.actions",
        default_model: str | None = None,
        rate: float | None = 200.0,
        burst: float = 400.0,
        throttle_rate: float = 2.0,
        throttle_burst: float = 4.0,
        top_k: int = 1,
        return_scores: bool = False,
        preprocess: str | Iterable[str] | None = None,
        mc_dropout: int = 0,
        extra_layers: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
        layer_dtype: str = "float32",
        include_inputs: bool = True,
        flush_every: int = 64,
        flush_interval_ms: int = 200,
        max_batch: int = 1024,
        max_body_bytes: int = 4 * 1024 * 1024,
        identity: IdentityPolicy | None = None,
        ground_truth_token: str = "",
        listen_actions: bool = True,
        client_config: Mapping[str, Any] | None = None,
        torch_threads: int | None = 1,
        progress: bool = False,
    ):
        if models is None:
            from workers.inference.models import load_demo_models

            models = load_demo_models(state_dir, model_names, progress=progress)
        if not models:
            raise ValueError("no model to serve")
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        if mc_dropout == 1 or mc_dropout < 0:
            raise ValueError("mc_dropout must be 0 (off) or at least 2 passes")
        self.bootstrap = bootstrap
        self.predictions_topic = predictions_topic
        self.actions_topic = actions_topic
        self.top_k = top_k
        self.return_scores = return_scores
        self.preprocess = parse_preprocess(preprocess)
        self.mc_dropout = mc_dropout
        self.include_inputs = include_inputs
        self.flush_every = max(1, int(flush_every))
        self.flush_interval = max(0.005, flush_interval_ms / 1000.0)
        self.max_batch = int(max_batch)
        self.max_body_bytes = int(max_body_bytes)
        self.identity = identity or IdentityPolicy()
        self.ground_truth_token = ground_truth_token
        self.client_config = dict(client_config or {})
        self.torch_threads = torch_threads
        self.policy = ClientPolicy(rate, burst, throttle_rate, throttle_burst)
        self.default_model = default_model or next(iter(models))
        if self.default_model not in models:
            raise KeyError(f"default model {self.default_model!r} is not served")
        self._producer = None
        if bootstrap:
            from kafka import KafkaProducer

            from workers.inference.publisher import auto_compression

            producer_config = {"compression_type": auto_compression(), "linger_ms": 5, "max_block_ms": 5000,
                               "max_request_size": 1_048_576 + 65_536}
            producer_config.update(self.client_config)
            self._producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **producer_config)
        self.models: dict[str, _Served] = {}
        for name, model in models.items():
            extra = extra_layers.get(name, ()) if isinstance(extra_layers, Mapping) else (extra_layers or ())
            if extra_layers is None:  # default: what the model's own tap reads (demo: shallow + middle layer)
                extra = [n for n in getattr(getattr(model, "tap", None), "names", ()) if n != "penultimate"]
            module = model.module
            module.eval()
            publisher = None
            if self._producer is not None:
                publisher = Publisher(bootstrap, name, model_version=str(model.version), topic=predictions_topic,
                                      producer=self._producer)
            self.models[name] = _Served(
                name=name,
                version=str(model.version),
                module=module,
                tap=LayerTap(module, list(extra), dtype=layer_dtype),
                input_shape=tuple(getattr(model, "input_shape", (1, 8, 8))),
                publisher=publisher,
            )
        self.listener: ActionListener | None = None
        if bootstrap and listen_actions:
            self.listener = ActionListener(bootstrap, actions_topic, self.policy, self.client_config)
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="layerwatch-infer")
        self._publish_pool = ThreadPoolExecutor(1, thread_name_prefix="layerwatch-publish")
        self._flusher: asyncio.Task | None = None
        self._publishing: set[asyncio.Future] = set()
        self.counters: dict[str, int] = {"requests": 0, "predictions": 0, "published": 0, "publish_failures": 0,
                                         "rejected_400": 0, "rejected_401": 0, "rejected_403": 0, "rejected_404": 0,
                                         "rejected_429": 0, "errors_500": 0}
        self.app = self._make_app()

    # --- application ----------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._terse_errors], client_max_size=self.max_body_bytes)
        app.router.add_post("/predict", self._predict)
        app.router.add_get("/health", self._health)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    @web.middleware
    async def _terse_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            messages = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found", 405: "method not allowed",
                        413: "payload too large", 429: "too many requests"}
            if exc.status < 400:
                raise
            key = f"rejected_{exc.status}"
            if key in self.counters:
                self.counters[key] += 1
            headers = {k: exc.headers[k] for k in ("Allow", "Retry-After") if k in exc.headers} or None
            detail = getattr(exc, "detail", "")
            message = messages.get(exc.status, "error")
            return _error(exc.status, f"{message}: {detail}" if detail else message, headers)
        except Exception:
            self.counters["errors_500"] += 1
            log.exception("unhandled error serving %s", request.path)
            return _error(500, "internal error")

    async def _on_startup(self, _app: web.Application) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self.listener is not None and not self.listener.is_alive():
            self.listener.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _on_cleanup(self, _app: web.Application) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        await self.flush_all()
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._publish_pool, self._close_kafka)
        self._infer_pool.shutdown(wait=True)
        self._publish_pool.shutdown(wait=True)
        for served in self.models.values():
            served.tap.remove()

    def _close_kafka(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        for served in self.models.values():
            if served.publisher is not None:
                try:
                    served.publisher.flush(timeout=10)
                except Exception as exc:
                    log.error("publishing %s failed: %s", served.name, exc)
        if self._producer is not None:
            self._producer.close(timeout=10)

    # --- handlers ---------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        listener = "off"
        if self.listener is not None:
            listener = "error" if self.listener.error else ("running" if self.listener.assigned.is_set() else "waiting")
        publish_errors = sum(s.publisher.errors for s in self.models.values() if s.publisher is not None)
        return web.json_response({
            "status": "ok",
            "models": list(self.models),
            "predictions": self.counters["predictions"],
            "published": self.counters["published"],
            "publish_errors": publish_errors,
            "actions": listener,
            "restricted_clients": self.policy.in_force(),
        })

    async def _predict(self, request: web.Request) -> web.Response:
        self.counters["requests"] += 1
        try:
            client = self.identity.client_id(request.headers, request.remote)
        except UnknownKey as exc:
            log.info("unauthorized request from %s: %s", request.remote, exc)
            raise _reject(web.HTTPUnauthorized, f"{exc} (X-Api-Key or Authorization: Bearer)") from None
        name = request.query.get("model")
        if name is None:
            if len(self.models) > 1:
                log.info("bad request from %s: no model= parameter", client)
                raise _reject(web.HTTPBadRequest, f"query parameter model is required when several models are "
                                                   f"served: one of {', '.join(self.models)}")
            name = self.default_model
        served = self.models.get(name)
        if served is None:
            log.info("request from %s for unknown model %r", client, name[:MAX_ATTACK_NAME])
            raise _reject(web.HTTPNotFound, f"model {name[:MAX_ATTACK_NAME]!r} is not served: one of "
                                            f"{', '.join(self.models)}")
        action = self.policy.action_for(client, name)
        if action == "block":
            raise web.HTTPForbidden()
        try:
            x = await self._parse_inputs(request, served.input_shape)
            attack, truth = self._ground_truth(request, len(x))
        except BadRequest as exc:
            log.info("bad request from %s: %s", client, exc)
            raise _reject(web.HTTPBadRequest, str(exc)) from None
        wait = self.policy.take(client, len(x), throttled=action == "throttle")
        if wait > 0:
            raise web.HTTPTooManyRequests(headers={"Retry-After": str(max(1, math.ceil(wait)))})
        loop = asyncio.get_running_loop()
        probs, layers, uncertainty = await loop.run_in_executor(self._infer_pool, self._infer, served, x)
        now = _now_ms()
        n = len(x)
        event_ids = [uuid.uuid4().hex for _ in range(n)]
        self.counters["predictions"] += n
        if served.publisher is not None:
            self._enqueue(served, {
                "event_ids": event_ids, "client_ids": [client] * n, "ts_ms": np.full(n, now, np.int64),
                "outputs": probs, "layers": layers, "uncertainty": uncertainty,
                "truth": truth, "attack": attack, "inputs": x.reshape(n, -1) if self.include_inputs else None,
            })
        body: dict[str, Any] = {"labels": probs.argmax(axis=1).tolist(), "event_ids": event_ids}
        if self.top_k > 1:
            body["top_k"] = np.argsort(-probs, axis=1)[:, : self.top_k].tolist()
        if self.return_scores:
            body["scores"] = np.round(probs.astype(np.float64), 6).tolist()
        return web.json_response(body)

    async def _parse_inputs(self, request: web.Request, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        raw = await request.read()  # over max_body_bytes: 413 from aiohttp
        ctype = request.content_type
        if ctype == "application/octet-stream":
            try:
                dims = tuple(int(d) for d in request.headers.get("X-Shape", "").split(","))
            except ValueError:
                raise BadRequest(f"header X-Shape: expected integers such as n,64 or n,1,8,8, got "
                                 f"{request.headers.get('X-Shape', '')[:40]!r}") from None
            if not dims or any(d <= 0 for d in dims) or int(np.prod(dims)) * 4 != len(raw):
                raise BadRequest(f"header X-Shape: expected a body of {int(np.prod(dims)) * 4} bytes for float32 "
                                 f"shape {dims}, got {len(raw)} bytes")
            array = np.frombuffer(raw, dtype="<f4").reshape(dims)
        else:  # JSON, whatever the client called it
            try:
                payload = json.loads(raw)
                array = np.asarray(payload["inputs"], dtype=np.float32)
            except (ValueError, TypeError, KeyError, IndexError):
                raise BadRequest('body: expected JSON {"inputs": [[64 numbers], ...]} (or a float32 body with '
                                 "Content-Type: application/octet-stream and X-Shape)") from None
        accepted = {(size,), tuple(shape)} | ({tuple(shape[1:])} if shape[0] == 1 else set())
        if array.ndim < 2 or array.shape[0] == 0 or tuple(array.shape[1:]) not in accepted:
            raise BadRequest(f"field inputs: expected shape (n, {size}) or (n, {', '.join(map(str, shape))}) "
                             f"with n >= 1, got {tuple(array.shape)}")
        if array.shape[0] > self.max_batch:
            raise BadRequest(f"field inputs: at most {self.max_batch} rows per request, got {array.shape[0]}")
        if not np.isfinite(array).all():
            raise BadRequest("field inputs: expected finite numbers, got NaN or Inf")
        return np.clip(array.reshape(-1, *shape), 0.0, 1.0).astype(np.float32, copy=False)

    def _ground_truth(self, request: web.Request, n: int) -> tuple[list[str] | None, np.ndarray | None]:
        if "X-Attack" not in request.headers and "X-Truth" not in request.headers:
            return None, None
        if not ground_truth_allowed(request.headers, self.ground_truth_token):
            # only the simulator, holding the token, writes ground truth
            raise _reject(web.HTTPForbidden, "headers X-Attack/X-Truth: expected X-Ground-Truth-Token")
        if "X-Attack" not in request.headers:
            raise BadRequest("X-Truth without X-Attack")
        attack = request.headers["X-Attack"].strip()
        if len(attack) > MAX_ATTACK_NAME or not attack.isprintable():
            raise BadRequest(f"header X-Attack: expected a printable name of at most {MAX_ATTACK_NAME} characters")
        attack = "" if attack.lower() in CLEAN_NAMES else attack
        truth = None
        if "X-Truth" in request.headers:
            try:
                truth = np.array([int(t) for t in request.headers["X-Truth"].split(",")], dtype=np.int32)
            except ValueError:
                raise BadRequest("header X-Truth: expected comma-separated integers such as 3,1,4") from None
            if len(truth) != n:
                raise BadRequest(f"header X-Truth: expected {n} labels (one per input), got {len(truth)}")
        return [attack] * n, truth

    # --- inference --------------------------------------------------------------------------

    def _infer(self, served: _Served, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """Runs on the inference thread: preprocessing, tapped forward pass, optional MC-dropout."""
        device = next(served.module.parameters()).device
        with torch.inference_mode():
            xt = torch.from_numpy(np.array(x, dtype=np.float32)).to(device)
            if self.preprocess:
                xt = apply_preprocess(xt, self.preprocess)
            result = served.tap.tap(xt, output_fn=lambda logits: torch.softmax(logits.float(), dim=1))
            uncertainty = None
            if self.mc_dropout:
                uncertainty = mc_dropout_uncertainty(served.module, xt, self.mc_dropout).cpu().numpy()
        return result.outputs, result.layers, uncertainty

    # --- publishing -------------------------------------------------------------------------

    def _enqueue(self, served: _Served, part: dict[str, Any]) -> None:
        pending = served.pending
        if not pending.parts:
            pending.since = time.monotonic()
        pending.parts.append(part)
        pending.rows += len(part["event_ids"])
        if pending.rows >= self.flush_every:
            self._flush(served)

    def _flush(self, served: _Served) -> asyncio.Future | None:
        pending = served.pending
        if not pending.parts:
            return None
        parts, served.pending = pending.parts, _Pending()
        future = asyncio.get_running_loop().run_in_executor(self._publish_pool, self._publish, served, parts)
        self._publishing.add(future)
        future.add_done_callback(self._publishing.discard)
        return future

    async def flush_all(self) -> None:
        """Publish every pending micro-batch now and wait until the producer has them."""
        futures = [f for f in (self._flush(s) for s in self.models.values()) if f is not None]
        if futures:
            await asyncio.gather(*futures, return_exceptions=True)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval / 2)
            now = time.monotonic()
            for served in self.models.values():
                if served.pending.parts and now - served.pending.since >= self.flush_interval:
                    self._flush(served)

    def _publish(self, served: _Served, parts: list[dict[str, Any]]) -> None:
        """Runs on the publishing thread: concatenate the parts column-wise and hand them to Kafka."""
        n = sum(len(p["event_ids"]) for p in parts)
        try:
            def column(key: str) -> np.ndarray | None:
                if all(p[key] is None for p in parts):
                    return None
                return np.concatenate([p[key] for p in parts])

            truth = None
            if any(p["truth"] is not None for p in parts):
                truth = np.concatenate([p["truth"] if p["truth"] is not None else np.full(len(p["event_ids"]), -1, np.int32)
                                        for p in parts])
            attack = None
            if any(p["attack"] is not None for p in parts):
                attack = [a for p in parts for a in (p["attack"] or [""] * len(p["event_ids"]))]
            inputs = None
            if all(p["inputs"] is not None for p in parts):
                inputs = np.concatenate([p["inputs"] for p in parts])
            served.publisher.publish(
                outputs=np.concatenate([p["outputs"] for p in parts]),
                layers={k: np.concatenate([p["layers"][k] for p in parts]) for k in parts[0]["layers"]},
                event_ids=[e for p in parts for e in p["event_ids"]],
                client_ids=[c for p in parts for c in p["client_ids"]],
                ts_ms=column("ts_ms"),
                truth=truth,
                attack=attack,
                inputs=inputs,
                uncertainty=column("uncertainty") if all(p["uncertainty"] is not None for p in parts) else None,
            )
            self.counters["published"] += n
        except Exception as exc:
            self.counters["publish_failures"] += n
            log.error("could not publish %d predictions of %s: %s", n, served.name, exc)

    # --- running ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters plus the publishers' delivery figures."""
        out: dict[str, Any] = dict(self.counters)
        out["delivered"] = sum(s.publisher.sent_events for s in self.models.values() if s.publisher is not None)
        out["delivery_errors"] = sum(s.publisher.errors for s in self.models.values() if s.publisher is not None)
        out["actions_applied"] = self.policy.actions_applied
        return out

    def run(self, host: str = "127.0.0.1", port: int = 8080, print_fn: Any = None,
            on_stop: Callable[[], Any] | None = None) -> None:
        """Serve until SIGTERM or SIGINT (aiohttp's handlers), then publish what is pending: the blocking entry point.

        ``on_stop`` is called once when the stop begins (``layerwatch serve`` starts its
        shutdown watchdog there).
        """
        if on_stop is not None:
            async def stopping(_app: web.Application) -> None:
                on_stop()

            self.app.on_shutdown.append(stopping)
        web.run_app(self.app, host=host, port=port, print=print_fn, access_log=None, shutdown_timeout=2.0)


def run_server(host: str = "127.0.0.1", port: int = 8080, on_stop: Callable[[], Any] | None = None,
               **kwargs: Any) -> None:
    """Build a :class:`ModelServer` from keyword arguments and serve until stopped (``layerwatch serve``)."""
    ModelServer(**kwargs).run(host, port, print_fn=print, on_stop=on_stop)


class ServerThread:
    """Run a ModelServer on its own event loop in a background thread (tests, benchmarks, demos).

    Example:
        >>> with ServerThread(ModelServer(bootstrap=None)) as running:   # doctest: +SKIP
        ...     running.url
        'http://127.0.0.1:41234'
    """

    def __init__(self, server: ModelServer, host: str = "127.0.0.1", port: int = 0):
        self.server = server
        self.host = host
        self.port = port
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread = threading.Thread(target=self._main, name="layerwatch-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the model server did not start within {timeout:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"the model server failed to start: {self._error}") from self._error
        return self

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self._runner = web.AppRunner(self.server.app, access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self.loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Publish every pending micro-batch and wait for the broker's acknowledgements."""
        self.call(self.server.flush_all(), timeout)
        for served in self.server.models.values():
            if served.publisher is not None:
                served.publisher.flush(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
