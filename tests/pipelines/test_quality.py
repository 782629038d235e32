"""The data-quality suites on the real stores: audit rows built by the ClickHouse sink's decoder
and inserted into the test's chDB database, serving rows written by the CQL sink's own write
rules into a migrated keyspace. A clean dataset passes every expectation; each kind of defect,
seeded alone, fails exactly the expectation for that kind; ``imstream quality check`` reads the
audit through the ClickHouse sink's HTTP API, exits 0/1/2 and writes Data Docs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from analytics.api import AnalyticsServer
from analytics.queries import Analytics
from core.settings import Settings
from pipelines.cli import app
from pipelines.quality.checks import CheckOptions, QualityReport, Thresholds, Topics, run_checks
from pipelines.quality.sources import CqlSample, DirectAuditReader
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
from sinks.cql.migrate import migrate
from sinks.cql.rules import MemberRow, Statements, UserConversationRow, WritePlanner
from tests.sinks.clickhouse_support import (
    at,
    created,
    new_prefix,
    next_record,
    prefixed_settings,
    presence,
    sent,
)
from tests.sinks.staff_support import staff_app, staff_get

pytestmark = pytest.mark.stack

T0 = at("2026-03-01T10:00:00")
SINCE = at("2026-03-01T00:00:00")
UNTIL = at("2026-03-02T00:00:00")
GROUP = "g-team"
GROUP_MEMBERS = ["bob", "carol", "dave"]
SCHEMA_TIMEOUT_SECONDS = 120.0


class _Reads:
    """The rules' reads, straight from the keyspace (the seed writes synchronously)."""

    def __init__(self, session: Session, statements: Statements) -> None:
        self.session = session
        self.s = statements

    def message_position(self, tenant_id: str, message_id: str) -> tuple[str, int] | None:
        rows = list(self.session.execute(self.s.select_message.bind((tenant_id, message_id))))
        return (str(rows[0].conversation_id), int(rows[0].seq)) if rows else None

    def members(self, tenant_id: str, conversation_id: str) -> list[MemberRow]:
        rows = self.session.execute(self.s.select_members.bind((tenant_id, conversation_id)))
        return [MemberRow(user_id=row.user_id, role=row.role) for row in rows]

    def user_conversations(
        self, tenant_id: str, user_id: str, conversation_id: str | None
    ) -> list[UserConversationRow]:
        raise AssertionError("the seed writes no record that reads the conversation list")

    def device_token(self, tenant_id: str, user_id: str, device_id: str) -> str | None:
        raise AssertionError("the seed writes no push token")

    def timeline_event(self, tenant_id: str, conversation_id: str, seq: int) -> str | None:
        raise AssertionError("the seed writes no recall")


@dataclass
class Seed:
    """Records of a realistic range: audit rows as the ClickHouse sink builds them, CQL writes
    as the CQL sink plans them, push outcomes as the push sender reports them."""

    catalog: TopicCatalog
    planner: WritePlanner
    tenant: str
    #: Shared by every test of the module: two records never share Kafka coordinates.
    offsets: dict[str, int]
    audit_rows: list[tuple[Any, ...]] = field(default_factory=list)
    cql_writes: list[Any] = field(default_factory=list)
    outcomes: list[tuple[Any, ...]] = field(default_factory=list)
    sync_ids: dict[str, int] = field(default_factory=dict)
    jobs: int = 0

    @property
    def dm(self) -> str:
        return ev.direct_conversation_id(self.tenant, "alice", "bob")

    def created(
        self, conversation_id: str, kind: ev.ConversationKind, members: list[str], moment: datetime
    ) -> ev.ConversationCreated:
        return created(conversation_id, kind, members, moment, tenant=self.tenant)

    def sent(
        self,
        sender: str,
        conversation_id: str,
        client_msg_id: str,
        moment: datetime,
        *,
        seq: int | None = None,
    ) -> ev.MessageSent:
        return sent(sender, conversation_id, client_msg_id, moment, tenant=self.tenant, seq=seq)

    def presence(self, user: str, moment: datetime) -> bytes:
        return ev.encode_event(presence(user, moment, tenant=self.tenant))

    def audit(self, topic: str, value: bytes, record_time: datetime) -> None:
        record = next_record(self.offsets, topic, value, record_time)
        self.audit_rows.append(AuditDecoder(self.catalog).audit(record).row.values())

    def sequenced(self, event: ev.Event, *, in_cql: bool = True, after_ms: int = 50) -> None:
        raw = ev.encode_event(event)
        self.audit(
            self.catalog.messages_sequenced.name,
            raw,
            event.occurred_at + timedelta(milliseconds=after_ms),
        )
        if in_cql:
            self.cql_writes.extend(self.planner.sequenced(event, raw))

    def sync(self, user: str, event: ev.Event, *, sync_id: int | None = None) -> None:
        next_id = self.sync_ids.get(user, 0) + 1 if sync_id is None else sync_id
        self.sync_ids[user] = max(self.sync_ids.get(user, 0), next_id)
        record = ev.SyncRecord(tenant_id=self.tenant, user_id=user, sync_id=next_id, event=event)
        self.audit(
            self.catalog.sync_events.name,
            record.model_dump_json().encode(),
            event.occurred_at + timedelta(milliseconds=80),
        )

    def conversation(self, event: ev.ConversationCreated) -> None:
        self.sequenced(event)
        for member in event.payload.members:
            self.sync(member, event)

    def message(self, message: ev.MessageSent, members: list[str]) -> None:
        self.sequenced(message)
        for member in members:
            self.sync(member, message)

    def push(self, provider: str, *outcomes: str) -> None:
        """One delivery (job, device) whose attempts came to ``outcomes`` in turn."""
        self.jobs += 1
        job = ev.derived_event_id(f"{self.tenant}/job-{self.jobs}", "push")
        for attempt, outcome in enumerate(outcomes, start=1):
            self.outcomes.append(
                (
                    job,
                    self.tenant,
                    "carol",
                    self.dm,
                    ev.message_event_id(self.tenant, "alice", "a1"),
                    T0,
                    f"carol-{provider}-{self.jobs}",
                    provider,
                    attempt,
                    outcome,
                    200 if outcome == "sent" else 500,
                    None,
                    T0 + timedelta(seconds=attempt),
                )
            )

    def store(self, clickhouse: Client, database: str, session: Session) -> None:
        if self.audit_rows:
            clickhouse.insert(
                AUDIT_TABLE, self.audit_rows, column_names=list(AUDIT_COLUMNS), database=database
            )
        if self.outcomes:
            clickhouse.insert(
                PUSH_OUTCOMES_TABLE,
                self.outcomes,
                column_names=list(PUSH_OUTCOME_COLUMNS),
                database=database,
            )
        for write in self.cql_writes:
            session.execute(write)
        self.audit_rows, self.outcomes, self.cql_writes = [], [], []


def clean(seed: Seed) -> None:
    """Two conversations with messages, their sync queues, a receipt (which carries a seq but
    is no timeline entry), a device event, push deliveries within the ratios."""
    seed.conversation(seed.created(seed.dm, ev.ConversationKind.DIRECT, ["alice", "bob"], T0))
    seed.conversation(seed.created(GROUP, ev.ConversationKind.GROUP, GROUP_MEMBERS, T0))
    for seq, (sender, client_msg_id) in enumerate(
        [("alice", "a1"), ("bob", "b1"), ("alice", "a2")], start=1
    ):
        moment = T0 + timedelta(seconds=10 * seq)
        seed.message(seed.sent(sender, seed.dm, client_msg_id, moment, seq=seq), ["alice", "bob"])
    for seq, sender in enumerate(GROUP_MEMBERS, start=1):
        moment = T0 + timedelta(seconds=10 * seq + 5)
        seed.message(seed.sent(sender, GROUP, f"{sender}-g", moment, seq=seq), GROUP_MEMBERS)
    seed.sequenced(
        ev.ReceiptRead.new(
            tenant_id=seed.tenant,
            actor=ev.Actor(user_id="bob"),
            occurred_at=T0 + timedelta(minutes=1),
            payload=ev.ReceiptReadPayload(conversation_id=seed.dm, conversation_seq=3),
        )
    )
    seed.audit(
        seed.catalog.presence.name,
        seed.presence("erin", T0),
        T0 + timedelta(milliseconds=5),
    )
    for _ in range(20):
        seed.push("apns", "sent")
    for _ in range(18):
        seed.push("fcm", "sent")
    seed.push("fcm", "throttled", "sent")  # the retry delivered it: a success
    seed.push("fcm", "invalid_token")


def duplicate_event_id(seed: Seed) -> None:
    # The same client send sequenced a second time (one send → two messages).
    message = seed.sent("alice", seed.dm, "a1", T0 + timedelta(minutes=2), seq=4)
    seed.message(message, ["alice", "bob"])


def seq_gap(seed: Seed) -> None:
    message = seed.sent("alice", seed.dm, "a3", T0 + timedelta(minutes=2), seq=5)
    seed.message(message, ["alice", "bob"])


def sync_id_not_increasing(seed: Seed) -> None:
    late = seed.sent("bob", seed.dm, "b2", T0 + timedelta(minutes=3))
    seed.sync("alice", late, sync_id=2)


def occurred_before_floor(seed: Seed) -> None:
    seed.audit(
        seed.catalog.presence.name,
        seed.presence("frank", at("2019-06-01T00:00:00")),
        T0 + timedelta(minutes=5),
    )


def occurred_ahead_of_record(seed: Seed) -> None:
    seed.audit(
        seed.catalog.presence.name,
        seed.presence("frank", T0 + timedelta(hours=2)),
        T0 + timedelta(minutes=5),
    )


def missing_from_timeline(seed: Seed) -> None:
    message = seed.sent("carol", GROUP, "c9", T0 + timedelta(minutes=2), seq=4)
    seed.sequenced(message, in_cql=False)


def member_of_missing_conversation(seed: Seed) -> None:
    # A membership change stored while the conversation's creation never was.
    added = ev.ConversationMemberAdded.new(
        tenant_id=seed.tenant,
        actor=ev.Actor(user_id="bob"),
        occurred_at=T0 + timedelta(minutes=4),
        payload=ev.ConversationMemberAddedPayload(conversation_id="g-ghost", user_id="zoe"),
    )
    seed.cql_writes.extend(seed.planner.sequenced(added, ev.encode_event(added)))


def conversation_without_members(seed: Seed) -> None:
    group = seed.created("g-empty", ev.ConversationKind.GROUP, ["erin"], T0 + timedelta(minutes=4))
    writes = seed.planner.sequenced(group, ev.encode_event(group))
    # Only the conversation's row: its member row was lost.
    seed.cql_writes.extend(
        write for write in writes if ".conversations (" in write.prepared_statement.query_string
    )


def push_failures(seed: Seed) -> None:
    for _ in range(5):
        seed.push("fcm", "throttled", "failed")


def push_invalid_tokens(seed: Seed) -> None:
    for _ in range(25):
        seed.push("apns", "invalid_token")


DEFECTS: dict[str, tuple[Callable[[Seed], None], str]] = {
    "duplicate-event-id": (duplicate_event_id, "audit-messages.message_ids_unique"),
    "seq-gap": (seq_gap, "audit-conversation-log.seq_strictly_increasing"),
    "sync-id-not-increasing": (
        sync_id_not_increasing,
        "audit-sync-queue.sync_ids_strictly_increasing",
    ),
    "occurred-before-floor": (
        occurred_before_floor,
        "audit-timestamps.occurred_at_not_before_floor",
    ),
    "occurred-ahead-of-record": (
        occurred_ahead_of_record,
        "audit-timestamps.occurred_at_not_ahead_of_record",
    ),
    "missing-from-timeline": (missing_from_timeline, "cql-timeline.sequenced_entries_in_timeline"),
    "member-of-missing-conversation": (
        member_of_missing_conversation,
        "cql-members.members_reference_conversations",
    ),
    "conversation-without-members": (
        conversation_without_members,
        "cql-conversations.conversations_have_members",
    ),
    "push-failure-share": (push_failures, "audit-push-outcomes.push_failure_share"),
    "push-invalid-token-share": (
        push_invalid_tokens,
        "audit-push-outcomes.push_invalid_token_share",
    ),
}


@dataclass
class Stores:
    settings: Settings
    catalog: TopicCatalog
    clickhouse: Client
    database: str
    session: Session
    keyspace: str
    seed: Seed

    def commit(self) -> None:
        self.seed.store(self.clickhouse, self.database, self.session)

    def check(self, docs_dir: Path, **overrides: Any) -> tuple[QualityReport, list[str]]:
        lines: list[str] = []
        report = run_checks(
            DirectAuditReader(self.clickhouse, self.database, "chDB"),
            CqlSample(self.session, self.keyspace, self.settings.sinks.timeline_bucket_size),
            Topics(
                conversation_log=self.catalog.messages_sequenced.name,
                sync_events=self.catalog.sync_events.name,
            ),
            CheckOptions(tenant=self.seed.tenant, since=SINCE, until=UNTIL, **overrides),
            docs_dir,
            lines.append,
        )
        return report, lines


@dataclass
class Shared:
    """The module's stores: one ClickHouse database and one migrated keyspace for every test
    (each test seeds a tenant of its own and checks that tenant): creating and dropping a
    keyspace per test costs seconds of Cassandra schema agreement each."""

    settings: Settings
    catalog: TopicCatalog
    database: str
    keyspace: str
    offsets: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def shared(
    local_stack: LocalStack, settings: Settings, clickhouse: Client, cql_session: Session
) -> Iterator[Shared]:
    name = f"t_quality_{uuid.uuid4().hex[:8]}"
    prefixed = prefixed_settings(settings, new_prefix("quality"), name)
    catalog = topic_catalog(prefixed)
    clickhouse.command(f"CREATE DATABASE {name}")
    schema = ClickHouseStore(clickhouse, name, owns_client=False)
    schema.apply_schema(catalog)
    schema.close()
    cql_session.execute(
        f"CREATE KEYSPACE {name} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        timeout=SCHEMA_TIMEOUT_SECONDS,
    )
    try:
        migrate(cql_session, name, 1)
        yield Shared(settings=prefixed, catalog=catalog, database=name, keyspace=name)
    finally:
        cql_session.execute(f"DROP KEYSPACE IF EXISTS {name}", timeout=SCHEMA_TIMEOUT_SECONDS)
        clickhouse.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def stores(shared: Shared, clickhouse: Client, cql_session: Session, unique_name: str) -> Stores:
    """The clean data, in a tenant of the test's own."""
    bucket_size = shared.settings.sinks.timeline_bucket_size
    statements = Statements(cql_session, shared.keyspace)
    planner = WritePlanner(
        statements,
        _Reads(cql_session, statements),
        timeline_bucket_size=bucket_size,
        sync_bucket_size=shared.settings.sinks.sync_bucket_size,
        sync_ttl_seconds=86400,
    )
    seed = Seed(
        catalog=shared.catalog,
        planner=planner,
        tenant=unique_name.replace("_", "-")[:64],
        offsets=shared.offsets,
    )
    clean(seed)
    stores = Stores(
        settings=shared.settings,
        catalog=shared.catalog,
        clickhouse=clickhouse,
        database=shared.database,
        session=cql_session,
        keyspace=shared.keyspace,
        seed=seed,
    )
    stores.commit()
    return stores


def test_clean_data_passes_every_expectation(stores: Stores, tmp_path: Path) -> None:
    report, lines = stores.check(tmp_path / "docs")
    assert report.success, [result for result in report.results if not result.success]
    assert {f"{result.suite}.{result.check}" for result in report.results} == {
        check for _, check in DEFECTS.values()
    }
    # The checks saw the data: 6 entries (the receipt is none), 5 messages... per frame.
    assert report.rows == {
        "messages": 6,
        "conversation_log": 6,
        "sync_queue": 5 + 15,
        "occurred_at_bounds": 3,
        "push_deliveries": 2,
        "timeline": 6,
        "members": 5,
        "conversations": 2,
    }
    assert report.notes == []
    assert report.docs_index == tmp_path / "docs" / "index.html"
    assert report.docs_index.is_file()
    assert any("conversation_log: 6 rows" in line for line in lines)


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_fails_exactly_its_expectation(
    stores: Stores, tmp_path: Path, defect: str
) -> None:
    seed_defect, expected = DEFECTS[defect]
    seed_defect(stores.seed)
    stores.commit()
    report, _ = stores.check(tmp_path / "docs")
    assert report.failed() == {expected}
    failed = next(r for r in report.results if f"{r.suite}.{r.check}" == expected)
    assert "unexpected" in failed.observed
    # Data Docs show the failed suite's validation.
    suite = expected.split(".", maxsplit=1)[0]
    assert list((tmp_path / "docs" / "validations" / suite).rglob("*.html"))


def test_the_timeline_check_waits_for_entries_to_settle(stores: Stores, tmp_path: Path) -> None:
    # An entry younger than the settle time may still be on its way to the CQL store.
    missing_from_timeline(stores.seed)
    stores.commit()
    report, _ = stores.check(tmp_path / "docs", thresholds=Thresholds(settle=timedelta(days=36500)))
    assert report.success
    assert report.rows["timeline"] == 0


def test_providers_with_too_few_deliveries_are_not_judged(stores: Stores, tmp_path: Path) -> None:
    push_failures(stores.seed)
    stores.commit()
    report, _ = stores.check(tmp_path / "docs", thresholds=Thresholds(push_min_deliveries=26))
    assert report.success
    assert report.rows["push_deliveries"] == 0
    assert [note for note in report.notes if note.startswith("push provider")] == [
        "push provider apns: 20 deliveries in the window, fewer than --push-min-deliveries 26: "
        "not judged",
        "push provider fcm: 25 deliveries in the window, fewer than --push-min-deliveries 26: "
        "not judged",
    ]


def test_the_cli_reads_the_audit_through_the_sink_api(stores: Stores, tmp_path: Path) -> None:
    store = ClickHouseStore(stores.clickhouse, stores.database, owns_client=False)
    server = AnalyticsServer(staff_app(Analytics(store)), "127.0.0.1", 0)
    server.start()
    runner = CliRunner()
    environment = {
        "IM_CQL__KEYSPACE": stores.keyspace,
        "IM_KAFKA__TOPIC_PREFIX": stores.settings.kafka.topic_prefix,
    }
    arguments = [
        "quality",
        "check",
        "--tenant",
        stores.seed.tenant,
        "--since",
        "2026-03-01T00:00:00Z",
        "--until",
        "2026-03-02T00:00:00Z",
        "--api-url",
        server.url,
    ]
    try:
        docs = tmp_path / "clean"
        result = runner.invoke(app, [*arguments, "--docs-dir", str(docs)], env=environment)
        assert result.exit_code == 0, result.output
        assert (docs / "index.html").is_file()
        assert f"data docs: {docs / 'index.html'}" in result.output
        assert "audit-conversation-log  seq_strictly_increasing" in result.output
        assert "FAIL" not in result.output

        missing_from_timeline(stores.seed)
        stores.commit()
        docs = tmp_path / "defect"
        result = runner.invoke(app, [*arguments, "--docs-dir", str(docs)], env=environment)
        assert result.exit_code == 1, result.output
        failed = [line for line in result.output.splitlines() if "FAIL" in line]
        assert len(failed) == 1
        assert "sequenced_entries_in_timeline" in failed[0]
        assert "conversation_id=g-team conversation_seq=4" in failed[0]
        assert (docs / "index.html").is_file()

        # A Data Docs directory that cannot be written: the checks cannot report.
        result = runner.invoke(
            app, [*arguments, "--docs-dir", "/proc/imstream-quality"], env=environment
        )
        assert result.exit_code == 2, result.output
        assert "[docs-unwritable]" in result.output

        # The API refuses bad requests with a stable code.
        status, body = staff_get(f"{server.url}/v1/quality/datasets/nope")
        assert (status, body["code"]) == (404, "unknown-dataset")
        status, body = staff_get(f"{server.url}/v1/quality/datasets/conversation_log?limit=10")
        assert (status, body["code"], body["field"]) == (400, "invalid-parameter", "topic")
        status, body = staff_get(
            f"{server.url}/v1/quality/datasets/push_deliveries?since=yesterday"
        )
        assert (status, body["code"], body["field"]) == (400, "invalid-parameter", "since")
        status, body = staff_get(f"{server.url}/v1/quality/datasets/push_deliveries?sql=1")
        assert (status, body["code"]) == (400, "unknown-parameter")
    finally:
        server.stop()

    # Nobody answers on the API's address any more: exit 2 with the code and what to do.
    result = runner.invoke(app, [*arguments, "--docs-dir", str(tmp_path / "x")], env=environment)
    assert result.exit_code == 2, result.output
    assert "[audit-unavailable]" in result.output
    assert "imstream run clickhouse-sink" in result.output
    result = runner.invoke(app, [*arguments, "--since", "last week"], env=environment)
    assert result.exit_code == 2
    assert "[invalid-option]" in result.output
