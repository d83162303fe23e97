"""Shared pytest fixtures and markers.

Sections are independent; add new fixtures in their own section.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(ROOT))


pytest_plugins = ["tests.plugins.broker"]


# ============================================================== ClickHouse / chDB store
#
# clickhouse_server: one Debian clickhouse-server child process per session
#   (tests/clickhouse_server.py); .url, .url_for(db), .stop(), .start(), .kill().
#   A test that stops it must start it again; store_url restarts it if needed.
# chdb_url: a fresh chdb:// path per test. chDB holds ONE path per process:
#   close every store opened on it before the test ends.
# store_url: parametrised over both backends; the server variant gets a fresh
#   database per test (dropped afterwards).

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator["ClickHouseServer"]:  # noqa: F821
    """A ClickHouse server (Debian's clickhouse-server) on free local ports."""
    from tests.clickhouse_server import ClickHouseServer, find_server_command

    if find_server_command() is None:
        pytest.skip("clickhouse-server is not installed (apt-get install -y clickhouse-server)")
    server = ClickHouseServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def chdb_url(tmp_path: Path) -> str:
    """A fresh ``chdb://`` URL under the test's tmp dir."""
    return f"chdb://{tmp_path / 'chdb-store'}"


def _drop_database(url: str, database: str) -> None:
    from urllib.parse import urlsplit

    from clickhouse_driver import Client

    parts = urlsplit(url)
    client = Client(parts.hostname, port=parts.port, connect_timeout=3)
    try:
        client.execute(f"DROP DATABASE IF EXISTS `{database}`")
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass
    finally:
        client.disconnect()


@pytest.fixture(params=["chdb", "server"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A store URL for each backend: a fresh chDB path, or a fresh database on
    the session's ClickHouse server."""
    if request.param == "chdb":
        yield request.getfixturevalue("chdb_url")
        return
    server = request.getfixturevalue("clickhouse_server")
    if not server.is_running():
        server.start()
    database = f"layerwatch_test_{next(_db_counter)}"
    url = server.url_for(database)
    yield url
    if server.is_running():
        _drop_database(url, database)


# ============================================================== demo models


@pytest.fixture(scope="session")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir with the demo models trained once per session (same path as the inference tests use)."""
    from workers.inference.models import load_demo_models

    path = tmp_path_factory.getbasetemp() / "layerwatch-state"
    load_demo_models(path, progress=False)
    return path


@pytest.fixture(scope="session")
def demo_classifier(demo_state: Path) -> Path:
    """A small attack classifier in the session's state dir, so the demo does not train the full one."""
    from workers.classifier.training import default_path, train

    if not default_path(demo_state).exists():
        train(demo_state, attacks=["pgd", "fgsm"], n_inputs=200, progress=False)
    return default_path(demo_state)
