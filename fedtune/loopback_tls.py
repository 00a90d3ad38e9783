"""A private CA and a certificate for 127.0.0.1, made afresh at each `fedtune server` start.

The SuperLink that `fedtune server` starts listens on loopback only (fedtune/gateway.py faces the
network). It still needs TLS there: Flower refuses `--enable-supernode-auth` without it
(flwr/superlink/cli/flower_superlink.py:374-385), and its own SuperExec and the `flwr` CLI dial
that address and verify the certificate. These files serve that one SuperLink and nothing else:
new keys every start, private keys readable by their owner only, never reused.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.atomic import write_bytes_atomically
from fedtune.ports import LOOPBACK

_VALID_FOR = datetime.timedelta(days=30)  # a server run is far shorter; the files are remade at each start


@dataclass(frozen=True)
class LoopbackTLS:
    """The files a loopback SuperLink is started with (`--ssl-*`) and its clients verify against (`ca`)."""

    ca: Path
    certificate: Path
    key: Path


def make_loopback_tls(directory: Path) -> LoopbackTLS:
    """Write a new CA and a server certificate valid for 127.0.0.1 only into `directory` (mode 700)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + _VALID_FOR  # 5 min: clock skew

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune loopback CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune loopback SuperLink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = LoopbackTLS(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    # The CA's key is not kept: nothing else is ever signed with it.
    key_pem = server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    # A new file each start, owner-only from its creation: never one of an earlier start with looser permissions.
    write_bytes_atomically(files.key, key_pem, mode=0o600)
    write_bytes_atomically(files.ca, ca.public_bytes(serialization.Encoding.PEM))
    write_bytes_atomically(files.certificate, server.public_bytes(serialization.Encoding.PEM))
    return files
