"""How a process reaches Kafka, the CQL store and ClickHouse, built from the one settings object.

These factories are the only places that turn settings into client objects, so that the stack's
health checks, the tests and the processes connect exactly the same way.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import clickhouse_connect
from cassandra import DriverException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    Session,
)
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from core.settings import Settings
from core.tls import client_context
from schemas.topics import KAFKA_PARTITIONER

_kafka_log = logging.getLogger("imstream.kafka")


def kafka_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Base librdkafka configuration; callers add role-specific keys (group.id, acks, …).

    Every producer, consumer and admin client of imstream starts from here, so the security
    settings (TLS, SASL credentials: :func:`kafka_security_config`) reach all of them."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "client.id": settings.kafka.client_id_prefix,
        "logger": _kafka_log,
        **kafka_security_config(settings),
    }
    config.update(overrides)
    return config


def kafka_security_config(settings: Settings) -> dict[str, str]:
    """librdkafka's keys for ``IM_KAFKA__SECURITY_PROTOCOL`` and its credentials.

    With TLS the broker's certificate is verified against the CA bundle and its host name
    (librdkafka's default ``ssl.endpoint.identification.algorithm=https``)."""
    kafka = settings.kafka
    config = {"security.protocol": kafka.security_protocol.value}
    if kafka.security_protocol.startswith("SASL_"):
        assert kafka.sasl_username is not None and kafka.sasl_password is not None
        config |= {
            "sasl.mechanism": kafka.sasl_mechanism.value,
            "sasl.username": kafka.sasl_username,
            "sasl.password": kafka.sasl_password.get_secret_value(),
        }
    if kafka.security_protocol.endswith("SSL"):
        if kafka.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(kafka.ssl_ca_location)
        if kafka.ssl_certificate_location is not None and kafka.ssl_key_location is not None:
            config["ssl.certificate.location"] = str(kafka.ssl_certificate_location)
            config["ssl.key.location"] = str(kafka.ssl_key_location)
    return config


def kafka_consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A pipeline consumer's configuration: group ``group_id``, offsets committed by the caller
    only after the work they cover is done, from the beginning when the group is new, and
    ``read_committed`` (the stream stage writes in transactions: an aborted batch is never
    read)."""
    return kafka_config(
        settings,
        **{
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            **overrides,
        },
    )


def consume_ready(consumer: Consumer, max_records: int, timeout: float) -> list[Message]:
    """Wait up to ``timeout`` for the first record, then take what else is already fetched (up to
    ``max_records`` in all). ``consume(n, timeout)`` alone waits for n records or the whole
    timeout: up to ``timeout`` of latency per record at low rates."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_records - 1, timeout=0)] if max_records > 1 else [first]


def sink_session_config(settings: Settings) -> dict[str, Any]:
    """A sink consumer's group session: ``sinks.session_timeout_seconds``, a heartbeat a third
    of it (at most 3 s)."""
    timeout = settings.sinks.session_timeout_seconds
    return {
        "session.timeout.ms": int(timeout * 1000),
        "heartbeat.interval.ms": int(min(3.0, timeout / 3) * 1000),
    }


def kafka_producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Producer configuration: keys land on the partitions the Java client picks."""
    return kafka_config(settings, partitioner=KAFKA_PARTITIONER, **overrides)


class UnacknowledgedError(Exception):
    """Kafka did not take the record: the message says why (timeout, or Kafka's error)."""


def acknowledged_producer(settings: Settings, *, timeout: float) -> Producer:
    """A producer for the operator tools' writes (``acks=all``, idempotent), giving each record
    ``timeout`` seconds to be acknowledged, so that a tool never reports success before Kafka
    holds what it wrote."""
    return Producer(
        kafka_producer_config(
            settings,
            **{
                "acks": "all",
                "enable.idempotence": True,
                "message.timeout.ms": int(timeout * 1000),
            },
        )
    )


def produce_acknowledged(
    settings: Settings, topic: str, key: bytes, value: bytes, *, timeout: float
) -> tuple[int, int]:
    """Write one record (``acks=all``, idempotent) and wait for Kafka's acknowledgement: its
    partition and offset. For the operator tools' single writes (audit records, revocations),
    which must not report success before Kafka holds them."""
    producer = acknowledged_producer(settings, timeout=timeout)
    outcome: list[tuple[KafkaError | None, Message]] = []

    def delivered(failure: KafkaError | None, message: Message) -> None:
        outcome.append((failure, message))

    try:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    except KafkaException as error:
        raise UnacknowledgedError(f"{topic}: {error}") from error
    if producer.flush(timeout) > 0 or not outcome:
        raise UnacknowledgedError(f"{topic}: not acknowledged within {timeout:g} s")
    failure, message = outcome[0]
    if failure is not None:
        raise UnacknowledgedError(f"{topic}: {failure.str()}")
    return message.partition() or 0, message.offset() or 0


def cql_cluster(
    settings: Settings, *, connect_timeout: float = 10.0, request_timeout: float = 10.0
) -> Cluster:
    """A scylla-driver cluster object (not yet connected) for Cassandra or ScyllaDB."""
    auth = None
    if settings.cql.username is not None:
        password = settings.cql.password.get_secret_value() if settings.cql.password else ""
        auth = PlainTextAuthProvider(username=settings.cql.username, password=password)
    options: dict[str, Any] = {}
    if settings.cql.protocol_version is not None:
        options["protocol_version"] = settings.cql.protocol_version
    if settings.cql.ssl_ca_path is not None:
        options["ssl_context"] = cql_ssl_context(settings)
    return Cluster(
        contact_points=settings.cql.contact_points,
        port=settings.cql.port,
        auth_provider=auth,
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                # Token-aware: a statement goes straight to a replica of its partition.
                load_balancing_policy=TokenAwarePolicy(
                    DCAwareRoundRobinPolicy(local_dc=settings.cql.local_datacenter)
                ),
                request_timeout=request_timeout,
            )
        },
        connect_timeout=connect_timeout,
        control_connection_timeout=connect_timeout,
        compression=settings.cql.compression,
        **options,
    )


class CqlUnavailableError(Exception):
    """The CQL cluster did not answer a command's connect; the message names where it looked."""


@contextmanager
def cql_session(settings: Settings) -> Iterator[Session]:
    """A connected session for one operator command, the cluster shut down after it; raises
    :class:`CqlUnavailableError` (each command turns it into its own error code)."""
    cluster = cql_cluster(settings)
    try:
        session = cluster.connect()
    except (NoHostAvailable, DriverException, OSError) as error:
        cluster.shutdown()
        raise CqlUnavailableError(
            f"{', '.join(settings.cql.contact_points)}:{settings.cql.port} did not answer "
            f"({error}); start the local stack with `imstream stack up`, or point "
            "IM_CQL__CONTACT_POINTS at a cluster"
        ) from error
    try:
        yield session
    finally:
        cluster.shutdown()


def cql_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS to the CQL nodes: their certificates verified against ``IM_CQL__SSL_CA_PATH`` (and
    their names, unless ``IM_CQL__SSL_CHECK_HOSTNAME=false``), with the client certificate when
    one is set; TLS 1.3 at least, as everywhere."""
    cql = settings.cql
    context = client_context(cql.ssl_ca_path)
    context.check_hostname = cql.ssl_check_hostname
    if cql.ssl_cert_path is not None and cql.ssl_key_path is not None:
        context.load_cert_chain(cql.ssl_cert_path, cql.ssl_key_path)
    return context


def clickhouse_client(
    settings: Settings, *, query_settings: dict[str, Any] | None = None
) -> Client:
    """A clickhouse-connect client: chDB in-process by default, HTTP when a server URL is set.

    chDB allows one data path per process and has no async client: callers run queries through a
    thread executor and keep to the one path that ``settings.chdb_path`` names (another client on
    it is another handle to the same engine). ``query_settings`` are ClickHouse settings of every
    query of the client (the query pool's time budget).
    """
    if settings.clickhouse.url:
        # An https:// URL is verified against IM_CLICKHOUSE__CA_PATH (the system's CAs unset).
        ca_path = settings.clickhouse.ca_path
        return clickhouse_connect.get_client(
            dsn=settings.clickhouse.url,
            username=settings.clickhouse.username,
            password=settings.clickhouse.password.get_secret_value(),
            ca_cert=str(ca_path) if ca_path is not None else None,
            settings=query_settings,
        )
    path = settings.chdb_path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=query_settings)
