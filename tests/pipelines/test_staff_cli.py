"""``imstream staff token``: short-lived staff tokens the API's gate accepts, for the role asked."""

from __future__ import annotations

import urllib.parse

import pytest
from typer.testing import CliRunner

from core.principals import StaffRole, staff_authenticator
from core.settings import Settings
from pipelines.cli import app as imstream
from pipelines.staff_cli import StaffCredential
from schemas.events import SYSTEM_TENANT
from tests.sinks.staff_support import staff_token


def test_the_token_is_a_staff_token_of_the_role_asked() -> None:
    runner = CliRunner()
    authenticator = staff_authenticator(Settings())
    printed = runner.invoke(
        imstream, ["staff", "token", "--role", "analyst", "--tenant", "acme", "--operator", "ann"]
    )
    assert printed.exit_code == 0, printed.output
    principal = authenticator.authenticate(f"Bearer {printed.stdout.strip()}")
    assert (principal.role, principal.tenant, principal.subject) == (
        StaffRole.ANALYST,
        "acme",
        "ann",
    )
    operator = runner.invoke(imstream, ["staff", "token", "--role", "operator"])
    principal = authenticator.authenticate(f"Bearer {operator.stdout.strip()}")
    assert (principal.role, principal.tenant) == (StaffRole.OPERATOR, SYSTEM_TENANT)
    address = runner.invoke(imstream, ["staff", "token", "--dashboards"]).stdout.strip()
    parts = urllib.parse.urlsplit(address)
    assert parts.path == "/dashboards"
    token = urllib.parse.parse_qs(parts.query)["token"][0]
    assert authenticator.authenticate(f"Bearer {token}").role is StaffRole.PLATFORM_ANALYST


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--role", "analyst"], "needs --tenant"),
        (["--role", "ingress"], "the ingress's own"),
    ],
)
def test_tokens_the_cli_must_not_sign_are_refused(arguments: list[str], message: str) -> None:
    refused = CliRunner().invoke(imstream, ["staff", "token", *arguments])
    assert refused.exit_code == 2 and message in refused.stderr


def test_a_given_token_is_sent_as_it_is_and_names_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = staff_token(StaffRole.OPERATOR, subject="erin-from-sso")
    monkeypatch.setenv("IM_STAFF_AUTH__TOKEN", given)
    credential = StaffCredential.of(Settings(), StaffRole.OPERATOR, operator="someone-else")
    assert credential.token() == given
    assert credential.subject == "erin-from-sso"
    monkeypatch.setenv("IM_STAFF_AUTH__ALGORITHM", "RS256")
    monkeypatch.delenv("IM_STAFF_AUTH__TOKEN")
    with pytest.raises(ValueError, match="IM_STAFF_AUTH__TOKEN"):
        StaffCredential.of(Settings(), StaffRole.OPERATOR)
