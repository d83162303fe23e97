"""The one HTTP client of a worker's API (`/health`, `/api/query`), for the CLI, the demo and the local stack."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from streams.store import StoreError


def http_json(url: str, body: dict | None = None, token: str = "", timeout: float = 5.0) -> tuple[int, dict]:
    """GET (or POST JSON) and return (status, decoded body); connection errors give (0, {}).

    A body that is not a JSON object (a proxy's HTML page, a plain-text error) comes back
    as ``{"error": <its first 300 characters>}``.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, _json_object(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json_object(exc.read())
    except OSError:
        return 0, {}


def _json_object(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw.decode("utf-8", "replace").strip()[:300]}
    return value if isinstance(value, dict) else {"error": str(value)[:300]}


class WorkerClient:
    """A worker's web API at ``url`` (bearer ``token`` when the worker has one)."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 60.0):
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s

    @classmethod
    def from_settings(cls, settings: Any) -> "WorkerClient":
        return cls(f"http://{settings.web_host}:{settings.web_port}", settings.web_token)

    def answers(self, timeout_s: float = 1.0) -> bool:
        """True when a layerwatch worker answers `/health` (503, degraded, is still a worker)."""
        status, body = http_json(f"{self.url}/health", timeout=timeout_s)
        return status in (200, 503) and "status" in body

    def query(self, sql: str, params: dict[str, Any] | None = None) -> tuple[list[str], list[list]]:
        """Column names and rows of a read-only query run by the worker; refusals raise StoreError."""
        status, body = http_json(f"{self.url}/api/query", {"sql": sql, "params": params or {}}, token=self.token,
                                 timeout=self.timeout_s)
        if status != 200 or "columns" not in body:
            reason = body.get("error") or ("no answer" if status == 0 else f"HTTP {status}")
            raise StoreError(f"query refused by the worker at {self.url} ({status}): {reason}")
        return body["columns"], body["rows"]

    def rows(self, sql: str, **params: Any) -> list[list]:
        return self.query(sql, params)[1]

    def shipped(self, name: str, **params: Any) -> tuple[list[str], list[list]]:
        """A shipped query (deploy/clickhouse/queries/NAME.sql) with its declared defaults filled in."""
        from streams.store.queries import prepare_shipped

        sql, values = prepare_shipped(name, params)
        return self.query(sql, values)
