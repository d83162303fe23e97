"""Writes column batches to the store from the event loop, retrying through outages.

A write that cannot reach ClickHouse is retried with capped exponential backoff and
never dropped; while it waits, the calling agent does not take more records, so the
backlog stays in Kafka (backpressure) and the worker's health reads "degraded". A write
the store keeps refusing for another reason (a bad value, a schema mismatch) raises
:class:`RowsRejected` after ``max_attempts_on_error`` attempts: the caller dead-letters the
records those rows came from, so nothing is acked that was not stored or dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from streams.metrics import Metrics
from streams.store import Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """A query result value as something json.dumps accepts."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        value = value.tolist() if hasattr(value, "tolist") else value
        return [jsonable(v) for v in value] if isinstance(value, list) else value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


class RowsRejected(StoreError):
    """The store refused a write several times for a reason other than an outage."""

    def __init__(self, table: str, n_rows: int, cause: Exception):
        super().__init__(f"store refused {n_rows} row(s) for {table}: {cause}")
        self.table, self.n_rows = table, n_rows


class StoreWriter:
    """Serialises store writes on one thread (clickhouse-driver is one client per thread); reads on others."""

    def __init__(self, store: Store, metrics: Metrics, *, max_backoff_s: float = 5.0, max_attempts_on_error: int = 3,
                 query_threads: int = 2):
        self.store = store
        self.metrics = metrics
        self.max_backoff_s = max_backoff_s
        self.max_attempts_on_error = max_attempts_on_error
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-store")
        # read-only queries of the API and dashboard: their own threads, hence their own store
        # connections (a chDB read-only session per thread), so a slow query never holds up a write
        self.query_executor = ThreadPoolExecutor(max_workers=query_threads, thread_name_prefix="lw-query")
        self.degraded_reason = ""

    @property
    def healthy(self) -> bool:
        return not self.degraded_reason

    async def write(self, table: str, columns: dict[str, Any], count_rejected: bool = True) -> None:
        """Insert the columns; on an outage wait and retry until the store is back.

        ``count_rejected=False``: the caller retries refused rows in smaller parts, so they
        are not counted in ``layerwatch_rows_rejected_total`` yet.
        """
        if not columns:
            return
        loop = asyncio.get_running_loop()
        n_rows = len(next(iter(columns.values())))
        backoff, attempt = 0.1, 0
        while True:
            attempt += 1
            try:
                await loop.run_in_executor(self.executor, self.store.insert, table, columns)
            except StoreUnavailable as exc:
                self._failed(table, exc)
            except StoreError as exc:
                self._failed(table, exc)
                if attempt >= self.max_attempts_on_error:
                    if count_rejected:
                        self.metrics.rows_rejected.labels(table).inc(n_rows)
                    self.degraded_reason = ""
                    raise RowsRejected(table, n_rows, exc) from exc
            else:
                self.metrics.rows.labels(table).inc(n_rows)
                self.metrics.store_up.set(1)
                if self.degraded_reason:
                    log.info("store is back; writes resumed")
                self.degraded_reason = ""
                return
            await asyncio.sleep(backoff)  # retry backoff, not synchronisation
            backoff = min(backoff * 2, self.max_backoff_s)

    def _failed(self, table: str, exc: Exception) -> None:
        if not self.degraded_reason:
            log.warning("store write to %s failed, retrying with backoff: %s", table, exc)
        self.degraded_reason = f"store unavailable: {exc}"[:300]
        self.metrics.store_errors.inc()
        self.metrics.store_up.set(0)

    async def query(self, sql: str, params: dict | None = None, **kwargs: Any) -> list[tuple]:
        """Run a query on the writer's thread (the store owns the chDB path in this process)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: self.store.query(sql, params, **kwargs))

    async def query_columns(self, sql: str, params: dict | None = None) -> tuple[list[str], list[list]]:
        """A read-only query for the HTTP API and the dashboard, on a query thread: names and JSON-ready rows."""
        loop = asyncio.get_running_loop()
        names, rows = await loop.run_in_executor(
            self.query_executor, lambda: self.store.query_columns(sql, params, readonly=True)
        )
        return list(names), [[jsonable(v) for v in row] for row in rows]

    def close(self) -> None:
        """Finish the writes in flight; queries in flight are left to the store's close."""
        self.query_executor.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown(wait=True)
