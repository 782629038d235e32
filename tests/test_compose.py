"""compose.yaml cannot run here (no Docker engine), so this test keeps it honest instead."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import SecretStr

from core.settings import (
    AuthSettings,
    ClickHouseSettings,
    CqlSettings,
    CryptoSettings,
    IngressSettings,
    KafkaSettings,
    Profile,
    Settings,
)
from dashboards.definitions import load_dashboards
from dashboards.grafana import DATASOURCE_UID, EXPORT_DIR, uid_of
from pipelines.certs_cli import (
    COMPOSE_CERTIFICATES,
    COMPOSE_SECRETS,
    PASSWORDS_FILE,
    certs_command,
    kafka_password_variable,
)
from pipelines.kafka_acls import SERVICES, acl_bindings
from pipelines.processes import PROCESSES

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
        advertised = services[name]["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
        assert f"CLIENT://{name}:{kafka_port}" in advertised

    contact_points = json.loads(environment["IM_CQL__CONTACT_POINTS"])
    assert set(contact_points) == {"scylla-1", "scylla-2", "scylla-3"}
    assert int(environment["IM_CQL__PORT"]) == CqlSettings().port

    clickhouse_url = urlsplit(environment["IM_CLICKHOUSE__URL"])
    assert clickhouse_url.hostname == "clickhouse"
    assert f"{clickhouse_url.port}:{clickhouse_url.port}" in services["clickhouse"]["ports"]
    users = ET.parse(ROOT / "compose/clickhouse/users.d/imstream.xml").getroot().find("users")
    assert users is not None and users.find(environment["IM_CLICKHOUSE__USERNAME"]) is not None


def process_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run an imstream process: ``imstream run <kind>``, named after the kind."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("command", [None])[0] == "run"
    }


def test_one_service_per_process_kind_named_like_the_readme(compose: dict[str, Any]) -> None:
    kinds = {kind.name for kind in PROCESSES}
    services = process_services(compose)
    assert set(services) == kinds
    for name, service in services.items():
        assert service["command"] == ["run", name]
    readme = (ROOT / "README.md").read_text()
    for kind in kinds:
        assert f"`imstream run {kind}`" in readme, f"README's process table lacks {kind}"


def test_each_key_goes_only_where_it_is_used(
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
    # The clients' key verifies hellos: the ingress alone holds it.
    assert "IM_AUTH__JWT_SECRET" not in compose["x-imstream-env"]
    client_key = {
        name
        for name, service in services.items()
        if "IM_AUTH__JWT_SECRET" in (service.get("environment") or {})
    }
    assert client_key == {"ingress"}
    port = int(services["clickhouse-sink"]["environment"]["IM_SINKS__ANALYTICS_PORT"])
    assert services["clickhouse-sink"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_ingress_port_matches_the_settings(compose: dict[str, Any]) -> None:
    ingress = compose["services"]["ingress"]
    port = int(ingress["environment"]["IM_INGRESS__PORT"])
    assert port == IngressSettings().port
    assert f"{port}:{port}" in ingress["ports"]


def test_metrics_are_scraped_from_the_internal_listener_which_is_not_published(
    compose: dict[str, Any],
) -> None:
    ingress = compose["services"]["ingress"]
    internal = int(ingress["environment"]["IM_INGRESS__INTERNAL_PORT"])
    assert internal == IngressSettings().internal_port
    assert not any(str(internal) in str(mapping) for mapping in ingress.get("ports", [])), (
        "the internal listener (metrics, API docs) must not be published"
    )
    prometheus = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"ingress:{internal}"]


def test_every_running_service_has_a_healthcheck_and_waits_for_healthy_dependencies(
    compose: dict[str, Any],
) -> None:
    """A service that runs (all but the one-shot setup jobs) says when it is healthy, and a
    service waits for what it depends on by condition: healthy, or for a one-shot job completed,
    never merely started — except Prometheus, which scrapes whatever is up."""
    services = compose["services"]
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        if not one_shot:
            healthcheck = service.get("healthcheck")
            assert healthcheck and healthcheck.get("test"), f"{name} has no healthcheck"
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions"
        for dependency, condition in depends_on.items():
            wanted = (
                "service_completed_successfully"
                if services[dependency].get("restart") == "no"
                else "service_healthy"
            )
            if name == "prometheus":
                wanted = "service_started"
            assert condition == {"condition": wanted}, (name, dependency)


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


# -- TLS and credentials on every link (docs/operations.md, "TLS and credentials") -------------

CERTS = "/etc/imstream/certs/"
KAFKA_BROKERS = ("kafka-1", "kafka-2", "kafka-3")


def listener_protocols(environment: dict[str, str]) -> dict[str, str]:
    pairs = environment["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    return dict(pair.split(":", 1) for pair in pairs)


def test_no_kafka_listener_is_plaintext_or_anonymous(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in KAFKA_BROKERS:
        environment = {**compose["x-kafka-env"], **services[name]["environment"]}
        protocols = listener_protocols(environment)
        assert set(protocols.values()) <= {"SASL_SSL", "SSL"}, protocols
        listeners = [item.split("://")[0] for item in environment["KAFKA_LISTENERS"].split(",")]
        assert set(listeners) == set(protocols)
        for listener, protocol in protocols.items():
            if protocol == "SSL":  # mutual TLS: no anonymous principal on any listener
                key = f"KAFKA_LISTENER_NAME_{listener}_SSL_CLIENT_AUTH"
                assert environment.get(key) == "required", (name, listener)
        assert environment["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
        assert environment["KAFKA_SSL_ENABLED_PROTOCOLS"] == "TLSv1.3"
        assert environment["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
        assert environment["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
        assert "ports" not in services[name], "brokers are reached inside the compose network"
        assert environment["KAFKA_SSL_KEYSTORE_LOCATION"] == f"{CERTS}{name}-bundle.pem"
        supers = environment["KAFKA_SUPER_USERS"].split(";")
        assert supers == [f"User:CN={broker}" for broker in KAFKA_BROKERS] + ["User:CN=kafka-admin"]
    # The services come to the SASL_SSL listener, verifying the brokers against the CA.
    imstream = compose["x-imstream-env"]
    assert imstream["IM_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert imstream["IM_KAFKA__SSL_CA_LOCATION"] == f"{CERTS}ca.pem"
    client_port = imstream["IM_KAFKA__BOOTSTRAP_SERVERS"].split(",")[0].rsplit(":", 1)[1]
    advertised = services["kafka-1"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"CLIENT://kafka-1:{client_port}" in advertised.split(",")
    assert listener_protocols(compose["x-kafka-env"])["CLIENT"] == "SASL_SSL"


def test_each_service_has_its_own_kafka_principal_and_acls(compose: dict[str, Any]) -> None:
    services = process_services(compose)
    assert set(services) == set(SERVICES)
    passwords = set()
    for name, service in services.items():
        environment = service["environment"]
        assert environment["IM_KAFKA__SASL_USERNAME"] == name
        variable = kafka_password_variable(name)
        assert environment["IM_KAFKA__SASL_PASSWORD"].startswith(f"${{{variable}:?")
        passwords.add(variable)
        assert compose["services"]["kafka-users"]["environment"][variable].startswith(
            f"${{{variable}:?"
        )
        bindings = acl_bindings(Settings(), name)
        assert bindings and {binding.principal for binding in bindings} == {f"User:{name}"}
    assert len(passwords) == len(services)
    users_script = (ROOT / "compose/kafka/users.sh").read_text()
    assert " ".join(SERVICES) in users_script
    # The administrator's jobs: topics and ACLs with the admin certificate on the internal
    # listener; every process waits for them.
    grants = compose["services"]["kafka-grants"]
    assert grants["command"] == ["topics", "grant"]
    admin = grants["environment"]
    assert admin["IM_KAFKA__SECURITY_PROTOCOL"] == "SSL"
    assert admin["IM_KAFKA__SSL_CERTIFICATE_LOCATION"] == f"{CERTS}kafka-admin.pem"
    assert "IM_KAFKA__SASL_USERNAME" not in admin
    for name, service in services.items():
        for job in ("kafka-grants", "kafka-users", "schema"):
            assert service["depends_on"][job] == {"condition": "service_completed_successfully"}, (
                name,
                job,
            )


def test_scylla_requires_passwords_and_tls(compose: dict[str, Any]) -> None:
    tls = yaml.safe_load((ROOT / "compose/scylla/tls.yaml").read_text())
    assert tls["authenticator"] == "PasswordAuthenticator"
    assert tls["authorizer"] == "CassandraAuthorizer"
    client = tls["client_encryption_options"]
    assert client["enabled"] is True
    assert client["certificate"] == f"{CERTS}scylla.pem"
    assert "+VERS-TLS1.3" in client["priority_string"] and "-VERS-ALL" in client["priority_string"]
    assert tls["server_encryption_options"]["internode_encryption"] == "all"
    assert (ROOT / "compose/scylla/tls.yaml").read_text().startswith("# imstream-tls")
    for name in ("scylla-1", "scylla-2", "scylla-3"):
        service = compose["services"][name]
        assert "cat /etc/imstream/scylla/tls.yaml >> /etc/scylla/scylla.yaml" in " ".join(
            compose["x-scylla"]["entrypoint"]
        )
        assert "./compose/scylla:/etc/imstream/scylla:ro" in service["volumes"]
        assert "ports" not in service
    roles = (ROOT / "compose/scylla/roles.sh").read_text()
    assert "ALTER ROLE cassandra WITH LOGIN = false" in roles
    assert "SUPERUSER" not in roles.split("CREATE ROLE IF NOT EXISTS imstream")[1].split("\n")[0]
    environment = imstream_environment(compose)
    assert environment["IM_CQL__USERNAME"] == "imstream"
    assert environment["IM_CQL__PASSWORD"]
    assert environment["IM_CQL__SSL_CA_PATH"] == f"{CERTS}ca.pem"
    assert compose["services"]["schema"]["depends_on"]["scylla-roles"]


def _grants(user: ET.Element) -> list[str]:
    return [query.text or "" for query in user.iterfind("grants/query")]


def test_clickhouse_is_https_only_with_least_privilege_users(compose: dict[str, Any]) -> None:
    config = ET.parse(ROOT / "compose/clickhouse/config.d/tls.xml").getroot()
    for plain in ("http_port", "tcp_port", "interserver_http_port"):
        element = config.find(plain)
        assert element is not None and element.get("remove"), plain
    assert config.findtext("https_port") == "8443"
    server = config.find("openSSL/server")
    assert server is not None
    assert "tlsv1_2" in (server.findtext("disableProtocols") or "").split(",")
    users = ET.parse(ROOT / "compose/clickhouse/users.d/imstream.xml").getroot()
    default = users.find("users/default")
    assert default is not None and default.get("remove"), "the password-less default user stays"
    application, reader = users.find("users/imstream"), users.find("users/reader")
    assert application is not None and reader is not None
    for user in (application, reader):
        assert user.findtext("access_management") == "0"
        password = user.find("password")
        assert password is not None and password.get("from_env"), "a password from the env"
        for grant in _grants(user):
            assert " ALL" not in grant.upper() and "*.*" not in grant.replace("imstream*.*", "")
    (application_grant,) = _grants(application)
    assert application_grant.endswith(" ON imstream*.*")
    assert _grants(reader) == ["GRANT SELECT ON imstream.*"]
    assert users.findtext(f"profiles/{reader.findtext('profile')}/readonly") in {"1", "2"}

    environment = imstream_environment(compose)
    assert environment["IM_CLICKHOUSE__URL"] == "https://clickhouse:8443"
    assert environment["IM_CLICKHOUSE__CA_PATH"] == f"{CERTS}ca.pem"
    clickhouse = compose["services"]["clickhouse"]
    assert "CLICKHOUSE_USER" not in clickhouse["environment"]
    # Grafana reads as `reader`, over TLS, and never holds the application's password.
    grafana = compose["services"]["grafana"]
    assert "IM_CLICKHOUSE__PASSWORD" not in grafana["environment"]
    content = compose["configs"]["grafana-datasources"]["content"].replace("$$", "$")
    (datasource,) = [
        ds
        for ds in yaml.safe_load(content)["datasources"]
        if ds["type"] == "grafana-clickhouse-datasource"
    ]
    assert datasource["jsonData"]["username"] == "reader"
    assert datasource["jsonData"]["secure"] is True and datasource["jsonData"]["port"] == 8443


def test_the_ingress_and_the_analytics_api_serve_tls(compose: dict[str, Any]) -> None:
    ingress = compose["services"]["ingress"]["environment"]
    assert ingress["IM_INGRESS__TLS_CERT_PATH"] == f"{CERTS}ingress.pem"
    assert ingress["IM_INGRESS__TLS_KEY_PATH"] == f"{CERTS}ingress-key.pem"
    assert ingress["IM_INGRESS__ANALYTICS_URL"].startswith("https://clickhouse-sink:")
    assert ingress["IM_INGRESS__ANALYTICS_CA_PATH"] == f"{CERTS}ca.pem"
    sink = compose["services"]["clickhouse-sink"]["environment"]
    assert sink["IM_SINKS__ANALYTICS_TLS_CERT_PATH"] == f"{CERTS}clickhouse-sink.pem"


def test_only_the_cql_sink_and_the_ingress_hold_the_master_key(compose: dict[str, Any]) -> None:
    holders = {
        name
        for name, service in compose["services"].items()
        if "IM_CRYPTO__MASTER_KEY" in (service.get("environment") or {})
    }
    assert holders == {"cql-sink", "ingress"}
    assert "IM_CRYPTO__MASTER_KEY" not in compose["x-imstream-env"]


def test_clickhouse_stores_its_tables_on_an_encrypted_disk(compose: dict[str, Any]) -> None:
    clickhouse = compose["services"]["clickhouse"]
    config = ROOT / "compose/clickhouse/config.d/encrypted-disk.xml"
    assert any(
        str(volume).startswith(f"./{config.relative_to(ROOT)}:") for volume in clickhouse["volumes"]
    )
    root = ET.parse(config).getroot()
    disk = root.find("storage_configuration/disks/imstream_encrypted")
    assert disk is not None and disk.findtext("type") == "encrypted"
    assert disk.findtext("algorithm") == "AES_256_CTR"
    key = disk.find("key_hex")
    assert key is not None and key.get("from_env") in clickhouse["environment"]
    policy = root.findtext("merge_tree/storage_policy")
    assert root.find(f"storage_configuration/policies/{policy}/volumes/main/disk") is not None


def test_make_certs_writes_every_certificate_and_secret_compose_uses(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    text = (ROOT / "compose.yaml").read_text()
    required = set(_REQUIRED.findall(text))
    assert required == set(COMPOSE_SECRETS)
    mounted = set(re.findall(re.escape(CERTS) + r"([a-z0-9-]+)\.pem", text))
    for folder in ("compose/clickhouse", "compose/scylla", "compose/kafka"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                mounted |= set(
                    re.findall(re.escape(CERTS) + r"([a-z0-9-]+)\.pem", path.read_text())
                )
    leaves = {
        f"{name}{suffix}" for name in COMPOSE_CERTIFICATES for suffix in ("", "-key", "-bundle")
    }
    assert mounted <= leaves | {"ca"}, mounted - leaves

    out = tmp_path / "certs"
    certs_command(out=out, ingress_name=["chat.example.com"], force=False)
    for name in mounted:
        assert (out / f"{name}.pem").is_file(), name
    passwords = (out / PASSWORDS_FILE).read_text()
    assert {line.split("=", 1)[0] for line in passwords.splitlines()[1:]} == set(COMPOSE_SECRETS)
    written = dict(line.split("=", 1) for line in passwords.splitlines()[1:])
    master_key = Settings(
        profile=Profile.PROD,
        auth=AuthSettings(jwt_secret=SecretStr(written["IM_AUTH__JWT_SECRET"])),
        crypto=CryptoSettings(master_key=SecretStr(written["IM_CRYPTO__MASTER_KEY"])),
    ).master_key()
    assert len(master_key) == 32
    assert len(bytes.fromhex(written["CLICKHOUSE_DISK_KEY_HEX"])) == 32
    # A second run keeps the CA and the passwords: containers already use them.
    before = (out / "ca.pem").read_bytes()
    certs_command(out=out, ingress_name=None, force=False)
    assert (out / "ca.pem").read_bytes() == before
    assert (out / PASSWORDS_FILE).read_text() == passwords
    assert "compose/certs/" in (ROOT / ".gitignore").read_text().splitlines()
