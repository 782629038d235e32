"""TLS contexts of imstream's servers and HTTP clients: TLS 1.3 or nothing.

Every server imstream runs (the ingress, the ClickHouse sink's analytics API) serves TLS when it
is given a certificate and key, and then speaks TLS 1.3 only: all its clients are ours or
current browsers and SDKs, and 1.3 has no weak cipher suites left to configure. A client that
offers only TLS 1.2 fails the handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Final

MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_3


class TlsSettingsError(ValueError):
    """A certificate, key or CA bundle cannot be loaded: which file, and why."""


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context for the certificate chain in ``cert_file`` and its key, TLS 1.3 only;
    raises :class:`TlsSettingsError` naming the file that is missing or does not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise TlsSettingsError(
            f"cannot load the TLS certificate {cert_file} with key {key_file}: {error}"
        ) from error
    return context


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A client context verifying the server against ``ca_file`` (the system's trust store when
    None) and its host name, TLS 1.3 only."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise TlsSettingsError(f"cannot load the CA bundle {ca_file}: {error}") from error
    context.minimum_version = MINIMUM_VERSION
    return context


def uvicorn_tls_options(context: ssl.SSLContext | None) -> dict[str, Any]:
    """uvicorn ``Config`` keywords that serve ``context`` (nothing for plain HTTP).

    uvicorn's own SSL options choose a protocol constant, not a minimum version; its context
    factory hands it a context built here instead."""
    if context is None:
        return {}
    return {"ssl_context_factory": lambda _config, _default: context}
