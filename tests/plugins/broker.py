"""pytest fixture: one embedded Tansu broker per test session on a free port."""

from __future__ import annotations

import pytest

from streams.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Bootstrap address ('127.0.0.1:PORT') of a Tansu broker that lives for the whole session."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as embedded:
        yield embedded.bootstrap
