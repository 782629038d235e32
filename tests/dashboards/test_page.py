"""The built-in dashboards page on the real chDB: seeded audit rows with known answers give those
answers in every panel, through the HTTP endpoint the ClickHouse sink serves; the tenant and range
selectors filter; a panel whose query fails shows its error and the rest of the page renders; bad
parameters are refused with their codes. And the lag sampler writes real Kafka lag samples and
outlives a failing sample."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client

from analytics.access import ApiGate
from analytics.api import AnalyticsServer
from analytics.dashboards_page import DashboardPages, dashboards_router
from analytics.lag import LagSampler
from analytics.queries import Analytics
from core.principals import staff_authenticator
from core.settings import Settings
from dashboards.definitions import DEFINITIONS_DIR, load_dashboards
from pipelines.processes import consumer_groups
from pipelines.stack.manager import LocalStack
from schemas import events as ev
from schemas.topics import TopicCatalog, topic_catalog
from sinks.clickhouse.schema import (
    AUDIT_COLUMNS,
    AUDIT_TABLE,
    CONSUMER_LAG_TABLE,
    PUSH_OUTCOMES_TABLE,
)
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.clickhouse_support import (
    TENANT,
    Outgoing,
    at,
    catalog_topics,
    created,
    new_prefix,
    prefixed_settings,
    presence,
    produce,
    sent,
)
from tests.sinks.staff_support import serving, staff_app, staff_headers
from tests.sinks.test_clickhouse_analytics import OUTCOME_COLUMNS, Seed

pytestmark = pytest.mark.stack

T0 = at("2026-03-01T10:00:00")
#: Lag samples are kept 90 days (a TTL): they are seeded in the last hour.
LAG_T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
LAG_WINDOW = {
    "from": (LAG_T0 - timedelta(minutes=5)).isoformat(),
    "to": (LAG_T0 + timedelta(minutes=5)).isoformat(),
}
GLOBEX = "globex"
WINDOW = {"from": "2026-03-01T09:30:00Z", "to": "2026-03-01T11:00:00Z"}


def seed(catalog: TopicCatalog) -> Seed:
    """acme: a direct conversation and three groups (3 members; 6 + 1 added; 2 - 1 left), five
    messages, each copied into its recipients' sync queues 20/40/…/ms later and echoed to the
    sender; globex: one group and one message."""
    data = Seed(catalog)
    sequenced, sync = catalog.messages_sequenced.name, catalog.sync_events.name
    dm = ev.direct_conversation_id(TENANT, "alice", "bob")
    members = {
        dm: ["alice", "bob"],
        "g-1": ["bob", "carol", "dave"],
        "g-2": ["erin", "fay", "gus", "hal", "ida", "jo"],
        "g-3": ["kim", "lee"],
    }
    for conversation, people in members.items():
        kind = ev.ConversationKind.DIRECT if conversation == dm else ev.ConversationKind.GROUP
        data.event(sequenced, created(conversation, kind, people, T0))
    data.event(
        sequenced,
        ev.ConversationMemberAdded.new(
            tenant_id=TENANT,
            actor=ev.Actor(user_id="erin"),
            occurred_at=T0 + timedelta(seconds=1),
            payload=ev.ConversationMemberAddedPayload(conversation_id="g-2", user_id="max"),
        ),
    )
    data.event(
        sequenced,
        ev.ConversationLeft.new(
            tenant_id=TENANT,
            actor=ev.Actor(user_id="lee"),
            occurred_at=T0 + timedelta(seconds=2),
            payload=ev.ConversationLeftPayload(conversation_id="g-3", user_id="lee"),
        ),
    )
    data.event(
        sequenced, created("g-x", ev.ConversationKind.GROUP, ["zed", "yan"], T0, tenant=GLOBEX)
    )
    messages = [
        sent("alice", dm, "a1", T0 + timedelta(seconds=5), seq=1),
        sent("bob", dm, "b1", T0 + timedelta(seconds=10), seq=2),
        sent("alice", dm, "a2", T0 + timedelta(seconds=15), seq=3),
        sent("bob", "g-1", "b2", T0 + timedelta(seconds=65), seq=1),
        sent("carol", "g-1", "c1", T0 + timedelta(seconds=70), seq=2),
    ]
    sync_id = 0
    latency = 0
    for message in messages:
        data.event(sequenced, message, after_ms=5)
        data.event(catalog.messages_in.name, message)
        assert message.actor is not None
        for user in members[message.payload.conversation_id]:
            sync_id += 1
            echo = user == message.actor.user_id
            latency = latency if echo else latency + 20
            data.add(
                sync,
                ev.SyncRecord(tenant_id=TENANT, user_id=user, sync_id=sync_id, event=message)
                .model_dump_json()
                .encode(),
                record_time=message.occurred_at + timedelta(milliseconds=1 if echo else latency),
            )
    data.event(
        sequenced, sent("zed", "g-x", "z1", T0 + timedelta(seconds=30), seq=1, tenant=GLOBEX)
    )
    data.event(catalog.presence.name, presence("erin", T0 + timedelta(minutes=20)))
    data.dead_letter(
        catalog.messages_in.name, b"not json", "malformed-json", 7, T0 + timedelta(seconds=40)
    )
    return data


def outcomes() -> list[tuple[Any, ...]]:
    """Three pushes sent, one failed, one job with no device (skipped: not an attempt)."""
    rows = []
    for index, (provider, outcome) in enumerate(
        [("apns", "sent"), ("fcm", "sent"), ("apns", "sent"), ("fcm", "failed"), ("", "skipped")]
    ):
        job = ev.derived_event_id(f"job-{index}", "push")
        moment = T0 + timedelta(seconds=20 + index)
        rows.append(
            (
                job,
                TENANT,
                "carol",
                "g-1",
                ev.message_event_id(TENANT, "bob", "b2"),
                moment,
                f"carol-{index}" if provider else "",
                provider,
                1 if provider else 0,
                outcome,
                200,
                None,
                moment,
                moment,
            )
        )
    return rows


@pytest.fixture
def store(
    local_stack: LocalStack, clickhouse: Client, clickhouse_database: str, settings: Settings
) -> Iterator[ClickHouseStore]:
    catalog = topic_catalog(prefixed_settings(settings, new_prefix("dash")))
    store = ClickHouseStore(clickhouse, clickhouse_database, owns_client=False)
    store.apply_schema(catalog)
    clickhouse.insert(
        AUDIT_TABLE,
        seed(catalog).rows,
        column_names=[*AUDIT_COLUMNS, "ingested_at"],
        database=clickhouse_database,
    )
    clickhouse.insert(
        PUSH_OUTCOMES_TABLE, outcomes(), column_names=OUTCOME_COLUMNS, database=clickhouse_database
    )
    clickhouse.insert(
        CONSUMER_LAG_TABLE,
        [
            [LAG_T0 + timedelta(seconds=10), "cql-sink", "g-cql", 40],
            [LAG_T0 + timedelta(seconds=10), "stream-worker", "g-conv", 5],
            [LAG_T0 + timedelta(seconds=10), "stream-worker", "g-users", 7],
            [LAG_T0 + timedelta(seconds=20), "cql-sink", "g-cql", 3],
            [LAG_T0 + timedelta(seconds=20), "stream-worker", "g-conv", 0],
        ],
        column_names=["sampled_at", "process", "group_id", "lag"],
        database=clickhouse_database,
    )
    yield store
    store.close()


@pytest.fixture
def endpoint(store: ClickHouseStore) -> Iterator[str]:
    """The analytics app as the sink process serves it (dashboards included), on a free port."""
    with serving(staff_app(Analytics(store))) as url:
        yield url


def get(url: str) -> tuple[int, str]:
    response = httpx.get(url, headers=staff_headers(), timeout=60)
    return response.status_code, response.text


def panels(endpoint: str, dashboard: str, **parameters: str) -> dict[str, dict[str, Any]]:
    query = urllib.parse.urlencode({**WINDOW, **parameters})
    status, body = get(f"{endpoint}/dashboards/{dashboard}/data?{query}")
    assert status == 200, body
    return {panel["id"]: panel for panel in json.loads(body)["panels"]}


def value(panel: dict[str, Any]) -> Any:
    assert panel["status"] == "ok", json.dumps(panel)
    return panel["rows"][0][0]


def statuses(html: str) -> dict[str, str]:
    return dict(re.findall(r"data-panel-id='([a-z0-9_]+)'[^>]*data-panel-status='([a-z]+)'", html))


def test_every_panel_answers_what_the_seed_holds(endpoint: str) -> None:
    activity = panels(endpoint, "activity", tenant=TENANT)
    assert value(activity["messages_in_range"]) == 5
    assert value(activity["dau_over_mau"]) == 1.0  # one day of activity: DAU = MAU
    assert activity["group_sizes"]["rows"] == [["1-2", 1], ["3-5", 1], ["6-10", 1]]
    per_minute = activity["messages_per_minute"]
    assert per_minute["interval_seconds"] == 60
    assert sorted((row[1], row[2]) for row in per_minute["rows"]) == [
        (f"{TENANT} · direct", 3.0),
        (f"{TENANT} · group", 2.0),
    ]
    conversations = {row[0]: row[1] for row in activity["active_conversations"]["rows"]}
    assert sum(conversations.values()) == 2  # zero-filled buckets, one per conversation
    assert activity["daily_active_users"]["rows"] == [["2026-03-01T00:00:00Z", 4]]

    everyone = panels(endpoint, "activity")
    assert value(everyone["messages_in_range"]) == 6
    assert {row[1] for row in everyone["messages_per_minute"]["rows"]} == {
        f"{TENANT} · direct",
        f"{TENANT} · group",
        f"{GLOBEX} · group",
    }

    delivery = panels(endpoint, "delivery", tenant=TENANT)
    # Recipients only (echoes to senders excluded): 20, 40, …, 140 ms; p99 is the largest.
    assert value(delivery["delivery_p99"]) == 140
    latency = delivery["delivery_latency"]["rows"]
    assert latency and all(len(row) == 4 for row in latency)
    assert value(delivery["push_success"]) == pytest.approx(0.75)
    assert value(delivery["dead_letters_total"]) == 0  # undecodable: no tenant
    assert value(panels(endpoint, "delivery")["dead_letters_total"]) == 1
    assert delivery["consumer_lag_now"]["status"] == "empty"  # no sample in that window
    recent = panels(endpoint, "delivery", **LAG_WINDOW)
    assert value(recent["consumer_lag_now"]) == 3  # the latest sample: 3 + 0
    lag = {(row[1], row[0]): row[2] for row in recent["consumer_lag"]["rows"]}
    first = (LAG_T0 + timedelta(seconds=10)).isoformat().replace("+00:00", "Z")
    assert lag[("stream-worker", first)] == 12  # the two groups of one process, summed
    assert {row[1] for row in delivery["push_outcomes"]["rows"]} == {
        "apns sent",
        "fcm sent",
        "fcm failed",
        "no device skipped",
    }


def test_the_page_draws_every_panel_as_a_chart(endpoint: str) -> None:
    for dashboard in ("activity", "delivery"):
        query = urllib.parse.urlencode(WINDOW)
        status, html = get(f"{endpoint}/dashboards/{dashboard}?{query}")
        assert status == 200
        found = statuses(html)
        if dashboard == "delivery":  # the lag samples are recent, the audit is not
            assert found.pop("consumer_lag") == found.pop("consumer_lag_now") == "empty"
            assert "No data in this range" in html
        assert len(found) == (6 if dashboard == "delivery" else 8), found
        assert set(found.values()) == {"ok"}, found
        sections = re.findall(r"<section .*?</section>", html, flags=re.S)
        for section in sections:
            if "data-panel-status='ok'" not in section:
                continue
            if "data-panel-kind='stat'" in section:
                assert re.search(r"data-chart='stat'>[^<]*\d", section), section[:300]
            else:
                assert "<svg" in section and "class='mark'" in section, section[:300]
    status, index = get(f"{endpoint}/dashboards")
    assert status == 200 and "/dashboards/activity" in index and "/dashboards/delivery" in index


def test_the_tenant_and_range_selectors_filter(endpoint: str) -> None:
    globex = panels(endpoint, "activity", tenant=GLOBEX)
    assert value(globex["messages_in_range"]) == 1
    assert globex["group_sizes"]["rows"] == [["1-2", 1]]
    later = panels(endpoint, "activity", **{"from": "2026-03-01T10:01:00Z"})
    assert value(later["messages_in_range"]) == 2
    status, html = get(f"{endpoint}/dashboards/activity?{urllib.parse.urlencode(WINDOW)}")
    assert status == 200
    assert f"<option value='{GLOBEX}'>" in html and f"<option value='{TENANT}'>" in html
    # Nothing before the seed: the charts say so instead of drawing nothing.
    empty = panels(
        endpoint, "activity", **{"from": "2026-02-01T00:00:00Z", "to": "2026-02-02T00:00:00Z"}
    )
    assert empty["messages_per_minute"]["status"] == "empty"
    assert empty["group_sizes"]["status"] == "empty"


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("range=2h", 400, "invalid-parameter"),
        ("colour=red", 400, "unknown-parameter"),
        ("tenant=a%20b", 400, "invalid-parameter"),
        ("from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", 400, "invalid-parameter"),
        ("from=2026-03-01T00:00:00", 400, "invalid-parameter"),
        ("from=2025-01-01T00:00:00Z&to=2026-03-01T00:00:00Z", 400, "invalid-parameter"),
    ],
)
def test_bad_parameters_are_refused_with_their_code(
    endpoint: str, query: str, status: int, code: str
) -> None:
    answered, html = get(f"{endpoint}/dashboards/activity?{query}")
    assert answered == status
    assert f"data-error-code='{code}'" in html
    answered, body = get(f"{endpoint}/dashboards/activity/data?{query}")
    assert answered == status and json.loads(body)["code"] == code


def test_an_unknown_dashboard_is_a_404(endpoint: str) -> None:
    status, html = get(f"{endpoint}/dashboards/nope")
    assert status == 404 and "data-error-code='unknown-dashboard'" in html


def test_a_failing_panel_shows_its_error_and_the_page_still_renders(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    shutil.copytree(DEFINITIONS_DIR / "delivery", tmp_path / "delivery")
    broken = tmp_path / "delivery" / "consumer_lag.sql"
    broken.write_text(broken.read_text().replace("$__db.consumer_lag", "$__db.no_such_table"))
    pages = DashboardPages(store, load_dashboards(tmp_path))
    from fastapi import FastAPI  # noqa: PLC0415 - a bare app around the router alone

    app = FastAPI()
    app.include_router(dashboards_router(pages))
    # The routes read the principal the gate verified; without it they refuse.
    app.add_middleware(
        ApiGate,
        authenticator=staff_authenticator(Settings()),
        max_body_bytes=1024,
    )
    server = AnalyticsServer(app, "127.0.0.1", 0)
    server.start()
    try:
        status, html = get(f"{server.url}/dashboards/delivery?{urllib.parse.urlencode(WINDOW)}")
    finally:
        server.stop()
    assert status == 200
    found = statuses(html)
    assert found.pop("consumer_lag") == "error"
    assert found.pop("consumer_lag_now") == "empty"  # no recent sample; not an error
    assert set(found.values()) == {"ok"} and len(found) == 6, found
    panel = re.search(r"data-panel-id='consumer_lag'.*?</section>", html, flags=re.S)
    assert panel is not None and "no_such_table" in panel.group(0)
    assert "1 failed" in html


def test_the_lag_sampler_writes_every_groups_lag_and_outlives_failures(
    store: ClickHouseStore, settings: Settings
) -> None:
    prefixed = prefixed_settings(settings, new_prefix("lag"))
    groups = consumer_groups(prefixed)
    with catalog_topics(prefixed) as catalog:
        # Nobody has consumed these: every group's lag is what was written to its topics.
        produce(prefixed, [Outgoing(catalog.messages_in.name, b"c-1", b"{}") for _ in range(3)])
        sampler = LagSampler(prefixed, store, consumer_groups, interval=0.05)
        assert sampler.sample() == sum(len(g) for g in groups.values())
    result = store.query(
        f"SELECT process, group_id, lag FROM `{store.database}`.{CONSUMER_LAG_TABLE} "
        "WHERE group_id LIKE {prefix:String}",
        {"prefix": prefixed.kafka.topic_prefix + "%"},
    )
    lags = {(row[0], row[1]): row[2] for row in result.result_rows}
    assert lags == {
        (process, group): (3 if catalog.messages_in.name in topics else 0)
        for process, by_group in groups.items()
        for group, topics in by_group.items()
    }
    # Its topics gone (as before `imstream topics apply`), a group is skipped, not fatal.
    assert sampler.sample() == 0 and sampler.group_failures == len(lags)

    calls = 0
    per_sample = sum(len(g) for g in groups.values())
    table = f"`{store.database}`.{CONSUMER_LAG_TABLE}"

    def flaky(_settings: Settings, _group: str, _topics: list[str]) -> int | None:
        """The first sample cannot be stored (its table is gone: a real ClickHouse error); the
        table is back for the next."""
        nonlocal calls
        calls += 1
        if calls == 1:
            store.call(lambda client: client.command(f"DROP TABLE {table}"))
        elif calls == per_sample + 1:
            store.apply_schema(catalog)
        return 1

    sampler = LagSampler(prefixed, store, consumer_groups, interval=0.05, read_lag=flaky)
    sampler.start()
    deadline = time.monotonic() + 20
    while (sampler.samples < 2 or sampler.failures < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.stop()
    assert sampler.failures == 1 and sampler.samples >= 2


def test_the_parameters_round_trip_through_the_selectors(endpoint: str) -> None:
    start = datetime(2026, 3, 1, 9, 30)
    status, html = get(
        f"{endpoint}/dashboards/activity?{urllib.parse.urlencode({**WINDOW, 'tenant': TENANT})}"
    )
    assert status == 200
    assert f"<option value='{TENANT}' selected>" in html
    assert "value='2026-03-01T09:30:00Z'" in html  # the custom range stays in the form
    assert f"{start:%Y-%m-%d %H:%M:%S} → 2026-03-01 11:00:00 UTC · tenant {TENANT}" in html
