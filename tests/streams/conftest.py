"""Fixtures for the stream worker tests: a topic prefix per test module, the worker process.

Each test module gets its own topic prefix (so its own consumer groups, transactional ids and
state topics) and deletes every topic of that prefix afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from pipelines.stack.manager import LocalStack
from tests.sinks.cql_support import catalog_topics
from tests.streams.support import Worker, worker_environment


@pytest.fixture(scope="module")
def stream_settings(settings: Settings, local_stack: LocalStack) -> Iterator[Settings]:
    with catalog_topics(settings, f"t-sw-{uuid.uuid4().hex[:8]}-") as prefixed:
        yield prefixed


@pytest.fixture
def worker(stream_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    process = Worker(worker_environment(stream_settings), tmp_path / "stream-worker.log")
    yield process
    process.stop()
