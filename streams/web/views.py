"""The worker's HTTP endpoints (Faust web views): health, Prometheus metrics, read-only SQL, the models overview.

Endpoints that return data or run SQL require ``Authorization: Bearer <LW_WEB_TOKEN>``
when a token is configured; `/health` stays open for load balancers.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import faust
from faust.web import Request, Response, View

from streams.secrets import mask, mask_data
from streams.store import StoreError

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 20_000


def authorized(request: Request, token: str) -> bool:
    """True when no token is configured or the request carries it as a bearer token."""
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def register_api_views(app: faust.App, runtime: Any) -> None:
    """Add /health, /metrics, /api/query and /api/models to the Faust web server."""
    token = runtime.settings.web_token

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            health = mask_data(runtime.health())
            return self.json(health, status=200 if health["status"] == "ok" else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            if not authorized(request, token):
                return self.json({"error": "unauthorized"}, status=401)
            return self.bytes(runtime.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/api/query")
    class Query(View):
        async def post(self, request: Request) -> Response:
            if not authorized(request, token):
                return self.json({"error": "unauthorized"}, status=401)
            try:
                body = await request.json()
                sql, params = body["sql"], body.get("params") or {}
                if not isinstance(sql, str) or len(sql) > MAX_QUERY_CHARS or not isinstance(params, dict):
                    raise ValueError("sql must be a string and params an object")
            except (ValueError, KeyError, TypeError):
                return self.json({"error": "bad request: expected {\"sql\": ..., \"params\": {...}}"}, status=400)
            try:
                names, rows = await runtime.writer.query_columns(sql, params)
            except StoreError as exc:
                return self.json({"error": mask(exc)}, status=400)
            return self.json({"columns": names, "rows": rows})

    @app.page("/api/models")
    class Models(View):
        async def get(self, request: Request) -> Response:
            if not authorized(request, token):
                return self.json({"error": "unauthorized"}, status=401)
            from streams.models import models_async

            try:
                models = await models_async(runtime.writer.query_columns)
            except StoreError as exc:
                return self.json({"error": str(exc)}, status=503)
            return self.json({"models": models})

