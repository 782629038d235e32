"""``imstream topics``: create, update and inspect the catalog's Kafka topics, and read them.

``apply`` and ``list`` manage the catalog; ``inspect``, ``tail`` and ``find`` are read-only looks
for operators (``pipelines/topics_ops.py``): they never commit an offset or write a record.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.settings import Settings
from core.timeargs import parse_moment
from pipelines.console import load_settings, table_text
from pipelines.kafka_acls import SERVICES, acl_bindings, apply_acls, describe_binding
from pipelines.topics import ChangeAction, TopicAdminError, apply_topics, describe_topics
from pipelines.topics_ops import (
    Filters,
    FindProgress,
    TopicInspection,
    UnknownTopicError,
    find,
    inspect_topics,
    resolve_topics,
    tail,
)
from schemas.topics import TopicCatalog, topic_catalog

topics_app = typer.Typer(
    help="The Kafka topics of the catalog (schemas/topics.py): apply it, list what is there, "
    "and read them (inspect offsets and lag, tail decoded records, find an event).",
    no_args_is_help=True,
)

Timeout = Annotated[float, typer.Option("--timeout", help="seconds to wait for Kafka")]


def _connect() -> tuple[Settings, TopicCatalog, AdminClient]:
    settings = load_settings()
    return settings, topic_catalog(settings), AdminClient(kafka_config(settings))


def _unreachable(settings: Settings, error: Exception) -> typer.Exit:
    typer.echo(
        f"error: [kafka-unavailable] {settings.kafka.bootstrap_servers}: {error}. Start the "
        "local stack with `imstream stack up`, or point IM_KAFKA__BOOTSTRAP_SERVERS at a cluster.",
        err=True,
    )
    return typer.Exit(1)


@topics_app.command("apply")
def apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would change")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Create missing topics, fix drifted configs, add partitions; never deletes anything."""
    settings, catalog, admin = _connect()
    try:
        changes = apply_topics(admin, catalog, dry_run=dry_run, timeout=timeout)
    except TopicAdminError as error:
        typer.echo(f"error: [topics-refused] {error}", err=True)
        raise typer.Exit(1) from error
    except KafkaException as error:
        raise _unreachable(settings, error) from error
    verb = "would be " if dry_run else ""
    for change in changes:
        label = f"{verb}{change.action.value}"
        typer.echo(f"{label:<{len(verb) + 9}}  {change.topic.name}")
        for line in change.details():
            typer.echo(f"    {line}")
        for warning in change.warnings:
            typer.echo(f"    warning: {warning}")
    counts = {action: sum(c.action is action for c in changes) for action in ChangeAction}
    typer.echo(
        ("dry run: " if dry_run else "")
        + ", ".join(f"{count} {action.value}" for action, count in counts.items())
    )


@topics_app.command("grant")
def grant(
    service: Annotated[
        list[str] | None,
        typer.Option("--service", help=f"only these services (default all: {', '.join(SERVICES)})"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only show the ACLs")] = False,
    timeout: Timeout = 30.0,
) -> None:
    """Write the ACLs of each service's principal, User:<service> (pipelines/kafka_acls.py):
    run as an administrator on a cluster with an authorizer; adding one twice changes nothing."""
    settings, _catalog, admin = _connect()
    chosen = service or list(SERVICES)
    unknown = sorted(set(chosen) - set(SERVICES))
    if unknown:
        typer.echo(
            f"error: [unknown-service] {', '.join(unknown)}; known: {', '.join(SERVICES)}",
            err=True,
        )
        raise typer.Exit(2)
    if dry_run:
        bindings = [b for name in chosen for b in acl_bindings(settings, name)]
    else:
        try:
            bindings = list(apply_acls(admin, settings, chosen, timeout=timeout))
        except KafkaException as error:
            raise _unreachable(settings, error) from error
    for binding in bindings:
        typer.echo(describe_binding(binding))
    typer.echo(f"{'dry run: ' if dry_run else ''}{len(bindings)} ACLs for {', '.join(chosen)}")


@topics_app.command("list")
def list_topics(timeout: Timeout = 30.0) -> None:
    """Show every catalog topic with its key, partitions, cleanup, retention and end offsets."""
    settings, catalog, admin = _connect()
    try:
        states = describe_topics(admin, catalog, timeout=timeout)
    except TopicAdminError as error:
        typer.echo(f"error: [topics-unreadable] {error}", err=True)
        raise typer.Exit(1) from error
    except KafkaException as error:
        raise _unreachable(settings, error) from error
    rows = [("TOPIC", "KEY", "PARTITIONS", "CLEANUP", "RETENTION", "END OFFSETS")]
    for state in states:
        if not state.exists:
            rows.append((state.topic.name, state.topic.key.value, "missing", "-", "-", "-"))
            continue
        rows.append(
            (
                state.topic.name,
                state.topic.key.value,
                str(state.partitions),
                state.configs.get("cleanup.policy", "?"),
                _retention(state.configs.get("retention.ms")),
                str(state.end_offsets),
            )
        )
    typer.echo(table_text(rows[0], rows[1:]))
    missing = sum(not state.exists for state in states)
    if missing:
        typer.echo(f"{missing} topic(s) missing: run `imstream topics apply`", err=True)


def _retention(millis: str | None) -> str:
    if millis is None:
        return "?"
    if int(millis) < 0:
        return "forever"
    duration = timedelta(milliseconds=int(millis))
    units = (("d", timedelta(days=1)), ("h", timedelta(hours=1)), ("m", timedelta(minutes=1)))
    for unit, size in units:
        if duration >= size and duration % size == timedelta(0):
            return f"{duration // size}{unit}"
    return f"{int(millis)}ms"


def _unknown_topic(error: UnknownTopicError) -> typer.Exit:
    typer.echo(f"error: [topic-unknown] {error.args[0]}", err=True)
    return typer.Exit(2)


@topics_app.command("inspect")
def inspect(
    topics: Annotated[
        list[str] | None,
        typer.Argument(
            help="topics by logical (im.messages.in) or full name; every catalog topic if none",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
    timeout: Timeout = 10.0,
) -> None:
    """Per topic: each partition's low and high watermark and record count, and for every
    process kind whose consumer group reads it, the committed offset and lag per partition.

    Lag counts as `imstream status` does: records after the committed offset (from the low
    watermark when the group committed nothing); one record behind is caught up (a
    transaction's commit marker).

    Example: imstream topics inspect im.messages.in im.sync.events
    """
    settings, catalog, _ = _connect()
    try:
        found = inspect_topics(settings, resolve_topics(catalog, topics or []), timeout=timeout)
    except UnknownTopicError as error:
        raise _unknown_topic(error) from error
    except KafkaException as error:
        raise _unreachable(settings, error) from error
    if as_json:
        typer.echo(json.dumps([inspection.as_json() for inspection in found], indent=2))
        return
    for number, inspection in enumerate(found):
        if number:
            typer.echo("")
        _show_inspection(inspection)


def _show_inspection(inspection: TopicInspection) -> None:
    topic = inspection.topic
    typer.echo(
        f"{topic.name}  key={topic.key.value}  partitions={len(inspection.partitions)}  "
        f"records={inspection.records}"
    )
    header = ("  PARTITION", "LOW", "HIGH", "RECORDS")
    groups = inspection.groups
    rows: list[tuple[str, ...]] = [
        header + tuple(f"{group.process} COMMITTED/LAG" for group in groups)
    ]
    for index, partition in enumerate(inspection.partitions):
        cells = [f"  {partition.partition}", str(partition.low), str(partition.high)]
        cells.append(str(partition.records))
        for group in groups:
            lag = group.partitions[index]
            committed = "-" if lag.committed is None else str(lag.committed)
            cells.append(f"{committed}/{lag.lag}")
        rows.append(tuple(cells))
    typer.echo(table_text(rows[0], rows[1:]))
    for group in groups:
        typer.echo(f"  {group.process}: group {group.group}, lag {group.lag}")
    if not groups:
        typer.echo("  no process kind reads it with a consumer group")


@topics_app.command("tail")
def tail_command(  # noqa: PLR0917 - typer maps each parameter to an option
    topic: Annotated[str, typer.Argument(help="logical (im.messages.in) or full topic name")],
    last: Annotated[
        int, typer.Option("--last", "-n", min=0, help="start this many offsets before each end")
    ] = 20,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="every retained record (overrides --last)")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep showing new records until Ctrl-C")
    ] = False,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    conversation: Annotated[str | None, typer.Option(help="only this conversation")] = None,
    user: Annotated[
        str | None, typer.Option(help="only this user (the actor, or the record's user)")
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            help="only this type (repeatable): message.sent, push.job, undecodable, …",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per record (the decoded value)")
    ] = False,
    timeout: Timeout = 10.0,
) -> None:
    """Decoded records of a topic, one line each: record time, partition@offset, key, type,
    tenant, conversation, user and a short summary.

    By default the last 20 offsets of every partition, merged by record time. Records are
    decoded as the ClickHouse audit decodes them (events, inbox, sync, live-delivery, push
    records; dead letters by their source's format); a record that does not decode shows as
    `undecodable` with its error code. With a filter, undecodable records show only with
    `--type undecodable`.

    Example: imstream topics tail im.messages.sequenced --conversation c-1 --follow
    """
    settings, catalog, _ = _connect()
    filters = Filters(tenant=tenant, conversation=conversation, user=user, types=tuple(types or ()))
    stop = threading.Event()
    shown = 0
    try:
        records = tail(
            settings,
            catalog,
            resolve_topics(catalog, [topic])[0],
            last=last,
            from_beginning=from_beginning,
            follow=follow,
            filters=filters,
            stop=stop,
            timeout=timeout,
        )
        try:
            for record in records:
                typer.echo(
                    json.dumps(record.as_json(), ensure_ascii=False) if as_json else record.line()
                )
                shown += 1
        except KeyboardInterrupt:
            stop.set()
    except UnknownTopicError as error:
        raise _unknown_topic(error) from error
    except KafkaException as error:
        raise _unreachable(settings, error) from error
    typer.echo(f"{shown} record(s) shown", err=True)


@topics_app.command("find")
def find_command(  # noqa: PLR0917 - typer maps each parameter to an option
    wanted: Annotated[
        str, typer.Argument(metavar="ID", help="an event_id, or a message's client_msg_id")
    ],
    sender: Annotated[
        str | None, typer.Option(help="with a client_msg_id: only the one this user sent")
    ] = None,
    since: Annotated[
        str, typer.Option(help="how far back: a duration (90s, 30m, 1h, 2d) or an ISO time")
    ] = "24h",
    topics: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            help="where to look (repeatable) [default: im.messages.in, im.messages.sequenced]",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per place it is found")
    ] = False,
    timeout: Timeout = 10.0,
) -> None:
    """Every place an event is, by event_id or client_msg_id, among the records written since
    --since (found with offsets_for_times, so older records are not read at all).

    Prints topic, partition@offset, record time and the decoded event for each place; exits 1
    when it is nowhere. Progress (records scanned, rate) goes to stderr on long scans.

    Example: imstream topics find m-42 --sender alice --since 2h
    """
    settings, catalog, _ = _connect()
    try:
        moment = parse_moment(since, "--since", relative_to=datetime.now(UTC))
    except ValueError as error:
        typer.echo(f"error: [time-invalid] {error}", err=True)
        raise typer.Exit(2) from error

    def progress(step: FindProgress) -> None:
        typer.echo(
            f"scanned {step.scanned} records in {step.elapsed:.1f} s ({step.rate:,.0f}/s)", err=True
        )

    places = 0
    try:
        chosen = resolve_topics(
            catalog, topics or [catalog.messages_in.name, catalog.messages_sequenced.name]
        )
        for record in find(
            settings,
            catalog,
            chosen,
            wanted,
            since=moment,
            sender=sender,
            progress=progress,
            timeout=timeout,
        ):
            places += 1
            if as_json:
                typer.echo(json.dumps(record.as_json(), ensure_ascii=False))
                continue
            row = record.row
            stamp = record.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            typer.echo(f"{row.topic}  {row.partition}@{row.offset}  {stamp}  {row.event_type}")
            typer.echo(json.dumps(record.value(), indent=2, ensure_ascii=False))
    except UnknownTopicError as error:
        raise _unknown_topic(error) from error
    except KafkaException as error:
        raise _unreachable(settings, error) from error
    searched = ", ".join(topic.name for topic in chosen)
    when = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    if not places:
        typer.echo(f"not found: {wanted} in {searched} since {when}", err=True)
        raise typer.Exit(1)
    typer.echo(f"found {wanted} in {places} place(s)", err=True)
