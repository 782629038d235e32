"""A throw-away PKI made at test time: a CA and a server certificate for 127.0.0.1/localhost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.pki import make_pki


@dataclass(frozen=True, slots=True)
class LocalPki:
    ca_file: Path
    """The CA certificate (PEM): what a client trusts."""
    cert_file: Path
    """The server certificate (PEM), signed by the CA, for 127.0.0.1 and localhost."""
    key_file: Path
    """The server certificate's private key (PEM)."""


def make_local_pki(directory: Path) -> LocalPki:
    pki = make_pki(directory, {"localhost": ()}, ca_name="imstream test CA")
    server = pki["localhost"]
    return LocalPki(ca_file=pki.ca_file, cert_file=server.cert_file, key_file=server.key_file)
