"""The one settings object: environment mapping, validation and the secret policy."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from core.connections import (
    cql_cluster,
    kafka_config,
    kafka_consumer_config,
    kafka_producer_config,
)
from core.pki import make_pki
from core.settings import AuthSettings, CqlSettings, KafkaSettings, Profile, Settings


def test_nested_groups_come_from_im_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    monkeypatch.setenv("IM_CQL__CONTACT_POINTS", '["10.0.0.1","10.0.0.2"]')
    monkeypatch.setenv("IM_STACK__STATE_DIR", "relative/state")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.cql.contact_points == ["10.0.0.1", "10.0.0.2"]
    assert settings.stack.state_dir == Path("relative/state").resolve()
    assert settings.chdb_path == Path("relative/state").resolve() / "clickhouse"


def test_unknown_variables_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_KAFKA__BOOTSTRAP_SERVER", "typo")
    with pytest.raises(ValidationError, match="bootstrap_server"):
        Settings()
    monkeypatch.delenv("IM_KAFKA__BOOTSTRAP_SERVER")
    monkeypatch.setenv("IM_KAFK__BOOTSTRAP_SERVERS", "typo")
    with pytest.raises(ValidationError, match="IM_KAFK__BOOTSTRAP_SERVERS"):
        Settings()


def test_placeholder_secret_is_refused_outside_dev() -> None:
    Settings(profile=Profile.DEV).check_client_key()
    # Processes that verify no client token start without the key (compose gives it to the
    # ingress only); the ingress refuses the placeholder at start (tests/ingress/test_cli.py).
    prod = Settings(profile=Profile.PROD)
    with pytest.raises(ValueError, match="IM_AUTH__JWT_SECRET"):
        prod.check_client_key()


def test_real_secret_is_accepted_in_prod() -> None:
    settings = Settings(
        profile=Profile.PROD, auth=AuthSettings(jwt_secret=SecretStr("s3cr3t-" + "x" * 40))
    )
    assert settings.profile is Profile.PROD
    assert "s3cr3t" not in repr(settings)


def test_kafka_security_reaches_every_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("IM_KAFKA__SASL_USERNAME", "ingress")
    monkeypatch.setenv("IM_KAFKA__SASL_PASSWORD", "p4ss")
    monkeypatch.setenv("IM_KAFKA__SSL_CA_LOCATION", "/certs/ca.pem")
    settings = Settings()
    expected = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "ingress",
        "sasl.password": "p4ss",
        "ssl.ca.location": "/certs/ca.pem",
    }
    for config in (
        kafka_config(settings),
        kafka_consumer_config(settings, "g"),
        kafka_producer_config(settings, **{"transactional.id": "t"}),
    ):
        assert expected.items() <= config.items()
    assert "p4ss" not in repr(settings)
    assert kafka_config(Settings(kafka=KafkaSettings()))["security.protocol"] == "PLAINTEXT"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"IM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "IM_KAFKA__SASL_USERNAME"),
        ({"IM_KAFKA__SASL_USERNAME": "x"}, "IM_KAFKA__SASL_PASSWORD go together"),
        ({"IM_KAFKA__SSL_KEY_LOCATION": "/k.pem"}, "IM_KAFKA__SSL_CERTIFICATE_LOCATION"),
        ({"IM_INGRESS__TLS_CERT_PATH": "/c.pem"}, "IM_INGRESS__TLS_KEY_PATH"),
        ({"IM_SINKS__ANALYTICS_TLS_KEY_PATH": "/k.pem"}, "IM_SINKS__ANALYTICS_TLS_CERT_PATH"),
        ({"IM_CQL__SSL_CERT_PATH": "/c.pem"}, "IM_CQL__SSL_KEY_PATH"),
    ],
)
def test_half_given_credentials_are_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_cql_and_clickhouse_tls_come_from_their_settings(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, {"scylla": ()})
    leaf = pki["scylla"]
    settings = Settings(
        cql=CqlSettings(
            ssl_ca_path=pki.ca_file,
            ssl_cert_path=leaf.cert_file,
            ssl_key_path=leaf.key_file,
            ssl_check_hostname=False,
        )
    )
    cluster = cql_cluster(settings)
    context = cluster.ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED and not context.check_hostname
    assert cql_cluster(Settings()).ssl_context is None
