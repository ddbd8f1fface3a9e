"""Kits: one folder per party holding only what that party needs.

    <out>/ca/                 ca.key (0600), ca.crt — the study CA; keep it offline
    <out>/coordinator/        kit.toml, study.toml, ca.crt, server.crt, server.key (0600),
                              nodes/<hospital>.pub (node keys the coordinator accepts),
                              signing.key (0600), signing.pub (Ed25519: signs model packages)
    <out>/<hospital>/         kit.toml, study.toml, ca.crt, node.key (0600), node.pub,
                              site.toml (the hospital's own settings: where its data is),
                              coordinator-signing.pub (verifies the coordinator's model packages)

`provision` creates all of them centrally. In the distributed mode the private key never
leaves the hospital: `node_keygen` runs there, and `add_node` registers the public key in
the coordinator's kit.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from deploy.pki import CertificateAuthority, load_node_public_key, node_key_pair
from export.signing import ensure_signing_key, load_signing_key, load_signing_public_key, signing_key_pair
from fedcare.errors import FedcareError
from fedcare.files import check_private_permissions, read_toml, write_public, write_secret
from fedcare.study import load_study

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_PORT = 9092
SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
COORDINATOR_SIGNING_PUB = "coordinator-signing.pub"


class KitError(FedcareError, ValueError):
    """A kit is missing, incomplete, or does not belong to this role; the message says which file."""


@dataclass(frozen=True)
class CoordinatorKit:
    path: Path
    hosts: tuple[str, ...]
    port: int
    study_hash: str

    @property
    def study_file(self) -> Path:
        return self.path / "study.toml"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.path / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.path / "server.key"

    @property
    def nodes_dir(self) -> Path:
        return self.path / "nodes"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def node_keys(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.nodes_dir.glob("*.pub"))}

    @property
    def signing_key(self) -> Path:
        return self.path / SIGNING_KEY

    @property
    def signing_pub(self) -> Path:
        return self.path / SIGNING_PUB


@dataclass(frozen=True)
class HospitalKit:
    path: Path
    name: str
    coordinator: str
    study_hash: str

    @property
    def study_file(self) -> Path:
        return self.path / "study.toml"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.crt"

    @property
    def node_key(self) -> Path:
        return self.path / "node.key"

    @property
    def site_file(self) -> Path:
        return self.path / "site.toml"

    @property
    def coordinator_signing_pub(self) -> Path:
        return self.path / COORDINATOR_SIGNING_PUB


def _check_name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise KitError(f"{what} '{name}': use lowercase letters, digits and '-' (at most 63 characters)")
    return name


def _read_kit(path: Path, role: str) -> dict:
    kit_file = Path(path) / "kit.toml"
    raw = read_toml(kit_file, KitError, f"not found; is {path} a fedcare kit folder?")
    found = raw.get("kit", {}).get("role")
    if found != role:
        raise KitError(f"{kit_file}: this is a {found or 'unknown'} kit, not a {role} kit")
    study = load_study(Path(path) / "study.toml")
    if study.hash != raw["kit"].get("study_hash"):
        raise KitError(f"{Path(path) / 'study.toml'}: does not match the study hash recorded in {kit_file}")
    return raw


def load_coordinator_kit(path: str | Path) -> CoordinatorKit:
    path = Path(path).resolve()
    raw = _read_kit(path, "coordinator")
    # TLS files are checked where they are used: `coordinator start` refuses to run without them.
    return CoordinatorKit(path, tuple(raw["coordinator"]["hosts"]), int(raw["coordinator"]["port"]), raw["kit"]["study_hash"])


def load_hospital_kit(path: str | Path, *, need_keys: bool = True) -> HospitalKit:
    path = Path(path).resolve()
    raw = _read_kit(path, "hospital")
    kit = HospitalKit(path, raw["kit"]["name"], raw["coordinator"]["address"], raw["kit"]["study_hash"])
    if need_keys:
        if not kit.ca_cert.is_file():
            raise KitError(f"{kit.ca_cert}: missing from the hospital kit")
        check_private_permissions(kit.node_key)
    return kit


def read_site_settings(kit: HospitalKit) -> dict[str, str]:
    """The hospital's `site.toml`: `data` (its export directory) and `state_dir`."""
    if not kit.site_file.exists():
        return {"state_dir": str(kit.path / "state")}
    raw = read_toml(kit.site_file, KitError, "not found")
    site = raw.get("site", {})
    state = Path(str(site.get("state_dir", "state")))
    return {
        **({"data": str(site["data"])} if "data" in site else {}),
        "state_dir": str(state if state.is_absolute() else kit.path / state),
    }


def coordinator_signing_key(kit: CoordinatorKit) -> Ed25519PrivateKey:
    """The coordinator kit's package signing key (0600 enforced, checked against `signing.pub`)."""
    return load_signing_key(kit.signing_key, kit.signing_pub)


def package_verification_key(kit_path: str | Path) -> tuple[Ed25519PublicKey, Path]:
    """The key that verifies model packages, from a hospital kit (`coordinator-signing.pub`) or the
    coordinator kit (`signing.pub`); with the file it came from."""
    path = Path(kit_path).resolve()
    raw = read_toml(path / "kit.toml", KitError, f"not found; is {path} a fedcare kit folder?")
    role = raw.get("kit", {}).get("role")
    if role == "hospital":
        kit = load_hospital_kit(path, need_keys=False)
        source = kit.coordinator_signing_pub
        if not source.exists():
            raise KitError(f"{source}: missing from the hospital kit; ask the coordinator for its signing.pub "
                           f"and save it there")
    elif role == "coordinator":
        source = load_coordinator_kit(path).signing_pub
        if not source.exists():
            raise KitError(f"{source}: missing; the coordinator kit has no package signing key yet (`fedcare export` creates it)")
    else:
        raise KitError(f"{path / 'kit.toml'}: unknown kit role {role!r}")
    return load_signing_public_key(source), source


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
    names = [_check_name(h, "--hospitals: name") for h in hospitals]
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
    signing_private, signing_public = signing_key_pair()
    write_secret(coord / SIGNING_KEY, signing_private)
    write_public(coord / SIGNING_PUB, signing_public)
    kits = {"ca": out / "ca", "coordinator": coord}
    for name in names:
        kit = out / name
        private, public = node_key_pair()
        write_secret(kit / "node.key", private)
        write_public(kit / "node.pub", public)
        write_public(coord / "nodes" / f"{name}.pub", public)
        shutil.copyfile(out / "ca" / "ca.crt", kit / "ca.crt")
        write_public(kit / COORDINATOR_SIGNING_PUB, signing_public)
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
    """At the hospital: a new node key pair in `out` (node.key 0600, node.pub to send to the coordinator)."""
    private, public = node_key_pair()
    write_secret(out / "node.key", private)
    write_public(out / "node.pub", public)
    return out / "node.key", out / "node.pub"


def add_node(kit_path: Path, name: str, public_key: Path, hospital_kit_out: Path | None = None) -> Path:
    """At the coordinator: accept a hospital's node public key.

    With `hospital_kit_out`, also write that hospital's kit files (everything but its private
    key, which stays at the hospital) for the coordinator to send back, including the
    coordinator's package verification key `coordinator-signing.pub` (a coordinator kit that
    predates package signing gets its signing key created here).
    """
    kit = load_coordinator_kit(kit_path)
    _check_name(name, "--name")
    line = load_node_public_key(public_key)
    for other, path in kit.node_keys().items():
        if path.read_bytes().strip() == line.strip():
            raise KitError(f"--public-key: this key is already registered as '{other}'")
    target = kit.nodes_dir / f"{name}.pub"
    if target.exists():
        raise KitError(f"--name: a node named '{name}' is already registered; remove {target} first")
    if hospital_kit_out is not None:
        ensure_signing_key(kit.signing_key, kit.signing_pub)  # before registering: a kit whose signing key cannot be used changes nothing
    write_public(target, line)
    if hospital_kit_out is not None:
        out = Path(hospital_kit_out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kit.ca_cert, out / "ca.crt")
        write_public(out / COORDINATOR_SIGNING_PUB, kit.signing_pub.read_bytes())
        shutil.copyfile(kit.study_file, out / "study.toml")
        _write_hospital_kit_toml(out, name, f"{kit.hosts[0]}:{kit.port}", kit.study_hash)
        if not (out / "site.toml").exists():
            (out / "site.toml").write_text(SITE_TEMPLATE.format(data="/path/to/ehr-export"), encoding="utf-8")
    return target
