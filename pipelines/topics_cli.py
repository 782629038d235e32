"""``imstream topics``: create, update and inspect the catalog's Kafka topics."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipelines.connections import kafka_config
from pipelines.console import load_settings
from pipelines.settings import Settings
from pipelines.topics import ChangeAction, TopicAdminError, apply_topics, describe_topics
from schemas.topics import TopicCatalog, topic_catalog

topics_app = typer.Typer(
    help="The Kafka topics of the catalog (schemas/topics.py): apply it, list what is there.",
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
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
