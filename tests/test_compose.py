"""compose.yaml cannot run here (no Docker engine), so this test keeps it honest instead."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dashboards.definitions import load_dashboards
from dashboards.grafana import DATASOURCE_UID, EXPORT_DIR, uid_of
from pipelines.cli import run_app
from pipelines.settings import (
    ClickHouseSettings,
    CqlSettings,
    IngressSettings,
    KafkaSettings,
    Settings,
)

ROOT = Path(__file__).resolve().parent.parent
INFRASTRUCTURE = {
    "kafka-1",
    "kafka-2",
    "kafka-3",
    "scylla-1",
    "scylla-2",
    "scylla-3",
    "clickhouse",
    "prometheus",
    "grafana",
    "setup",
}
_REQUIRED = re.compile(r"\$\{(?P<name>[A-Z0-9_]+):\?[^}]*\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def resolved(value: str) -> str:
    """Compose interpolation of required variables, each filled with a long dummy secret of its
    own (the settings refuse one key shared by two principals)."""
    return _REQUIRED.sub(lambda match: f"{match['name']}-".ljust(48, "x"), value)


def imstream_environment(compose: dict[str, Any]) -> dict[str, str]:
    return {key: resolved(str(value)) for key, value in compose["x-imstream-env"].items()}


def test_every_infrastructure_service_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= INFRASTRUCTURE


def test_im_variables_are_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = imstream_environment(compose)
    assert environment, "x-imstream-env must hold the processes' IM_ variables"
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if key.startswith("IM_"):
                environment.setdefault(key, resolved(str(value)))
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.profile == "prod"
    # Each principal's key is given: no process starts on a placeholder (the sink would refuse).
    assert settings.real_secret(settings.staff_auth.secret, "IM_STAFF_AUTH__SECRET")
    assert settings.real_secret(settings.service_auth.secret, "IM_SERVICE_AUTH__SECRET")
    assert settings.kafka.replication_factor == 3
    assert settings.cql.replication_factor == 3


def test_addresses_and_ports_match_the_settings(compose: dict[str, Any]) -> None:
    environment = imstream_environment(compose)
    services = compose["services"]
    kafka_port = int(KafkaSettings().bootstrap_servers.rsplit(":", 1)[1])
    brokers = environment["IM_KAFKA__BOOTSTRAP_SERVERS"].split(",")
    assert {broker.rsplit(":", 1)[0] for broker in brokers} == {"kafka-1", "kafka-2", "kafka-3"}
    assert {int(broker.rsplit(":", 1)[1]) for broker in brokers} == {kafka_port}
    for name in ("kafka-1", "kafka-2", "kafka-3"):
        advertised = services[name]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert advertised == f"PLAINTEXT://{name}:{kafka_port}"

    contact_points = json.loads(environment["IM_CQL__CONTACT_POINTS"])
    assert set(contact_points) == {"scylla-1", "scylla-2", "scylla-3"}
    assert int(environment["IM_CQL__PORT"]) == CqlSettings().port

    clickhouse_url = urlsplit(environment["IM_CLICKHOUSE__URL"])
    assert clickhouse_url.hostname == "clickhouse"
    assert f"{clickhouse_url.port}:{clickhouse_url.port}" in services["clickhouse"]["ports"]
    assert (
        services["clickhouse"]["environment"]["CLICKHOUSE_USER"]
        == (environment["IM_CLICKHOUSE__USERNAME"])
    )


def process_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run an imstream process: ``imstream run <kind>``, named after the kind."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [None])[0] == "run"
    }


def test_one_service_per_process_kind_named_like_the_readme(compose: dict[str, Any]) -> None:
    kinds = {command.name for command in run_app.registered_commands}
    services = process_services(compose)
    assert set(services) == kinds
    for name, service in services.items():
        assert service["command"] == ["run", name]
    readme = (ROOT / "README.md").read_text()
    for kind in kinds:
        assert f"`imstream run {kind}`" in readme, f"README's process table lacks {kind}"


def test_the_staff_and_service_keys_go_only_where_they_are_used(
    compose: dict[str, Any],
) -> None:
    """The staff key verifies operators and analysts at the ClickHouse sink; the service key is
    shared by the ingress (signs users' searches) and that sink (verifies them). No other
    process holds either, and the sink's API is published on the loopback only."""
    services = compose["services"]
    assert "IM_STAFF_AUTH__SECRET" not in compose["x-imstream-env"]
    assert "IM_SERVICE_AUTH__SECRET" not in compose["x-imstream-env"]
    holders = {
        name: {key for key in (service.get("environment") or {}) if "_AUTH__SECRET" in key}
        for name, service in services.items()
    }
    assert holders["clickhouse-sink"] >= {"IM_STAFF_AUTH__SECRET", "IM_SERVICE_AUTH__SECRET"}
    assert "IM_SERVICE_AUTH__SECRET" in holders["ingress"]
    others = {
        name: keys for name, keys in holders.items() if name not in {"clickhouse-sink", "ingress"}
    }
    assert not any(
        "IM_STAFF_AUTH__SECRET" in keys or "IM_SERVICE_AUTH__SECRET" in keys
        for keys in others.values()
    ), others
    assert "IM_STAFF_AUTH__SECRET" not in holders["ingress"]
    port = int(services["clickhouse-sink"]["environment"]["IM_SINKS__ANALYTICS_PORT"])
    assert services["clickhouse-sink"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_ingress_port_matches_the_settings(compose: dict[str, Any]) -> None:
    ingress = compose["services"]["ingress"]
    port = int(ingress["environment"]["IM_INGRESS__PORT"])
    assert port == IngressSettings().port
    assert f"{port}:{port}" in ingress["ports"]


def test_grafana_provisions_the_exported_dashboards_on_the_clickhouse_data_source(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    targets = {config["source"]: config["target"] for config in grafana["configs"]}
    assert targets["grafana-dashboards"].startswith("/etc/grafana/provisioning/dashboards/")
    (provider,) = yaml.safe_load(compose["configs"]["grafana-dashboards"]["content"])["providers"]
    assert provider["type"] == "file"
    mounts = {(ROOT / v.split(":")[0]).resolve(): v.split(":")[1] for v in grafana["volumes"]}
    assert mounts.get(EXPORT_DIR) == provider["options"]["path"], "exports not mounted"
    # The image carries the definitions too: the ClickHouse sink serves them at /dashboards.
    assert "COPY dashboards dashboards" in compose["x-imstream-build"]["dockerfile_inline"]

    content = compose["configs"]["grafana-datasources"]["content"].replace("$$", "$")
    datasources = yaml.safe_load(content)["datasources"]
    (clickhouse,) = [ds for ds in datasources if ds["type"] == "grafana-clickhouse-datasource"]
    assert clickhouse["uid"] == DATASOURCE_UID
    assert clickhouse["jsonData"]["defaultDatabase"] == ClickHouseSettings().database

    dashboards = load_dashboards()
    exported = sorted(EXPORT_DIR.glob("*.json"))
    assert exported == sorted(EXPORT_DIR / f"{uid_of(d)}.json" for d in dashboards)
    for path in exported:
        model = json.loads(path.read_text())
        for panel in model["panels"]:
            assert panel["datasource"]["uid"] == clickhouse["uid"], (path.name, panel["title"])
            assert all(t["datasource"]["uid"] == clickhouse["uid"] for t in panel["targets"])


def test_every_process_service_is_healthy_when_it_announced_readiness(
    compose: dict[str, Any],
) -> None:
    # The readiness `imstream up` waits for: each process writes IM_READY_FILE once ready, and
    # `imstream ready` (the healthcheck) reads it.
    assert compose["x-imstream-env"]["IM_READY_FILE"]
    assert "COPY core core" in compose["x-imstream-build"]["dockerfile_inline"]
    for name, service in process_services(compose).items():
        assert service["healthcheck"]["test"] == ["CMD", "imstream", "ready"], name
        assert (
            service["environment"].get("IM_READY_FILE")
            == (compose["x-imstream-env"]["IM_READY_FILE"])
        ), name
