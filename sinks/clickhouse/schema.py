"""The ClickHouse schema of the audit log and the analytics on it (docs/analytics.md).

``audit_events`` holds one row per Kafka record of every topic the ClickHouse sink reads. It is a
``ReplacingMergeTree`` whose sorting key contains the record's coordinates
``(topic, partition, offset)``; every other key column (tenant, event type, time) and the
partition key are functions of the record itself, so every copy of one Kafka record — a replay,
a batch inserted again after a crash — has the same key and lands in the same partition, and
merges (or ``FINAL`` at read time) keep exactly one. Among copies, the one inserted first wins
(the version column is the bitwise complement of ``ingested_at``), so that "when was it stored"
does not move when a topic is replayed.

The analytics are plain views over ``audit_events FINAL`` (and ``push_outcomes FINAL``): they hold
no data of their own, so a replay cannot double count them. Materialized views would be fed
insert blocks *before* deduplication, which is exactly what a replay must not count twice.

Everything here is idempotent — tables are created if missing, views are replaced (they hold no
data) — and is applied by the sink at start (``apply_schema``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Final

from clickhouse_connect.driver.client import Client

from schemas.events import DIRECT_CONVERSATION_PREFIX
from schemas.topics import Topic, TopicCatalog

log = logging.getLogger(__name__)

AUDIT_TABLE = "audit_events"
PUSH_OUTCOMES_TABLE = "push_outcomes"
#: Consumer-group lag samples the ClickHouse sink takes (analytics/lag.py).
CONSUMER_LAG_TABLE = "consumer_lag"

#: The columns the sink writes, in the order of ``AuditRow.values()``; ``ingested_at`` is filled
#: by ClickHouse when the insert is stored, ``first_insert_wins`` is computed from it.
AUDIT_COLUMNS: tuple[str, ...] = (
    "topic",
    "partition",
    "offset",
    "record_key",
    "record_timestamp",
    "event_id",
    "event_type",
    "tenant_id",
    "conversation_id",
    "user_id",
    "sync_id",
    "conversation_seq",
    "occurred_at",
    "error_code",
    "error_message",
    "error_source_topic",
    "error_source_partition",
    "error_source_offset",
    "raw",
)

#: The columns of ``push_outcomes`` the sink writes, in the order of ``PushOutcomeRow.values()``.
PUSH_OUTCOME_COLUMNS: tuple[str, ...] = (
    "job_id",
    "tenant_id",
    "user_id",
    "conversation_id",
    "message_id",
    "job_occurred_at",
    "device_id",
    "provider",
    "attempt",
    "outcome",
    "status_code",
    "reason",
    "attempted_at",
)

#: The event types the analytics name.
MESSAGE_SENT = "message.sent"
CONVERSATION_CREATED = "conversation.created"
#: ``event_type`` of a record that could not be decoded (its raw value is kept).
UNDECODABLE = "undecodable"
#: ``event_type`` of a push job (not an event: it has no ``type`` of its own).
PUSH_JOB = "push.job"
#: ``event_type`` of a push outcome record (``PushOutcomeRecord``).
PUSH_OUTCOME = "push.outcome"
#: ``event_type`` of a record with no value on a compacted topic (a deletion).
TOMBSTONE = "tombstone"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class SchemaNameError(ValueError):
    """The configured database name cannot be used as a ClickHouse identifier."""


def quote_identifier(name: str) -> str:
    """``name`` as a ClickHouse identifier; only plain names are accepted (they come from
    settings, never from a client)."""
    if not _IDENTIFIER.match(name):
        raise SchemaNameError(
            f"ClickHouse database name {name!r} must be letters, digits and underscores "
            "(IM_CLICKHOUSE__DATABASE)"
        )
    return f"`{name}`"


def sql_string(value: str) -> str:
    """``value`` as a ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _string_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(sql_string(value) for value in values) + "]"


def audited_topics(catalog: TopicCatalog) -> tuple[Topic, ...]:
    """What the sink reads: every source that carries events or records (all but the
    processors' state topics), then every dead-letter topic."""
    state = {
        catalog.conversation_state.name,
        catalog.message_state.name,
        catalog.user_state.name,
        catalog.known_users.name,
    }
    sources = tuple(topic for topic in catalog.sources() if topic.name not in state)
    return (*sources, *catalog.dead_letters)


def inbound_topics(catalog: TopicCatalog) -> tuple[Topic, ...]:
    """The topics clients write through the ingress: their actors are the active users."""
    return tuple(topic for topic in catalog.sources() if topic.ingress)


def schema_statements(database: str, catalog: TopicCatalog) -> list[str]:
    """Every statement of the schema, in the order to apply them."""
    db = quote_identifier(database)
    audit = f"{db}.{AUDIT_TABLE}"
    outcomes = f"{db}.{PUSH_OUTCOMES_TABLE}"
    sequenced = sql_string(catalog.messages_sequenced.name)
    push_jobs = sql_string(catalog.push_jobs.name)
    inbound = _string_list([topic.name for topic in inbound_topics(catalog)])
    dead_letter_names = [topic.name for topic in catalog.dead_letters]
    dead_letter_sources = [
        source.name for source in catalog.sources() if source.dead_letter is not None
    ]
    dead_letters = _string_list(dead_letter_names)
    direct_prefix = sql_string(DIRECT_CONVERSATION_PREFIX)
    # quantileExact is deterministic (a value of the set, no sampling): a replay, or the same
    # data read twice, gives the same answer.
    latency_columns = (
        "count() AS messages, "
        "quantileExact(0.5)(latency_ms) AS p50_ms, "
        "quantileExact(0.9)(latency_ms) AS p90_ms, "
        "quantileExact(0.99)(latency_ms) AS p99_ms, "
        "max(latency_ms) AS max_ms"
    )
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"""
CREATE TABLE IF NOT EXISTS {audit}
(
    topic LowCardinality(String) COMMENT 'Kafka topic (full name, with the deployment prefix)',
    partition UInt32,
    offset UInt64,
    record_key Nullable(String) COMMENT 'the Kafka record key',
    record_timestamp DateTime64(3, 'UTC') COMMENT 'the Kafka record timestamp',
    event_id Nullable(UUID) COMMENT 'the event id; a push job''s job_id',
    event_type LowCardinality(String)
        COMMENT 'the event type; push.job, tombstone or undecodable for records without one',
    tenant_id String COMMENT 'empty when the record could not be decoded',
    conversation_id Nullable(String),
    user_id Nullable(String)
        COMMENT 'the actor; the record''s user for user-keyed records and device events',
    sync_id Nullable(UInt64) COMMENT 'the entry''s place in the user''s sync queue',
    conversation_seq Nullable(UInt64),
    occurred_at DateTime64(6, 'UTC')
        COMMENT 'when the event happened; the record timestamp if it could not be decoded',
    ingested_at DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC')
        COMMENT 'when the row was stored in ClickHouse (the first copy''s time)',
    error_code LowCardinality(Nullable(String))
        COMMENT 'dead-letter topics: the imstream.error.code header; else why it is undecodable',
    error_message Nullable(String),
    error_source_topic LowCardinality(Nullable(String))
        COMMENT 'dead-letter topics: the topic the record was rejected from',
    error_source_partition Nullable(UInt32),
    error_source_offset Nullable(UInt64),
    raw String COMMENT 'the record value, byte for byte',
    first_insert_wins UInt64 MATERIALIZED bitNot(toUInt64(toUnixTimestamp64Micro(ingested_at)))
        COMMENT 'the version: the earliest insert of a record has the highest'
)
ENGINE = ReplacingMergeTree(first_insert_wins)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, event_type, occurred_at, topic, partition, offset)
COMMENT 'One row per Kafka record: read with FINAL for exact results (docs/analytics.md)'
""",
        f"""
CREATE TABLE IF NOT EXISTS {outcomes}
(
    job_id UUID COMMENT 'the PushJob''s job_id',
    tenant_id String,
    user_id String,
    conversation_id String,
    message_id UUID,
    job_occurred_at DateTime64(6, 'UTC') COMMENT 'the PushJob''s occurred_at',
    device_id String COMMENT 'empty when the job reached no device (attempt 0, skipped)',
    provider LowCardinality(String) COMMENT 'apns or fcm; empty when the job reached no device',
    attempt UInt16 COMMENT '1 for the first delivery attempt to the device',
    outcome LowCardinality(String)
        COMMENT 'sent, invalid_token, throttled, failed or skipped (PushOutcomeRecord.outcome)',
    status_code Nullable(UInt16) COMMENT 'the provider''s HTTP status',
    reason Nullable(String) COMMENT 'the provider''s reason, if any',
    attempted_at DateTime64(6, 'UTC'),
    recorded_at DateTime64(6, 'UTC') DEFAULT now64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(recorded_at)
PARTITION BY toYYYYMM(job_occurred_at)
ORDER BY (tenant_id, job_id, device_id, attempt)
COMMENT 'Push delivery outcomes, one row per (job, device, attempt), written by the push sender'
""",
        f"""
CREATE OR REPLACE VIEW {db}.messages_per_minute AS
SELECT
    messages.tenant_id AS tenant_id,
    toStartOfMinute(messages.occurred_at) AS minute,
    if(kinds.kind != '', kinds.kind,
       if(startsWith(messages.conversation_id, {direct_prefix}), 'direct', 'group'))
        AS conversation_kind,
    count() AS messages
FROM
(
    SELECT tenant_id, occurred_at, assumeNotNull(conversation_id) AS conversation_id
    FROM {audit} FINAL
    WHERE topic = {sequenced} AND event_type = {sql_string(MESSAGE_SENT)}
) AS messages
LEFT JOIN
(
    SELECT tenant_id, assumeNotNull(conversation_id) AS conversation_id,
           any(JSONExtractString(raw, 'payload', 'kind')) AS kind
    FROM {audit} FINAL
    WHERE topic = {sequenced} AND event_type = {sql_string(CONVERSATION_CREATED)}
    GROUP BY tenant_id, conversation_id
) AS kinds
ON messages.tenant_id = kinds.tenant_id AND messages.conversation_id = kinds.conversation_id
GROUP BY tenant_id, minute, conversation_kind
""",
        f"""
CREATE OR REPLACE VIEW {db}.daily_active_users AS
SELECT tenant_id, toDate(occurred_at) AS day, uniqExact(user_id) AS active_users
FROM {audit} FINAL
WHERE topic IN {inbound} AND user_id IS NOT NULL
GROUP BY tenant_id, day
""",
        f"""
CREATE OR REPLACE VIEW {db}.monthly_active_users AS
SELECT tenant_id, toStartOfMonth(occurred_at) AS month, uniqExact(user_id) AS active_users
FROM {audit} FINAL
WHERE topic IN {inbound} AND user_id IS NOT NULL
GROUP BY tenant_id, month
""",
        f"""
CREATE OR REPLACE VIEW {db}.send_to_sequenced_latency AS
SELECT tenant_id, toStartOfMinute(occurred_at) AS minute, {latency_columns}
FROM
(
    SELECT tenant_id, occurred_at,
           (toUnixTimestamp64Micro(record_timestamp) - toUnixTimestamp64Micro(occurred_at))
               / 1000 AS latency_ms
    FROM {audit} FINAL
    WHERE topic = {sequenced} AND event_type = {sql_string(MESSAGE_SENT)}
)
GROUP BY tenant_id, minute
""",
        f"""
CREATE OR REPLACE VIEW {db}.sequenced_to_stored_latency AS
SELECT tenant_id, toStartOfMinute(record_timestamp) AS minute, {latency_columns}
FROM
(
    SELECT tenant_id, record_timestamp,
           (toUnixTimestamp64Micro(ingested_at) - toUnixTimestamp64Micro(record_timestamp))
               / 1000 AS latency_ms
    FROM {audit} FINAL
    WHERE topic = {sequenced} AND event_type = {sql_string(MESSAGE_SENT)}
)
GROUP BY tenant_id, minute
""",
        f"""
CREATE OR REPLACE VIEW {db}.push_jobs_per_minute AS
SELECT tenant_id, toStartOfMinute(occurred_at) AS minute, count() AS jobs,
       sum(JSONExtractUInt(raw, 'merged_count')) AS merged_messages,
       uniqExact(user_id) AS users
FROM {audit} FINAL
WHERE topic = {push_jobs} AND event_type = {sql_string(PUSH_JOB)}
GROUP BY tenant_id, minute
""",
        f"""
CREATE OR REPLACE VIEW {db}.push_outcomes_per_minute AS
SELECT tenant_id, toStartOfMinute(attempted_at) AS minute, provider, outcome,
       count() AS attempts, uniqExact(job_id) AS jobs
FROM {outcomes} FINAL
GROUP BY tenant_id, minute, provider, outcome
""",
        # One dead letter per rejected source record, whichever stages dead-lettered it and
        # however often: counted by the source coordinates the headers name.
        f"""
CREATE OR REPLACE VIEW {db}.dead_letters_per_minute AS
SELECT toStartOfMinute(dead_lettered_at) AS minute, tenant_id, source_topic, error_code,
       count() AS dead_letters
FROM
(
    SELECT
        coalesce(error_source_topic,
                 transform(topic, {dead_letters}, {_string_list(dead_letter_sources)}, ''))
            AS source_topic,
        coalesce(error_source_partition, partition) AS source_partition,
        coalesce(error_source_offset, offset) AS source_offset,
        coalesce(error_code, 'unknown') AS error_code,
        min(record_timestamp) AS dead_lettered_at,
        any(tenant_id) AS tenant_id
    FROM {audit} FINAL
    WHERE topic IN {dead_letters}
    GROUP BY source_topic, source_partition, source_offset, error_code
)
GROUP BY minute, tenant_id, source_topic, error_code
""",
        # Row-level views for the dashboards (dashboards/): panels aggregate them over any
        # interval (quantiles of per-minute quantiles would be wrong).
        f"""
CREATE OR REPLACE VIEW {db}.sequenced_events AS
SELECT tenant_id, event_type, assumeNotNull(conversation_id) AS conversation_id, user_id,
       conversation_seq, occurred_at, record_timestamp AS sequenced_at, ingested_at AS stored_at,
       raw
FROM {audit} FINAL
WHERE topic = {sequenced}
""",
        f"""
CREATE OR REPLACE VIEW {db}.sync_entries AS
SELECT tenant_id, event_type, assumeNotNull(user_id) AS user_id, conversation_id, sync_id,
       occurred_at, record_timestamp AS queued_at,
       JSONExtractString(raw, 'event', 'actor', 'user_id') AS actor_id
FROM {audit} FINAL
WHERE topic = {sql_string(catalog.sync_events.name)}
""",
        f"""
CREATE TABLE IF NOT EXISTS {db}.{CONSUMER_LAG_TABLE}
(
    sampled_at DateTime64(3, 'UTC'),
    process LowCardinality(String) COMMENT 'the process kind reading as the group',
    group_id LowCardinality(String),
    lag UInt64 COMMENT 'records: end offsets minus committed offsets (core/lag.py)'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(sampled_at)
ORDER BY (group_id, sampled_at)
TTL toDateTime(sampled_at) + INTERVAL 90 DAY
COMMENT 'Consumer-group lag sampled by the ClickHouse sink every few seconds'
""",
    ]


#: The views ``schema_statements`` creates, for tests and the docs.
VIEWS: tuple[str, ...] = (
    "messages_per_minute",
    "daily_active_users",
    "monthly_active_users",
    "send_to_sequenced_latency",
    "sequenced_to_stored_latency",
    "push_jobs_per_minute",
    "push_outcomes_per_minute",
    "dead_letters_per_minute",
    "sequenced_events",
    "sync_entries",
)


def apply_schema(client: Client, database: str, catalog: TopicCatalog) -> None:
    """Create the database, tables and views if missing and bring the views up to date.

    Idempotent; blocking (call it through the store's thread for chDB). Then the message
    search table and its feed (below)."""

    for statement in schema_statements(database, catalog):
        client.command(statement)
    apply_search_schema(client, database, catalog.messages_sequenced.name, AUDIT_TABLE)


# -- the message search table (analytics.search queries it; docs/analytics.md#search) ------

SEARCH_TABLE: Final = "message_search"
SEARCH_FEED: Final = "message_search_feed"
MESSAGE_EDITED: Final = "message.edited"
MESSAGE_RECALLED: Final = "message.recalled"


#: The skip indexes bench/search.py compares; ``SEARCH_INDEX`` is the one the schema uses.
INDEXES: Final[dict[str, str]] = {
    "text": "INDEX text_norm_tokens text_norm TYPE text(tokenizer = splitByNonAlpha)",
    "tokenbf": "INDEX text_norm_tokens text_norm TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1",
    "ngrambf": "INDEX text_norm_tokens text_norm TYPE ngrambf_v1(3, 65536, 3, 0) GRANULARITY 1",
    "none": "",
}
SEARCH_INDEX: Final = "text"


def normalized(column: str) -> str:
    """The SQL that normalizes ``column`` as ``search_query.tokenize`` does: lower case, every
    run of characters that are not letters or digits one space, no space at either end."""
    return f"trimBoth(replaceRegexpAll(lowerUTF8({column}), '[^\\\\p{{L}}\\\\p{{N}}]+', ' '))"


def search_table_ddl(database: str, index: str = SEARCH_INDEX, table: str = SEARCH_TABLE) -> str:
    db = quote_identifier(database)
    index_clause = f",\n    {INDEXES[index]}" if INDEXES[index] else ""
    return f"""
CREATE TABLE IF NOT EXISTS {db}.{quote_identifier(table)}
(
    tenant_id LowCardinality(String),
    conversation_id String,
    message_id UUID COMMENT 'the message: its message.sent event id',
    event_id UUID COMMENT 'the event of this row',
    kind LowCardinality(String) COMMENT 'message.sent, message.edited or message.recalled',
    seq UInt64 COMMENT 'message.sent rows: the message''s conversation_seq; else 0',
    event_seq UInt64 COMMENT 'the conversation_seq the event took: the latest text wins',
    sender_id String COMMENT 'message.sent rows: the sender; else empty',
    occurred_at DateTime64(6, 'UTC'),
    text String COMMENT 'the text body sent or edited; empty for other bodies and recalls',
    text_norm String
        COMMENT 'text lower-cased, runs of non letters/digits as one space'{index_clause}
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, kind, conversation_id, message_id, event_id)
COMMENT 'One row per message event; fold per message at read time (analytics/search.py)'
"""


def _feed_select(audit: str, sequenced_topic: str) -> str:
    """The search rows of the audit rows of message events (never fails on a row: the audit
    insert it rides on must not)."""
    kinds = ", ".join(sql_string(kind) for kind in (MESSAGE_SENT, MESSAGE_EDITED, MESSAGE_RECALLED))
    sent = sql_string(MESSAGE_SENT)
    return f"""
SELECT
    tenant_id,
    assumeNotNull(conversation_id) AS conversation_id,
    if(event_type = {sent}, assumeNotNull(event_id),
       toUUIDOrZero(JSONExtractString(raw, 'payload', 'message_id'))) AS message_id,
    assumeNotNull(event_id) AS event_id,
    event_type AS kind,
    if(event_type = {sent}, assumeNotNull(conversation_seq), 0) AS seq,
    assumeNotNull(conversation_seq) AS event_seq,
    if(event_type = {sent}, ifNull(user_id, ''), '') AS sender_id,
    occurred_at,
    JSONExtractString(raw, 'payload', 'body', 'text') AS text,
    {normalized("text")} AS text_norm
FROM {audit}
WHERE topic = {sql_string(sequenced_topic)} AND event_type IN ({kinds})
  AND conversation_id IS NOT NULL AND event_id IS NOT NULL AND conversation_seq IS NOT NULL
"""


def search_statements(database: str, sequenced_topic: str, audit_table: str) -> list[str]:
    """The search table, the view that feeds it from every audit insert, and the backfill from
    the audit rows already stored (only while the search table is empty: the first start after
    the table was added)."""
    db = quote_identifier(database)
    audit = f"{db}.{quote_identifier(audit_table)}"
    table = f"{db}.{SEARCH_TABLE}"
    select = _feed_select(audit, sequenced_topic)
    return [
        search_table_ddl(database),
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{SEARCH_FEED} TO {table} AS {select}",
        f"INSERT INTO {table} {select} AND (SELECT count() FROM {table}) = 0",
    ]


def apply_search_schema(
    client: Client, database: str, sequenced_topic: str, audit_table: str
) -> str:
    """Apply :func:`search_statements`; the index kind the table has is returned. A ClickHouse
    that refuses the ``text`` index (older releases: experimental, other tokenizer names) gets
    ``tokenbf_v1`` instead: the same queries, answered from a bloom filter."""
    table, *rest = search_statements(database, sequenced_topic, audit_table)
    kind = SEARCH_INDEX
    try:
        client.command(table)
    except Exception as error:  # the server's refusal; no common base worth naming
        kind = "tokenbf"
        log.warning(
            "ClickHouse refused the text index (%s); the search table uses %s instead",
            error,
            INDEXES[kind],
        )
        client.command(search_table_ddl(database, kind))
    for statement in rest:
        client.command(statement)
    return kind


# -- requests -------------------------------------------------------------------------------
