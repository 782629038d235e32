"""Message search over 1M messages: the production search SQL per skip index, against the same
searches without the index and against a plain ``LIKE`` full scan, in one chDB of its own.

    python -m bench.search [--messages 1000000] [--runs 20] [--no-write]

The data is made in ClickHouse (``INSERT … SELECT FROM numbers()``) in a temporary chDB path of
this process: one tenant, 10,000 conversations of 100 messages, 5,000 senders, 30 days; each text
8-15 words drawn from a 20,000-word vocabulary with Zipf-like frequencies (rank ``k`` with
probability ∝ 1/k, as in natural language), so there are rare, medium and common words; one
message in 200 also carries a fixed two-word phrase of medium words, one in 200,000 an
"order number" token. 2% of the messages are
edited (a second row with new words) and 1% recalled, so the fold per message does real work.
The rows are the ``message_search`` rows the feed writes (``analytics.search``).

The same rows go into one table per index kind (``INDEXES``: ClickHouse's ``text`` index,
``tokenbf_v1``, ``ngrambf_v1``), each merged. Five searches, each run ``--runs`` times after two
warm-ups (p50/p99 of the wall time of a whole ``MessageSearch.search``: its rounds of queries
and the fold in Python, as the analytics API runs it):

- a needle tenant-wide (a token in 5 messages, like an order number), a rare word tenant-wide
  (≈ 60 messages), common word tenant-wide (≈ 20% of messages; the page
  is the newest 20 of them), a phrase of two medium words, a common word in one conversation,
  and a user's search for a medium word over 50 conversations (the scoped form of the ingress).

Per index kind: ``MessageSearch`` on its table (for ``ngrambf`` the token test is ``LIKE``, the
only form that index answers). Baselines in the same run: ``MessageSearch`` on the ``text``
table with ``SETTINGS use_skip_indexes = 0`` (the hits are asserted equal to the indexed ones),
and a plain ``LIKE '%word%'`` scan of the sent rows, newest first (no fold). Results go to
``docs/bench/search.json``. Every query runs with ``use_query_condition_cache = 0``: ClickHouse
would otherwise remember, from the first run of a search, the granules where its filter matched
nothing, and the repeats would measure that memo instead of the search.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from analytics.search import MessageSearch, ScopeRange, SearchRequest
from bench.common import REPO_ROOT, Progress, machine_facts, now_iso, percentiles_ms, run_main
from bench.harness import add_output_options
from core.settings import Settings
from schemas.search import parse_query
from sinks.clickhouse.schema import SEARCH_TABLE, normalized, search_table_ddl
from sinks.clickhouse.store import ClickHouseStore

DATABASE = "bench_search"
TENANT = "bench"
CONVERSATIONS = 10_000
SENDERS = 5_000
VOCABULARY = 20_000
DAYS = 30
OUTPUT = REPO_ROOT / "docs" / "bench" / "search.json"
#: Vocabulary ranks of the words searched (rank 1 is the most frequent).
RARE_RANK, MEDIUM_RANK, COMMON_RANK = 15_000, 300, 5
PHRASE_RANKS = (40, 41)
#: A token in one message of this many (an order number: what analysts look up by id).
NEEDLE, NEEDLE_EVERY = "zq4417", 200_000
INDEX_KINDS = ("text", "tokenbf", "ngrambf")
#: ClickHouse remembers which granules a filter matched nowhere (the query condition cache):
#: repeating one search would measure that memo, not the search. Off for every variant.
NO_CONDITION_CACHE = "use_query_condition_cache = 0"


def vocabulary(size: int) -> list[str]:
    """``size`` distinct pronounceable words, the same every run."""
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    codas = ["", "n", "r", "s", "l", "k"]
    syllables = ["".join(parts) for parts in itertools.product(onsets, vowels, codas)]
    words: list[str] = []
    for length in (2, 3):
        for combination in itertools.product(syllables, repeat=length):
            words.append("".join(combination))
            if len(words) == size:
                return words
    raise ValueError("vocabulary too large")


def table_name(kind: str) -> str:
    return f"{SEARCH_TABLE}_{kind}"


def generate(client: Client, messages: int, progress: Progress) -> dict[str, Any]:
    """The vocabulary, the base table (no index) with the messages, edits and recalls."""
    words = vocabulary(VOCABULARY)
    client.command(f"CREATE TABLE {DATABASE}.vocab (rank UInt32, word String) ENGINE = Memory")
    client.insert("vocab", [(rank + 1, word) for rank, word in enumerate(words)], database=DATABASE)
    client.command(search_table_ddl(DATABASE, "none", table_name("none")))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    step_us = int(timedelta(days=DAYS).total_seconds() * 1_000_000 / messages)
    phrase = f"{words[PHRASE_RANKS[0] - 1]} {words[PHRASE_RANKS[1] - 1]}"
    # A word of rank floor(V ** u), u uniform: P(rank k) ∝ 1/k.
    pick = (
        "v[toUInt32(least({n}, greatest(1, floor(pow({n}, "
        "cityHash64(number, {salt}, i) / 18446744073709551615.0)))))]"
    )
    words_of = (
        "arrayStringConcat(arrayMap(i -> "
        + pick.format(n=VOCABULARY, salt="{salt}")
        + ", range(8 + cityHash64(number, {salt}) % 8)), ' ')"
    )
    uuid_of = (
        "reinterpretAsUUID(concat(reinterpretAsString(cityHash64(number, {a})), "
        "reinterpretAsString(cityHash64(number, {b}))))"
    )
    common = f"""
WITH (SELECT groupArray(word) FROM (SELECT word FROM {DATABASE}.vocab ORDER BY rank)) AS v
SELECT '{TENANT}' AS tenant_id,
       concat('c-', toString(number % {CONVERSATIONS})) AS conversation_id,
       {uuid_of.format(a=1, b=2)} AS message_id,
       {{event_id}} AS event_id,
       {{kind}} AS kind,
       {{seq}} AS seq,
       {{event_seq}} AS event_seq,
       {{sender}} AS sender_id,
       fromUnixTimestamp64Micro(toInt64({int(start.timestamp() * 1_000_000)} + number * {step_us}
           + {{after_us}}), 'UTC') AS occurred_at,
       {{text}} AS text,
       __NORMALIZED__ AS text_norm
FROM numbers({messages})
"""
    body = words_of.format(salt=11)
    sent_text = (
        f"concat(upperUTF8(substring({body}, 1, 1)), substring({body}, 2), "
        f"if(number % 200 = 7, ' {phrase}', ''), "
        f"if(number % {NEEDLE_EVERY} = 11, ' order {NEEDLE}', ''), '.')"
    )

    def later(minutes: int, kind: str, text: str, where: str) -> str:
        """Events ``minutes`` after the sends of the messages ``where`` picks (edits, recalls):
        their own event ids, and event seqs ``minutes`` millions past the sends'."""
        return (
            common.format(
                event_id=uuid_of.format(a=2 + 2 * minutes, b=3 + 2 * minutes),
                kind=kind,
                seq="0",
                event_seq=f"intDiv(number, {CONVERSATIONS}) + {minutes * 1_000_000 + 1}",
                sender="''",
                after_us=str(minutes * 60_000_000),
                text=text,
            )
            + f" WHERE {where}"
        )

    statements = {
        "messages": common.format(
            event_id="message_id",
            kind="'message.sent'",
            seq=f"intDiv(number, {CONVERSATIONS}) + 1",
            event_seq=f"intDiv(number, {CONVERSATIONS}) + 1",
            sender=f"concat('u-', toString((number * 7 + cityHash64(number, 3) % 20) % {SENDERS}))",
            after_us="0",
            text=sent_text,
        ),
        "edits": later(1, "'message.edited'", words_of.format(salt=12), "number % 50 = 3"),
        "recalls": later(2, "'message.recalled'", "''", "number % 100 = 5"),
    }
    columns = (
        "tenant_id, conversation_id, message_id, event_id, kind, seq, event_seq, sender_id, "
        "occurred_at, text, text_norm"
    )
    timings = {}
    for name, statement in statements.items():
        started = time.monotonic()
        select = statement.replace("__NORMALIZED__", normalized("text"))
        client.command(
            f"INSERT INTO {DATABASE}.{table_name('none')} ({columns}) {select}",
            settings={"max_query_size": 10_000_000},
        )
        timings[name] = round(time.monotonic() - started, 2)
        progress.done(f"generated {name} in {timings[name]} s")
    return {"phrase": phrase, "generate_seconds": timings}


def build_indexed(client: Client, progress: Progress) -> dict[str, Any]:
    """One table per index kind with the base table's rows, merged; build time and sizes."""
    built: dict[str, Any] = {}
    for kind in ("none", *INDEX_KINDS):
        table = table_name(kind)
        started = time.monotonic()
        if kind != "none":
            client.command(search_table_ddl(DATABASE, kind, table))
            client.command(
                f"INSERT INTO {DATABASE}.{table} SELECT * FROM {DATABASE}.{table_name('none')}"
            )
        client.command(f"OPTIMIZE TABLE {DATABASE}.{table} FINAL")
        seconds = round(time.monotonic() - started, 2)
        sizes = client.query(
            "SELECT sum(data_compressed_bytes), sum(data_uncompressed_bytes), sum(rows), count() "
            "FROM system.parts WHERE database = {db:String} AND table = {t:String} AND active",
            parameters={"db": DATABASE, "t": table},
        ).result_rows[0]
        index_bytes = client.query(
            "SELECT sum(data_compressed_bytes) FROM system.data_skipping_indices "
            "WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": DATABASE, "t": table},
        ).result_rows[0][0]
        built[kind] = {
            "insert_and_merge_seconds": seconds,
            "rows": int(sizes[2]),
            "parts": int(sizes[3]),
            "table_compressed_mb": round(int(sizes[0]) / 2**20, 1),
            "index_compressed_mb": round(int(index_bytes or 0) / 2**20, 2),
        }
        progress.done(f"table {table}: {built[kind]}")
    return built


def searches(words: list[str]) -> dict[str, SearchRequest]:
    rare, medium, common = (words[rank - 1] for rank in (RARE_RANK, MEDIUM_RANK, COMMON_RANK))
    phrase = " ".join(words[rank - 1] for rank in PHRASE_RANKS)
    scope = tuple(ScopeRange(f"c-{n}") for n in range(0, CONVERSATIONS, CONVERSATIONS // 50))
    return {
        "needle_tenant_wide": SearchRequest(tenant=TENANT, query=parse_query(NEEDLE)),
        "rare_word_tenant_wide": SearchRequest(tenant=TENANT, query=parse_query(rare)),
        "common_word_tenant_wide": SearchRequest(tenant=TENANT, query=parse_query(common)),
        "phrase_tenant_wide": SearchRequest(tenant=TENANT, query=parse_query(f'"{phrase}"')),
        "common_word_one_conversation": SearchRequest(
            tenant=TENANT, query=parse_query(common), conversation="c-4242"
        ),
        "medium_word_user_50_conversations": SearchRequest(
            tenant=TENANT, query=parse_query(medium), scope=scope
        ),
    }


def like_sql(request: SearchRequest, table: str) -> tuple[str, dict[str, Any]]:
    """The plain baseline: the sent rows whose normalized text contains every token (and the
    phrase), newest first — no fold, no index."""
    parameters: dict[str, Any] = {"tenant": request.tenant, "limit": request.limit + 1}
    conditions = ["tenant_id = {tenant:String}", "kind = 'message.sent'"]
    for number, token in enumerate(request.query.tokens):
        parameters[f"like_{number}"] = f"%{token}%"
        conditions.append(f"text_norm LIKE {{like_{number}:String}}")
    for number, phrase in enumerate(request.query.phrases):
        parameters[f"phrase_{number}"] = f"%{' '.join(phrase)}%"
        conditions.append(f"text_norm LIKE {{phrase_{number}:String}}")
    if request.conversation is not None:
        parameters["conversation"] = request.conversation
        conditions.append("conversation_id = {conversation:String}")
    if request.scope is not None:
        parameters["scope"] = [item.conversation_id for item in request.scope]
        conditions.append("conversation_id IN {scope:Array(String)}")
    sql = (
        f"SELECT conversation_id, seq, message_id, sender_id, occurred_at, text "
        f"FROM {DATABASE}.{table} WHERE {' AND '.join(conditions)} "
        "ORDER BY occurred_at DESC LIMIT {limit:UInt32} "
        f"SETTINGS use_skip_indexes = 0, {NO_CONDITION_CACHE}"
    )
    return sql, parameters


def timed(
    calls: dict[str, Callable[[], Any]], runs: int
) -> dict[str, tuple[dict[str, float | None], Any]]:
    """p50/p99 of ``runs`` calls of each, after two warm-ups, and each one's last answer. The
    calls take turns (one of each per run), so load from elsewhere on the machine falls on all
    of them alike."""
    answers: dict[str, Any] = {}
    for _ in range(2):
        for name, call in calls.items():
            answers[name] = call()
    durations: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            answers[name] = call()
            durations[name].append(time.perf_counter() - started)
    results = {}
    for name in calls:
        latency = percentiles_ms(durations[name])
        results[name] = ({"p50": latency["p50"], "p99": latency["p99"]}, answers[name])
    return results


def page_of(loop: asyncio.AbstractEventLoop, search: MessageSearch, request: SearchRequest) -> Any:
    page = loop.run_until_complete(search.search(request))
    return [hit.json() for hit in page.hits], page.extra.get("rounds")


def frequencies(client: Client, requests: dict[str, SearchRequest]) -> dict[str, int]:
    """How many messages' sent text holds each searched token (what makes a word rare)."""
    counts: dict[str, int] = {}
    for request in requests.values():
        for token in request.query.tokens:
            if token not in counts:
                counts[token] = int(
                    client.query(
                        f"SELECT count() FROM {DATABASE}.{table_name('none')} "
                        "WHERE kind = 'message.sent' AND hasToken(text_norm, {t:String})",
                        parameters={"t": token},
                    ).result_rows[0][0]
                )
    return counts


def run(messages: int, runs: int, progress: Progress) -> dict[str, Any]:
    path = Path(tempfile.mkdtemp(prefix="imstream-bench-search-"))
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    try:
        client.command(f"CREATE DATABASE {DATABASE}")
        data = generate(client, messages, progress)
        tables = build_indexed(client, progress)
        words = vocabulary(VOCABULARY)
        requests = searches(words)
        store = ClickHouseStore(client, DATABASE, owns_client=False)
        loop = asyncio.new_event_loop()
        variants = {
            f"index_{kind}": MessageSearch(
                store,
                table_name(kind),
                operator="like" if kind == "ngrambf" else "hasToken",
                settings_clause=f"SETTINGS {NO_CONDITION_CACHE}",
            )
            for kind in INDEX_KINDS
        }
        variants["no_index"] = MessageSearch(
            store,
            table_name("text"),
            settings_clause=f"SETTINGS use_skip_indexes = 0, {NO_CONDITION_CACHE}",
        )
        results: dict[str, Any] = {}
        for name, request in requests.items():
            case: dict[str, Any] = {"query": request.query.text}
            sql, parameters = like_sql(request, table_name("none"))
            calls: dict[str, Callable[[], Any]] = {
                variant: partial(page_of, loop, search, request)
                for variant, search in variants.items()
            }
            calls["like_scan"] = partial(client.query, sql, parameters=parameters)
            measured = timed(calls, runs)
            reference = measured["index_text"][1][0]
            case["hits_on_page"] = len(reference)
            for variant in variants:
                latency, (hits, rounds) = measured[variant]
                case[f"{variant}_ms"] = latency
                case[f"{variant}_rounds"] = rounds
                if variant != "index_ngrambf" and hits != reference:
                    raise AssertionError(f"{name}: {variant} answered differently")
            case["like_scan_ms"] = measured["like_scan"][0]
            progress.done(
                f"{name}: "
                + ", ".join(f"{variant} p50 {measured[variant][0]['p50']} ms" for variant in calls)
            )
            best = case["index_text_ms"]["p50"]
            case["speedup_vs_no_index_p50"] = round(case["no_index_ms"]["p50"] / best, 1)
            case["speedup_vs_like_scan_p50"] = round(case["like_scan_ms"]["p50"] / best, 1)
            results[name] = case
        loop.close()
        store.close()
        return {
            "messages": messages,
            "rows": tables["none"]["rows"],
            "conversations": CONVERSATIONS,
            "senders": SENDERS,
            "vocabulary": VOCABULARY,
            "runs_per_search": runs,
            "phrase": data["phrase"],
            "token_message_counts": frequencies(client, requests),
            "generate_seconds": data["generate_seconds"],
            "tables": tables,
            "searches": results,
        }
    finally:
        client.close()
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    add_output_options(parser, OUTPUT)
    options = parser.parse_args(argv)
    progress = Progress()
    started = time.monotonic()
    results = run(options.messages, options.runs, progress)
    document = {
        "recorded_at": now_iso(),
        "machine": machine_facts(Settings()),
        "note": "chDB in the bench process; see machine.load_average_at_start",
        "elapsed_seconds": round(time.monotonic() - started, 1),
        **results,
    }
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if not options.no_write:
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
