"""Fixtures for the stream worker tests: a topic prefix per test module, the worker process.

Each test module gets its own topic prefix (so its own consumer groups, transactional ids and
state topics) and deletes every topic of that prefix afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.settings import KafkaSettings, Settings
from pipelines.stack.manager import LocalStack
from pipelines.topics import apply_topics
from schemas.topics import topic_catalog
from tests.streams.support import Worker, worker_environment


@pytest.fixture(scope="module")
def stream_settings(settings: Settings, local_stack: LocalStack) -> Iterator[Settings]:
    prefix = f"t-sw-{uuid.uuid4().hex[:8]}-"
    prefixed = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                bootstrap_servers=settings.kafka.bootstrap_servers, topic_prefix=prefix
            )
        }
    )
    admin = AdminClient(kafka_config(prefixed))
    apply_topics(admin, topic_catalog(prefixed))
    yield prefixed
    names = [name for name in admin.list_topics(timeout=30).topics if name.startswith(prefix)]
    if names:
        for future in admin.delete_topics(names).values():
            future.result(timeout=60)


@pytest.fixture
def worker(stream_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    process = Worker(worker_environment(stream_settings), tmp_path / "stream-worker.log")
    yield process
    process.stop()
