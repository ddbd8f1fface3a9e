"""Provisioning: the study CA and one kit per party (`fedcare provision`), and the distributed mode in
which a hospital's node key never leaves it (`fedcare node keygen` there, `fedcare coordinator add-node`
at the coordinator). The kits' layout is `deploy/kits.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from deploy.kits import (
    ARTIFACT_KEY,
    COORDINATOR_SIGNING_PUB,
    PACKAGE_PUB_SUFFIX,
    DEFAULT_PORT,
    SIGNING_KEY,
    SIGNING_PUB,
    CoordinatorKit,
    KitError,
    check_name,
    load_coordinator_kit,
)
from deploy.pki import CertificateAuthority, load_node_public_key, node_key_pair
from export.signing import PACKAGE_PUB, ensure_package_key, ensure_signing_key, load_package_public_key, signing_key_pair
from fedcare.files import write_public, write_secret
from fedcare.sealing import ensure_artifact_key
from fedcare.study import load_study


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


SITE_TEMPLATE = """# This hospital's own settings (owned by hospital IT, not by the study).
[site]
# Directory holding the site's export: train.csv and test.csv, columns named by the study.
data = "{data}"
# Where the node keeps its privacy ledger (relative to this kit). Back it up; never edit it.
state_dir = "state"

[policy]
# The most privacy this site spends on any one study (all its runs together) ...
max_epsilon_per_study = 3.0
# ... and across every study it ever takes part in (studies add up).
max_epsilon_lifetime = 10.0
# The largest delta a study may ask of this site.
max_delta = 1e-5
# This site takes part only in SecAgg+ rounds with at least this many sites ...
min_cohort = 3
# ... and at least this reconstruction threshold.
min_threshold = 2
# Study hashes this site trains (`fedcare study check` prints one); empty: any study it is sent.
accepted_studies = []
"""


def provision(study_path: Path, hosts: list[str], hospitals: list[str], out: Path, port: int = DEFAULT_PORT) -> dict[str, Path]:
    """Create the CA, the coordinator kit and one kit per hospital under `out` (which must not exist)."""
    study = load_study(study_path)
    if not hosts or any(not h.strip() for h in hosts):
        raise KitError("--coordinator-host: give at least one host name or IP address")
    names = [check_name(h, "--hospitals: name") for h in hospitals]
    if len(set(names)) != len(names):
        raise KitError("--hospitals: names must be unique")
    if len(names) < study.strategy.min_sites:
        raise KitError(f"--hospitals: {len(names)} hospitals, the study needs at least strategy.min_sites = {study.strategy.min_sites}")
    if not 1 <= port <= 65535:
        raise KitError(f"--port: {port} is not a TCP port")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"--out: {out} is not empty; refusing to overwrite existing kits")
    ca = CertificateAuthority.create(study.name)
    ca.save(out / "ca" / "ca.key", out / "ca" / "ca.crt")
    study_text = study.to_toml()

    coord = out / "coordinator"
    cert, key = ca.issue_server(hosts)
    write_public(coord / "server.crt", cert)
    write_secret(coord / "server.key", key)
    shutil.copyfile(out / "ca" / "ca.crt", coord / "ca.crt")
    (coord / "study.toml").write_text(study_text, encoding="utf-8")
    (coord / "kit.toml").write_text(
        f'[kit]\nrole = "coordinator"\nstudy_hash = "{study.hash}"\n\n'
        f"[coordinator]\nhosts = {_toml_list(hosts)}\nport = {port}\n",
        encoding="utf-8",
    )
    (coord / "nodes").mkdir()
    node_ca = CertificateAuthority.create(study.name, purpose="node CA")
    node_ca.save(coord / "node-ca.key", coord / "node-ca.crt")
    signing_private, signing_public = signing_key_pair()
    write_secret(coord / SIGNING_KEY, signing_private)
    write_public(coord / SIGNING_PUB, signing_public)
    ensure_artifact_key(coord / ARTIFACT_KEY)
    kits = {"ca": out / "ca", "coordinator": coord}
    for name in names:
        kit = out / name
        private, public = node_key_pair()
        write_secret(kit / "node.key", private)
        write_public(kit / "node.pub", public)
        write_public(coord / "nodes" / f"{name}.pub", public)
        node_cert = node_ca.issue_client(name, public)
        write_public(coord / "nodes" / f"{name}.crt", node_cert)
        write_public(kit / "node.crt", node_cert)
        shutil.copyfile(out / "ca" / "ca.crt", kit / "ca.crt")
        write_public(kit / COORDINATOR_SIGNING_PUB, signing_public)
        ensure_package_key(kit)
        shutil.copyfile(kit / PACKAGE_PUB, coord / "nodes" / f"{name}{PACKAGE_PUB_SUFFIX}")
        (kit / "study.toml").write_text(study_text, encoding="utf-8")
        _write_hospital_kit_toml(kit, name, f"{hosts[0]}:{port}", study.hash)
        (kit / "site.toml").write_text(SITE_TEMPLATE.format(data="/path/to/ehr-export"), encoding="utf-8")
        kits[name] = kit
    return kits


def _write_hospital_kit_toml(kit: Path, name: str, address: str, study_hash: str) -> None:
    (kit / "kit.toml").write_text(
        f'[kit]\nrole = "hospital"\nname = "{name}"\nstudy_hash = "{study_hash}"\n\n'
        f'[coordinator]\naddress = "{address}"\n',
        encoding="utf-8",
    )


def node_keygen(out: Path) -> tuple[Path, Path]:
    """At the hospital: a new node key pair in `out` (node.key 0600, node.pub to send to the coordinator),
    and the site's package key pair beside it if there is none (package.key 0600, package.pub: the
    coordinator encrypts model packages for it)."""
    private, public = node_key_pair()
    write_secret(out / "node.key", private)
    write_public(out / "node.pub", public)
    ensure_package_key(out)
    return out / "node.key", out / "node.pub"


def node_ca(kit: CoordinatorKit) -> CertificateAuthority:
    """The coordinator's node CA; a kit provisioned before it existed gets one here."""
    if not kit.node_ca_key.exists():
        ca = CertificateAuthority.create(load_study(kit.study_file).name, purpose="node CA")
        ca.save(kit.node_ca_key, kit.node_ca_cert)
        return ca
    return CertificateAuthority.load(kit.node_ca_key, kit.node_ca_cert)


def add_node(kit_path: Path, name: str, public_key: Path, hospital_kit_out: Path | None = None, *,
             package_key: Path | None = None) -> Path:
    """At the coordinator: accept a hospital's node public key and issue its TLS client certificate
    (`nodes/<name>.crt`, to send back to the hospital as its kit's `node.crt`). The site's package.pub
    (`package_key`, default: a `package.pub` beside the node key, as `fedcare node keygen` writes it)
    is kept as `nodes/<name>.package.pub`, for `fedcare export --encrypt-for <name>`.

    With `hospital_kit_out`, also write that hospital's kit files (everything but its private
    key, which stays at the hospital) for the coordinator to send back, including the
    coordinator's package verification key `coordinator-signing.pub` (a coordinator kit that
    predates package signing gets its signing key created here).
    """
    kit = load_coordinator_kit(kit_path)
    check_name(name, "--name")
    line = load_node_public_key(public_key)
    for other, path in kit.node_keys().items():
        if path.read_bytes().strip() == line.strip():
            raise KitError(f"--public-key: this key is already registered as '{other}'")
    target = kit.nodes_dir / f"{name}.pub"
    if target.exists():
        raise KitError(f"--name: a node named '{name}' is already registered; remove {target} first")
    if package_key is None and (Path(public_key).parent / PACKAGE_PUB).is_file():
        package_key = Path(public_key).parent / PACKAGE_PUB
    site_package_pub = None
    if package_key is not None:
        load_package_public_key(package_key)  # an X25519 PEM, or refused before anything changes
        site_package_pub = Path(package_key).read_bytes()
    if hospital_kit_out is not None:
        ensure_signing_key(kit.signing_key, kit.signing_pub)  # before registering: a kit whose signing key cannot be used changes nothing
    certificate = node_ca(kit).issue_client(name, line)
    write_public(target, line)
    write_public(kit.nodes_dir / f"{name}.crt", certificate)
    if site_package_pub is not None:
        write_public(kit.site_package_key(name), site_package_pub)
    if hospital_kit_out is not None:
        out = Path(hospital_kit_out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kit.ca_cert, out / "ca.crt")
        write_public(out / "node.crt", certificate)
        write_public(out / COORDINATOR_SIGNING_PUB, kit.signing_pub.read_bytes())
        shutil.copyfile(kit.study_file, out / "study.toml")
        _write_hospital_kit_toml(out, name, f"{kit.hosts[0]}:{kit.port}", kit.study_hash)
        if not (out / "site.toml").exists():
            (out / "site.toml").write_text(SITE_TEMPLATE.format(data="/path/to/ehr-export"), encoding="utf-8")
    return target


def remove_node(kit_path: Path, name: str) -> str:
    """At the coordinator: stop accepting hospital `name`'s node: its key and certificate leave the kit
    (the edge refuses the certificate at its next reload; a running coordinator reloads within a second
    and unregisters the key from Flower, a stopped one does both at its next start). Returns the key's
    fingerprint."""
    from deploy.audit import audit
    from deploy.pki import fingerprint

    kit = load_coordinator_kit(kit_path)
    check_name(name, "--name")
    key = kit.nodes_dir / f"{name}.pub"
    if not key.exists():
        raise KitError(f"--name: no node named '{name}' in {kit.nodes_dir} (accepted: {', '.join(kit.node_keys()) or 'none'})")
    printed = fingerprint(key.read_bytes())
    (kit.nodes_dir / f"{name}.crt").unlink(missing_ok=True)  # first: the edge stops admitting it
    key.unlink()
    kit.site_package_key(name).unlink(missing_ok=True)
    audit(kit, "node removed", name=name, fingerprint=printed)
    return printed

