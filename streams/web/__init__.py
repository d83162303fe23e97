"""The worker's web server (Faust's): the API views (views.py) and the live dashboard (dashboard.py, static/)."""

from __future__ import annotations

from typing import Any


def register_views(app: Any, runtime: Any) -> None:
    """Add every layerwatch view to the app's web server (once, before the worker starts)."""
    from streams.web.dashboard import register_dashboard_views
    from streams.web.views import register_api_views

    register_api_views(app, runtime)
    register_dashboard_views(app, runtime)
