"""The live drift dashboard: an HTML page, its static assets and JSON data views on the worker's web server.

Routes (Faust views on the worker's HTTP server, ``LW_WEB_HOST``:``LW_WEB_PORT``):

- ``GET /`` and ``GET /dashboard``: the page (``streams/static/dashboard.html``). It always
  loads; it holds no data.
- ``GET /static/plotly.min.js``: plotly.js from the ``plotly`` Python package
  (``plotly/package_data/plotly.min.js``), so the page works offline; ``/static/dashboard.js``
  and ``/static/dashboard.css`` from ``streams/static/``.
- ``GET /api/dashboard/models``: models and their layers in the time range.
- ``GET /api/dashboard/drift``: per model and layer the tested windows (detection rate,
  p-value), the alert threshold, and the distribution_shift alert bands per model.
- ``GET /api/dashboard/labels``: the attack classifier's label mix per time bucket.
- ``GET /api/dashboard/alerts``: open alerts (any age) and alerts of the time range.
- ``GET /api/dashboard/window?window_id=...``: one window's most suspicious events, with
  the model's input (the demo's 8x8 digit images) when the publisher sent it.

Every data view takes ``minutes`` (default 15, at most 7 days) or ``range=data``: the span
of the stored data (the page's default, so a finished run is shown whole, however long
ago it ran), and answers 401 without
``Authorization: Bearer <LW_WEB_TOKEN>`` when a token is configured. The page reads the
token from the URL fragment (``http://host:port/#token=...``; a fragment never reaches the
server, so it cannot land in access logs), keeps it in the tab's sessionStorage, removes it
from the address bar and sends it on every fetch; without one it asks for it in a form.

All SQL is below as named constants, bounded by a time range and a LIMIT, and runs on
ClickHouse 18.16 and chDB 26. The data functions take an awaitable ``query(sql, params)
-> (column names, rows)`` so that tests run them on a store without a web server.
"""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from streams.rows import now_ms
from streams.secrets import mask
from streams.web.payloads import (
    DEFAULT_ALERTS,
    DEFAULT_EVENTS,
    MAX_ALERTS,
    MAX_EVENTS,
    BadParameter,
    alerts_payload,
    bounded_int,
    data_span,
    drift_payload,
    labels_payload,
    models_payload,
    parse_minutes,
    text_param,
    window_payload,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "dashboard.html"
STATIC_FILES = {  # name -> content type; nothing else under /static is served
    "dashboard.js": "application/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PLOTLY_JS = "plotly.min.js"

# ------------------------------------------------------------------------------ views


def plotly_js_path() -> Path:
    """plotly.js as bundled in the plotly Python package."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / PLOTLY_JS


class _Asset:
    """A static file read once, with a gzip copy for clients that accept it."""

    def __init__(self, path: Path, content_type: str):
        self.path, self.content_type = path, content_type
        self.body: bytes | None = None
        self.gzipped: bytes | None = None
        self.lock = asyncio.Lock()

    async def load(self) -> tuple[bytes, bytes]:
        async with self.lock:
            if self.body is None:
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(None, self.path.read_bytes)
                self.gzipped = await loop.run_in_executor(None, lambda: gzip.compress(body, 6))
                self.body = body
        return self.body, self.gzipped  # type: ignore[return-value]


PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # plotly.js writes inline styles; images are data: URLs built in the page.
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'"),
}
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def register_dashboard_views(app: Any, runtime: Any) -> None:
    """Register the page, the assets and the data views (see the module docstring)."""
    from faust.web import Request, Response, View

    from streams.store import StoreError
    from streams.web.views import authorized

    settings = runtime.settings
    token = settings.web_token
    page = _Asset(STATIC_DIR / PAGE, "text/html; charset=utf-8")
    assets = {name: _Asset(STATIC_DIR / name, ctype) for name, ctype in STATIC_FILES.items()}
    assets[PLOTLY_JS] = _Asset(plotly_js_path(), "application/javascript; charset=utf-8")

    async def query(sql: str, params: Mapping[str, Any]) -> tuple[Sequence[str], Sequence[Sequence[Any]]]:
        return await runtime.writer.query_columns(sql, dict(params))

    async def send_asset(view: View, request: Request, asset: _Asset, headers: Mapping[str, str]) -> Response:
        body, zipped = await asset.load()
        use_gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        # the content type goes in the headers: aiohttp refuses a charset in content_type=
        return view.bytes(zipped if use_gzip else body, headers={
            **headers, "Content-Type": asset.content_type, "Vary": "Accept-Encoding",
            **({"Content-Encoding": "gzip"} if use_gzip else {})})

    class Page(View):
        async def get(self, request: Request) -> Response:
            return await send_asset(self, request, page, PAGE_HEADERS)

    app.page("/", name="layerwatch_dashboard_index")(Page)
    app.page("/dashboard", name="layerwatch_dashboard")(type("DashboardPage", (Page,), {}))

    @app.page("/static/{name}", name="layerwatch_dashboard_static")
    class Static(View):
        async def get(self, request: Request, name: str) -> Response:
            asset = assets.get(name)
            if asset is None:
                return self.json({"error": "not found"}, status=404)
            cache = "public, max-age=86400" if name == PLOTLY_JS else "no-cache"
            return await send_asset(self, request, asset, {"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})

    def data_view(path: str, build: Callable[[Any], Awaitable[dict[str, Any]]]) -> None:
        class Data(View):
            async def get(self, request: Request) -> Response:
                if not authorized(request, token):
                    return self.json({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="layerwatch"', **API_HEADERS})
                try:
                    body = await build(request.query)
                except BadParameter as exc:
                    return self.json({"error": str(exc)}, status=400, headers=API_HEADERS)
                except StoreError as exc:
                    return self.json({"error": mask(f"store: {exc}")}, status=503, headers=API_HEADERS)
                return self.json(body, headers=API_HEADERS)

        Data.__name__ = Data.__qualname__ = "Dashboard" + path.rsplit("/", 1)[-1].title()
        app.page(path, name="layerwatch_dashboard_" + path.rsplit("/", 1)[-1])(Data)

    async def common(q: Mapping[str, str]) -> dict[str, Any]:
        """``minutes`` and ``now`` of the request: the last ``minutes``, or (``range=data``) the data's span."""
        now = now_ms()
        if q.get("range") == "data" and not q.get("minutes"):
            span = await data_span(query, now=now)
            if span is not None:
                return {"minutes": span[0], "now": span[1]}
        elif q.get("range") not in (None, "", "data"):
            raise BadParameter("range must be 'data' (or give minutes)")
        return {"minutes": parse_minutes(q.get("minutes")), "now": now}

    async def stamped(body: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        return {**await body, "clock_ms": now_ms()}  # the server's clock, for "x ago" of old data

    async def models(q: Mapping[str, str]) -> dict[str, Any]:
        event_time = {"late": runtime.metrics.by_model(runtime.metrics.late),
                      "clamped": runtime.metrics.by_model(runtime.metrics.clamped)}
        return await stamped(models_payload(query, **await common(q), event_time=event_time))

    async def drift(q: Mapping[str, str]) -> dict[str, Any]:
        return await stamped(drift_payload(
            query, **await common(q), threshold=settings.alert_detection_rate, alpha=settings.alpha,
            model_id=text_param(q.get("model_id"), "model_id"), layer=text_param(q.get("layer"), "layer")))

    async def labels(q: Mapping[str, str]) -> dict[str, Any]:
        return await stamped(labels_payload(query, **await common(q), model_id=text_param(q.get("model_id"), "model_id")))

    async def alerts(q: Mapping[str, str]) -> dict[str, Any]:
        return await stamped(alerts_payload(
            query, **await common(q), model_id=text_param(q.get("model_id"), "model_id"),
            limit=bounded_int(q.get("limit"), DEFAULT_ALERTS, 1, MAX_ALERTS, "limit")))

    data_view("/api/dashboard/models", models)
    data_view("/api/dashboard/drift", drift)
    data_view("/api/dashboard/labels", labels)
    data_view("/api/dashboard/alerts", alerts)

    async def window(q: Mapping[str, str]) -> dict[str, Any]:
        window_id = text_param(q.get("window_id"), "window_id")
        if not window_id:
            raise BadParameter("window_id is required")
        return await window_payload(query, window_id=window_id, layer=text_param(q.get("layer"), "layer"),
                                    limit=bounded_int(q.get("limit"), DEFAULT_EVENTS, 1, MAX_EVENTS, "limit"))

    data_view("/api/dashboard/window", window)
