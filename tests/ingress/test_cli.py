"""``imstream run ingress`` refuses to start with an error that says what to do."""

from __future__ import annotations

import socket
import subprocess

from tests.ingress.support import run_imstream


def run_ingress(**variables: str) -> subprocess.CompletedProcess[str]:
    return run_imstream("run", "ingress", variables=variables)


def test_a_port_in_use_is_reported() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_ingress(IM_INGRESS__PORT=str(port))
    assert result.returncode == 1
    assert f"[port-in-use] cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "IM_INGRESS__PORT" in result.stderr


def test_an_invalid_node_id_is_reported() -> None:
    result = run_ingress(IM_INGRESS__NODE_ID="node one")
    assert result.returncode == 1
    assert "[settings-invalid] IM_INGRESS__NODE_ID='node one' is not a valid node id" in (
        result.stderr
    )


def test_an_unknown_setting_is_reported() -> None:
    result = run_ingress(IM_INGRESS__PROT="8080")
    assert result.returncode == 2
    assert "[settings-invalid]" in result.stderr


def test_the_clients_placeholder_key_stops_the_ingress_outside_dev() -> None:
    """Only the ingress holds the clients' key (compose gives it to no other process), so it is
    the ingress that refuses the development placeholder, before it listens."""
    result = run_ingress(
        IM_PROFILE="prod", IM_AUTH__JWT_SECRET="", IM_SERVICE_AUTH__SECRET="s" * 40
    )
    assert result.returncode == 1
    assert "[settings-invalid] IM_AUTH__JWT_SECRET still holds the development placeholder" in (
        result.stderr
    )
