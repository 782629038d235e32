"""The one settings object: environment mapping, validation and the secret policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from pipelines.settings import AuthSettings, Profile, Settings


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
    assert Settings(profile=Profile.DEV).auth.jwt_secret.get_secret_value()
    with pytest.raises(ValidationError, match="IM_AUTH__JWT_SECRET"):
        Settings(profile=Profile.PROD)


def test_real_secret_is_accepted_in_prod() -> None:
    settings = Settings(
        profile=Profile.PROD, auth=AuthSettings(jwt_secret=SecretStr("s3cr3t-" + "x" * 40))
    )
    assert settings.profile is Profile.PROD
    assert "s3cr3t" not in repr(settings)
