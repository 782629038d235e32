"""The ``imstream`` command: the operator's entry point to every process and tool."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.settings import Settings
from pipelines.certs_cli import certs_command
from pipelines.console import StatusLine, load_settings, table_text
from pipelines.dashboards_cli import dashboards_app
from pipelines.dlq import dlq_app
from pipelines.processes import BY_NAME, PROCESSES
from pipelines.quality import quality_app
from pipelines.replay_cli import rebuild_app, replay_command
from pipelines.search_cli import search_app
from pipelines.stack.errors import StackError
from pipelines.stack.manager import LocalStack, ServiceState, ServiceStatus
from pipelines.stack.process import last_lines
from pipelines.staff_cli import staff_app
from pipelines.supervisor import ChildSpec, StartupError, Supervisor
from pipelines.tenant_cli import tenant_app
from pipelines.topics import ChangeAction, apply_topics
from pipelines.topics_cli import topics_app
from schemas.topics import topic_catalog

app = typer.Typer(
    help="imstream: an instant-messaging backend built as a stream-processing pipeline on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The embedded local stack: Kafka, Cassandra and ClickHouse (chDB).")
run_app = typer.Typer(
    help="Run one imstream process in the foreground until SIGTERM or Ctrl-C.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")
app.add_typer(quality_app, name="quality")
app.command("replay")(replay_command)
app.command("certs")(certs_command)
app.add_typer(rebuild_app, name="rebuild")
app.add_typer(search_app, name="search")
app.add_typer(dashboards_app, name="dashboards")
app.add_typer(staff_app, name="staff")
app.add_typer(tenant_app, name="tenant")
app.add_typer(run_app, name="run")
db_app = typer.Typer(help="The CQL serving store: schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

#: Process logs: one line per event, to stderr, for whatever collects the process's output.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProgressLine(StatusLine):
    """The local stack's progress: a download's ``fetching …: …`` lines replace each other (on
    a pipe, one every few seconds), every other line stays."""

    def __call__(self, text: str) -> None:
        if text.startswith("fetching ") and ":" in text:
            self.update(text)
        else:
            self.print(text)


def fail(error: StackError) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(1)


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1_048_576:.0f} MB"


def render_statuses(statuses: list[ServiceStatus]) -> str:
    rows = [
        (
            status.name,
            status.state.value,
            status.endpoint,
            ",".join(map(str, status.pids)) or "-",
            _megabytes(status.rss_bytes),
            str(status.data_path) if status.data_path else "-",
            str(status.log_path) if status.log_path else "-",
        )
        for status in statuses
    ]
    table = table_text(("SERVICE", "STATE", "ENDPOINT", "PID", "RSS", "DATA", "LOG"), rows)
    details = [f"  {status.name}: {status.detail}" for status in statuses if status.detail]
    return "\n".join([table, *details])


@stack_app.command("up")
def stack_up() -> None:
    """Start Kafka and Cassandra (fetching their jars on first use) and check ClickHouse."""
    settings = load_settings()
    began = time.monotonic()
    try:
        with ProgressLine() as progress:
            statuses = LocalStack(settings, progress=progress).up()
    except StackError as error:
        raise fail(error) from error
    typer.echo(render_statuses(statuses))
    typer.echo(
        f"stack up in {time.monotonic() - began:.1f}s (state dir {settings.stack.state_dir})"
    )


@stack_app.command("down")
def stack_down() -> None:
    """Stop every process the stack started; nothing of it is left running."""
    settings = load_settings()
    for line in LocalStack(settings).down():
        typer.echo(line)


@stack_app.command("status")
def stack_status() -> None:
    """Show up/down per service; exits 1 when any service is not up."""
    settings = load_settings()
    statuses = LocalStack(settings).status()
    typer.echo(render_statuses(statuses))
    if any(status.state is not ServiceState.UP for status in statuses):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str, typer.Argument(help="kafka or cassandra")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many lines to show")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
) -> None:
    """Print the last lines of a service's log (ClickHouse runs in-process and has none)."""
    settings = load_settings()
    try:
        log_path = LocalStack(settings).server(service).log_path
    except KeyError as error:
        typer.echo(f"error: [unknown-service] {error.args[0]}", err=True)
        raise typer.Exit(2) from error
    for line in last_lines(log_path, lines):
        typer.echo(line)
    if follow:
        _follow(log_path)


def _follow(path: Path) -> None:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        handle.seek(0, 2)
        while True:
            line = handle.readline()
            if line:
                typer.echo(line.rstrip("\n"))
            else:
                time.sleep(0.5)


@app.command("up")
def up(
    ingress_nodes: Annotated[
        int,
        typer.Option(
            min=1,
            max=8,
            help="Ingress nodes, on consecutive ports from IM_INGRESS__PORT (ingress-1, -2 …) "
            "and IM_INGRESS__INTERNAL_PORT (their metrics and docs)",
        ),
    ] = 2,
    sink_nice: Annotated[
        int,
        typer.Option(
            min=0,
            max=19,
            help="CPU priority steps below the rest for the sinks (0: same): on one machine the "
            "delivery path (ingress, stream worker) gets the CPU first, the sinks catch up",
        ),
    ] = 10,
) -> None:
    """Run the main job on the local stack until Ctrl-C, then stop everything it started.

    Starts the local stack, applies the topic catalog and the CQL migrations, then runs every
    process kind as a child process (restarted when it crashes) — the ingress as several nodes,
    so that a message sent to one node reaches a device on another — and says "imstream is up"
    only once every process announced it is ready. A process that exits first, or is still not
    ready after IM_STACK__READY_TIMEOUT_SECONDS, stops the start-up: its last log lines are
    shown and nothing it started is left running (exit 1).
    """
    settings = load_settings()
    progress = ProgressLine()
    stack = LocalStack(settings, progress=progress)
    try:
        with progress:
            statuses = stack.up()
    except StackError as error:
        raise fail(error) from error
    typer.echo(render_statuses(statuses))
    catalog = topic_catalog(settings)
    changes = apply_topics(AdminClient(kafka_config(settings)), catalog)
    created = sum(change.action is ChangeAction.CREATED for change in changes)
    typer.echo(f"topics: {len(changes)} in the catalog, {created} created")
    from sinks.cql.migrate import migrate_command  # noqa: PLC0415

    if migrate_command(settings, dry_run=False, echo=lambda line: typer.echo(f"schema: {line}")):
        _echo_lines(stack.down(only=stack.started))
        raise typer.Exit(1)
    supervisor = Supervisor(
        process_specs(settings, ingress_nodes, sink_nice),
        settings.stack.run_dir / "logs",
        report=typer.echo,
    )
    stopping = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    began = time.monotonic()
    supervisor.start_all()
    try:
        took = supervisor.wait_ready(
            settings.stack.ready_timeout_seconds, ProgressLine(), interrupted=stopping.is_set
        )
    except StartupError as failure:
        typer.echo(f"error: {failure}", err=True)
        _echo_lines(supervisor.stop_all(settings.stack.stop_timeout_seconds))
        _echo_lines(stack.down(only=stack.started))
        typer.echo("the start-up failed; nothing that imstream up started is left running")
        raise typer.Exit(1) from failure
    typer.echo(render_processes(settings, supervisor, took))
    typer.echo(
        f"imstream is up: {len(took)} processes ready in {time.monotonic() - began:.1f}s. "
        "Press Ctrl-C to stop."
    )
    while not stopping.wait(1.0):
        supervisor.check()
    typer.echo("stopping …")
    _echo_lines(supervisor.stop_all(settings.stack.stop_timeout_seconds))
    _echo_lines(stack.down(only=stack.started))


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


def process_specs(settings: Settings, ingress_nodes: int, sink_nice: int) -> list[ChildSpec]:
    """Every ``imstream run`` process kind once, the ingress as ``ingress_nodes`` nodes on
    consecutive ports, the sinks ``sink_nice`` steps lower in CPU priority."""
    ingress = settings.ingress
    specs: list[ChildSpec] = []
    for kind in (process.name for process in PROCESSES):
        if kind != "ingress":
            nice = sink_nice if BY_NAME[kind].sink else 0
            specs.append(ChildSpec(name=kind, kind=kind, nice=nice))
            continue
        for index in range(ingress_nodes):
            node = f"ingress-{index + 1}"
            specs.append(
                ChildSpec(
                    name=node,
                    kind=kind,
                    env={
                        "IM_INGRESS__PORT": str(ingress.port + index),
                        "IM_INGRESS__INTERNAL_PORT": str(ingress.internal_port + index),
                        "IM_INGRESS__NODE_ID": node,
                    },
                )
            )
    return specs


def render_processes(settings: Settings, supervisor: Supervisor, took: dict[str, float]) -> str:
    """What runs where: each process, its pid, how long it took to be ready, where it answers."""
    ingress, sinks = settings.ingress, settings.sinks
    rows = []
    for child in supervisor.children:
        if child.kind == "ingress":
            port = child.env.get("IM_INGRESS__PORT", str(ingress.port))
            tls = "s" if ingress.tls_cert_path is not None else ""
            internal = child.env.get("IM_INGRESS__INTERNAL_PORT", str(ingress.internal_port))
            where = (
                f"ws{tls}://{ingress.host}:{port}/v1/ws · "
                f"http://{ingress.internal_host}:{internal}/docs, /metrics"
            )
        elif child.kind == "clickhouse-sink":
            scheme = "https" if sinks.analytics_tls_cert_path is not None else "http"
            where = (
                f"{scheme}://{sinks.analytics_host}:{sinks.analytics_port}/v1/analytics"
                " · /dashboards (staff token: imstream staff token --dashboards)"
            )
        else:
            where = "-"
        ready = f"{took[child.name]:.1f}s" if child.name in took else "-"
        rows.append((child.name, str(child.pid or "-"), ready, where, str(child.log_path)))
    return table_text(("PROCESS", "PID", "READY AFTER", "ANSWERS ON", "LOG"), rows)


@run_app.command("stream-worker")
def run_stream_worker(
    processor: Annotated[
        list[str] | None,
        typer.Option(
            "--processor",
            help="Run only this processor (conversations or users); repeatable. Default: both.",
        ),
    ] = None,
) -> None:
    """The stream processors: sequencing, fan-out, sync ids, routing, push jobs (transactional)."""
    chosen = processor or ["conversations", "users"]
    unknown = sorted(set(chosen) - {"conversations", "users"})
    if unknown:
        raise typer.BadParameter(
            f"unknown processor {', '.join(unknown)}; choose conversations or users",
            param_hint="--processor",
        )
    _run_process("stream-worker", processors=chosen)


def _run_process(name: str, **options: object) -> None:
    """Run the process kind ``name`` of the process table in the foreground; exit with its code."""
    settings = load_settings()
    configure_process_logging()
    raise typer.Exit(BY_NAME[name].main()(settings, **options))


def _register_processes() -> None:
    """An ``imstream run <name>`` command for every process of the table without options of
    its own (the stream worker takes ``--processor``, above)."""
    for kind in PROCESSES:
        if kind.name != "stream-worker":
            run_app.command(kind.name, help=kind.summary)(_command_for(kind.name))


def _command_for(name: str) -> Callable[[], None]:
    def command() -> None:
        _run_process(name)

    return command


_register_processes()


class RepeatFilter(logging.Filter):
    """Lets a message through at most once per ``window`` seconds (numbers ignored).

    librdkafka reports every reconnect attempt, and a missing topic is retried every second:
    during an outage the same line would otherwise bury everything else in the log.
    """

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._last_seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{re.sub(r'[0-9]+', '#', record.getMessage())}"
        now = time.monotonic()
        last = self._last_seen.get(key)
        if last is not None and now - last < self.window:
            return False
        if len(self._last_seen) > 10_000:
            self._last_seen.clear()
        self._last_seen[key] = now
        return True


def configure_process_logging() -> None:
    """Logging for a long-running process: INFO from imstream, warnings from libraries."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    # uvicorn logs every accepted WebSocket at INFO: one line per client is noise at 10k sockets.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("imstream.kafka").setLevel(logging.WARNING)
    repeats = RepeatFilter()
    for name in ("imstream.kafka", "ingress.live", "ingress.producer"):
        logging.getLogger(name).addFilter(repeats)


@app.command("revoke")
def revoke(  # noqa: PLR0917 - typer maps each parameter to an option
    jti: Annotated[
        str | None, typer.Option("--jti", help="Revoke the one token with this jti")
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", help="Log this user out: every token issued before now"),
    ] = None,
    device: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--device",
            metavar="USER DEVICE",
            help="Log one device of a user out: every token it uses issued before now",
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(
            help="The tenant (required with --user and --device; with --jti, the "
            "token's tenant, else every tenant)"
        ),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why, for the audit")] = None,
    operator: Annotated[
        str | None, typer.Option(help="Who revokes, for the audit; default the login name")
    ] = None,
) -> None:
    """Revoke a token, or log a user or a device out, on every ingress node: refused from now
    on (token-revoked) and their open sockets closed (4005) within a second."""
    from pydantic import ValidationError  # noqa: PLC0415

    from pipelines.operator_actions import operator_name  # noqa: PLC0415
    from pipelines.revoke import (  # noqa: PLC0415
        RevocationError,
        describe,
        publish_revocation,
        revocation,
    )

    if sum(given is not None for given in (jti, user, device)) != 1:
        typer.echo("error: give exactly one of --jti, --user, --device", err=True)
        raise typer.Exit(2)
    settings = load_settings()
    user_id, device_id = device if device is not None else (user, None)
    try:
        event = revocation(
            operator=operator_name(operator),
            tenant_id=tenant,
            token_id=jti,
            user_id=user_id,
            device_id=device_id,
            reason=reason,
        )
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        typer.echo(f"error: {'.'.join(map(str, problem['loc']))}: {problem['msg']}", err=True)
        raise typer.Exit(2) from None
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        topic, partition, offset = publish_revocation(settings, event)
    except RevocationError as error:
        typer.echo(f"error: [kafka-unavailable] not revoked: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{describe(event)} (event {event.event_id}, {topic}[{partition}]@{offset})")


@app.command("ready")
def ready() -> None:
    """Exit 0 once this process announced that it is ready (IM_READY_FILE), 1 while it has not
    or no longer runs: the healthcheck of every process container."""
    from core.readiness import read_announcement  # noqa: PLC0415
    from pipelines.stack.process import is_alive  # noqa: PLC0415

    settings = load_settings()
    if settings.ready_file is None:
        typer.echo(
            "error: [ready-file-unset] set IM_READY_FILE to the process's ready file", err=True
        )
        raise typer.Exit(2)
    found = read_announcement(settings.ready_file)
    if found is None or not is_alive(found.pid):
        typer.echo(f"starting: no running process announced readiness in {settings.ready_file}")
        raise typer.Exit(1)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.ready_at))
    typer.echo(f"ready since {since} (pid {found.pid}: {found.detail})")


@app.command("status")
def status() -> None:
    """Every process `imstream up` runs: up or down, restarts, consumer lag, last error."""
    from pipelines.status import status_command  # noqa: PLC0415

    raise typer.Exit(status_command(load_settings(), typer.echo))


@app.command("demo")
def demo(  # noqa: PLR0917 - typer maps each parameter to an option
    url: Annotated[
        str | None, typer.Option(help="The ingress WebSocket URL; default from the settings")
    ] = None,
    users: Annotated[int, typer.Option(min=2, help="Simulated users")] = 20,
    conversations: Annotated[int, typer.Option(min=1, help="Conversations (half 1:1)")] = 10,
    group_size: Annotated[int, typer.Option(min=2, help="Members per group")] = 5,
    rate: Annotated[float, typer.Option(min=0.1, help="Messages per second in all")] = 20.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of sending")] = 30.0,
    tenant: Annotated[str, typer.Option(help="The tenant the users belong to")] = "demo",
    offline_users: Annotated[
        int,
        typer.Option(
            min=0,
            help="Users that never connect and register a push token (half APNs, half FCM): "
            "their messages become pushes, reported from the analytics API",
        ),
    ] = 0,
) -> None:
    """Simulated users chatting through a running imstream (start it with `imstream up`), then
    a summary: sent, accepted, delivered live and by sync, duplicates and lost (both must be 0),
    send→deliver latency; with --offline-users, the push jobs owed to them and the push
    outcomes by provider. Exits 1 when anything was lost or doubled, or a push job has no
    outcome."""
    from pipelines.demo import DemoOptions, main_demo  # noqa: PLC0415

    settings = load_settings()
    ingress = settings.ingress
    target = url or f"ws://{ingress.host}:{ingress.port}/v1/ws"
    options = DemoOptions(
        url=target,
        tenant=tenant,
        users=users,
        conversations=conversations,
        group_size=group_size,
        rate=rate,
        duration=duration,
        offline_users=offline_users,
    )
    raise typer.Exit(
        main_demo(
            settings, options, echo=typer.echo, progress=lambda line: typer.echo(line, err=True)
        )
    )


@db_app.command("migrate")
def db_migrate(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be applied; change nothing.")
    ] = False,
) -> None:
    """Create the keyspace if needed and apply every migration not yet applied (idempotent)."""
    from sinks.cql.migrate import migrate_command  # noqa: PLC0415

    raise typer.Exit(migrate_command(load_settings(), dry_run=dry_run, echo=typer.echo))


@db_app.command("status")
def db_status() -> None:
    """The applied and pending migrations of the keyspace."""
    from sinks.cql.migrate import status_command  # noqa: PLC0415

    raise typer.Exit(status_command(load_settings(), echo=typer.echo))


def main() -> None:
    app()
