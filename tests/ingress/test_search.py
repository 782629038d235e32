"""Users' search through the ingress, end to end on the real stack: ``imstream run ingress`` on
this module's topics and serving keyspace (membership written to Cassandra as the CQL sink writes
it), the analytics API (``AnalyticsServer``, as the ClickHouse sink serves it) over this module's
chDB database holding audited message events. A user finds only messages of conversations they
are a member of, is refused a foreign conversation exactly as history refuses it, bad queries get
their codes, and a search service that never answers gives ``unavailable`` within the timeout."""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cassandra.cluster import Session
from clickhouse_connect.driver.client import Client

from analytics.queries import Analytics
from core.pki import Pki, make_pki
from core.settings import Settings, SinkSettings
from core.tls import client_context
from ingress.app import create_app
from ingress.search import UserSearch
from schemas import events as ev
from schemas.topics import topic_catalog
from sinks.clickhouse.audit import AuditDecoder, KafkaRecord
from sinks.clickhouse.sink import analytics_tls
from sinks.clickhouse.store import ClickHouseStore
from tests.ingress.conftest import MAIN_GATEWAY
from tests.ingress.support import TENANT, Gateway, start_gateway, token, unique
from tests.sinks.clickhouse_support import sent
from tests.sinks.staff_support import serving, staff_app

pytestmark = pytest.mark.stack

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
# alice and bob share c-ab; alice and carol share c-ac; carol and dave share c-cd.
# gus and hal share c-gh; jon is c-ij's member, ivy was until seq 1; kim is c-kl's member.
MEMBERS = {
    "c-ab": ["alice", "bob"],
    "c-ac": ["alice", "carol"],
    "c-cd": ["carol", "dave"],
    "c-gh": ["gus", "hal"],
    "c-ij": ["jon"],
    "c-kl": ["kim"],
}
# (sender, conversation, seq, text, minutes after T0)
MESSAGES = [
    ("alice", "c-ab", 1, "Quarterly report is ready", 1),
    ("bob", "c-ab", 2, "the REPORT looks good", 2),
    ("carol", "c-ac", 1, "Did you read the quarterly report?", 3),
    ("carol", "c-cd", 1, "secret quarterly report draft", 4),
    ("gus", "c-gh", 1, "the recalled plan", 5),
    ("hal", "c-gh", 2, "the kept plan", 6),
    ("ivy", "c-ij", 1, "an early roadmap", 7),
    ("jon", "c-ij", 2, "a late roadmap", 8),
    ("kim", "c-kl", 1, "a memo of a deleted group", 9),
]


def _sent(sender: str, conversation: str, seq: int, text: str, minute: int) -> ev.MessageSent:
    moment = T0 + timedelta(minutes=minute)
    return sent(
        sender, conversation, f"{conversation}-{seq}", moment, seq=seq, tenant=TENANT, text=text
    )


@pytest.fixture(scope="module")
def analytics_store(ingress_settings: Settings, clickhouse: Client) -> Iterator[ClickHouseStore]:
    """This module's chDB database with the messages audited as the sink audits them."""
    database = "t_usearch_" + uuid.uuid4().hex[:10]
    clickhouse.command(f"CREATE DATABASE {database}")
    store = ClickHouseStore(clickhouse, database, owns_client=False)
    catalog = topic_catalog(ingress_settings)
    store.apply_schema(catalog)
    decoder = AuditDecoder(catalog)
    rows = []
    for offset, message in enumerate(MESSAGES):
        event = _sent(*message)
        audited = decoder.audit(
            KafkaRecord(
                topic=catalog.messages_sequenced.name,
                partition=0,
                offset=offset,
                key=None,
                value=ev.encode_event(event),
                timestamp_ms=int(event.occurred_at.timestamp() * 1000),
                headers=[],
            )
        )
        rows.append(audited.row)
    store.insert_audit(rows)
    try:
        yield store
    finally:
        store.close()
        clickhouse.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture(scope="module")
def analytics_url(analytics_store: ClickHouseStore) -> Iterator[str]:
    """The analytics API over the store, on a free port."""
    with serving(staff_app(Analytics(analytics_store))) as url:
        yield url


@pytest.fixture(scope="module")
def memberships(serving_keyspace: str, cql_session: Session) -> str:
    """The members and conversation lists, as the CQL sink writes them."""
    for conversation, users in MEMBERS.items():
        for user in users:
            cql_session.execute(
                f"INSERT INTO {serving_keyspace}.members (tenant_id, conversation_id, user_id, "
                "role) VALUES (%s, %s, %s, 'member')",
                (TENANT, conversation, user),
            )
            cql_session.execute(
                f"INSERT INTO {serving_keyspace}.user_conversations (tenant_id, user_id, "
                "conversation_id, kind, member, last_seq) VALUES (%s, %s, %s, 'group', true, 2)",
                (TENANT, user, conversation),
            )
    return serving_keyspace


@pytest.fixture(scope="module")
def searching_gateway(
    ingress_settings: Settings,
    memberships: str,
    analytics_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    running = start_gateway(
        ingress_settings,
        tmp_path_factory.mktemp("search-gateway"),
        ingress={**MAIN_GATEWAY, "analytics_url": analytics_url},
        cql={"keyspace": memberships},
        wait=Gateway.serving,
    )
    yield running
    assert running.stop() == 0, running.log()


def search(gateway: Gateway, user: str, **parameters: str) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token(gateway.settings, user)}", "X-Request-Id": "s1"}
    path = f"/v1/tenants/{TENANT}/search?{urllib.parse.urlencode(parameters)}"
    status, _, raw = gateway.request("GET", path, headers=headers)
    return status, json.loads(raw)


def hits(gateway: Gateway, user: str, **parameters: str) -> list[tuple[str, int]]:
    status, body = search(gateway, user, **parameters)
    assert status == 200, body
    assert body["type"] == "search_results" and body["id"] == "s1"
    return [(hit["conversation_id"], hit["seq"]) for hit in body["hits"]]


def test_a_user_finds_messages_of_their_own_conversations_only(
    searching_gateway: Gateway,
) -> None:
    assert hits(searching_gateway, "alice", q="quarterly report") == [("c-ac", 1), ("c-ab", 1)]
    assert hits(searching_gateway, "alice", q="report") == [("c-ac", 1), ("c-ab", 2), ("c-ab", 1)]
    assert hits(searching_gateway, "bob", q="report") == [("c-ab", 2), ("c-ab", 1)]
    assert hits(searching_gateway, "dave", q='"quarterly REPORT"') == [("c-cd", 1)]
    assert hits(searching_gateway, "erin", q="report") == []
    assert hits(searching_gateway, "alice", q="report", conversation="c-ab") == [
        ("c-ab", 2),
        ("c-ab", 1),
    ]
    status, body = search(searching_gateway, "alice", q="report", limit="1")
    assert status == 200 and body["next_cursor"] and body["hits"][0]["snippet"].count("«") == 1


def test_search_follows_recalls_removals_and_deletions_as_soon_as_the_store_holds_them(
    searching_gateway: Gateway, memberships: str, cql_session: Session
) -> None:
    """The audit still holds what was recalled (the ClickHouse sink's lag, here for good): the
    serving store's facts, there before the command is answered, decide."""
    assert hits(searching_gateway, "hal", q="plan") == [("c-gh", 2), ("c-gh", 1)]
    cql_session.execute(
        f"INSERT INTO {memberships}.recalled_messages (tenant_id, conversation_id, message_id, "
        "recall_seq) VALUES (%s, 'c-gh', %s, 3)",
        (TENANT, ev.message_event_id(TENANT, "gus", "c-gh-1")),
    )
    assert hits(searching_gateway, "hal", q="plan") == [("c-gh", 2)]
    assert hits(searching_gateway, "gus", q="plan", conversation="c-gh") == [("c-gh", 2)]

    # ivy was removed after seq 1: what came before, nothing after (as history gives her).
    cql_session.execute(
        f"INSERT INTO {memberships}.former_members (tenant_id, conversation_id, user_id, "
        "until_seq) VALUES (%s, 'c-ij', 'ivy', 1)",
        (TENANT,),
    )
    assert hits(searching_gateway, "ivy", q="roadmap", conversation="c-ij") == [("c-ij", 1)]
    assert hits(searching_gateway, "jon", q="roadmap", conversation="c-ij") == [
        ("c-ij", 2),
        ("c-ij", 1),
    ]

    assert hits(searching_gateway, "kim", q="memo", conversation="c-kl") == [("c-kl", 1)]
    cql_session.execute(
        f"INSERT INTO {memberships}.conversations (tenant_id, conversation_id, deleted) "
        "VALUES (%s, 'c-kl', true)",
        (TENANT,),
    )
    status, body = search(searching_gateway, "kim", q="memo", conversation="c-kl")
    assert (status, body["code"]) == (403, "forbidden")


def test_a_foreign_conversation_is_refused_as_history_refuses_it(
    searching_gateway: Gateway,
) -> None:
    status, body = search(searching_gateway, "alice", q="secret", conversation="c-cd")
    headers = {"Authorization": f"Bearer {token(searching_gateway.settings, 'alice')}"}
    history_status, _, raw = searching_gateway.request(
        "GET", f"/v1/tenants/{TENANT}/conversations/c-cd/messages", headers=headers
    )
    history = json.loads(raw)
    assert (status, body["code"], body["message"]) == (
        history_status,
        history["code"],
        history["message"],
    )
    assert (status, body["code"]) == (403, "forbidden")


@pytest.mark.parametrize(
    ("parameters", "code"),
    [
        ({"q": ""}, "[query-empty]"),
        ({"q": "x" * 201}, "[query-too-long]"),
        ({"q": "a b c d e f g h i"}, "[query-too-many-terms]"),
        ({"q": '"open'}, "[query-unbalanced-quote]"),
        ({"q": "report", "cursor": "garbage"}, "[invalid-cursor]"),
    ],
)
def test_bad_queries_are_refused_with_their_codes(
    searching_gateway: Gateway, parameters: dict[str, str], code: str
) -> None:
    status, body = search(searching_gateway, "alice", **parameters)
    assert (status, body["code"]) == (422, "schema-invalid"), body
    assert body["message"].startswith(code), body
    assert body["field"] in {"q", "cursor"}


def test_a_search_service_that_never_answers_gives_unavailable_in_time(
    ingress_settings: Settings,
    memberships: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers a request
    gateway = start_gateway(
        ingress_settings,
        tmp_path_factory.mktemp("silent-search"),
        ingress={
            **MAIN_GATEWAY,
            "analytics_url": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "search_timeout_seconds": 1.0,
        },
        cql={"keyspace": memberships},
        wait=Gateway.serving,
    )
    try:
        started = time.monotonic()
        status, body = search(gateway, "alice", q="report")
        elapsed = time.monotonic() - started
        assert (status, body["code"]) == (503, "unavailable"), body
        assert body["retry_after_ms"] > 0 and "search service" in body["message"]
        assert elapsed < 5, f"answered after {elapsed:.1f} s"
    finally:
        assert gateway.stop() == 0, gateway.log()
        silent.close()


@pytest.fixture(scope="module")
def analytics_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("analytics-pki"), {"clickhouse-sink": ()})


@pytest.fixture(scope="module")
def https_analytics_url(analytics_store: ClickHouseStore, analytics_pki: Pki) -> Iterator[str]:
    """The analytics API over the store serving https only, as the sink does with
    IM_SINKS__ANALYTICS_TLS_CERT_PATH / _KEY_PATH."""
    leaf = analytics_pki["clickhouse-sink"]
    settings = Settings().model_copy(
        update={
            "sinks": SinkSettings(
                analytics_tls_cert_path=leaf.cert_file, analytics_tls_key_path=leaf.key_file
            )
        }
    )
    with serving(staff_app(Analytics(analytics_store)), tls=analytics_tls(settings)) as url:
        yield url


def test_the_ingress_searches_over_https_trusting_the_analytics_ca(
    ingress_settings: Settings,
    memberships: str,
    https_analytics_url: str,
    analytics_pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert https_analytics_url.startswith("https://")
    logs = tmp_path_factory.mktemp("https-search")
    trusting = start_gateway(
        ingress_settings,
        logs,
        ingress={
            **MAIN_GATEWAY,
            "analytics_url": https_analytics_url,
            "analytics_ca_path": analytics_pki.ca_file,
        },
        cql={"keyspace": memberships},
        wait=Gateway.serving,
    )
    try:
        assert hits(trusting, "bob", q="report") == [("c-ab", 2), ("c-ab", 1)]
    finally:
        assert trusting.stop() == 0, trusting.log()
    # A node that does not trust the CA gets no answer it would believe: unavailable.
    doubting = start_gateway(
        ingress_settings,
        logs,
        ingress={**MAIN_GATEWAY, "analytics_url": https_analytics_url},
        cql={"keyspace": memberships},
        wait=Gateway.serving,
    )
    try:
        status, body = search(doubting, "bob", q="report")
        assert (status, body["code"]) == (503, "unavailable"), body
    finally:
        assert doubting.stop() == 0, doubting.log()


def test_the_https_analytics_api_refuses_tls_12_and_plain_http(
    https_analytics_url: str, analytics_pki: Pki
) -> None:
    healthz = f"{https_analytics_url}/healthz"
    response = httpx.get(healthz, timeout=10, verify=client_context(analytics_pki.ca_file))
    assert response.status_code == 200
    old = client_context(analytics_pki.ca_file)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    # The server ends a TLS 1.2 handshake (an alert, or a reset before one is read).
    with pytest.raises(httpx.ConnectError):
        httpx.get(healthz, timeout=10, verify=old)
    # Plain HTTP on the TLS port: no TLS record, the server closes without an HTTP answer.
    with pytest.raises(httpx.TransportError):
        httpx.get(healthz.replace("https://", "http://"), timeout=10)


async def test_the_search_client_is_closed_when_the_node_stops(ingress_settings: Settings) -> None:
    """One connection pool per node to the search API, closed with the app's lifespan."""
    ingress = ingress_settings.ingress.model_copy(update={"node_id": unique("node")})
    settings = ingress_settings.model_copy(update={"ingress": ingress})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        search = UserSearch(settings, app.gateway.reads)
        app.state.user_search = search
        assert not search._http.is_closed
    assert search._http.is_closed
