"""What nodes prove themselves with: SuperNode key pairs, the server's authorized keys, its TLS files."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.atomic import write_bytes_atomically
from fedtune.processes import NodeError


@dataclass(frozen=True)
class TLSFiles:
    """What the server needs of deploy/make-certs.sh's files: its certificate and key (ca.crt goes to clients)."""

    certificate: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TLSFiles:
        directory = directory.resolve()
        files = cls(directory / "server.crt", directory / "server.key")
        missing = [str(p) for p in (files.certificate, files.key) if not p.is_file()]
        if missing:
            raise NodeError(f"missing TLS files: {', '.join(missing)}; make them with deploy/make-certs.sh {directory}")
        return files


def make_node_key(path: Path) -> Path:
    """Write a SuperNode key pair: `path` (private, mode 600) and `path`.pub; returns the public key's path.

    Flower authenticates SuperNodes with NIST elliptic-curve keys in OpenSSH format (P-384 here, as
    in Flower's docs); the private key never leaves the client node.
    """
    public = path.with_name(path.name + ".pub")
    existing = [str(p) for p in (path, public) if p.exists()]
    if existing:
        raise NodeError(f"not overwriting existing key files: {', '.join(existing)}")
    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
    try:
        # exclusive: a key file that appeared since the check above is never replaced.
        write_bytes_atomically(path, private_pem, mode=0o600, exclusive=True)
    except FileExistsError:
        raise NodeError(f"not overwriting existing key files: {path}") from None
    write_bytes_atomically(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def read_authorized_keys(source: Path) -> list[str]:
    """The public keys of the SuperNodes allowed to join: a file with one OpenSSH key per line
    (`#` comments allowed), or a folder of `*.pub` files. Every key is checked before anything starts."""
    if source.is_dir():
        files = sorted(source.glob("*.pub"))
        if not files:
            raise NodeError(f"no *.pub files in {source}: put the clients' public keys there (fedtune keygen)")
    elif source.is_file():
        files = [source]
    else:
        raise NodeError(f"authorized keys not found: {source}")
    keys: list[str] = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = serialization.load_ssh_public_key(line.encode())
            except (ValueError, TypeError) as error:
                raise NodeError(f"{file}:{number} is not an OpenSSH public key: {error}") from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise NodeError(f"{file}:{number}: Flower needs an elliptic-curve (ecdsa) key; make one with "
                                "`fedtune keygen PATH`")
            keys.append(line)
    if not keys:
        raise NodeError(f"{source} holds no public keys")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
