"""The study's keys and certificates (Python `cryptography`; no shelling out to openssl).

- a study CA (ECDSA P-384, self-signed) that signs the coordinator's TLS certificate;
- the coordinator's TLS key and certificate, with SANs for every host name / IP it serves;
- one ECDSA P-384 key pair per hospital in OpenSSH format, as Flower's SuperNode
  authentication takes them (`--auth-supernode-private-key`, `flwr supernode register`);
- the coordinator's node CA (its own self-signed CA, held in the coordinator kit) and, for each
  hospital, a TLS client certificate it issues for that hospital's node public key: the
  coordinator's network edge admits a connection only with one of them (`deploy/edge.py`).

Private keys are written with mode 0600 (created that way, never widened) and are never
printed or logged; `write_secret` refuses to overwrite an existing key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.errors import KeyMaterialError
from fedcare.files import write_public, write_secret

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _common_name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, *,
             days: int) -> x509.CertificateBuilder:
    """What every certificate here starts with: names, key, a random serial, valid from 5 minutes ago."""
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, study_name: str, *, purpose: str = "study CA") -> CertificateAuthority:
        key = ec.generate_private_key(CURVE)
        name = _common_name(f"fedcare {purpose} ({study_name})")
        cert = (
            _builder(name, name, key.public_key(), days=CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(key, cert)

    def save(self, key_path: Path, cert_path: Path) -> None:
        write_secret(key_path, _pem_private(self.key))
        write_public(cert_path, _pem_cert(self.cert))

    @classmethod
    def load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        from fedcare.keys import load_private_key

        key = load_private_key(key_path, ec.EllipticCurvePrivateKey, "a CA key must be ECDSA")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def issue_client(self, name: str, public_key_line: bytes) -> bytes:
        """A TLS client certificate (PEM) for hospital `name`'s node public key (OpenSSH line)."""
        public_key = serialization.load_ssh_public_key(public_key_line.strip())
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise KeyMaterialError(f"node '{name}': a client certificate needs an ECDSA public key")
        cert = (
            _builder(_common_name(name), self.cert.subject, public_key, days=SERVER_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA384())
        )
        return _pem_cert(cert)

    def issue_server(self, hosts: list[str]) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for a TLS server reachable at `hosts`."""
        if not hosts:
            raise KeyMaterialError("at least one coordinator host name or IP address is needed")
        key = ec.generate_private_key(CURVE)
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = (
            _builder(_common_name(hosts[0]), self.cert.subject, key.public_key(), days=SERVER_DAYS)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA384())
        )
        return _pem_cert(cert), _pem_private(key)


def loopback_certificate() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): a self-signed certificate for 127.0.0.1 / localhost only, made at each
    coordinator start for the SuperLink behind the edge (trusted by the edge and the operator's `flwr`)."""
    key = ec.generate_private_key(CURVE)
    name = _common_name("fedcare SuperLink (loopback)")
    cert = (
        _builder(name, name, key.public_key(), days=SERVER_DAYS)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _pem_cert(cert), _pem_private(key)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-1 fingerprint (hex, lowercase) of a PEM certificate, as nginx's `$ssl_client_fingerprint` shows it."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA1()).hex()  # noqa: S303 (an identifier, not a signature)


def node_tls_key(openssh_private: bytes) -> bytes:
    """The node's OpenSSH private key as PKCS#8 PEM, the form a TLS library loads."""
    key = serialization.load_ssh_private_key(openssh_private, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError("node.key: not an ECDSA key")
    return _pem_private(key)


def node_key_pair() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) for Flower SuperNode authentication."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def load_node_public_key(path: Path) -> bytes:
    """Validate an OpenSSH ECDSA public key file and return its single line."""
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: public key file not found") from None
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"{path}: Flower node authentication needs an ECDSA key, got {type(key).__name__}")
    if b"PRIVATE" in data:
        raise KeyMaterialError(f"{path}: this is a private key; give the .pub file")
    return data + b"\n"


def fingerprint(public_line: bytes) -> str:
    """Short SHA-256 fingerprint of a public key line, safe to print."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public_line.strip())
    return digest.finalize().hex()[:16]
