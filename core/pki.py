"""A development PKI: one CA and a certificate per service, as PEM files.

``imstream certs`` (``make certs``) writes the one compose.yaml mounts, and the tests make a
throw-away one per session: TLS is then tested end to end with a CA that nothing else trusts. A
production deployment brings certificates from its own CA; nothing here is meant for it.

Every leaf certificate is good for both TLS roles (``serverAuth`` and ``clientAuth``): a Kafka
broker is a server to clients and a client of its controllers, and a service may present its
certificate to a server that asks for one (Kafka's controller listener does, docs/operations.md).
Keys are ECDSA P-256 in unencrypted PKCS#8 (what Kafka's PEM key store reads): the files are
secrets, written readable by their owner only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names every local certificate holds: a process on this machine reaches another by these.
LOCAL_NAMES: Final = ("localhost", "127.0.0.1")
CA_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca-key.pem"


@dataclass(frozen=True, slots=True)
class Leaf:
    """One service's certificate and key, signed by the CA."""

    name: str
    cert_file: Path
    """The certificate (PEM), for ``name`` and the names it was made for."""
    key_file: Path
    """Its private key (PEM, unencrypted PKCS#8)."""
    bundle_file: Path
    """Key and certificate in one file: Kafka's PEM key store (``ssl.keystore.location``)."""


@dataclass(frozen=True, slots=True)
class Pki:
    directory: Path
    ca_file: Path
    """The CA certificate (PEM): what every client trusts."""
    leaves: dict[str, Leaf]

    def __getitem__(self, name: str) -> Leaf:
        return self.leaves[name]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_names(names: Iterable[str]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


def _write_secret(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(b"")
    path.chmod(mode)
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(
    directory: Path,
    services: Mapping[str, Iterable[str]],
    *,
    ca_name: str = "imstream development CA",
    valid_for: timedelta = timedelta(days=365),
    key_mode: int = 0o600,
) -> Pki:
    """A new CA in ``directory`` and, for each service, a certificate whose common name is the
    service's name and whose subject alternative names are the service's name, the names given
    for it and :data:`LOCAL_NAMES`. Existing files are replaced. Private keys get ``key_mode``
    (the owner's only by default; containers running as other users need them readable)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700 if key_mode == 0o600 else 0o755)
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=5), now + valid_for
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / CA_FILE
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(directory / CA_KEY_FILE, _key_pem(ca_key), 0o600)
    leaves = {}
    for service, extra_names in services.items():
        names = list(dict.fromkeys([service, *extra_names, *LOCAL_NAMES]))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(service))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(_subject_names(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        leaf = Leaf(
            name=service,
            cert_file=directory / f"{service}.pem",
            key_file=directory / f"{service}-key.pem",
            bundle_file=directory / f"{service}-bundle.pem",
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        leaf.cert_file.write_bytes(cert_pem)
        _write_secret(leaf.key_file, _key_pem(key), key_mode)
        _write_secret(leaf.bundle_file, _key_pem(key) + cert_pem, key_mode)
        leaves[service] = leaf
    return Pki(directory=directory, ca_file=ca_file, leaves=leaves)
