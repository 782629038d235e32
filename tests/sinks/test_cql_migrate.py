"""``imstream db migrate`` / ``db status`` and ``sinks.cql.migrate.migrate`` on real Cassandra."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Session

from core.settings import Settings
from sinks.cql.migrate import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PENDING,
    LEASE_TABLE,
    MIGRATIONS_DIR,
    MIGRATIONS_TABLE,
    Migration,
    MigrationError,
    MigrationErrorCode,
    discover,
    keyspace_exists,
    migrate,
    migrate_command,
    split_statements,
    status_command,
)
from sinks.cql.serving import POINTER_TABLE
from tests.sinks.cql_support import (
    SERVING_TABLES,
    cql_local_stack,  # noqa: F401 - the local_stack fixture: Kafka and Cassandra only
    keyspace_settings,
    table_names,
)

pytestmark = pytest.mark.stack

#: The migrations the package ships, in order.
#: The tables of migration 4 (read access).
READ_ACCESS_TABLES = {"former_members", "recalled_messages", "command_outcomes"}
PACKAGED = [
    "0001_initial",
    "0002_serving_keyspace",
    "0003_large_groups",
    "0004_read_access",
    "0005_tenant_keys",
]


@pytest.fixture
def fresh_keyspace(cql_session: Session, unique_name: str) -> Iterator[str]:
    """A keyspace name that does not exist yet; dropped after the test if it was created."""
    yield unique_name
    cql_session.execute(f"DROP KEYSPACE IF EXISTS {unique_name}", timeout=60)


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the migrations folder, for tests that change a file."""
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, target)
    return target


def test_the_packaged_migrations_are_found_and_well_formed() -> None:
    migrations = discover()
    assert [m.label for m in migrations] == PACKAGED
    statements = migrations[0].statements()
    assert len(statements) == len(SERVING_TABLES)
    pointer = migrations[1].statements()
    assert pointer == [pointer[0]]
    assert pointer[0].startswith(f"CREATE TABLE IF NOT EXISTS {POINTER_TABLE} ")
    assert all(s.startswith("CREATE TABLE IF NOT EXISTS ") for s in [*statements, *pointer])
    assert not any("--" in s for s in [*statements, *pointer])


def test_split_statements_keeps_quoted_semicolons_and_dashes() -> None:
    script = (
        "-- a comment; with a semicolon\n"
        "CREATE TABLE IF NOT EXISTS a (k text PRIMARY KEY) WITH comment = 'x;y -- z';\n"
        "// another comment\n"
        "INSERT INTO a (k) VALUES ('it''s');  -- trailing\n"
        "\n;\n"
    )
    assert split_statements(script) == [
        "CREATE TABLE IF NOT EXISTS a (k text PRIMARY KEY) WITH comment = 'x;y -- z'",
        "INSERT INTO a (k) VALUES ('it''s')",
    ]


def test_migrate_creates_the_keyspace_and_every_table_once(
    cql_session: Session, fresh_keyspace: str
) -> None:
    lines: list[str] = []
    applied = migrate(cql_session, fresh_keyspace, 1, echo=lines.append)

    assert [m.label for m in applied] == PACKAGED
    assert keyspace_exists(cql_session, fresh_keyspace)
    assert table_names(cql_session, fresh_keyspace) == {
        *SERVING_TABLES,
        *READ_ACCESS_TABLES,
        "tenant_keys",
        POINTER_TABLE,
        MIGRATIONS_TABLE,
        LEASE_TABLE,
    }
    rows = list(
        cql_session.execute(
            f"SELECT version, name, checksum, applied_at FROM {fresh_keyspace}.{MIGRATIONS_TABLE}"
        )
    )
    rows.sort(key=lambda r: r.version)
    assert [(r.version, r.name, r.checksum) for r in rows] == [
        (1, "initial", discover()[0].checksum),
        (2, "serving_keyspace", discover()[1].checksum),
        (3, "large_groups", discover()[2].checksum),
        (4, "read_access", discover()[3].checksum),
        (5, "tenant_keys", discover()[4].checksum),
    ]
    assert rows[0].applied_at is not None
    assert lines == [
        f"created keyspace {fresh_keyspace} (SimpleStrategy, RF 1)",
        f"applied 0001_initial ({len(SERVING_TABLES)} statements)",
        "applied 0002_serving_keyspace (1 statements)",
        "applied 0003_large_groups (1 statements)",
        "applied 0004_read_access (3 statements)",
        "applied 0005_tenant_keys (1 statements)",
    ]
    replication = cql_session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
        (fresh_keyspace,),
    ).one()
    assert replication.replication["class"].endswith("SimpleStrategy")

    # The second run applies nothing and leaves the record as it was.
    again: list[str] = []
    assert migrate(cql_session, fresh_keyspace, 1, echo=again.append) == []
    assert again == []
    after = list(
        cql_session.execute(
            f"SELECT version, checksum, applied_at FROM {fresh_keyspace}.{MIGRATIONS_TABLE}"
        )
    )
    after.sort(key=lambda r: r.version)
    assert [(r.version, r.checksum, r.applied_at) for r in after] == [
        (r.version, r.checksum, r.applied_at) for r in rows
    ]


def test_a_migration_changed_after_it_was_applied_is_refused(
    cql_session: Session, keyspace: str, migrations_copy: Path
) -> None:
    migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))
    path = migrations_copy / "0001_initial.cql"
    path.write_text(path.read_text() + "\n-- an innocent-looking edit\n")

    with pytest.raises(MigrationError) as refused:
        migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))
    assert refused.value.code is MigrationErrorCode.CHANGED
    assert str(refused.value.code) == "migration-changed"
    assert "0001_initial.cql changed after it was applied" in refused.value.message
    with pytest.raises(MigrationError) as in_dry_run:
        migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy), dry_run=True)
    assert in_dry_run.value.code is MigrationErrorCode.CHANGED


def test_a_new_migration_is_applied_after_the_recorded_ones(
    cql_session: Session, keyspace: str, migrations_copy: Path
) -> None:
    assert len(migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))) == 5
    (migrations_copy / "0006_pins.cql").write_text(
        "-- pinned conversations per user\n"
        "CREATE TABLE IF NOT EXISTS pins (tenant_id text, user_id text, conversation_id text,"
        " PRIMARY KEY ((tenant_id, user_id), conversation_id));\n"
    )
    applied = migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))
    assert [m.label for m in applied] == ["0006_pins"]
    assert "pins" in table_names(cql_session, keyspace)
    versions = {
        r.version for r in cql_session.execute(f"SELECT version FROM {keyspace}.{MIGRATIONS_TABLE}")
    }
    assert versions == {1, 2, 3, 4, 5, 6}


def test_a_refused_statement_fails_with_a_code_and_is_not_recorded(
    cql_session: Session, keyspace: str, migrations_copy: Path
) -> None:
    (migrations_copy / "0006_broken.cql").write_text("CREATE TABLE IF NOT EXISTS broken (k);\n")
    with pytest.raises(MigrationError) as failed:
        migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))
    assert failed.value.code is MigrationErrorCode.FAILED
    assert "0006_broken.cql, statement 1" in failed.value.message
    versions = {
        r.version for r in cql_session.execute(f"SELECT version FROM {keyspace}.{MIGRATIONS_TABLE}")
    }
    assert versions == {1, 2, 3, 4, 5}


def test_a_column_added_before_the_migration_was_recorded_is_not_added_again(
    cql_session: Session, keyspace: str, migrations_copy: Path
) -> None:
    """CQL has no portable ``ADD IF NOT EXISTS``: a migration interrupted after its ``ALTER``
    and before it was recorded must apply again without ``already exists``."""
    migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))
    (migrations_copy / "0006_pinned_at.cql").write_text(
        "ALTER TABLE user_conversations ADD pinned_at timestamp;\n"
    )
    cql_session.execute(
        f"ALTER TABLE {keyspace}.user_conversations ADD pinned_at timestamp", timeout=60
    )
    applied = migrate(cql_session, keyspace, 1, migrations=discover(migrations_copy))
    assert [m.label for m in applied] == ["0006_pinned_at"]


def test_a_badly_named_file_is_refused(migrations_copy: Path) -> None:
    (migrations_copy / "2_second.cql").write_text("SELECT now() FROM system.local;")
    with pytest.raises(MigrationError) as refused:
        discover(migrations_copy)
    assert refused.value.code is MigrationErrorCode.BAD_FILE


def test_concurrent_migrators_apply_each_migration_once(
    cql_session: Session, fresh_keyspace: str
) -> None:
    results: list[list[Migration]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(cql_session, fresh_keyspace, 1))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(len(applied) for applied in results) == [0, 0, len(PACKAGED)]
    assert table_names(cql_session, fresh_keyspace) >= SERVING_TABLES
    rows = list(cql_session.execute(f"SELECT version FROM {fresh_keyspace}.{MIGRATIONS_TABLE}"))
    assert sorted(r.version for r in rows) == [1, 2, 3, 4, 5]


def test_dry_run_changes_nothing(
    cql_session: Session, settings: Settings, fresh_keyspace: str
) -> None:
    lines: list[str] = []
    code = migrate_command(
        keyspace_settings(settings, fresh_keyspace), dry_run=True, echo=lines.append
    )

    assert code == EXIT_OK
    assert lines == [
        f"would create keyspace {fresh_keyspace} (SimpleStrategy, RF 1)",
        f"would apply 0001_initial ({len(SERVING_TABLES)} statements)",
        "would apply 0002_serving_keyspace (1 statements)",
        "would apply 0003_large_groups (1 statements)",
        "would apply 0004_read_access (3 statements)",
        "would apply 0005_tenant_keys (1 statements)",
        f"dry run: 5 migration(s) would be applied to keyspace {fresh_keyspace}; nothing was "
        "changed",
    ]
    assert not keyspace_exists(cql_session, fresh_keyspace)


def test_the_commands_report_pending_applied_and_up_to_date(
    cql_session: Session, settings: Settings, fresh_keyspace: str
) -> None:
    configured = keyspace_settings(settings, fresh_keyspace)

    before: list[str] = []
    assert status_command(configured, echo=before.append) == EXIT_PENDING
    assert before == [
        f"keyspace {fresh_keyspace} does not exist yet (`imstream db migrate` creates it)",
        "pending  0001_initial",
        "pending  0002_serving_keyspace",
        "pending  0003_large_groups",
        "pending  0004_read_access",
        "pending  0005_tenant_keys",
        f"keyspace {fresh_keyspace}: 0 applied, 5 pending, 0 changed",
    ]

    migrated: list[str] = []
    assert migrate_command(configured, dry_run=False, echo=migrated.append) == EXIT_OK
    assert migrated[-1] == f"5 migration(s) applied; keyspace {fresh_keyspace} is at version 5"
    assert "applied 0001_initial" in migrated[-6]
    assert "applied 0002_serving_keyspace" in migrated[-5]
    assert "applied 0003_large_groups" in migrated[-4]
    assert "applied 0004_read_access" in migrated[-3]
    assert "applied 0005_tenant_keys" in migrated[-2]

    again: list[str] = []
    assert migrate_command(configured, dry_run=False, echo=again.append) == EXIT_OK
    assert again == [f"nothing to apply; keyspace {fresh_keyspace} is up to date at version 5"]

    after: list[str] = []
    assert status_command(configured, echo=after.append) == EXIT_OK
    assert len(after) == 6
    assert after[0].startswith("applied  0001_initial  20")
    assert after[1].startswith("applied  0002_serving_keyspace  20")
    assert after[2].startswith("applied  0003_large_groups  20")
    assert after[3].startswith("applied  0004_read_access  20")
    assert after[4].startswith("applied  0005_tenant_keys  20")
    assert after[5] == f"keyspace {fresh_keyspace}: 5 applied, 0 pending, 0 changed"


def test_the_commands_report_a_changed_migration_with_its_code(
    cql_session: Session, settings: Settings, keyspace: str
) -> None:
    migrate(cql_session, keyspace, 1)
    cql_session.execute(
        f"UPDATE {keyspace}.{MIGRATIONS_TABLE} SET checksum = 'edited' WHERE version = 1"
    )
    configured = keyspace_settings(settings, keyspace)

    status: list[str] = []
    assert status_command(configured, echo=status.append) == EXIT_ERROR
    assert status[0].startswith("changed  0001_initial")
    assert status[-1].startswith("error: [migration-changed] 0001_initial.cql changed")

    migrated: list[str] = []
    assert migrate_command(configured, dry_run=False, echo=migrated.append) == EXIT_ERROR
    assert migrated == [status[-1]]


def test_an_invalid_keyspace_name_is_refused_with_its_code(settings: Settings) -> None:
    lines: list[str] = []
    code = migrate_command(
        keyspace_settings(settings, "no-dashes"), dry_run=True, echo=lines.append
    )
    assert code == EXIT_ERROR
    assert lines[0].startswith("error: [keyspace-invalid] 'no-dashes' is not a valid keyspace")


def test_an_unreachable_cluster_is_reported_with_its_code(settings: Settings) -> None:
    unreachable = settings.model_copy(
        update={"cql": settings.cql.model_copy(update={"port": 1, "keyspace": "nowhere"})}
    )
    lines: list[str] = []
    assert status_command(unreachable, echo=lines.append) == EXIT_ERROR
    assert lines[0].startswith("error: [cql-unavailable] 127.0.0.1:1 did not answer")
    assert "imstream stack up" in lines[0]
