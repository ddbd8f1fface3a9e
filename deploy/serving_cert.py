"""The hospital's serving certificate for `fedcare serve` (`fedcare serve cert`).

The prediction API is the hospital's own service on its own network, reached by its EHR gateway: its
TLS identity is the hospital's, not the study's, so the study CA (the coordinator's) never signs it.
Two ways, both documented in README:

- the hospital's own PKI (recommended where one exists): issue a server certificate for the host the
  EHR gateway calls, and pass it with `fedcare serve --tls-cert F --tls-key F`;
- `fedcare serve cert --kit KIT --host NAME[,NAME...]`: a serving CA local to this kit
  (`serve-ca.crt`, its key `serve-ca.key` 0600, made once) issues `serve.crt` / `serve.key` (0600)
  for those names; the EHR gateway trusts `serve-ca.crt`. `fedcare serve` uses the kit's `serve.crt`
  when no `--tls-cert` is given. Reissuing (new names, renewal) keeps the CA, so the gateway's trust
  does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.kits import KitError, load_kit
from deploy.pki import CertificateAuthority
from fedcare.files import write_public, write_secret

SERVE_CA_KEY, SERVE_CA_CERT = "serve-ca.key", "serve-ca.crt"
SERVE_CERT, SERVE_KEY = "serve.crt", "serve.key"


@dataclass(frozen=True)
class ServingCertificate:
    cert: Path
    key: Path
    ca_cert: Path
    created_ca: bool


def kit_serving_certificate(kit_dir: Path) -> tuple[Path, Path] | None:
    """(serve.crt, serve.key) of a kit, if `fedcare serve cert` made them."""
    cert, key = Path(kit_dir) / SERVE_CERT, Path(kit_dir) / SERVE_KEY
    return (cert, key) if cert.is_file() and key.is_file() else None


def issue_serving_certificate(kit_dir: Path, hosts: list[str]) -> ServingCertificate:
    """Issue (or reissue) the kit's serving certificate for `hosts` from its local serving CA."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise KitError("--host: give at least one host name or IP address the EHR gateway uses")
    kit = load_kit(kit_dir)
    root = kit.path
    ca_key, ca_cert = root / SERVE_CA_KEY, root / SERVE_CA_CERT
    created = not ca_key.exists()
    if created:
        CertificateAuthority.create(root.name, purpose="serving CA").save(ca_key, ca_cert)
    ca = CertificateAuthority.load(ca_key, ca_cert)
    cert, key = ca.issue_server(hosts)
    for path in (root / SERVE_CERT, root / SERVE_KEY):
        path.unlink(missing_ok=True)  # a reissue replaces the pair (write_secret never overwrites)
    write_secret(root / SERVE_KEY, key)
    write_public(root / SERVE_CERT, cert)
    return ServingCertificate(root / SERVE_CERT, root / SERVE_KEY, ca_cert, created)
