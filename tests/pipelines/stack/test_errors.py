"""Each operator mistake the stack can meet ends in a clear error that says what to do."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import CqlSettings, KafkaSettings, Settings, StackSettings
from pipelines.cli import app
from pipelines.stack import process
from pipelines.stack.errors import StackError, StackErrorCode
from pipelines.stack.java import find_java, parse_major_version
from pipelines.stack.manager import LocalStack


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def isolated_settings(
    tmp_path: Path, main: Settings, *, share_jars: bool = True, **stack: object
) -> Settings:
    """Settings for a second stack in ``tmp_path`` on free ports, reusing the fetched jars."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if share_jars:
        (state_dir / "jars").symlink_to(main.stack.state_dir / "jars")
    stack_settings = StackSettings.model_validate(
        {
            "state_dir": state_dir,
            "kafka_controller_port": free_port(),
            "cassandra_storage_port": free_port(),
            "cassandra_jmx_port": free_port(),
            "start_timeout_seconds": 60,
            "stop_timeout_seconds": 10,
            **stack,
        }
    )
    return main.model_copy(
        update={
            "kafka": KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
            "cql": CqlSettings(port=free_port()),
            "stack": stack_settings,
        }
    )


def no_process_left(settings: Settings) -> bool:
    stack = LocalStack(settings)
    return not any(process.find_pids(server.marker) for server in stack.servers)


def fake_java_home(tmp_path: Path, version_line: str) -> Path:
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return home


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('java version "1.8.0_292"', 8),
        ('openjdk version "21-ea" 2023-09-19', 21),
        ('openjdk version "11.0.2" 2019-01-15', 11),
        ("no version here", None),
    ],
)
def test_java_version_parsing(output: str, major: int | None) -> None:
    assert parse_major_version(output) == major


def test_java_older_than_17_is_refused_with_advice(
    tmp_path: Path, settings: Settings, local_stack: LocalStack
) -> None:
    home = fake_java_home(tmp_path, 'openjdk version "11.0.2" 2019-01-15')
    isolated = isolated_settings(tmp_path, settings, java_home=home)
    with pytest.raises(StackError) as caught:
        LocalStack(isolated).up()
    assert caught.value.code is StackErrorCode.JAVA_TOO_OLD
    assert "Java 11" in caught.value.message
    assert "IM_STACK__JAVA_HOME" in caught.value.message
    assert no_process_left(isolated)


def test_cli_reports_old_java_and_exits_non_zero(tmp_path: Path) -> None:
    home = fake_java_home(tmp_path, 'java version "1.8.0_292"')
    state_dir = tmp_path / "state"
    result = CliRunner().invoke(
        app,
        ["stack", "up"],
        env={
            "IM_STACK__STATE_DIR": str(state_dir),
            "IM_STACK__JAVA_HOME": str(home),
            "IM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        },
    )
    assert result.exit_code == 1
    assert "[java-too-old]" in result.output
    assert "Java 8" in result.output


def test_missing_java_is_reported(tmp_path: Path) -> None:
    with pytest.raises(StackError) as caught:
        find_java(tmp_path / "no-jdk-here")
    assert caught.value.code is StackErrorCode.JAVA_MISSING
    assert "install Java 17+" in caught.value.message


def test_missing_maven_is_reported_when_jars_are_not_cached(
    tmp_path: Path, settings: Settings
) -> None:
    isolated = isolated_settings(
        tmp_path, settings, share_jars=False, maven_executable=str(tmp_path / "no-mvn")
    )
    with pytest.raises(StackError) as caught:
        LocalStack(isolated).up()
    assert caught.value.code is StackErrorCode.MAVEN_MISSING
    assert "apt-get install maven" in caught.value.message
    assert no_process_left(isolated)


def test_unreachable_maven_central_with_empty_cache_is_reported(
    tmp_path: Path, settings: Settings
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/maven2"
    isolated = isolated_settings(
        tmp_path,
        settings,
        share_jars=False,
        maven_repository_url=unreachable,
        maven_local_repository=tmp_path / "empty-m2",
    )
    with pytest.raises(StackError) as caught:
        LocalStack(isolated).up()
    assert caught.value.code is StackErrorCode.MAVEN_FETCH_FAILED
    assert unreachable in caught.value.message
    assert "not in the cache" in caught.value.message
    assert no_process_left(isolated)


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_port_in_use_is_reported_and_nothing_starts(
    tmp_path: Path, settings: Settings, local_stack: LocalStack, held_port: int
) -> None:
    isolated = isolated_settings(tmp_path, settings, kafka_controller_port=held_port)
    with pytest.raises(StackError) as caught:
        LocalStack(isolated).up()
    assert caught.value.code is StackErrorCode.PORT_IN_USE
    assert f"port {held_port} (controller)" in caught.value.message
    assert no_process_left(isolated)


def test_failed_health_check_shows_the_log_and_leaves_no_process(
    tmp_path: Path, settings: Settings, local_stack: LocalStack
) -> None:
    isolated = isolated_settings(tmp_path, settings, kafka_heap="1k", cassandra_heap="1k")
    with pytest.raises(StackError) as caught:
        LocalStack(isolated).up()
    assert caught.value.code is StackErrorCode.HEALTH_CHECK_FAILED
    assert "exited during start-up" in caught.value.message
    assert "Last lines of" in caught.value.message
    assert "heap" in caught.value.message.lower()
    assert no_process_left(isolated)
