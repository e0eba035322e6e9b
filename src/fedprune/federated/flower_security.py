"""Files a secure Flower deployment needs: a TLS certificate authority, a SuperLink server
certificate signed by it, and one authentication key pair per SuperNode.

Why: without TLS the LoRA updates, masks and run configuration cross the network in clear text,
and without SuperNode authentication any process that reaches the SuperLink's port can join the
federation and send it updates. Flower (1.41) supports both; this module makes the files so a
user does not have to assemble ``openssl`` and ``ssh-keygen`` recipes by hand (the slow secure
loopback test uses it too, so it stays exercised).

What each file is for (names as in Flower's documentation):

* ``ca.crt`` - the CA certificate. Every SuperNode and every ``flwr`` user needs it
  (``flower-supernode --root-certificates``, ``root-certificates`` in the ``flwr`` connection).
* ``ca.key`` - the CA's private key; only needed to sign another server certificate. Keep it
  off the SuperLink machine.
* ``server.pem`` / ``server.key`` - the SuperLink's certificate and private key
  (``flower-superlink --ssl-certfile/--ssl-keyfile``, with ``--ssl-ca-certfile ca.crt``). The
  certificate names 127.0.0.1 and localhost (the SuperLink's own ServerApp process connects over
  loopback) plus every ``--host`` given: the names SuperNodes use to reach the SuperLink.
* ``<node>`` / ``<node>.pub`` - a SuperNode's key pair (ECDSA P-384 in OpenSSH format, what
  Flower accepts). The private key stays on the device (``flower-supernode
  --auth-supernode-private-key``); the public key is registered on the SuperLink
  (``flwr supernode register <node>.pub <connection>``), which then refuses every other node
  when started with ``--enable-supernode-auth``.

Existing files are kept, never overwritten: rerunning with more ``--nodes`` adds keys, and an
existing CA signs a new server certificate only if ``server.pem`` was removed. Private keys are
written with mode 0600.

    python -m fedprune.federated.flower_security --out flower-certs \\
        --host superlink.example.org --nodes 10
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from fedprune import atomic

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
"""Always in the server certificate: the SuperLink starts its ServerApp process against its own
API over loopback, with the same certificate."""

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """New files readable by their owner only, from the moment they exist (not chmod after)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _write_private(path: Path, data: bytes) -> None:
    with _private_umask():
        atomic.write_bytes(path, data)


def _san(hosts: Iterable[str]):
    from cryptography import x509

    names = []
    for h in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c.isspace() for c in h) or "/" in h or ":" in h:
                raise ValueError(f"--host {h!r} is neither an IP address nor a DNS name "
                                 "(give the name SuperNodes use, without port or scheme)") from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_certificates(out_dir: str | os.PathLike, hosts: Iterable[str] = (),
                          days: int = 365) -> TlsFiles:
    """A CA and a SuperLink certificate it signs, valid ``days`` days for ``hosts`` + loopback.

    Files already in ``out_dir`` are kept (see the module docstring), so a second call returns
    the same certificates.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not 1 <= days <= 3650:
        raise ValueError(f"--days {days}: a certificate's validity must be between 1 and 3650 days")
    out = Path(out_dir)
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    san = _san([*LOOPBACK_HOSTS, *hosts])  # validates hosts before anything is written
    pem = serialization.Encoding.PEM
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    def key_bytes(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    if files.ca_cert.exists() != files.ca_key.exists():
        raise FileNotFoundError(f"{files.ca_cert} and {files.ca_key} go together: one is missing; "
                                "restore it or remove both to make a new CA")
    if files.ca_cert.exists():
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = (x509.CertificateBuilder().subject_name(_name("fedprune Flower CA"))
                   .issuer_name(_name("fedprune Flower CA")).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))
        _write_private(files.ca_key, key_bytes(ca_key))
        atomic.write_bytes(files.ca_cert, ca_cert.public_bytes(pem))

    if files.server_cert.exists() and files.server_key.exists():
        return files
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name("fedprune Flower SuperLink"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(files.server_key, key_bytes(key))
    atomic.write_bytes(files.server_cert, cert.public_bytes(pem))
    return files


def make_node_keys(out_dir: str | os.PathLike, names: Iterable[str]) -> list[NodeKey]:
    """One SuperNode authentication key pair per name (``<name>``, ``<name>.pub``); existing kept."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    keys = []
    for name in names:
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"node key name {name!r}: use letters, digits, '_', '.', '-' "
                             "(it becomes a file name)")
        k = NodeKey(out / name, out / f"{name}.pub")
        if not (k.private.exists() and k.public.exists()):
            key = ec.generate_private_key(ec.SECP384R1())
            _write_private(k.private, key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()))
            pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH)
            atomic.write_bytes(k.public, pub + f" {name}\n".encode())
        keys.append(k)
    return keys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedprune.federated.flower_security",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the certificates and keys")
    p.add_argument("--host", action="append", default=[],
                   help="a name or IP address SuperNodes use to reach the SuperLink (repeatable; "
                        "127.0.0.1 and localhost are always included)")
    p.add_argument("--nodes", type=int, default=0, help="make keys node-0 ... node-<N-1>")
    p.add_argument("--node", action="append", default=[], help="make a key with this name (repeatable)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days")
    a = p.parse_args(argv)
    if a.nodes < 0:
        p.error(f"--nodes {a.nodes}: must be >= 0")
    try:
        tls = make_tls_certificates(a.out, a.host, a.days)
        keys = make_node_keys(a.out, [f"node-{i}" for i in range(a.nodes)] + a.node)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    print(f"CA certificate (for SuperNodes and flwr): {tls.ca_cert}\n"
          f"SuperLink certificate and key:            {tls.server_cert} {tls.server_key}\n"
          f"CA private key (keep offline):            {tls.ca_key}")
    for k in keys:
        print(f"SuperNode key {k.private.name}: private {k.private} (stays on the device), "
              f"public {k.public} (flwr supernode register)")


if __name__ == "__main__":
    main()
