"""Crash soak of the stream worker: 10,000 messages while the worker is SIGKILLed 5 times.

    python -m bench.stream_crash_soak [--messages 10000] [--kills 5] [--pairs 50] [--seed 4]

Runs against the local stack's Kafka under a topic prefix of its own (deleted at the end) and
checks the delivery contract afterwards: one seq per message and no seq used twice, every member's
sync queue holding every message once in order, unread counts matching the messages. It prints
each finding and exits 1 on any violation.

Status (see docs/streams.md, "Open problem"): not clean yet — after the restarts some sync
entries do not appear — so it is a soak run here, not yet a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from bench.common import run_main, with_topic_prefix
from bench.harness import bench_parser
from core.connections import kafka_config
from core.settings import Settings
from pipelines.topics import apply_topics
from schemas.events import MessageSent, SyncRecord, parse_event
from schemas.topics import topic_catalog
from streams.processors import USERS_TABLE, stored_user
from streams.state import MemoryState
from tests.streams.support import (
    TENANT,
    Worker,
    created,
    direct_pairs,
    message,
    produce,
    read_topic,
    wait_for_sync,
    worker_environment,
)

log = logging.getLogger("bench.stream_crash_soak")


def latest_user_states(settings: Settings) -> MemoryState:
    changelog = topic_catalog(settings).user_state.name
    states = MemoryState()
    consumer = Consumer(
        kafka_config(
            settings,
            **{"group.id": f"soak-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"},
        )
    )
    consumer.subscribe([changelog])
    last = time.monotonic()
    try:
        while time.monotonic() - last < 5.0:
            record = consumer.poll(0.5)
            if record is None or record.error() is not None:
                continue
            key = (record.key() or b"").decode()
            value = record.value()
            states.put(USERS_TABLE, key, None if value is None else json.loads(value))
            last = time.monotonic()
    finally:
        consumer.close()
    return states


def read_queues(settings: Settings, topic: str) -> dict[str, dict[int, SyncRecord]]:
    """The sync queues as they stand; a sync id holding two different events is logged."""
    queues: dict[str, dict[int, SyncRecord]] = defaultdict(dict)
    for value in read_topic(settings, topic, idle_seconds=3.0):
        record = SyncRecord.model_validate_json(value)
        previous = queues[record.user_id].get(record.sync_id)
        if previous is not None and previous != record:
            log.error("%s: sync id %d holds two different events", record.user_id, record.sync_id)
        queues[record.user_id][record.sync_id] = record
    return queues


def reused_seqs(settings: Settings, topic: str) -> int:
    """How many conversation seqs were given to two or more messages (each one a violation)."""
    seqs: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for value in read_topic(settings, topic):
        event = parse_event(value)
        if isinstance(event, MessageSent):
            seqs[event.payload.conversation_id][event.payload.conversation_seq or 0].add(
                event.event_id
            )
    reused = sum(1 for by_seq in seqs.values() for ids in by_seq.values() if len(ids) > 1)
    log.info("seqs used for two or more messages: %d", reused)
    return reused


def queue_violations(
    pairs: list[tuple[str, str, str]],
    sends: list[MessageSent],
    queues: dict[str, dict[int, SyncRecord]],
) -> int:
    """The members whose sync queue misses a message of their conversation or has them out of
    order; each is logged."""
    violations = 0
    for sender, receiver, conversation_id in pairs:
        wanted = [s.event_id for s in sends if s.payload.conversation_id == conversation_id]
        for user in (sender, receiver):
            queued = [queues[user][k].event for k in sorted(queues.get(user, {}))]
            got = [e.event_id for e in queued if isinstance(e, MessageSent)]
            if got != wanted:
                violations += 1
                missing = len(set(wanted) - set(got))
                log.error(
                    "%s: %d of %d messages missing or out of order", user, missing, len(wanted)
                )
    return violations


def unread_violations(
    states: MemoryState, pairs: list[tuple[str, str, str]], sends: list[MessageSent]
) -> int:
    """The receivers whose unread count is not every message of their conversation."""
    violations = 0
    for _sender, receiver, conversation_id in pairs:
        count = sum(1 for s in sends if s.payload.conversation_id == conversation_id)
        state = stored_user(states, f"{TENANT}/{receiver}")
        view = state.conversations.get(conversation_id) if state else None
        unread = view.unread if view else 0
        if unread != count:
            violations += 1
            log.error("%s: unread %d, expected %d", receiver, unread, count)
    return violations


def parse_args() -> argparse.Namespace:
    parser = bench_parser("bench.stream_crash_soak", __doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--instance-id", default=None, help="static group membership id")
    parser.add_argument("--timeout", type=float, default=480, help="seconds to wait for the queues")
    parser.add_argument("--keep", action="store_true", help="keep the topics for inspection")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = Settings()
    prefix = f"soak-{uuid.uuid4().hex[:8]}-"
    settings = with_topic_prefix(base, prefix)
    admin = AdminClient(kafka_config(settings))
    catalog = topic_catalog(settings)
    apply_topics(admin, catalog)
    environment = worker_environment(
        settings,
        member_admission="open",  # synthetic users never sign in
        **({"instance_id": args.instance_id} if args.instance_id else {}),
    )
    log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "stream-worker.log"
    worker = Worker(environment, log_path)
    log.info("prefix %s, worker log %s", prefix, log_path)
    violations = 0
    try:
        pairs = direct_pairs(args.pairs)
        produce(settings, catalog, [created(a, b, cid) for a, b, cid in pairs])
        rng = random.Random(args.seed)
        sends = [
            message(pairs[i % len(pairs)][0], pairs[i % len(pairs)][2], f"m{i}")
            for i in range(args.messages)
        ]

        def feed() -> None:
            for start in range(0, len(sends), 500):
                produce(settings, catalog, sends[start : start + 500])
                time.sleep(0.4)

        feeder = threading.Thread(target=feed)
        worker.start()
        feeder.start()
        for kill in range(args.kills):
            time.sleep(rng.uniform(1.0, 4.0))
            worker.kill()
            log.info("kill %d/%d; restarting", kill + 1, args.kills)
            worker.start()
        feeder.join()
        expected = 2 * (len(sends) + len(pairs))
        stop = threading.Event()

        def supervise() -> None:
            while not stop.wait(1.0):
                if worker.restart_if_exited():
                    log.info("worker exited on its own; restarted")

        supervisor = threading.Thread(target=supervise)
        supervisor.start()
        try:
            queues = wait_for_sync(settings, catalog, expected, timeout=args.timeout)
        except AssertionError as error:
            log.error("sync queues incomplete: %s", error)
            violations += 1
            queues = read_queues(settings, catalog.sync_events.name)
        finally:
            stop.set()
            supervisor.join()
        log.info(
            "distinct sync entries: %d of %d expected",
            sum(len(queue) for queue in queues.values()),
            expected,
        )
        violations += reused_seqs(settings, catalog.messages_sequenced.name)
        violations += queue_violations(pairs, sends, queues)
        violations += unread_violations(latest_user_states(settings), pairs, sends)
        log.info("violations: %d", violations)
    finally:
        worker.stop()
        names = [n for n in admin.list_topics(timeout=30).topics if n.startswith(prefix)]
        if names and not args.keep:
            for future in admin.delete_topics(names).values():
                future.result(timeout=60)
    return 1 if violations else 0


if __name__ == "__main__":
    run_main(main)
