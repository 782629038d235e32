"""Fixtures the ClickHouse sink test modules share (a module may still define its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from core.settings import Settings
from pipelines.stack.manager import LocalStack
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.clickhouse_support import prefixed_sink, shared_client_store


@pytest.fixture
def sink_settings(
    request: pytest.FixtureRequest,
    settings: Settings,
    local_stack: LocalStack,
    clickhouse_database: str,
) -> Iterator[Settings]:
    """A topic prefix named after the test module (every catalog topic and consumer group
    under it deleted after) and the test's database."""
    tag = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_clickhouse_")
    with prefixed_sink(settings, tag, clickhouse_database) as prefixed:
        yield prefixed


@pytest.fixture
def store(clickhouse: Client, clickhouse_database: str) -> Iterator[ClickHouseStore]:
    """A store over the session's one chDB client, on the test's database."""
    yield from shared_client_store(clickhouse, clickhouse_database)
