"""The one settings object of imstream.

Only this module reads the environment. Every variable starts with ``IM_``; nested groups use a
double underscore, e.g. ``IM_KAFKA__BOOTSTRAP_SERVERS`` or ``IM_STACK__STATE_DIR``.
Processes build a :class:`Settings` once at start-up and pass explicit values to
the constructors they call.
"""

from __future__ import annotations

import base64
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.push_settings import PushProviderSettings

#: The key-encryption key of a development stack (base64 of 32 ASCII bytes): public, dev only.
DEV_MASTER_KEY = "ZGV2LW9ubHktaW5zZWN1cmUtbWFzdGVyLWtleS0zMmI="
#: Secrets that ship as defaults so that a developer can start the stack with no set-up. They are
#: refused in any profile but ``dev``.
PLACEHOLDER_SECRETS = frozenset(
    {
        "dev-only-insecure-jwt-secret-change-me",
        "dev-only-insecure-staff-secret-change-me",
        "dev-only-insecure-service-secret-change-me",
        DEV_MASTER_KEY,
        "",
    }
)

Port = Annotated[int, Field(ge=1, le=65535)]


class Profile(StrEnum):
    DEV = "dev"
    TEST = "test"
    PROD = "prod"


class _Group(BaseModel):
    """A nested settings group; an unknown ``IM_GROUP__KEY`` is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _pair(group: BaseModel, prefix: str, first: str, second: str) -> None:
    """Refuse one of two settings that only mean something together (a certificate and its
    key, a user name and its password)."""
    if (getattr(group, first) is None) != (getattr(group, second) is None):
        raise ValueError(f"{prefix}{first.upper()} and {prefix}{second.upper()} go together")


class KafkaSecurityProtocol(StrEnum):
    """librdkafka's ``security.protocol``: compose runs ``SASL_SSL``, the local stack
    ``PLAINTEXT`` on loopback (docs/operations.md, "TLS and credentials")."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSaslMechanism(StrEnum):
    SCRAM_SHA_512 = "SCRAM-SHA-512"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    PLAIN = "PLAIN"


class KafkaSettings(_Group):
    """How every process reaches Kafka."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id_prefix: str = "imstream"
    topic_prefix: str = ""
    replication_factor: Annotated[int, Field(ge=1)] = 1
    #: Partitions of the conversation-keyed and of the user-keyed topics (each group shares one
    #: count: co-partitioning). More partitions let more worker replicas share the work; each
    #: partition a transaction writes costs the broker a verification and a marker, so a one-box
    #: deployment pays for partitions it cannot use (docs/performance.md: 2 instead of 6 took
    #: 22 to 32% off Kafka's CPU per message on the development machine). Set before the topics
    #: are created: Kafka can add partitions but a key would then move to another one.
    conversation_partitions: Annotated[int, Field(ge=1, le=1000)] = 6
    user_partitions: Annotated[int, Field(ge=1, le=1000)] = 6
    security_protocol: KafkaSecurityProtocol = KafkaSecurityProtocol.PLAINTEXT
    sasl_mechanism: KafkaSaslMechanism = KafkaSaslMechanism.SCRAM_SHA_512
    #: This process's principal (one per service in compose: its ACLs allow what it needs).
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = Field(
        default=None,
        description="CA bundle (PEM) the brokers' certificates are verified with; "
        "default the system's",
    )
    #: A client certificate and key (PEM), for brokers that ask for one (mutual TLS).
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None

    @model_validator(mode="after")
    def _credentials_complete(self) -> Self:
        _pair(self, "IM_KAFKA__", "sasl_username", "sasl_password")
        _pair(self, "IM_KAFKA__", "ssl_certificate_location", "ssl_key_location")
        uses_sasl = self.security_protocol.startswith("SASL_")
        if uses_sasl and self.sasl_username is None:
            raise ValueError(
                f"IM_KAFKA__SECURITY_PROTOCOL={self.security_protocol} needs "
                "IM_KAFKA__SASL_USERNAME and IM_KAFKA__SASL_PASSWORD"
            )
        return self


class CqlSettings(_Group):
    """How every process reaches the CQL store (Cassandra locally, ScyllaDB in production)."""

    contact_points: list[str] = ["127.0.0.1"]
    port: Port = 9042
    keyspace: str = "imstream"
    replication_factor: Annotated[int, Field(ge=1)] = 1
    local_datacenter: str = "datacenter1"
    #: The native protocol version; unset, the driver negotiates the highest both sides speak
    #: (v5 with Cassandra 5, v4 with ScyllaDB).
    protocol_version: Annotated[int, Field(ge=3, le=5)] | None = None
    #: Compress CQL frames (LZ4 or Snappy, as the server offers). Off by default: on a loopback
    #: or a data-centre LAN it costs both sides CPU and saves no time (measured in bench/e2e.py).
    compression: bool = False
    username: str | None = None
    password: SecretStr | None = None
    #: TLS to the CQL nodes (ScyllaDB's client_encryption_options), verified against this CA
    #: bundle (PEM) and the contact point's name; unset, the connection is plain.
    ssl_ca_path: Path | None = None
    #: A client certificate and key (PEM), for nodes that require one.
    ssl_cert_path: Path | None = None
    ssl_key_path: Path | None = None
    #: Check that the node's certificate names the address connected to (off only for nodes
    #: reached by addresses their certificates do not hold).
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _credentials_complete(self) -> Self:
        _pair(self, "IM_CQL__", "ssl_cert_path", "ssl_key_path")
        return self


class ClickHouseSettings(_Group):
    """Where ClickHouse lives: in-process chDB by default, a server over HTTP if ``url`` is set."""

    url: str | None = None
    database: str = "imstream"
    username: str = "default"
    password: SecretStr = SecretStr("")
    #: The CA bundle (PEM) an ``https://`` server's certificate is verified with; default the
    #: system's.
    ca_path: Path | None = None
    chdb_path: Path | None = Field(
        default=None,
        description="chDB data path; defaults to <stack.state_dir>/clickhouse",
    )


class AuthSettings(_Group):
    jwt_algorithm: str = "HS256"
    jwt_secret: SecretStr = SecretStr("dev-only-insecure-jwt-secret-change-me")
    jwt_public_key_path: Path | None = None
    jwt_issuer: str = "imstream"
    jwt_audience: str = "imstream-clients"
    jwt_leeway_seconds: Annotated[float, Field(ge=0)] = 30.0
    jwt_max_lifetime_seconds: Annotated[float, Field(gt=0)] = Field(
        default=24 * 3600.0,
        description="How long a token may be valid, from its iat and from when it is "
        "presented; a token valid for longer is refused as token-invalid. A revocation is kept "
        "in memory this long (plus twice the leeway) after its moment",
    )
    jwks_path: Path | None = Field(
        default=None,
        description="A JSON Web Key Set file (RS256 RSA keys, HS256 oct keys, each with a kid): "
        "a token whose header names a kid is verified with that key; re-read when it changes, "
        "so keys rotate without a restart. The single key (jwt_secret or jwt_public_key_path) "
        "still verifies tokens without a kid",
    )
    jwks_url: str | None = Field(
        default=None,
        description="The identity service's JWKS URL (jwks_uri), instead of jwks_path: fetched "
        "every jwks_refresh_seconds, and soon after a token names a kid not held",
    )
    jwks_check_seconds: Annotated[float, Field(gt=0)] = Field(
        default=2.0,
        description="How often, at most, the JWKS file is looked at for a change (or the URL "
        "fetched for an unknown kid)",
    )
    jwks_refresh_seconds: Annotated[float, Field(gt=0)] = Field(
        default=300.0, description="How often the JWKS URL is fetched anyway"
    )


class StaffAuthSettings(_Group):
    """Tokens of the staff — operators and analysts — for the ClickHouse sink's API (port 8091).

    A separate issuer, audience and key from the clients' (``IM_AUTH__*``): a client token,
    whatever roles or tenant it claims, never opens a staff route, and a leaked client key
    signs no operator. Roles: ``operator`` (replays, rebuilds, and every read),
    ``platform-analyst`` (every tenant's analytics, read-only) and ``analyst`` (the analytics of
    the token's own tenant, ``tid``, only). ``imstream`` CLI commands sign a short-lived token
    from ``secret`` when it is HS256; with RS256 they need one given (``IM_STAFF_TOKEN``).
    """

    algorithm: str = "HS256"
    secret: SecretStr = SecretStr("dev-only-insecure-staff-secret-change-me")
    public_key_path: Path | None = None
    issuer: str = "imstream-staff"
    audience: str = "imstream-ops"
    leeway_seconds: Annotated[float, Field(ge=0)] = 30.0
    max_lifetime_seconds: Annotated[float, Field(gt=0)] = Field(
        default=12 * 3600.0,
        description="How far in the future a staff token's exp may be when it is presented",
    )
    token: SecretStr | None = Field(
        default=None,
        description="A staff token the imstream CLI sends instead of signing one (RS256 "
        "deployments, or an operator without the staff secret)",
    )


class ServiceAuthSettings(_Group):
    """The ingress's own identity towards the ClickHouse sink: ``POST /v1/search/scoped``.

    The ingress signs a short-lived token (role ``ingress``) per user search with ``secret``,
    naming the user (``sub``) and tenant (``tid``) it authenticated; the sink searches that
    tenant, never one named in the body. A key of its own, so that neither a client nor a staff
    key can speak for the ingress, and only the ingress and the sink hold it.
    """

    secret: SecretStr = SecretStr("dev-only-insecure-service-secret-change-me")
    issuer: str = "imstream-ingress"
    audience: str = "imstream-search"
    token_ttl_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0


class IngressSettings(_Group):
    host: str = "127.0.0.1"
    port: Port = 8080
    tls_cert_path: Path | None = Field(
        default=None,
        description="Certificate chain (PEM); with tls_key_path the node serves https and wss "
        "only, TLS 1.3 at least (unset: plain http and ws, for a local run or behind a TLS proxy)",
    )
    tls_key_path: Path | None = None
    node_id: str = "ingress-1"
    max_frame_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    kafka_message_timeout_ms: Annotated[int, Field(ge=100)] = 5000
    kafka_linger_ms: Annotated[int, Field(ge=0)] = 2
    kafka_max_queued_messages: Annotated[int, Field(ge=1)] = 100_000
    unavailable_retry_after_ms: Annotated[int, Field(ge=0)] = 1000
    readyz_timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    shutdown_flush_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    rate_limit_per_second: Annotated[float, Field(gt=0)] = 20.0
    rate_limit_burst: Annotated[float, Field(ge=1)] = 40.0
    user_rate_limit_per_second: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="Commands per second of all of one user's devices on a node together; "
        "default twice the device rate",
    )
    user_rate_limit_burst: Annotated[float, Field(ge=1)] | None = Field(
        default=None, description="Default twice the device burst"
    )
    tenant_rate_limit_per_second: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="Commands per second of all of one tenant's users on a node together; "
        "default 500 times the device rate",
    )
    tenant_rate_limit_burst: Annotated[float, Field(ge=1)] | None = Field(
        default=None, description="Default 500 times the device burst"
    )
    rate_limit_max_keys: Annotated[int, Field(ge=1)] = 100_000
    max_pending_sockets_per_address: Annotated[int, Field(ge=1)] = Field(
        default=256,
        description="Sockets from one client address that may wait for their hello at once; "
        "more get HTTP 429 at the handshake",
    )
    max_pending_sockets: Annotated[int, Field(ge=1)] = Field(
        default=10_000, description="Sockets that may wait for their hello at once, in all"
    )
    outbound_queue_frames: Annotated[int, Field(ge=1)] = 256
    outbound_queue_bytes: Annotated[int, Field(ge=64 * 1024)] = Field(
        default=8 * 1024 * 1024,
        description="Bytes that may wait for a reader whose socket's buffers are full before "
        "it is closed as a slow consumer, however slowly it still reads",
    )
    slow_consumer_seconds: Annotated[float, Field(gt=0)] = Field(
        default=2.0,
        description="How long the socket may refuse more bytes (its buffers full) while at least "
        "outbound_queue_frames frames wait before the reader is closed as a slow consumer",
    )
    idle_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    auth_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: The analytics API of the process that owns ClickHouse (the clickhouse-sink), which answers
    #: users' message searches (docs/analytics.md#search); a search waits at most the timeout.
    analytics_url: str = "http://127.0.0.1:8091"
    #: The CA bundle (PEM) an ``https://`` analytics_url is verified with; default the system's.
    analytics_ca_path: Path | None = None
    search_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    access_change_timeout_seconds: Annotated[float, Field(ge=0)] = Field(
        default=10.0,
        description="How long a remove, leave, delete or recall waits, once in Kafka, for the "
        "serving store to hold its outcome before it is answered (from then on no read on any "
        "node serves what it took away); past it the answer is unavailable. 0: answer once in "
        "Kafka, without the guarantee (a gateway with no pipeline behind it)",
    )
    close_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=10.0,
        description="How long a closed socket's peer gets to read what is left and answer the "
        "close frame before the connection is reset (a reader that stopped reading never does)",
    )
    internal_host: str = Field(
        default="127.0.0.1",
        description="Where the internal listener binds: /metrics, /docs, /redoc, /openapi.json "
        "and the health checks, for operators and scrapers, never for clients",
    )
    internal_port: Port = Field(
        default=9080,
        description="The internal listener's port; the client port answers 404 for what it serves",
    )
    presence_renew_seconds: Annotated[float, Field(gt=0)] = Field(
        default=5.0,
        description="How often the node renews the lease of its connections (a node.lease_renewed "
        "record on every presence partition)",
    )
    presence_lease_seconds: Annotated[float, Field(gt=0)] = Field(
        default=20.0,
        description="How long after a renewal the node's devices count as online: a node killed "
        "without publishing its disconnects has its devices offline at most this long after its "
        "last renewal, and pushes to their users resume",
    )

    @model_validator(mode="after")
    def _lease_outlives_renewals(self) -> Self:
        if self.presence_lease_seconds < 2 * self.presence_renew_seconds:
            raise ValueError(
                "IM_INGRESS__PRESENCE_LEASE_SECONDS must be at least twice "
                "IM_INGRESS__PRESENCE_RENEW_SECONDS, so that one late renewal does not take a "
                "node's devices offline"
            )
        if self.internal_port == self.port:
            raise ValueError("IM_INGRESS__INTERNAL_PORT must differ from IM_INGRESS__PORT")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        _pair(self, "IM_INGRESS__", "tls_cert_path", "tls_key_path")
        return self


class MemberAdmission(StrEnum):
    KNOWN = "known"
    OPEN = "open"


class StreamsSettings(_Group):
    """The stream worker (``imstream run stream-worker``): batching, fan-out and push policy."""

    app_id: str = "imstream-streams"
    #: A stable id per worker replica. The transactional id (one per worker: its processors
    #: commit together) and the static group membership derive from it, so that a restarted
    #: worker aborts its predecessor's open transaction and takes its old place in the group at
    #: once. Replicas need distinct ids;
    #: the default is the host name (one replica per host).
    instance_id: str | None = None
    #: Kafka static group membership (``group.instance.id``) for the processors' consumers.
    static_membership: bool = True
    batch_size: Annotated[int, Field(ge=1)] = 1000
    #: A processor commits at most once per interval (one transaction per batch): a record that
    #: arrives sooner after the previous transaction began waits for the rest of the interval,
    #: with the records that come meanwhile. An idle processor takes the next record at once.
    #: Under load this caps the transactions per second, Kafka's main cost. Above this floor the
    #: interval can adapt up to ``max_commit_interval_seconds`` (equal to the floor by default):
    #: the last transaction's duration divided by ``commit_time_share`` (a slow broker — a busy
    #: machine — gets fewer, larger transactions; docs/streams.md says what it measured).
    commit_interval_seconds: Annotated[float, Field(ge=0)] = 0.02
    max_commit_interval_seconds: Annotated[float, Field(ge=0)] = 0.02
    #: One transaction for both processors' batches (one transactional producer per worker)
    #: instead of one per processor. Fewer transactions — Kafka's main cost — but each loop then
    #: waits for the other's batch, and a shared transaction is longer: on the development
    #: machine it cut Kafka's CPU per message by a few percent and raised the 1:1 send → deliver
    #: p50 at 100 messages/s from 45 to 83 ms (docs/performance.md), so it is off by default.
    shared_transaction: bool = False
    #: The share of the time the worker may spend in transactions (see above).
    commit_time_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: How often each processor logs a progress line (records, transactions, interval).
    progress_seconds: Annotated[float, Field(gt=0)] = 10.0
    session_timeout_seconds: Annotated[float, Field(ge=6)] = 10.0
    transaction_timeout_seconds: Annotated[float, Field(ge=1)] = 30.0
    producer_linger_seconds: Annotated[float, Field(ge=0)] = 0.002
    #: Groups with more members switch to read diffusion (docs/streams.md, "Large groups").
    #: At most 10,000: the switching event carries the member list to the ingress nodes.
    large_group_threshold: Annotated[int, Field(ge=2, le=10_000)] = 500
    max_members: Annotated[int, Field(ge=2)] = 100_000
    #: Group-size limits of particular tenants (JSON, e.g. ``{"acme": 5000}``), in place of
    #: ``max_members``: a create naming more members, or an add past it, is refused
    #: (``group-full``).
    tenant_max_members: dict[str, Annotated[int, Field(ge=2)]] = Field(default_factory=dict)
    #: The largest output or state record a processor writes (key, value and headers). An input
    #: whose outputs or state would be larger goes to its dead-letter topic (``output-too-large``)
    #: instead of failing the transaction — which would stop the stage for everyone. Kept under
    #: the producer's ``message.max.bytes`` (1,000,000) and the broker's record limit.
    max_record_bytes: Annotated[int, Field(ge=1024, le=1_000_000)] = 900_000
    message_retention_days: Annotated[float, Field(gt=0)] = 7.0
    push_collapse_seconds: Annotated[float, Field(ge=0)] = 30.0
    #: Who may be named as a member in a create or an add: ``known`` users only (signed in at
    #: least once; docs/streams.md "Admission"), or ``open`` (anyone: a trusted tenant's
    #: provisioning, or tests that never sign their users in).
    member_admission: MemberAdmission = MemberAdmission.KNOWN
    #: Where each processor loop keeps its state store (LMDB, one directory per loop and
    #: instance; docs/streams.md "State store"); defaults to <stack.state_dir>/streams.
    state_dir: Path | None = None


class SinkSettings(_Group):
    """The sinks (``imstream run cql-sink``, ``imstream run clickhouse-sink``) and the serving
    store's layout."""

    #: Seqs per timeline partition and sync ids per sync-queue partition (bounded partitions).
    timeline_bucket_size: Annotated[int, Field(ge=10)] = 1000
    sync_bucket_size: Annotated[int, Field(ge=10)] = 1000
    #: How long sync-queue rows live (CQL TTL); older entries come from a full resync.
    sync_retention_days: Annotated[float, Field(gt=0, le=7300)] = 30.0
    #: How long a sink process may be silent before its consumer group gives its partitions to
    #: another member — or to its own restarted successor, which otherwise waits that long
    #: (Kafka's default is 45 s) before it gets any partition back after a crash.
    session_timeout_seconds: Annotated[float, Field(ge=6)] = 10.0
    #: CQL requests in flight per sink process, and retry backoff for timeouts/unavailability.
    cql_max_in_flight: Annotated[int, Field(ge=1)] = 64
    cql_retry_initial_seconds: Annotated[float, Field(gt=0)] = 0.2
    cql_retry_max_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: Records per Kafka poll batch for the CQL sink.
    cql_batch_size: Annotated[int, Field(ge=1)] = 500
    #: ClickHouse inserts: at most this many rows or this many seconds per insert.
    clickhouse_batch_rows: Annotated[int, Field(ge=1)] = 5000
    clickhouse_batch_seconds: Annotated[float, Field(gt=0)] = 1.0
    #: The analytics HTTP endpoint of the process that owns the ClickHouse data path.
    analytics_host: str = "127.0.0.1"
    analytics_port: Port = 8091
    #: The largest request body the endpoint reads (Content-Length over it: 413 unread).
    analytics_max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    #: The endpoint's queries (analytics, dashboards, quality, search) run on threads and
    #: ClickHouse connections of their own, never the audit inserts' (docs/analytics.md).
    analytics_query_workers: Annotated[int, Field(ge=1, le=32)] = 2
    #: Queries that may wait for a worker; beyond, a request is refused at once (503 busy).
    analytics_query_queue: Annotated[int, Field(ge=0)] = 16
    #: ClickHouse's max_execution_time of each of those queries, and their threads each.
    analytics_query_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    analytics_query_max_threads: Annotated[int, Field(ge=1)] = 1
    #: Certificate chain and key (PEM): with both, the analytics endpoint serves https only,
    #: TLS 1.3 at least.
    analytics_tls_cert_path: Path | None = None
    analytics_tls_key_path: Path | None = None

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        _pair(self, "IM_SINKS__", "analytics_tls_cert_path", "analytics_tls_key_path")
        return self


class CryptoSettings(_Group):
    """Encryption at rest of the CQL store's message bodies, previews and push tokens
    (docs/security.md, "Encryption at rest"): each tenant's data key (AES-256-GCM) is stored
    wrapped by the master key (the key-encryption key), which only the CQL sink and the ingress
    hold. Deleting a tenant's wrapped key (``imstream tenant forget-key``) shreds its data."""

    master_key: SecretStr = Field(
        default=SecretStr(DEV_MASTER_KEY),
        description="The key-encryption key: 32 bytes, base64. The default is a public "
        "development key, refused outside the dev profile",
    )
    master_key_path: Path | None = Field(
        default=None,
        description="A file holding the key-encryption key (base64), instead of master_key",
    )
    previous_master_key: SecretStr | None = Field(
        default=None,
        description="While rotating the master key: the old one (base64). It still unwraps the "
        "tenant keys it wrapped; imstream tenant rewrap-keys re-wraps them with master_key",
    )
    key_cache_size: Annotated[int, Field(ge=1)] = Field(
        default=1024, description="Tenants whose unwrapped data key a process keeps in memory"
    )
    key_cache_seconds: Annotated[float, Field(gt=0)] = Field(
        default=60.0,
        description="How long a process trusts a data key it read (or its absence): a key "
        "forgotten by forget-key stops decrypting everywhere within this time",
    )


class StackSettings(_Group):
    """The embedded local stack started by ``imstream stack up``."""

    state_dir: Path = Field(default=Path(".imstream"), validate_default=True)
    java_home: Path | None = None
    maven_executable: str = "mvn"
    maven_repository_url: str = "https://repo.maven.apache.org/maven2"
    maven_local_repository: Path | None = None
    kafka_version: str = "4.1.1"
    kafka_controller_port: Port = 9093
    kafka_heap: str = "512m"
    cassandra_version: str = "5.0.6"
    cassandra_storage_port: Port = 7000
    cassandra_jmx_port: Port = 7199
    cassandra_heap: str = "1g"
    #: CPU priority steps below the rest for the local Cassandra: on one machine the delivery
    #: path (ingress, Kafka, stream worker) gets the CPU first; the serving store's work is
    #: mostly the CQL sink's writes, which may lag a burst (measured in bench/e2e.py).
    cassandra_nice: Annotated[int, Field(ge=0, le=19)] = 10
    start_timeout_seconds: Annotated[float, Field(gt=0)] = 240.0
    stop_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    #: Where ``imstream up`` keeps its processes' logs (``logs/``), ready files (``ready/``) and
    #: state (``processes.json``, read by ``imstream status``); default the state dir. Apart
    #: from it, several ``imstream up`` can share one running stack (e.g. a test's).
    processes_dir: Path | None = None
    #: How long ``imstream up`` waits for every process to announce it is ready before it stops
    #: them all with ``[not-ready]``: a cold machine starts six Python processes, each joining
    #: its consumer group, in well under a minute.
    ready_timeout_seconds: Annotated[float, Field(gt=0)] = 180.0

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("processes_dir")
    @classmethod
    def _absolute_or_unset(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @property
    def run_dir(self) -> Path:
        """Where ``imstream up`` keeps its processes' logs, ready files and state."""
        return self.processes_dir or self.state_dir


class Settings(BaseSettings):
    """Everything imstream can be told, grouped by concern."""

    model_config = SettingsConfigDict(
        env_prefix="IM_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    profile: Profile = Profile.DEV
    kafka: KafkaSettings = KafkaSettings()
    cql: CqlSettings = CqlSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    auth: AuthSettings = AuthSettings()
    #: Operators' and analysts' tokens for the ClickHouse sink's API (``IM_STAFF_AUTH__…``).
    staff_auth: StaffAuthSettings = StaffAuthSettings()
    #: The ingress's tokens for users' searches on that API (``IM_SERVICE_AUTH__…``).
    service_auth: ServiceAuthSettings = ServiceAuthSettings()
    #: The push sink's APNs/FCM credentials, endpoints and delivery limits (``IM_PUSH__…``).
    push: PushProviderSettings = PushProviderSettings()
    ingress: IngressSettings = IngressSettings()
    streams: StreamsSettings = StreamsSettings()
    sinks: SinkSettings = SinkSettings()
    #: Encryption at rest in the CQL store (``IM_CRYPTO__…``).
    crypto: CryptoSettings = CryptoSettings()
    stack: StackSettings = StackSettings()
    #: Where this process announces that it is ready (``core/readiness.py``): ``imstream up``
    #: sets one per child, compose one per container for its healthcheck. Unset: no file.
    ready_file: Path | None = None

    @model_validator(mode="after")
    def _refuse_unknown_variables(self) -> Self:
        known = {f"IM_{name.upper()}" for name in type(self).model_fields}
        unknown = sorted(
            key
            for key in os.environ
            if key.startswith("IM_") and key.split("__", 1)[0] not in known
        )
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; known groups: {', '.join(sorted(known))}"
            )
        return self

    @model_validator(mode="after")
    def _refuse_shared_keys(self) -> Self:
        """Each principal's key is its own, in every profile: the client key signs no staff or
        service token (a client could otherwise sign itself an operator)."""
        keys = {
            "IM_AUTH__JWT_SECRET": self.auth.jwt_secret.get_secret_value()
            if self.auth.jwt_algorithm == "HS256"
            else None,
            "IM_STAFF_AUTH__SECRET": self.staff_auth.secret.get_secret_value()
            if self.staff_auth.algorithm == "HS256"
            else None,
            "IM_SERVICE_AUTH__SECRET": self.service_auth.secret.get_secret_value(),
        }
        seen: dict[str, str] = {}
        for name, key in keys.items():
            if key is None:
                continue
            if key in seen:
                raise ValueError(
                    f"{name} equals {seen[key]}; the clients', the staff's and the ingress's "
                    "tokens need a key each"
                )
            seen[key] = name
        return self

    def check_client_key(self) -> None:
        """Refuse (``ValueError``) the clients' development placeholder key outside the dev
        profile. Checked where client tokens are verified (the ingress), like the staff and
        service keys, so that the processes which verify no client token start without it (and
        compose gives it to the ingress only)."""
        if self.profile is Profile.DEV:
            return
        if (
            self.auth.jwt_algorithm.startswith("HS")
            and self.auth.jwt_secret.get_secret_value() in PLACEHOLDER_SECRETS
            and self.auth.jwks_path is None
            and self.auth.jwks_url is None
        ):
            raise ValueError(
                f"IM_AUTH__JWT_SECRET still holds the development placeholder; profile "
                f"'{self.profile}' needs a real secret (or IM_AUTH__JWT_ALGORITHM=RS256 with "
                f"IM_AUTH__JWT_PUBLIC_KEY_PATH, or a JWKS)"
            )

    def real_secret(self, secret: SecretStr, variable: str) -> str:
        """``secret``'s value, refused (``ValueError``) outside the dev profile while it still
        holds its placeholder. For the keys only some processes hold (the staff's, the
        ingress's service key): checked where they are used, so that a process which needs none
        of them starts without it."""
        value = secret.get_secret_value()
        if self.profile is not Profile.DEV and value in PLACEHOLDER_SECRETS:
            raise ValueError(
                f"{variable} still holds the development placeholder (or is empty); profile "
                f"'{self.profile}' needs a real secret"
            )
        return value

    def master_key(self) -> bytes:
        """The key-encryption key (``IM_CRYPTO__MASTER_KEY`` or the file of
        ``IM_CRYPTO__MASTER_KEY_PATH``), 32 bytes; ``ValueError`` when it is not 32 bytes of
        base64, or outside the dev profile when it is the development key. Checked at the start
        of the processes that hold it (the CQL sink, the ingress), so a wrong one stops them
        before they write or serve anything."""
        crypto = self.crypto
        if crypto.master_key_path is not None:
            try:
                text = crypto.master_key_path.read_text().strip()
            except OSError as error:
                raise ValueError(
                    f"IM_CRYPTO__MASTER_KEY_PATH {crypto.master_key_path} cannot be read: {error}"
                ) from None
            variable = "IM_CRYPTO__MASTER_KEY_PATH"
        else:
            text = self.real_secret(crypto.master_key, "IM_CRYPTO__MASTER_KEY")
            variable = "IM_CRYPTO__MASTER_KEY"
        if self.profile is not Profile.DEV and text in PLACEHOLDER_SECRETS:
            raise ValueError(
                f"{variable} holds the development master key; profile '{self.profile}' needs "
                "a key of its own (32 random bytes, base64: openssl rand -base64 32)"
            )
        try:
            key = base64.b64decode(text, validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ValueError(f"{variable} must be 32 bytes in base64 (openssl rand -base64 32)")
        return key

    def previous_master_key(self) -> bytes | None:
        """``IM_CRYPTO__PREVIOUS_MASTER_KEY`` (32 bytes, base64), or None; ``ValueError`` when
        it is malformed."""
        previous = self.crypto.previous_master_key
        if previous is None:
            return None
        try:
            key = base64.b64decode(previous.get_secret_value().strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ValueError("IM_CRYPTO__PREVIOUS_MASTER_KEY must be 32 bytes in base64")
        return key

    @property
    def stream_state_dir(self) -> Path:
        """The stream workers' state stores, resolved against the stack state dir when unset."""
        chosen = self.streams.state_dir
        return chosen.expanduser().resolve() if chosen else self.stack.state_dir / "streams"

    @property
    def chdb_path(self) -> Path:
        """The chDB data path, resolved against the stack state dir when not set explicitly."""
        return self.clickhouse.chdb_path or self.stack.state_dir / "clickhouse"
