"""``imstream tenant``: operator commands on a tenant's data keys (docs/operations.md).

``rewrap-keys`` re-wraps every tenant's data key from the previous master key
(``IM_CRYPTO__PREVIOUS_MASTER_KEY``) to the current one (``IM_CRYPTO__MASTER_KEY``): the master
key's rotation, with no sealed value rewritten (docs/security.md).

``forget-key`` deletes the tenant's wrapped data key from the CQL store (crypto-shredding,
docs/security.md "Encryption at rest"): every message body, conversation-list preview and push
token the CQL sink sealed with it becomes unreadable for good — reads serve the bodies as
withheld — and the tenant's next message is sealed with a new key. Irreversible: the command
asks for confirmation unless ``--yes`` is given, and records an ``operator.action`` event.
"""

from __future__ import annotations

from typing import Annotated

import typer

from core.connections import CqlUnavailableError, cql_session
from pipelines.console import load_settings
from pipelines.operator_actions import OperatorAuditError, operator_name, record_operator_action
from schemas.events import OperatorOutcome
from sinks.cql.crypto import forget_key, kek_id, rewrap_keys

tenant_app = typer.Typer(help="A tenant's data keys in the CQL store.", no_args_is_help=True)

FORGET_KEY_COMMAND = "tenant forget-key"
REWRAP_KEYS_COMMAND = "tenant rewrap-keys"
#: Tenants named at most in the report of keys neither master key opens.
SHOWN_TENANTS = 20


@tenant_app.command("forget-key")
def forget_key_command(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant whose key to delete.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    operator: Annotated[
        str | None, typer.Option("--operator", help="Who runs it (default: the login name).")
    ] = None,
) -> None:
    """Delete TENANT's data key: its stored bodies, previews and push tokens become unreadable."""
    settings = load_settings()
    if not yes and not typer.confirm(
        f"Delete the data key of tenant {tenant}? Its stored message bodies, previews and push "
        "tokens become unreadable for good",
        default=False,
    ):
        typer.echo("nothing done")
        raise typer.Exit(1)
    try:
        with cql_session(settings) as session:
            key_id = forget_key(session, settings.cql.keyspace, tenant)
    except CqlUnavailableError as error:
        typer.echo(f"error: [cql-unavailable] {error}", err=True)
        raise typer.Exit(1) from error
    if key_id is None:
        typer.echo(f"tenant {tenant} has no data key in {settings.cql.keyspace}: nothing to forget")
    else:
        typer.echo(
            f"tenant {tenant}: data key {key_id} deleted from {settings.cql.keyspace}.tenant_keys. "
            "Its message bodies (served as withheld), previews and push tokens in the CQL store "
            f"are unreadable; running processes drop their cached copy within "
            f"{settings.crypto.key_cache_seconds:g} s (IM_CRYPTO__KEY_CACHE_SECONDS); the "
            "tenant's next message gets a new key"
        )
    try:
        record_operator_action(
            settings,
            operator=operator_name(operator),
            command=FORGET_KEY_COMMAND,
            arguments={"tenant": tenant},
            counts={"keys_deleted": 0 if key_id is None else 1},
            outcome=OperatorOutcome.SUCCEEDED,
        )
    except OperatorAuditError as error:
        typer.echo(f"warning: the key is deleted, but the action is not audited: {error}", err=True)
        raise typer.Exit(1) from error


@tenant_app.command("rewrap-keys")
def rewrap_keys_command(
    operator: Annotated[
        str | None, typer.Option("--operator", help="Who runs it (default: the login name).")
    ] = None,
) -> None:
    """Re-wrap every tenant key under IM_CRYPTO__PREVIOUS_MASTER_KEY with IM_CRYPTO__MASTER_KEY."""
    settings = load_settings()
    try:
        new = settings.master_key()
        old = settings.previous_master_key()
    except ValueError as error:
        typer.echo(f"error: [settings-invalid] {error}", err=True)
        raise typer.Exit(2) from error
    if old is None:
        typer.echo(
            "error: [settings-invalid] set IM_CRYPTO__PREVIOUS_MASTER_KEY to the master key to "
            "rotate away from (IM_CRYPTO__MASTER_KEY is the new one)",
            err=True,
        )
        raise typer.Exit(2)
    try:
        with cql_session(settings) as session:
            result = rewrap_keys(session, settings.cql.keyspace, old, new)
    except CqlUnavailableError as error:
        typer.echo(f"error: [cql-unavailable] {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(
        f"{result.rewrapped} tenant key(s) re-wrapped from master key {kek_id(old)} to "
        f"{kek_id(new)} in {settings.cql.keyspace}.tenant_keys; {result.current} already under "
        f"{kek_id(new)}"
    )
    if result.unknown:
        shown = ", ".join(result.unknown[:SHOWN_TENANTS])
        more = len(result.unknown) - SHOWN_TENANTS
        typer.echo(
            f"error: [key-unknown] {len(result.unknown)} tenant key(s) are wrapped by neither "
            f"master key, left as they are: {shown}{f' and {more} more' if more > 0 else ''}",
            err=True,
        )
    try:
        record_operator_action(
            settings,
            operator=operator_name(operator),
            command=REWRAP_KEYS_COMMAND,
            arguments={"from": kek_id(old), "to": kek_id(new)},
            counts={
                "rewrapped": result.rewrapped,
                "current": result.current,
                "unknown": len(result.unknown),
            },
            outcome=OperatorOutcome.FAILED if result.unknown else OperatorOutcome.SUCCEEDED,
            error="tenant keys wrapped by neither master key" if result.unknown else None,
        )
    except OperatorAuditError as error:
        typer.echo(f"warning: the keys are re-wrapped, but not audited: {error}", err=True)
        raise typer.Exit(1) from error
    if result.unknown:
        raise typer.Exit(1)
