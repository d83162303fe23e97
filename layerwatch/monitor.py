"""Monitor: the object a user's inference server holds to publish its predictions to layerwatch.

    monitor = Monitor(model, "fraud-mlp")          # Kafka address and security from LW_* settings
    logits = monitor(x, client_id="alice")          # exactly what model(x) returns
    monitor.close()                                 # flushes

The request path runs the model with a :class:`~workers.inference.tap.LayerTap` attached
(penultimate layer by default), copies the (n, dim) activations and the outputs on the
model's device (pooled and cast to ``layer_dtype``, so a later in-place operation cannot
change them), and appends them to a bounded in-memory queue. It never waits for Kafka.

A background thread takes the queue in micro-batches, by rows (``batch_rows``, 256) or by
age (``max_age_ms``, 200 ms) whichever comes first, applies ``output_fn`` (softmax by
default) on the device for the whole micro-batch, copies it to the host once and hands
one PredictionBatch record to a :class:`~workers.inference.publisher.Publisher`.

Queue semantics: at most ``queue_rows`` rows wait; when the broker is slow or down and
the queue is full, the **oldest** rows are dropped (a stale prediction is worth less
than a fresh one), counted in ``stats()["dropped"]``, with one warning per minute at
most. The background thread stops handing records to the producer while ``queue_rows``
rows are unacknowledged (kafka-python's producer buffer has no size limit of its own),
so at most about twice ``queue_rows`` rows are held in memory. While the broker cannot be
reached at all, the background thread retries the connection with backoff and the queue
keeps the newest rows. ``close()`` sends what is queued and waits for the acknowledgements.

Thread- and asyncio-safe: the queue is guarded by one lock held for a few microseconds,
and the tap records per thread, so concurrent requests on one model never mix.

This module lives in the ``layerwatch`` face package rather than ``workers/`` because it
joins the ``LW_*`` settings (``streams.settings``, pure) with the pure inference parts
(``workers.inference``), and ``workers/`` never imports ``streams/``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from streams.kafka import kafka_python_config
from streams.settings import Settings, load_settings
from workers.inference.actions import ALLOW, ActionListener, ClientPolicy
from workers.inference.publisher import Publisher, PublishError, new_event_ids
from workers.inference.tap import LayerTap, first_tensor, pool_to_matrix, to_host

log = logging.getLogger("layerwatch.monitor")

WARN_EVERY_S = 60.0
# Producer settings for a publisher that must never hold the serving process hostage: give up
# on a send after 2 s without metadata or buffer room (the queue then drops oldest), and on a
# first connection after 5 s (kafka-python 3 waits 30 s by default), then retry with backoff.
PRODUCER_DEFAULTS = {"max_block_ms": 2000, "request_timeout_ms": 10_000, "reconnect_backoff_max_ms": 2000}


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits, in float32 (the default ``output_fn``)."""
    return torch.softmax(logits.float(), dim=1)


def top1(outputs: Any) -> list[int]:
    """Top-1 class index per row of a model's outputs (tensor, array, or a tuple/dict holding one).

    Target concealment (seed 003): answer clients with labels only, never scores, so a
    black-box attacker gets as little gradient signal as possible.
    """
    if isinstance(outputs, np.ndarray):
        return outputs.reshape(len(outputs), -1).argmax(axis=1).tolist()
    t = first_tensor(outputs)
    return t.reshape(t.shape[0], -1).argmax(dim=1).tolist()


@dataclass(slots=True)
class _Entry:
    """One call's rows waiting in the queue: outputs and layers side by side in one (n, width)
    device tensor (one copy on the request path), not yet copied to the host."""

    n: int
    rows: torch.Tensor
    client: str | list[str]
    ids: list[str] | None
    ts_ms: int
    queued_at: float  # time.monotonic()


class Monitor:
    """Publish a model's predictions (outputs + layer activations) to layerwatch without blocking serving.

    Args:
        model: the ``torch.nn.Module`` to tap, or None for a server that runs its own forward
            pass and only calls :meth:`observe`.
        model_id, model_version: identify the model in every event (and its reference).
        layers: module names to tap besides the penultimate layer (the input of the last
            ``nn.Linear``); ``include_regex`` adds every module whose name fully matches.
        bootstrap: Kafka bootstrap address; None reads ``LW_KAFKA_BOOTSTRAP``.
        penultimate: tap the penultimate layer (False when the model has no ``nn.Linear``).
        output_fn: applied to the outputs before they are published, in the background
            thread: "softmax" (default, for logits), None (outputs are already probabilities),
            or a callable on a (n, classes) tensor.
        layer_dtype: "float16" (default, half the bytes) or "float32" for published layers.
        batch_rows, max_age_ms: a micro-batch is published when it has this many rows, or
            when its oldest row is this old.
        queue_rows: the most rows waiting to be published; beyond it the oldest are dropped.
        actions: listen to ``lw.actions`` so :meth:`decision` answers (a consumer thread).
        settings: a ``Settings`` (default: ``load_settings()``, the ``LW_*`` variables) for
            the address, security, and topic names not given here.
        client_config: kafka-python settings (security, ...) instead of the settings' ones;
            also used for the producer (e.g. ``buffer_memory``, ``linger_ms``).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        model_id: str,
        model_version: str = "1",
        layers: Iterable[str] | None = None,
        bootstrap: str | None = None,
        *,
        include_regex: str | None = None,
        penultimate: bool = True,
        output_fn: str | Callable[[torch.Tensor], torch.Tensor] | None = "softmax",
        layer_dtype: str = "float16",
        batch_rows: int = 256,
        max_age_ms: float = 200.0,
        queue_rows: int = 16_384,
        actions: bool = True,
        settings: Settings | None = None,
        client_config: Mapping[str, Any] | None = None,
    ):
        if not model_id:
            raise ValueError("model_id must not be empty")
        if batch_rows < 1 or queue_rows < batch_rows:
            raise ValueError("need 1 <= batch_rows <= queue_rows")
        settings = settings or load_settings()
        config = kafka_python_config(settings)
        config.pop("bootstrap_servers")
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.client_config: dict[str, Any] = dict(client_config) if client_config is not None else config
        self.topic = settings.topic("predictions")
        self.model_id = model_id
        self.model_version = str(model_version)
        self.layer_dtype = np.dtype(layer_dtype)
        self.batch_rows = int(batch_rows)
        self.max_age = max_age_ms / 1000.0
        self.queue_rows = int(queue_rows)
        if output_fn == "softmax":
            output_fn = softmax
        elif isinstance(output_fn, str):
            raise ValueError(f"output_fn must be 'softmax', None or a callable, got {output_fn!r}")
        self.output_fn = output_fn
        self.tap = (LayerTap(model, layers, include_regex=include_regex, penultimate=penultimate, dtype=layer_dtype)
                    if model is not None else None)
        self._layer_names: list[str] | None = list(self.tap.names) if self.tap is not None else None
        self._layer_dims: dict[str, int] | None = None
        self._width: int | None = None  # columns of a packed row: outputs, then each layer

        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Entry] = collections.deque()
        self._rows = 0
        self._dropped = 0
        self._lost = 0  # rows of micro-batches the producer refused (PublishError on send)
        self._sending = 0  # rows taken from the queue and not yet handed to the producer
        self._drain = 0  # flush() callers waiting: publish whatever is queued now
        self._closing = False
        self._close_deadline = float("inf")
        self._warned: dict[str, float] = {}
        self.publisher: Publisher | None = None
        self.last_error: BaseException | None = None

        from kafka import KafkaProducer  # imported here, not first in the sender thread

        self._producer_config = {**PRODUCER_DEFAULTS, **self.client_config}
        if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG:  # kafka-python >= 3
            self._producer_config.setdefault("bootstrap_timeout_ms", 5000)

        self.policy = ClientPolicy()
        self.listener: ActionListener | None = None
        if actions:
            self.listener = ActionListener(self.bootstrap, settings.topic("actions"), self.policy, self.client_config)
            self.listener.start()
        self._sender = threading.Thread(target=self._run, name=f"layerwatch-monitor-{model_id}", daemon=True)
        self._sender.start()

    # --- request path ---------------------------------------------------------------------------

    def __call__(self, x: Any, client_id: str | Sequence[str] | None = None,
                 request_ids: Sequence[str] | None = None) -> Any:
        """Run ``model(x)`` with the tap and queue its rows for publishing; returns exactly what model(x) returns.

        ``client_id`` (one for the call, or one per row) and ``request_ids`` (one per row,
        used as event ids; random ids otherwise) travel with every event.
        """
        if self.tap is None:
            raise TypeError("this Monitor has no model: call observe(outputs, layers) instead")
        out, mats = self.tap.forward(x)
        outputs = first_tensor(out).detach()
        # one op copies outputs and layers together (cat promotes to the widest dtype), before the caller
        # gets the outputs back. Holding the model's own tensors instead saves no measurable time and
        # pinned 5x the queue's bytes in the allocator (bench: 16,384 rows of the 11.6M MLP, +278 vs +53 MB)
        self._put(torch.cat([outputs.reshape(outputs.shape[0], -1), *mats], dim=1), mats, client_id, request_ids)
        return out

    def observe(self, outputs: Any, layers: Mapping[str, Any], client_id: str | Sequence[str] | None = None,
                request_ids: Sequence[str] | None = None) -> None:
        """Queue predictions a server computed itself (ONNX, Triton, a batch job).

        ``outputs``: (n, classes) array or tensor (logits unless ``output_fn=None``);
        ``layers``: name -> (n, dim) or (n, C, *spatial) activations (pooled to (n, C)),
        the same names and dimensions on every call.
        """
        out = _as_tensor(outputs, "outputs")
        if out.dim() != 2:
            raise ValueError(f"outputs must be (n, classes), got shape {tuple(out.shape)}")
        names = list(layers)
        if self._layer_names is None:
            self._layer_names = names
        if sorted(names) != sorted(self._layer_names):
            raise ValueError(f"layers {names} differ from this monitor's {self._layer_names}")
        mats = [pool_to_matrix(_as_tensor(layers[name], name)).to(out.device) for name in self._layer_names]
        if any(m.shape[0] != out.shape[0] for m in mats):
            raise ValueError(f"layers of {[m.shape[0] for m in mats]} rows do not match {out.shape[0]} outputs")
        # cat always copies: the caller may reuse its buffers once this returns
        self._put(torch.cat([out.float(), *mats], dim=1), mats, client_id, request_ids)

    def _put(self, rows: torch.Tensor, mats: list[torch.Tensor], client_id: Any, request_ids: Any) -> None:
        n = int(rows.shape[0])
        if self._width != rows.shape[1]:
            self._check_width(rows, mats)
        if request_ids is not None:
            request_ids = [str(r) for r in request_ids]
            if len(request_ids) != n:
                raise ValueError(f"{len(request_ids)} request_ids for {n} rows")
        if client_id is None:
            client_id = ""
        elif not isinstance(client_id, str):
            client_id = [str(c) for c in client_id]
            if len(client_id) != n:
                raise ValueError(f"{len(client_id)} client ids for {n} rows")
        now = time.monotonic()
        entry = _Entry(n, rows, client_id, request_ids, int(time.time() * 1000), now)
        dropped = 0
        with self._cond:
            if self._closing:
                self._dropped += n
                return
            was_empty = not self._queue
            self._queue.append(entry)
            self._rows += n
            while self._rows > self.queue_rows:
                old = self._queue.popleft()
                self._rows -= old.n
                dropped += old.n
            if dropped:
                self._dropped += dropped
            if was_empty or self._rows - n < self.batch_rows <= self._rows:
                self._cond.notify()
        if dropped:
            self._warn("dropped", "layerwatch queue full (%d rows): dropped the oldest rows, %d so far; is the "
                       "broker at %s reachable?", self.queue_rows, self._dropped, self.bootstrap)

    def _check_width(self, rows: torch.Tensor, mats: list[torch.Tensor]) -> None:
        """First call: remember the packed width and the layer dimensions; later: refuse a change."""
        dims = [int(m.shape[1]) for m in mats]
        if self._width is None:
            self._width = int(rows.shape[1])
            self._layer_dims = dict(zip(self._layer_names or (), dims))
            return
        raise ValueError(f"outputs and layers of {rows.shape[1]} columns (layers {dims}) do not match this "
                         f"monitor's first call ({self._width} columns, layers {self._layer_dims})")

    # --- serving defences -------------------------------------------------------------------

    def decision(self, client_id: str) -> str:
        """"allow", "throttle" or "block" for this client, from the actions in force on ``lw.actions``."""
        return self.policy.decision(client_id, self.model_id) if self.listener is not None else ALLOW

    # --- reference --------------------------------------------------------------------------

    def publish_reference(self, batches: Any, *, batch_size: int = 256, timeout: float = 60.0) -> int:
        """Publish clean validation data as this model version's reference; returns the events sent.

        ``batches``: inputs as one array or tensor (split into ``batch_size`` rows), or an
        iterable of batches such as a ``DataLoader``, each the inputs or a tuple
        ``(inputs, labels, ...)`` (integer labels are kept as ground truth). Synchronous:
        returns once the broker acknowledged everything, raises ``PublishError`` otherwise.
        """
        if self.tap is None:
            raise TypeError("this Monitor has no model: publish a reference with `layerwatch reference --from FILE.npz`")
        with Publisher(self.bootstrap, self.model_id, self.model_version, topic=self.topic, role="reference",
                       **self._producer_config) as publisher:
            for x, truth in _batches(batches, batch_size):
                result = self.tap.tap(x, output_fn=self.output_fn)
                publisher.publish(result.outputs, result.layers, client_ids=["reference"] * len(result.outputs),
                                  truth=truth)
            publisher.flush(timeout)
            return publisher.sent_events

    # --- background publishing --------------------------------------------------------------

    def _run(self) -> None:
        # Small tensors, one intra-op thread: OpenMP keeps this per thread (measured: the serving
        # thread keeps its own setting), so the sender never competes for the serving thread's pool.
        torch.set_num_threads(1)
        try:
            self._publish_loop()
        finally:  # the sender owns the producer: it closes it, also when close() gave up waiting
            if self.publisher is not None:
                try:
                    self.publisher.close(max(0.0, self._close_deadline - time.monotonic()))
                except Exception as exc:  # PublishError: undelivered records, already counted
                    self.last_error = exc
                    log.warning("layerwatch: %s", exc)

    def _publish_loop(self) -> None:
        backoff = 0.5
        while True:
            if self.publisher is None and not self._connect():
                with self._cond:
                    if self._closing and time.monotonic() >= self._close_deadline:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if self.publisher.in_flight_events >= self.queue_rows and not self._closing:
                # Kafka is not acknowledging (kafka-python's producer buffer has no size limit):
                # hold back, so memory stays bounded and the queue drops the oldest rows instead.
                with self._cond:
                    self._cond.wait(0.05)
                continue
            entries = self._take()
            if entries is None:
                return
            try:
                self._send(entries)
            finally:
                with self._cond:
                    self._sending = 0
                    self._cond.notify_all()

    def _connect(self) -> bool:
        try:
            self.publisher = Publisher(self.bootstrap, self.model_id, self.model_version, topic=self.topic,
                                       **self._producer_config)
            return True
        except Exception as exc:  # NoBrokersAvailable, DNS, TLS: keep serving, retry
            self.last_error = exc
            self._warn("connect", "layerwatch cannot reach Kafka at %s (%s); queueing up to %d rows",
                       self.bootstrap, exc, self.queue_rows)
            return False

    def _take(self) -> list[_Entry] | None:
        """Wait for a full or old-enough micro-batch (or a flush/close) and take it off the queue."""
        with self._cond:
            while True:
                if self._closing and time.monotonic() >= self._close_deadline:
                    self._dropped += self._rows  # close() ran out of time: the rest is lost
                    self._queue.clear()
                    self._rows = 0
                    return None
                if self._queue:
                    age = time.monotonic() - self._queue[0].queued_at
                    if self._rows >= self.batch_rows or age >= self.max_age or self._drain or self._closing:
                        break
                    self._cond.wait(self.max_age - age)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()
            entries: list[_Entry] = []
            rows = 0
            while self._queue and (not entries or rows + self._queue[0].n <= self.batch_rows):
                entry = self._queue.popleft()
                entries.append(entry)
                rows += entry.n
            self._rows -= rows
            self._sending = rows
            return entries

    def _send(self, entries: list[_Entry]) -> None:
        """Concatenate on the device, output_fn, one host copy, one PredictionBatch to the producer."""
        n = sum(e.n for e in entries)
        try:
            device = entries[0].rows.device
            rows = torch.cat([e.rows.to(device) for e in entries]) if len(entries) > 1 else entries[0].rows
            dims = list((self._layer_dims or {}).values())
            outputs, *mats = torch.split(rows, [rows.shape[1] - sum(dims), *dims], dim=1)
            outputs = outputs.float()
            if self.output_fn is not None:
                outputs = self.output_fn(outputs)
            host = to_host(outputs, dict(zip(self._layer_names or (), mats)), self.layer_dtype)
            event_ids: list[str] = []
            client_ids: list[str] = []
            for e in entries:
                event_ids += e.ids if e.ids is not None else new_event_ids(e.n)
                client_ids += [e.client] * e.n if isinstance(e.client, str) else e.client
            ts_ms = np.repeat(np.array([e.ts_ms for e in entries], dtype=np.int64), [e.n for e in entries])
            self.publisher.publish(host.outputs, host.layers, event_ids=event_ids, client_ids=client_ids, ts_ms=ts_ms)
        except Exception as exc:  # PublishError (buffer full, no metadata), a bad batch: count and go on
            self.last_error = exc
            with self._cond:
                self._lost += n
            self._warn("send", "layerwatch could not publish %d predictions of %s: %s", n, self.model_id, exc)

    def _warn(self, key: str, message: str, *args: Any) -> None:
        """log.warning at most once a minute per kind of trouble."""
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(message, *args)

    # --- state and shutdown -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Rows ``queued`` here, ``in_flight`` (handed to Kafka, not yet acknowledged), ``sent``
        (acknowledged), ``dropped`` (oldest rows pushed out of a full queue), ``failed`` (refused or
        not delivered by Kafka); ``connected``; ``actions`` (the listener: off, waiting, running, error)."""
        publisher = self.publisher.stats() if self.publisher is not None else {}
        with self._cond:
            out = {"queued": self._rows, "in_flight": self._sending + publisher.get("in_flight_events", 0),
                   "sent": publisher.get("sent_events", 0), "dropped": self._dropped,
                   "failed": self._lost + publisher.get("failed_events", 0)}
        out["connected"] = self.publisher is not None
        listener = self.listener
        out["actions"] = ("off" if listener is None else "error" if listener.error is not None
                          else "running" if listener.assigned.is_set() else "waiting")
        return out

    def flush(self, timeout: float = 30.0) -> bool:
        """Publish everything queued now and wait for the broker's acknowledgements; True if all went out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._drain += 1
            self._cond.notify_all()
            try:
                while self._queue or self._sending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._drain -= 1
        if self.publisher is None:
            return False
        try:
            self.publisher.flush(max(0.0, deadline - time.monotonic()))
        except PublishError as exc:
            self.last_error = exc
            return False
        return self.publisher.in_flight == 0

    def close(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop accepting rows, publish what is queued (``timeout`` seconds at most), close; returns ``stats()``.

        Rows still queued when the time is up (the broker is down) are counted as dropped."""
        with self._cond:
            already = self._closing
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if not already:
            self._sender.join(timeout + 0.5)
            with self._cond:
                self._dropped += self._rows
                self._queue.clear()
                self._rows = 0
            if self.listener is not None:  # a daemon thread: do not wait long for a broker that is away
                self.listener.stop(timeout=max(0.1, self._close_deadline - time.monotonic()))
            if self.tap is not None:
                self.tap.remove()
        return self.stats()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor({self.model_id!r}, version={self.model_version!r}, layers={self._layer_names}, bootstrap={self.bootstrap!r})"


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.from_numpy(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array or tensor, got {type(value).__name__}") from exc


def _batches(data: Any, batch_size: int) -> Iterator[tuple[Any, np.ndarray | None]]:
    """(inputs, integer labels or None) per batch of an array/tensor or an iterable of batches."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], None
        return
    for item in data:
        if isinstance(item, (tuple, list)):
            x, labels = item[0], (item[1] if len(item) > 1 else None)
        else:
            x, labels = item, None
        truth = None
        if labels is not None:
            labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if labels.ndim == 1 and labels.dtype.kind in "iu":
                truth = labels.astype(np.int32)
        yield x, truth
