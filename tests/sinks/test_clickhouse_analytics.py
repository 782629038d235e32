"""The analytics over the audit, on the real chDB: seeded rows with known answers — inserted twice,
as a replay would — give those answers through every named query and the HTTP endpoint, and bad
requests are refused with 400/404 and a stable code."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from analytics.queries import QUERIES, Analytics
from core.settings import Settings
from pipelines.stack.manager import LocalStack
from schemas import events as ev
from schemas.topics import TopicCatalog, topic_catalog
from sinks.clickhouse.audit import AuditDecoder
from sinks.clickhouse.schema import (
    AUDIT_COLUMNS,
    AUDIT_TABLE,
    PUSH_OUTCOME_COLUMNS,
    PUSH_OUTCOMES_TABLE,
)
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.clickhouse_support import (
    TENANT,
    at,
    created,
    daves_tablet_token,
    new_prefix,
    next_record,
    prefixed_settings,
    presence,
    push_job,
    sent,
)
from tests.sinks.staff_support import serving, staff_app, staff_get

pytestmark = pytest.mark.stack

T0 = at("2026-03-01T10:00:00")
MINUTE_0 = "2026-03-01T10:00:00Z"
MINUTE_1 = "2026-03-01T10:01:00Z"
GLOBEX = "globex"


class Seed:
    """Audit rows built the way the sink builds them (``AuditDecoder``), with chosen Kafka
    timestamps and storage times."""

    def __init__(self, catalog: TopicCatalog) -> None:
        self.catalog = catalog
        self.decoder = AuditDecoder(catalog)
        self.rows: list[tuple[Any, ...]] = []
        self._offsets: dict[str, int] = {}

    def add(
        self,
        topic: str,
        value: bytes,
        *,
        record_time: datetime,
        stored_after_ms: int = 0,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> None:
        audited = self.decoder.audit(
            next_record(self._offsets, topic, value, record_time, headers or [])
        )
        stored = record_time + timedelta(milliseconds=stored_after_ms)
        self.rows.append((*audited.row.values(), stored))

    def event(self, topic: str, event: ev.Event, *, after_ms: int = 0, stored_ms: int = 0) -> None:
        self.add(
            topic,
            ev.encode_event(event),
            record_time=event.occurred_at + timedelta(milliseconds=after_ms),
            stored_after_ms=stored_ms,
        )

    def dead_letter(
        self, source: str, value: bytes, code: str, offset: int, at_time: datetime
    ) -> None:
        dead_letter = self.catalog.by_name(source).dead_letter
        assert dead_letter is not None
        self.add(
            dead_letter,
            value,
            record_time=at_time,
            headers=[
                ("imstream.error.code", code.encode()),
                ("imstream.error.message", b"rejected"),
                ("imstream.source.topic", source.encode()),
                ("imstream.source.partition", b"0"),
                ("imstream.source.offset", str(offset).encode()),
            ],
        )


def seed(catalog: TopicCatalog) -> Seed:
    """The data whose answers the tests know (see each test)."""
    data = Seed(catalog)
    sequenced = catalog.messages_sequenced.name
    inbound = catalog.messages_in.name
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")
    dm_without_created = ev.direct_conversation_id(TENANT, "carol", "dave")
    data.event(sequenced, created(dm, ev.ConversationKind.DIRECT, ["alice", "bob"], T0))
    data.event(sequenced, created("g-1", ev.ConversationKind.GROUP, ["bob", "carol"], T0))
    data.event(
        sequenced,
        created("g-x", ev.ConversationKind.GROUP, ["zed", "yan"], T0, tenant=GLOBEX),
    )
    # Minute 10:00: three direct and two group messages; send→sequenced 100…500 ms,
    # sequenced→stored 1000, 1000, 2000, 3000, 5000 ms.
    minute_0 = [
        (sent("alice", dm, "a1", T0 + timedelta(seconds=5), seq=1), 100, 1000),
        (sent("bob", dm, "b1", T0 + timedelta(seconds=10), seq=2), 200, 1000),
        (sent("alice", dm, "a2", T0 + timedelta(seconds=15), seq=3), 300, 2000),
        (sent("bob", "g-1", "b2", T0 + timedelta(seconds=20), seq=1), 400, 3000),
        (sent("carol", "g-1", "c1", T0 + timedelta(seconds=25), seq=2), 500, 5000),
    ]
    # Minute 10:01: conversations with no conversation.created in the audit: the kind comes
    # from the id (direct ids start with dm-).
    minute_1 = [
        (sent("carol", dm_without_created, "c2", T0 + timedelta(seconds=65), seq=1), 50, 10),
        (sent("dave", "legacy-group", "d1", T0 + timedelta(seconds=70), seq=1), 150, 20),
    ]
    globex = [
        (sent("zed", "g-x", "z1", T0 + timedelta(seconds=30), seq=1, tenant=GLOBEX), 250, 700)
    ]
    for message, latency, stored in [*minute_0, *minute_1, *globex]:
        data.event(sequenced, message, after_ms=latency, stored_ms=stored)
    # Neither a recall nor the inbound copies are sequenced messages.
    recall = ev.MessageRecalled.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="alice"),
        occurred_at=T0 + timedelta(seconds=40),
        payload=ev.MessageRecalledPayload(
            conversation_id=dm, message_id=minute_0[0][0].event_id, conversation_seq=4
        ),
    )
    data.event(sequenced, recall)

    # Active users. 2026-03-01: alice, bob, carol (messages), bob (typing), erin (a device).
    for message, _, _ in minute_0:
        inbound_copy = message.model_copy(
            update={"payload": message.payload.model_copy(update={"conversation_seq": None})}
        )
        data.event(inbound, inbound_copy)
    data.event(
        catalog.typing_in.name,
        ev.TypingChanged.new(
            tenant_id=TENANT,
            actor=ev.Actor(user_id="bob"),
            occurred_at=T0 + timedelta(hours=1),
            payload=ev.TypingChangedPayload(conversation_id=dm, active=True),
        ),
    )
    data.event(catalog.presence.name, presence("erin", T0 + timedelta(hours=2)))
    # 2026-03-02: alice (mute), dave (a push token).
    data.event(
        catalog.user_state_in.name,
        ev.ConversationMuteChanged.new(
            tenant_id=TENANT,
            actor=ev.Actor(user_id="alice"),
            occurred_at=at("2026-03-02T09:00:00"),
            payload=ev.ConversationMuteChangedPayload(conversation_id=dm, muted=True),
        ),
    )
    data.event(catalog.push_tokens.name, daves_tablet_token(at("2026-03-02T12:00:00")))
    # 2026-04-01: frank's device disconnected (a system event: the device's user counts).
    data.event(
        catalog.presence.name,
        ev.DeviceDisconnected.new(
            tenant_id=TENANT,
            occurred_at=at("2026-04-01T08:00:00"),
            payload=presence("frank", T0).payload,
        ),
    )
    # Not client commands: a sync entry for zoe, a poison record on the inbound topic.
    data.add(
        catalog.sync_events.name,
        ev.SyncRecord(tenant_id=TENANT, user_id="zoe", sync_id=1, event=minute_0[0][0])
        .model_dump_json()
        .encode(),
        record_time=T0,
    )
    data.add(inbound, b"not an event", record_time=T0)

    # Push jobs: two at 10:00 (for 1 and 3 messages), one at 10:01.
    for user, message, merged in (
        ("carol", minute_0[0][0], 1),
        ("dave", minute_0[3][0], 3),
        ("alice", minute_1[0][0], 1),
    ):
        job = push_job(user, message, merged_count=merged)
        data.add(catalog.push_jobs.name, job.model_dump_json().encode(), record_time=T0)

    # Dead letters: messages_in offsets 7 and 8 rejected at 10:00 (7 twice, by two stages),
    # offset 9 at 10:01; an undecodable sync record at 10:00.
    rejected = ev.encode_event(minute_0[0][0])
    data.dead_letter(inbound, rejected, "schema-invalid", 7, T0 + timedelta(seconds=10))
    data.dead_letter(inbound, rejected, "schema-invalid", 8, T0 + timedelta(seconds=20))
    data.dead_letter(inbound, rejected, "schema-invalid", 7, T0 + timedelta(seconds=50))
    data.dead_letter(inbound, rejected, "processing-failed", 9, T0 + timedelta(seconds=65))
    data.dead_letter(
        catalog.sync_events.name, b"garbage", "malformed-json", 3, T0 + timedelta(seconds=30)
    )
    return data


def push_outcomes(catalog: TopicCatalog) -> list[tuple[Any, ...]]:
    """Outcomes as the push sender writes them; dave's tablet attempt is written twice (failed,
    then corrected to invalid-token): the later write replaces the earlier."""
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")
    job_a, job_b = ev.derived_event_id("a", "push"), ev.derived_event_id("b", "push")
    message = ev.message_event_id(TENANT, "alice", "a1")

    def outcome(
        job: str, device: str, provider: str, result: str, *, seconds: int, recorded: int
    ) -> tuple[Any, ...]:
        return (
            job,
            TENANT,
            device.split("-", maxsplit=1)[0],
            dm,
            message,
            T0,
            device,
            provider,
            1,
            result,
            200 if result == "delivered" else 410,
            None,
            T0 + timedelta(seconds=seconds),
            T0 + timedelta(seconds=recorded),
        )

    return [
        outcome(job_a, "carol-phone", "apns", "delivered", seconds=30, recorded=31),
        outcome(job_b, "dave-tablet", "fcm", "failed", seconds=35, recorded=36),
        outcome(job_b, "dave-tablet", "fcm", "invalid-token", seconds=35, recorded=90),
        outcome(job_b, "dave-phone", "fcm", "delivered", seconds=40, recorded=41),
    ]


#: The columns of a stored push outcome: those the sink writes, and when it wrote them.
OUTCOME_COLUMNS = [*PUSH_OUTCOME_COLUMNS, "recorded_at"]


@pytest.fixture
def catalog(settings: Settings) -> TopicCatalog:
    return topic_catalog(prefixed_settings(settings, new_prefix("cha")))


@pytest.fixture
def seeded(
    local_stack: LocalStack, clickhouse: Client, clickhouse_database: str, catalog: TopicCatalog
) -> Iterator[ClickHouseStore]:
    """The schema with the seed inserted twice — the second copy stored an hour later, as a
    replay would store it — and the push outcomes."""
    store = ClickHouseStore(clickhouse, clickhouse_database, owns_client=False)
    store.apply_schema(catalog)
    rows = seed(catalog).rows
    columns = [*AUDIT_COLUMNS, "ingested_at"]
    replayed = [(*row[:-1], row[-1] + timedelta(hours=1)) for row in rows]
    for batch in (rows, replayed):
        clickhouse.insert(AUDIT_TABLE, batch, column_names=columns, database=clickhouse_database)
    clickhouse.insert(
        PUSH_OUTCOMES_TABLE,
        push_outcomes(catalog),
        column_names=OUTCOME_COLUMNS,
        database=clickhouse_database,
    )
    yield store
    store.close()


@pytest.fixture
def endpoint(seeded: ClickHouseStore) -> Iterator[str]:
    """The analytics endpoint as the sink process serves it, on a free port."""
    with serving(staff_app(Analytics(seeded))) as url:
        yield url


def rows(endpoint: str, name: str, **parameters: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode(
        {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z", **parameters}
    )
    status, body = staff_get(f"{endpoint}/v1/analytics/{name}?{query}")
    assert status == 200, body
    assert body["query"] == name and body["truncated"] is False
    assert body["columns"] == list(QUERIES[name].columns)
    return list(body["rows"])


def test_messages_per_minute_by_tenant_and_conversation_kind(endpoint: str) -> None:
    assert rows(endpoint, "messages_per_minute") == [
        {"tenant_id": TENANT, "minute": MINUTE_0, "conversation_kind": "direct", "messages": 3},
        {"tenant_id": TENANT, "minute": MINUTE_0, "conversation_kind": "group", "messages": 2},
        {"tenant_id": TENANT, "minute": MINUTE_1, "conversation_kind": "direct", "messages": 1},
        {"tenant_id": TENANT, "minute": MINUTE_1, "conversation_kind": "group", "messages": 1},
        {"tenant_id": GLOBEX, "minute": MINUTE_0, "conversation_kind": "group", "messages": 1},
    ]


def test_daily_and_monthly_active_users_count_distinct_actors_of_client_commands(
    endpoint: str,
) -> None:
    window = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
    assert rows(endpoint, "daily_active_users", **window) == [
        {"tenant_id": TENANT, "day": "2026-03-01", "active_users": 4},
        {"tenant_id": TENANT, "day": "2026-03-02", "active_users": 2},
        {"tenant_id": TENANT, "day": "2026-04-01", "active_users": 1},
    ]
    assert rows(endpoint, "monthly_active_users", **window) == [
        {"tenant_id": TENANT, "month": "2026-03-01", "active_users": 5},
        {"tenant_id": TENANT, "month": "2026-04-01", "active_users": 1},
    ]


def test_latencies_are_exact_quantiles_per_minute(endpoint: str) -> None:
    assert rows(endpoint, "send_to_sequenced_latency") == [
        _latency(TENANT, MINUTE_0, 5, (300.0, 500.0, 500.0, 500.0)),
        _latency(TENANT, MINUTE_1, 2, (150.0, 150.0, 150.0, 150.0)),
        _latency(GLOBEX, MINUTE_0, 1, (250.0, 250.0, 250.0, 250.0)),
    ]
    # The first copy's storage time counts, not the replayed copy's an hour later.
    assert rows(endpoint, "sequenced_to_stored_latency") == [
        _latency(TENANT, MINUTE_0, 5, (2000.0, 5000.0, 5000.0, 5000.0)),
        _latency(TENANT, MINUTE_1, 2, (20.0, 20.0, 20.0, 20.0)),
        _latency(GLOBEX, MINUTE_0, 1, (700.0, 700.0, 700.0, 700.0)),
    ]


def _latency(
    tenant: str, minute: str, messages: int, quantiles: tuple[float, float, float, float]
) -> dict[str, Any]:
    """A latency row: ``quantiles`` are p50, p90, p99 and max in milliseconds."""
    p50, p90, p99, top = quantiles
    return {
        "tenant_id": tenant,
        "minute": minute,
        "messages": messages,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": top,
    }


def test_push_jobs_and_outcomes_per_minute(endpoint: str) -> None:
    assert rows(endpoint, "push_jobs_per_minute") == [
        {"tenant_id": TENANT, "minute": MINUTE_0, "jobs": 2, "merged_messages": 4, "users": 2},
        {"tenant_id": TENANT, "minute": MINUTE_1, "jobs": 1, "merged_messages": 1, "users": 1},
    ]
    outcome = {"tenant_id": TENANT, "minute": MINUTE_0, "attempts": 1, "jobs": 1}
    assert rows(endpoint, "push_outcomes_per_minute") == [
        {**outcome, "provider": "apns", "outcome": "delivered"},
        {**outcome, "provider": "fcm", "outcome": "delivered"},
        {**outcome, "provider": "fcm", "outcome": "invalid-token"},
    ]


def test_dead_letters_per_minute_count_each_rejected_record_once(
    endpoint: str, catalog: TopicCatalog
) -> None:
    inbound, sync = catalog.messages_in.name, catalog.sync_events.name
    assert rows(endpoint, "dead_letters_per_minute") == [
        {
            "tenant_id": TENANT,
            "minute": MINUTE_0,
            "source_topic": inbound,
            "error_code": "schema-invalid",
            "dead_letters": 2,
        },
        {
            "tenant_id": "",
            "minute": MINUTE_0,
            "source_topic": sync,
            "error_code": "malformed-json",
            "dead_letters": 1,
        },
        {
            "tenant_id": TENANT,
            "minute": MINUTE_1,
            "source_topic": inbound,
            "error_code": "processing-failed",
            "dead_letters": 1,
        },
    ]


def test_tenant_and_time_window_select_the_rows(endpoint: str) -> None:
    assert rows(endpoint, "messages_per_minute", tenant=GLOBEX) == [
        {"tenant_id": GLOBEX, "minute": MINUTE_0, "conversation_kind": "group", "messages": 1},
    ]
    # Rows whose minute starts in [from, to); the bounds may carry any offset.
    assert rows(
        endpoint,
        "messages_per_minute",
        tenant=TENANT,
        **{"from": "2026-03-01T11:01:00+01:00", "to": "2026-03-01T10:02:00Z"},
    ) == [
        {"tenant_id": TENANT, "minute": MINUTE_1, "conversation_kind": "direct", "messages": 1},
        {"tenant_id": TENANT, "minute": MINUTE_1, "conversation_kind": "group", "messages": 1},
    ]
    assert rows(endpoint, "messages_per_minute", tenant="nobody") == []


def test_the_endpoint_lists_its_queries_and_reports_health(endpoint: str) -> None:
    status, body = staff_get(f"{endpoint}/v1/analytics")
    assert status == 200
    assert [query["name"] for query in body["queries"]] == list(QUERIES)
    assert all(query["parameters"] == ["tenant", "from", "to"] for query in body["queries"])
    assert staff_get(f"{endpoint}/healthz") == (200, {"status": "ok"})


MESSAGES = "/v1/analytics/messages_per_minute"


@pytest.mark.parametrize(
    ("path", "status", "code", "field"),
    [
        ("/v1/analytics/drop_everything", 404, "unknown-query", None),
        (f"{MESSAGES}?sql=SELECT+1", 400, "unknown-parameter", "sql"),
        (f"{MESSAGES}?tenant=a%2Fb", 400, "invalid-parameter", "tenant"),
        (f"{MESSAGES}?tenant=x'%20OR%201=1", 400, "invalid-parameter", "tenant"),
        (f"{MESSAGES}?tenant=a&tenant=b", 400, "invalid-parameter", "tenant"),
        (f"{MESSAGES}?from=yesterday", 400, "invalid-parameter", "from"),
        (f"{MESSAGES}?to=2026-03-01T10:00:00", 400, "invalid-parameter", "to"),
        (
            f"{MESSAGES}?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z",
            400,
            "invalid-parameter",
            "from",
        ),
        (
            f"{MESSAGES}?from=2025-01-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            400,
            "invalid-parameter",
            "from",
        ),
        (
            "/v1/analytics/daily_active_users?from=0001-01-01T00:00:00Z",
            400,
            "invalid-parameter",
            "from",
        ),
    ],
)
def test_bad_requests_are_refused_with_a_stable_code(
    endpoint: str, path: str, status: int, code: str, field: str | None
) -> None:
    answer_status, body = staff_get(f"{endpoint}{path}")
    assert answer_status == status
    assert body["code"] == code
    assert body["field"] == field
    assert body["message"]


def test_a_clickhouse_failure_answers_unavailable_and_the_endpoint_keeps_serving(
    local_stack: LocalStack, clickhouse: Client
) -> None:
    store = ClickHouseStore(clickhouse, "no_such_database_here", owns_client=False)
    try:
        with serving(staff_app(Analytics(store))) as url:
            status, body = staff_get(f"{url}/v1/analytics/messages_per_minute")
            assert status == 503
            assert body["code"] == "unavailable"
            assert staff_get(f"{url}/healthz") == (200, {"status": "ok"})
    finally:
        store.close()
