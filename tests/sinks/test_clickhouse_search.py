"""Message search on the real stack: message events produced to the sequenced topic on Kafka, the
ClickHouse sink (in this process) auditing them into chDB, the search table fed from those audit
inserts, and searches through the analytics API's HTTP routes — by word and phrase whatever the
case, the latest text of an edited message, never a recalled one, never twice after a replay of
the whole range, and bad queries refused with their codes."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from analytics.queries import Analytics
from analytics.search import Cursor, MessageSearch, SearchRequest
from core.groups import clickhouse_sink_group
from core.settings import Settings
from pipelines.cli import app as imstream
from pipelines.stack.manager import LocalStack
from schemas import events as ev
from schemas.search import parse_query, snippet
from schemas.topics import conversation_key, topic_catalog
from sinks.clickhouse.schema import AUDIT_TABLE, SEARCH_TABLE, search_table_ddl
from sinks.clickhouse.sink import ClickHouseSink
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.clickhouse_support import (
    TENANT,
    Outgoing,
    catalog_topics,
    new_prefix,
    prefixed_settings,
    produce,
    sent,
)
from tests.sinks.staff_support import service_headers, serving, staff_app, staff_get

pytestmark = pytest.mark.stack

GLOBEX = "globex"
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def _sent(
    sender: str, conversation: str, seq: int, text: str, minute: int, *, tenant: str = TENANT
) -> ev.MessageSent:
    moment = T0 + timedelta(minutes=minute)
    return sent(
        sender, conversation, f"{conversation}-{seq}", moment, seq=seq, tenant=tenant, text=text
    )


def _edited(message: ev.MessageSent, seq: int, text: str, minute: int) -> ev.MessageEdited:
    return ev.MessageEdited.new(
        tenant_id=message.tenant_id,
        actor=message.actor,
        occurred_at=T0 + timedelta(minutes=minute),
        payload=ev.MessageEditedPayload(
            conversation_id=message.payload.conversation_id,
            message_id=message.event_id,
            body=ev.TextBody(text=text),
            conversation_seq=seq,
        ),
    )


def _recalled(message: ev.MessageSent, seq: int, minute: int) -> ev.MessageRecalled:
    return ev.MessageRecalled.new(
        tenant_id=message.tenant_id,
        actor=message.actor,
        occurred_at=T0 + timedelta(minutes=minute),
        payload=ev.MessageRecalledPayload(
            conversation_id=message.payload.conversation_id,
            message_id=message.event_id,
            conversation_seq=seq,
        ),
    )


HELLO = _sent("alice", "c-1", 1, "Hello World, the quick brown fox!", 0)
LUNCH = _sent("bob", "c-1", 2, "Lunch at noon? Bring the QUICK notes", 1)
RED_FOX = _sent("alice", "c-1", 3, "a quick red fox jumps", 2)
SYNC = _sent("carol", "c-2", 1, "Quick sync tomorrow: brown bag", 3)
OTHER_TENANT = _sent("alice", "c-1", 1, "quick hello from another tenant", 4, tenant=GLOBEX)
EVENTS: list[ev.MessageSent | ev.MessageEdited | ev.MessageRecalled] = [
    HELLO,
    LUNCH,
    RED_FOX,
    SYNC,
    OTHER_TENANT,
    _edited(LUNCH, 4, "Dinner at eight? bring the quick notes", 5),
    _recalled(RED_FOX, 5, 6),
]


def run_sink(settings: Settings, store: ClickHouseStore, group_id: str | None = None) -> None:
    ClickHouseSink(settings, store, threading.Event(), group_id=group_id).run(until_caught_up=True)


@pytest.fixture(scope="module")
def searchable(
    local_stack: LocalStack, settings: Settings, clickhouse: Client
) -> Iterator[tuple[Settings, ClickHouseStore]]:
    """The events produced to this module's sequenced topic and audited by the sink, twice — the
    second time a replay of the whole range as a new consumer group."""
    database = "t_search_" + new_prefix("s").split("-")[2]
    clickhouse.command(f"CREATE DATABASE {database}")
    prefixed = prefixed_settings(settings, new_prefix("search"), database)
    store = ClickHouseStore(clickhouse, database, owns_client=False)
    try:
        with catalog_topics(prefixed):
            catalog = topic_catalog(prefixed)
            store.apply_schema(catalog)
            # Keep the copies apart: the answers must not depend on merges having run.
            clickhouse.command(f"SYSTEM STOP MERGES {database}.{SEARCH_TABLE}")
            produce(
                prefixed,
                [
                    Outgoing(
                        catalog.messages_sequenced.name,
                        conversation_key(event.tenant_id, event.payload.conversation_id),
                        ev.encode_event(event),
                    )
                    for event in EVENTS
                ],
            )
            run_sink(prefixed, store)
            run_sink(prefixed, store, group_id=f"{clickhouse_sink_group(prefixed)}-replay")
            yield prefixed, store
    finally:
        store.close()
        clickhouse.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture(scope="module")
def endpoint(searchable: tuple[Settings, ClickHouseStore]) -> Iterator[str]:
    with serving(staff_app(Analytics(searchable[1]))) as url:
        yield url


def search(endpoint: str, q: str, **parameters: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"tenant": TENANT, "q": q, **parameters})
    status, body = staff_get(f"{endpoint}/v1/search?{query}")
    assert status == 200, body
    return dict(body)


def found(endpoint: str, q: str, **parameters: str) -> list[tuple[str, int]]:
    return [
        (hit["conversation_id"], hit["seq"]) for hit in search(endpoint, q, **parameters)["hits"]
    ]


def test_the_replay_stored_every_event_twice(
    searchable: tuple[Settings, ClickHouseStore], clickhouse: Client
) -> None:
    database = searchable[1].database
    audit = clickhouse.query(f"SELECT count() FROM {database}.{AUDIT_TABLE}").result_rows
    rows = clickhouse.query(f"SELECT count() FROM {database}.{SEARCH_TABLE}").result_rows
    assert audit[0][0] == 2 * len(EVENTS)
    assert rows[0][0] == 2 * len(EVENTS), "the feed wrote a search row per audited event"


def test_a_word_finds_its_messages_case_insensitively_newest_first_once_each(
    endpoint: str,
) -> None:
    # RED_FOX is recalled; the other tenant's message is not this tenant's.
    assert found(endpoint, "QUICK") == [("c-2", 1), ("c-1", 2), ("c-1", 1)]
    assert found(endpoint, "brown") == [("c-2", 1), ("c-1", 1)]
    body = search(endpoint, "Fox")
    assert [(hit["conversation_id"], hit["seq"]) for hit in body["hits"]] == [("c-1", 1)]
    hit = body["hits"][0]
    assert hit["sender_id"] == "alice" and hit["message_id"] == HELLO.event_id
    assert hit["snippet"] == "Hello World, the quick brown «fox»!"
    assert hit["sent_at"] == HELLO.occurred_at.isoformat().replace("+00:00", "Z")


def test_a_phrase_matches_consecutive_words_only(endpoint: str) -> None:
    assert found(endpoint, '"hello world"') == [("c-1", 1)]
    assert found(endpoint, '"HELLO, world"') == [("c-1", 1)]
    assert found(endpoint, '"world hello"') == []
    assert found(endpoint, '"quick brown" fox') == [("c-1", 1)]
    hit = search(endpoint, '"quick brown"')["hits"][0]
    assert hit["snippet"] == "Hello World, the «quick brown» fox!"


def test_an_edited_message_is_found_by_its_new_text_only(endpoint: str) -> None:
    assert found(endpoint, "lunch") == []
    assert found(endpoint, "noon") == []
    hits = search(endpoint, "dinner")["hits"]
    assert [(hit["conversation_id"], hit["seq"], hit["edited"]) for hit in hits] == [
        ("c-1", 2, True)
    ]
    assert hits[0]["snippet"] == "«Dinner» at eight? bring the quick notes"


def test_a_recalled_message_is_not_found(endpoint: str) -> None:
    assert found(endpoint, "red") == []
    assert found(endpoint, "jumps") == []


def test_filters_conversation_sender_time_and_tenant(endpoint: str) -> None:
    assert found(endpoint, "quick", conversation="c-2") == [("c-2", 1)]
    assert found(endpoint, "quick", sender="bob") == [("c-1", 2)]
    minute = (T0 + timedelta(minutes=1)).isoformat()
    assert found(endpoint, "quick", to=minute) == [("c-1", 1)]
    assert found(endpoint, "quick", **{"from": minute}) == [("c-2", 1), ("c-1", 2)]
    assert found(endpoint, "quick", tenant=GLOBEX) == [("c-1", 1)]


def test_pages_follow_the_cursor_without_gaps_or_repeats(endpoint: str) -> None:
    first = search(endpoint, "quick", limit="2")
    assert [(h["conversation_id"], h["seq"]) for h in first["hits"]] == [("c-2", 1), ("c-1", 2)]
    assert first["next_cursor"]
    second = search(endpoint, "quick", limit="2", cursor=first["next_cursor"])
    assert [(h["conversation_id"], h["seq"]) for h in second["hits"]] == [("c-1", 1)]
    assert second["next_cursor"] is None


def test_a_scoped_search_sees_only_its_conversation_ranges(endpoint: str) -> None:
    def scoped(scope: list[dict[str, Any]]) -> list[tuple[str, int]]:
        response = httpx.post(
            f"{endpoint}/v1/search/scoped",
            json={"q": "quick", "scope": scope},
            headers=service_headers(TENANT),
            timeout=30,
        )
        response.raise_for_status()
        body = response.json()
        return [(hit["conversation_id"], hit["seq"]) for hit in body["hits"]]

    assert scoped([{"conversation_id": "c-1", "from_seq": 1, "to_seq": None}]) == [
        ("c-1", 2),
        ("c-1", 1),
    ]
    assert scoped([{"conversation_id": "c-1", "from_seq": 2, "to_seq": None}]) == [("c-1", 2)]
    assert scoped([{"conversation_id": "c-1", "from_seq": 1, "to_seq": 1}]) == [("c-1", 1)]
    assert scoped([{"conversation_id": "c-9", "from_seq": 1, "to_seq": None}]) == []
    assert scoped([]) == []


@pytest.mark.parametrize(
    ("parameters", "status", "code", "field"),
    [
        ({"tenant": TENANT, "q": ""}, 400, "query-empty", "q"),
        ({"tenant": TENANT, "q": "?! ..."}, 400, "query-empty", "q"),
        ({"tenant": TENANT, "q": "x" * 201}, 400, "query-too-long", "q"),
        ({"tenant": TENANT, "q": "a b c d e f g h i"}, 400, "query-too-many-terms", "q"),
        ({"tenant": TENANT, "q": '"open phrase'}, 400, "query-unbalanced-quote", "q"),
        ({"q": "quick"}, 400, "invalid-parameter", "tenant"),
        ({"tenant": TENANT, "q": "quick", "limit": "0"}, 400, "invalid-parameter", "limit"),
        ({"tenant": TENANT, "q": "quick", "from": "yesterday"}, 400, "invalid-parameter", "from"),
        ({"tenant": TENANT, "q": "quick", "cursor": "nope"}, 400, "invalid-cursor", "cursor"),
        ({"tenant": TENANT, "q": "quick", "where": "1"}, 400, "unknown-parameter", "where"),
    ],
)
def test_bad_searches_are_refused_with_a_stable_code(
    endpoint: str, parameters: dict[str, str], status: int, code: str, field: str
) -> None:
    answer_status, body = staff_get(f"{endpoint}/v1/search?{urllib.parse.urlencode(parameters)}")
    assert (answer_status, body["code"], body["field"]) == (status, code, field), body
    assert body["message"]


def test_query_parsing_and_snippets() -> None:
    query = parse_query('Fox "quick  BROWN" fox "x"')
    assert query.words == ("x", "fox")
    assert query.phrases == (("quick", "brown"),)
    assert query.tokens == ("x", "fox", "quick", "brown")
    long_text = "word " * 40 + "the Quick-brown fox" + " word" * 40
    marked = snippet(long_text, query)
    assert marked.startswith("…") and marked.endswith("…")
    assert "«Quick-brown» «fox»" in marked
    cursor = Cursor(1_700_000_000_123_456, "c-1", 7)
    assert Cursor.decode(cursor.encode()) == cursor


async def test_rounds_cut_short_still_give_the_exact_pages(
    searchable: tuple[Settings, ClickHouseStore],
) -> None:
    """With one candidate row per first round, the newest candidate of "quick" is the edit of
    LUNCH (after every send): the round must not answer from it alone but read further."""
    store = searchable[1]
    full = MessageSearch(store)
    tiny = MessageSearch(store, first_round_rows=1)
    for text, limit in (("quick", 2), ("quick", 20), ("brown", 1), ("dinner", 5)):
        request = SearchRequest(tenant=TENANT, query=parse_query(text), limit=limit)
        expected, cut = await full.search(request), await tiny.search(request)
        assert [hit.json() for hit in cut.hits] == [hit.json() for hit in expected.hits]
        assert cut.next_cursor == expected.next_cursor
    request = SearchRequest(tenant=TENANT, query=parse_query("quick"), limit=2)
    page = await tiny.search(request)
    assert page.extra["rounds"] > 1
    following = await tiny.search(
        SearchRequest(
            tenant=TENANT,
            query=request.query,
            limit=2,
            cursor=Cursor.decode(page.next_cursor or ""),
        )
    )
    assert [(hit.conversation_id, hit.seq) for hit in [*page.hits, *following.hits]] == [
        ("c-2", 1),
        ("c-1", 2),
        ("c-1", 1),
    ]


def test_the_cli_prints_the_hits_as_a_table_or_json(endpoint: str) -> None:
    runner = CliRunner()
    table = runner.invoke(
        imstream, ["search", "messages", "--tenant", TENANT, "--url", endpoint, "QUICK"]
    )
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SENT", "AT", "CONVERSATION", "SEQ", "SENDER", "TEXT"]
    assert [line.split()[1:3] for line in lines[1:]] == [["c-2", "1"], ["c-1", "2"], ["c-1", "1"]]
    assert "bob (edited)" in lines[2] and "the «quick» notes" in lines[2]
    assert "3 hit(s)" in table.stderr
    as_json = runner.invoke(
        imstream,
        [
            "search",
            "messages",
            "--tenant",
            TENANT,
            "--url",
            endpoint,
            "--json",
            "--limit",
            "1",
            "brown",
        ],
    )
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.stdout)
    assert [hit["conversation_id"] for hit in body["hits"]] == ["c-2"] and body["next_cursor"]
    refused = runner.invoke(
        imstream, ["search", "messages", "--tenant", TENANT, "--url", endpoint, "?!"]
    )
    assert refused.exit_code == 2 and "[query-empty]" in refused.stderr
    unknown = runner.invoke(
        imstream,
        ["search", "messages", "--tenant", TENANT, "--url", endpoint, "--from", "soon", "quick"],
    )
    assert unknown.exit_code == 2 and "[invalid-parameter]" in unknown.stderr


async def test_a_tokenbf_table_gives_the_same_answers(
    searchable: tuple[Settings, ClickHouseStore], clickhouse: Client
) -> None:
    """The fallback index for a ClickHouse without the text index answers alike."""
    store = searchable[1]
    clickhouse.command(search_table_ddl(store.database, "tokenbf", "fallback_search"))
    database = store.database
    clickhouse.command(
        f"INSERT INTO {database}.fallback_search SELECT * FROM {database}.{SEARCH_TABLE}"
    )
    for text in ("quick", '"hello world"', "dinner", "lunch", "red"):
        request = SearchRequest(tenant=TENANT, query=parse_query(text))
        expected = await MessageSearch(store).search(request)
        fallback = await MessageSearch(store, "fallback_search").search(request)
        assert [hit.json() for hit in fallback.hits] == [hit.json() for hit in expected.hits]


def test_a_clickhouse_failure_answers_unavailable(clickhouse: Client) -> None:
    """A store whose database is gone: the search answers 503 ``unavailable``, not a crash."""
    store = ClickHouseStore(clickhouse, "t_search_missing_db", owns_client=False)
    try:
        with serving(staff_app(Analytics(store))) as url:
            status, body = staff_get(f"{url}/v1/search?tenant={TENANT}&q=quick")
            assert (status, body["code"]) == (503, "unavailable"), body
            assert "ClickHouse did not answer" in body["message"]
            status, _ = staff_get(f"{url}/healthz")
            assert status == 200, "the endpoint keeps serving"
    finally:
        store.close()
