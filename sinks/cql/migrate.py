"""Schema migrations of the CQL serving store: ``imstream db migrate [--dry-run]``, ``db status``.

Migrations are the files ``sinks/cql/migrations/NNNN_name.cql`` (found next to this module, so an
installed package finds them too). ``migrate`` creates the keyspace if it is missing
(``SimpleStrategy`` with ``IM_CQL__REPLICATION_FACTOR``; an existing keyspace is used as it is,
whatever its replication — production keyspaces are created by the operator with
``NetworkTopologyStrategy``), creates the ``schema_migrations`` table, then applies every
migration not yet recorded there, in version order, statement by statement, and records it
(``version, name, checksum, applied_at``).

Guarantees:

* **Idempotent.** A second run applies nothing and says so. Every statement of a migration is
  itself idempotent (``IF NOT EXISTS``): a migration interrupted half-way is applied again.
* **Refuses drift.** A recorded migration whose file changed since (checksum) is an error with the
  stable code ``migration-changed``: a released migration is never edited, a new one is added.
* **Safe when concurrent.** Several migrators (two sinks starting at once, an operator running
  ``db migrate`` meanwhile) take turns through a lease — a lightweight-transaction row with a TTL
  in ``schema_migrations_lease`` — because concurrent ``CREATE TABLE`` on different coordinators
  can leave conflicting table ids behind (Cassandra before 5.1). Should the lease be unavailable
  (LWT refused), statements and recording are still idempotent upserts.

Errors carry a stable code (:class:`MigrationErrorCode`) and say what to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cassandra import DriverException
from cassandra.cluster import NoHostAvailable, Session

from core.connections import CqlUnavailableError, cql_session
from core.settings import Settings
from schemas.errors import CodedError
from sinks.cql.writer import is_transient

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATIONS_TABLE = "schema_migrations"
LEASE_TABLE = "schema_migrations_lease"
#: How long a lease lives if its holder dies without releasing it.
LEASE_TTL_SECONDS = 120
#: How long a migrator waits for another one's lease before giving up.
LEASE_WAIT_SECONDS = 150.0
#: Longer waits for schema statements: every node must agree on the new schema.
DDL_TIMEOUT_SECONDS = 60.0

_FILE_NAME = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.cql$")
#: CQL identifiers we accept as a keyspace name (unquoted, at most 48 characters).
_KEYSPACE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")

#: Exit codes of the commands.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PENDING = 2


class MigrationErrorCode(StrEnum):
    """Stable codes of what can go wrong; operators and scripts branch on them."""

    CHANGED = "migration-changed"
    """A recorded migration's file no longer matches its checksum."""
    BAD_FILE = "migration-file-invalid"
    """A file in the migrations folder is not ``NNNN_name.cql``, or two share a version."""
    FAILED = "migration-failed"
    """A statement was refused (syntax, a conflicting existing table)."""
    LOCKED = "migration-locked"
    """Another migrator held the lease for longer than we wait."""
    KEYSPACE_INVALID = "keyspace-invalid"
    """IM_CQL__KEYSPACE is not a plain CQL identifier."""
    UNAVAILABLE = "cql-unavailable"
    """The cluster did not answer."""


class MigrationError(CodedError[MigrationErrorCode]):
    """The schema cannot be brought up to date: which step, and why."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    path: Path
    text: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text; line endings normalised so a checkout on Windows matches."""
        return hashlib.sha256(self.text.replace("\r\n", "\n").encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def statements(self) -> list[str]:
        return split_statements(self.text)


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: datetime | None


@dataclass(frozen=True, slots=True)
class SchemaState:
    """What is applied, what is pending, and what changed since it was applied."""

    applied: list[tuple[Migration | None, AppliedMigration]]
    """Recorded migrations, with their file (None when the file is gone)."""
    pending: list[Migration]
    changed: list[tuple[Migration, AppliedMigration]]


def split_statements(text: str) -> list[str]:
    """The statements of a CQL script: ``--`` and ``//`` comments removed, split on ``;``.

    Quotes are respected: a ``;`` or ``--`` inside a '…' string or a "…" identifier is kept.
    """
    statements: list[str] = []
    current: list[str] = []
    index, length = 0, len(text)
    quote: str | None = None
    while index < length:
        char = text[index]
        if quote is not None:
            current.append(char)
            if char == quote:
                if index + 1 < length and text[index + 1] == quote:  # '' escapes a quote
                    current.append(text[index + 1])
                    index += 1
                else:
                    quote = None
        elif char in "'\"":
            quote = char
            current.append(char)
        elif text.startswith(("--", "//"), index):
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
            continue
        elif char == ";":
            statements.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    statements.append("".join(current))
    return [" ".join(s.split()) for s in statements if s.strip()]


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file of ``directory``, in version order."""
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                MigrationErrorCode.BAD_FILE,
                f"{path} is not named NNNN_name.cql (four digits, lower-case name); rename it "
                "or move it out of the migrations folder",
            )
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(
                MigrationErrorCode.BAD_FILE,
                f"{path.name} and {migrations[version].path.name} share version {version}",
            )
        migrations[version] = Migration(
            version=version,
            name=match["name"],
            path=path,
            text=path.read_text(encoding="utf-8"),
        )
    return [migrations[version] for version in sorted(migrations)]


def check_keyspace_name(keyspace: str) -> str:
    if not _KEYSPACE_NAME.match(keyspace):
        raise MigrationError(
            MigrationErrorCode.KEYSPACE_INVALID,
            f"{keyspace!r} is not a valid keyspace name (a letter, then letters, digits or _, "
            "at most 48 characters); set IM_CQL__KEYSPACE",
        )
    return keyspace


def keyspace_exists(session: Session, keyspace: str) -> bool:
    rows = session.execute(
        "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)
    )
    return rows.one() is not None


def _table_exists(session: Session, keyspace: str, table: str) -> bool:
    rows = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s AND table_name = %s",
        (keyspace, table),
    )
    return rows.one() is not None


def read_applied(session: Session, keyspace: str) -> dict[int, AppliedMigration]:
    """The recorded migrations; empty when the keyspace or the table does not exist yet."""
    if not keyspace_exists(session, keyspace) or not _table_exists(
        session, keyspace, MIGRATIONS_TABLE
    ):
        return {}
    rows = session.execute(
        f"SELECT version, name, checksum, applied_at FROM {keyspace}.{MIGRATIONS_TABLE}"
    )
    return {
        int(row.version): AppliedMigration(
            version=int(row.version),
            name=str(row.name),
            checksum=str(row.checksum),
            applied_at=row.applied_at,
        )
        for row in rows
    }


def schema_state(
    session: Session, keyspace: str, migrations: Sequence[Migration] | None = None
) -> SchemaState:
    """Compare the migration files with what the keyspace has recorded."""
    check_keyspace_name(keyspace)
    files = list(migrations) if migrations is not None else discover()
    by_version = {migration.version: migration for migration in files}
    recorded = read_applied(session, keyspace)
    applied = [(by_version.get(v), recorded[v]) for v in sorted(recorded)]
    changed = [
        (migration, row)
        for migration, row in applied
        if migration is not None and migration.checksum != row.checksum
    ]
    pending = [migration for migration in files if migration.version not in recorded]
    return SchemaState(applied=applied, pending=pending, changed=changed)


def _changed_error(changed: Sequence[tuple[Migration, AppliedMigration]]) -> MigrationError:
    names = ", ".join(migration.path.name for migration, _ in changed)
    return MigrationError(
        MigrationErrorCode.CHANGED,
        f"{names} changed after it was applied (checksum differs from schema_migrations); "
        "restore the released file and put the change into a new migration",
    )


def migrate(
    session: Session,
    keyspace: str,
    replication_factor: int,
    *,
    migrations: Sequence[Migration] | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[Migration]:
    """Bring ``keyspace`` up to date; returns the migrations applied (to be applied, when
    ``dry_run``). Raises :class:`MigrationError`; driver errors (unreachable cluster) pass
    through for the caller to retry or report."""
    check_keyspace_name(keyspace)
    say = echo or log.info
    files = list(migrations) if migrations is not None else discover()
    if dry_run:
        state = schema_state(session, keyspace, files)
        if state.changed:
            raise _changed_error(state.changed)
        if not keyspace_exists(session, keyspace):
            say(f"would create keyspace {keyspace} (SimpleStrategy, RF {replication_factor})")
        for migration in state.pending:
            say(f"would apply {migration.label} ({len(migration.statements())} statements)")
        return state.pending
    _create_keyspace(session, keyspace, replication_factor, say)
    _ddl(
        session,
        f"CREATE TABLE IF NOT EXISTS {keyspace}.{MIGRATIONS_TABLE} (version int PRIMARY KEY, "
        "name text, checksum text, applied_at timestamp)",
    )
    _ddl(
        session,
        f"CREATE TABLE IF NOT EXISTS {keyspace}.{LEASE_TABLE} (name text PRIMARY KEY, "
        "holder text, taken_at timestamp)",
    )
    state = schema_state(session, keyspace, files)
    if state.changed:
        raise _changed_error(state.changed)
    if not state.pending:
        return []
    applied: list[Migration] = []
    with _lease(session, keyspace, say):
        # Read again under the lease: another migrator may have applied some meanwhile.
        state = schema_state(session, keyspace, files)
        if state.changed:
            raise _changed_error(state.changed)
        if not state.pending:
            return []
        with _keyspace_session(session, keyspace) as scoped:
            for migration in state.pending:
                _apply(scoped, keyspace, migration)
                say(f"applied {migration.label} ({len(migration.statements())} statements)")
                applied.append(migration)
    return applied


def _create_keyspace(
    session: Session, keyspace: str, replication_factor: int, say: Callable[[str], None]
) -> None:
    if keyspace_exists(session, keyspace):
        return
    _ddl(
        session,
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        f"{{'class': 'SimpleStrategy', 'replication_factor': {int(replication_factor)}}}",
    )
    say(f"created keyspace {keyspace} (SimpleStrategy, RF {replication_factor})")


def _ddl(session: Session, statement: str) -> None:
    session.execute(statement, timeout=DDL_TIMEOUT_SECONDS)


#: ``ALTER TABLE <table> ADD <column> <type>``: CQL has no portable ``IF NOT EXISTS`` for it.
_ADD_COLUMN = re.compile(r"^\s*ALTER\s+TABLE\s+(\w+)\s+ADD\s+(\w+)\s", re.IGNORECASE)


def _column_exists(session: Session, keyspace: str, table: str, column: str) -> bool:
    rows = session.execute(
        "SELECT column_name FROM system_schema.columns "
        "WHERE keyspace_name = %s AND table_name = %s AND column_name = %s",
        (keyspace, table.lower(), column.lower()),
        timeout=DDL_TIMEOUT_SECONDS,
    )
    return rows.one() is not None


def _apply(session: Session, keyspace: str, migration: Migration) -> None:
    for number, statement in enumerate(migration.statements(), start=1):
        added = _ADD_COLUMN.match(statement)
        if added is not None and _column_exists(session, keyspace, *added.groups()):
            continue  # applied before the migration could be recorded: idempotent
        try:
            _ddl(session, statement)
        except Exception as error:  # the driver raises server errors of several hierarchies
            if is_transient(error):
                raise
            first_line = statement[:120]
            raise MigrationError(
                MigrationErrorCode.FAILED,
                f"{migration.path.name}, statement {number} ({first_line}…) was refused: "
                f"{type(error).__name__}: {error}",
            ) from error
    session.execute(
        f"INSERT INTO {keyspace}.{MIGRATIONS_TABLE} (version, name, checksum, applied_at) "
        "VALUES (%s, %s, %s, %s)",
        (migration.version, migration.name, migration.checksum, datetime.now(UTC)),
    )


@contextmanager
def _keyspace_session(session: Session, keyspace: str) -> Iterator[Session]:
    """A session whose current keyspace is ``keyspace`` (the migration files name tables without
    it); the caller's session is left as it was."""
    scoped = session.cluster.connect(keyspace)
    try:
        yield scoped
    finally:
        scoped.shutdown()


@contextmanager
def _lease(session: Session, keyspace: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the migration lease (an LWT row with a TTL) while applying."""
    holder = uuid.uuid4().hex
    deadline = time.monotonic() + LEASE_WAIT_SECONDS
    announced = False
    while True:
        taken = session.execute(
            f"INSERT INTO {keyspace}.{LEASE_TABLE} (name, holder, taken_at) VALUES "
            f"('migrate', %s, %s) IF NOT EXISTS USING TTL {LEASE_TTL_SECONDS}",
            (holder, datetime.now(UTC)),
        )
        if taken.was_applied:
            break
        if time.monotonic() > deadline:
            raise MigrationError(
                MigrationErrorCode.LOCKED,
                f"another migrator has held the lease in {keyspace}.{LEASE_TABLE} for over "
                f"{LEASE_WAIT_SECONDS:.0f}s; it expires {LEASE_TTL_SECONDS}s after it was "
                "taken — run again then",
            )
        if not announced:
            say("another migrator is applying migrations; waiting for it")
            announced = True
        time.sleep(0.5)
    try:
        yield
    finally:
        session.execute(
            f"DELETE FROM {keyspace}.{LEASE_TABLE} WHERE name = 'migrate' IF holder = %s",
            (holder,),
        )


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A command's session; every driver failure, at connect or later, as ``cql-unavailable``."""
    try:
        with cql_session(settings) as session:
            yield session
    except CqlUnavailableError as error:
        raise MigrationError(MigrationErrorCode.UNAVAILABLE, str(error)) from error
    except (NoHostAvailable, DriverException) as error:
        raise _unavailable(settings, error) from error


def _unavailable(settings: Settings, error: BaseException) -> MigrationError:
    return MigrationError(
        MigrationErrorCode.UNAVAILABLE,
        f"the cluster at {', '.join(settings.cql.contact_points)}:{settings.cql.port} failed a "
        f"request ({type(error).__name__}: {error}); check it is up and run again",
    )


def migrate_command(settings: Settings, *, dry_run: bool, echo: Callable[[str], None]) -> int:
    """``imstream db migrate [--dry-run]``: one line per applied (or pending) migration and a
    summary. Exit 0 on success, 1 on an error (``error: [code] message``)."""
    keyspace = settings.cql.keyspace
    try:
        check_keyspace_name(keyspace)
        files = discover()
        with _session(settings) as session:
            applied = migrate(
                session,
                keyspace,
                settings.cql.replication_factor,
                migrations=files,
                dry_run=dry_run,
                echo=echo,
            )
    except MigrationError as error:
        echo(f"error: {error}")
        return EXIT_ERROR
    if dry_run:
        echo(
            f"dry run: {len(applied)} migration(s) would be applied to keyspace {keyspace}; "
            "nothing was changed"
        )
    elif applied:
        echo(
            f"{len(applied)} migration(s) applied; keyspace {keyspace} is at version "
            f"{applied[-1].version}"
        )
    else:
        latest = files[-1].version if files else 0
        echo(f"nothing to apply; keyspace {keyspace} is up to date at version {latest}")
    return EXIT_OK


def status_command(settings: Settings, *, echo: Callable[[str], None]) -> int:
    """``imstream db status``: every migration as applied (with when), pending or changed.
    Exit 0 when up to date, 2 when migrations are pending, 1 on an error (changed, unreachable)."""
    keyspace = settings.cql.keyspace
    try:
        check_keyspace_name(keyspace)
        files = discover()
        with _session(settings) as session:
            exists = keyspace_exists(session, keyspace)
            state = schema_state(session, keyspace, files)
    except MigrationError as error:
        echo(f"error: {error}")
        return EXIT_ERROR
    if not exists:
        echo(f"keyspace {keyspace} does not exist yet (`imstream db migrate` creates it)")
    changed = {migration.version for migration, _ in state.changed}
    for migration, row in state.applied:
        label = migration.label if migration else f"{row.version:04d}_{row.name}"
        when = row.applied_at.strftime("%Y-%m-%d %H:%M:%S") if row.applied_at else "?"
        if row.version in changed:
            echo(f"changed  {label}  (applied {when}; the file's checksum differs)")
        elif migration is None:
            echo(f"applied  {label}  {when}  (no file: applied by a newer version)")
        else:
            echo(f"applied  {label}  {when}")
    for migration in state.pending:
        echo(f"pending  {migration.label}")
    summary = (
        f"keyspace {keyspace}: {len(state.applied)} applied, {len(state.pending)} pending, "
        f"{len(state.changed)} changed"
    )
    echo(summary)
    if state.changed:
        echo(f"error: {_changed_error(state.changed)}")
        return EXIT_ERROR
    return EXIT_PENDING if state.pending else EXIT_OK
