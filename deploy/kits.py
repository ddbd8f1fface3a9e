"""Kits: one folder per party holding only what that party needs.

    <out>/ca/                 ca.key (0600), ca.crt — the study CA; keep it offline
    <out>/coordinator/        kit.toml, study.toml, ca.crt, server.crt, server.key (0600),
                              nodes/<hospital>.pub (node keys the coordinator accepts),
                              nodes/<hospital>.crt (their TLS client certificates),
                              node-ca.key (0600), node-ca.crt (issues those certificates),
                              signing.key (0600), signing.pub (Ed25519: signs model packages),
                              nodes/<hospital>.package.pub (X25519: packages encrypted for that site),
                              artifact.key (0600: AES-256-GCM over checkpoints and exported models),
                              state/ (SuperLink database, edge configuration, audit.jsonl, logs;
                              elsewhere if kit.toml's [coordinator] state_dir says so)
    <out>/<hospital>/         kit.toml, study.toml, ca.crt, node.key (0600), node.pub,
                              node.crt (the node's TLS client certificate, from the coordinator),
                              site.toml (the hospital's own settings: where its data is),
                              package.key (0600), package.pub (X25519: opens packages encrypted for it),
                              coordinator-signing.pub (verifies the coordinator's model packages)

This module is the layout and its loading (every file a party's commands look for);
`deploy/provision.py` creates kits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from export.signing import load_signing_key, load_signing_public_key
from fedcare.errors import FedcareError
from fedcare.fields import Fields
from fedcare.files import check_private_permissions, read_toml
from fedcare.sealing import ArtifactKey
from fedcare.study import load_study

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_PORT = 9092
SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
COORDINATOR_SIGNING_PUB = "coordinator-signing.pub"
ARTIFACT_KEY = "artifact.key"
PACKAGE_PUB_SUFFIX = ".package.pub"


class KitError(FedcareError, ValueError):
    """A kit is missing, incomplete, or does not belong to this role; the message says which file."""


@dataclass(frozen=True)
class _Kit:
    """What every kit holds: its folder, the study file and the study CA's certificate."""

    path: Path

    @property
    def study_file(self) -> Path:
        return self.path / "study.toml"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.crt"


@dataclass(frozen=True)
class CoordinatorKit(_Kit):
    hosts: tuple[str, ...]
    port: int
    study_hash: str
    state: Path | None = None  # kit.toml [coordinator] state_dir (absolute, or relative to the kit); default KIT/state

    server_cert = property(lambda self: self.path / "server.crt")
    server_key = property(lambda self: self.path / "server.key")  # 0600
    nodes_dir = property(lambda self: self.path / "nodes")  # <hospital>.pub: the node keys it accepts
    state_dir = property(lambda self: self.state if self.state is not None else self.path / "state")
    signing_key = property(lambda self: self.path / SIGNING_KEY)  # 0600
    signing_pub = property(lambda self: self.path / SIGNING_PUB)
    node_ca_key = property(lambda self: self.path / "node-ca.key")  # 0600: issues the nodes' TLS client certificates
    node_ca_cert = property(lambda self: self.path / "node-ca.crt")
    audit_log = property(lambda self: self.state_dir / "audit.jsonl")

    artifact_key = property(lambda self: self.path / ARTIFACT_KEY)  # 0600: seals checkpoints and run artifacts

    def node_keys(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.nodes_dir.glob("*.pub")) if not p.name.endswith(PACKAGE_PUB_SUFFIX)}

    def site_package_key(self, name: str) -> Path:
        """Where the kit keeps hospital `name`'s package.pub (X25519: packages encrypted at rest for it)."""
        return self.nodes_dir / f"{name}{PACKAGE_PUB_SUFFIX}"

    def node_certificates(self) -> dict[str, Path]:
        """hospital name -> its node's TLS client certificate, for the nodes whose key is accepted."""
        return {name: self.nodes_dir / f"{name}.crt" for name in self.node_keys() if (self.nodes_dir / f"{name}.crt").is_file()}


@dataclass(frozen=True)
class HospitalKit(_Kit):
    name: str
    coordinator: str
    study_hash: str

    node_key = property(lambda self: self.path / "node.key")  # 0600
    node_cert = property(lambda self: self.path / "node.crt")  # TLS client certificate from the coordinator's node CA
    site_file = property(lambda self: self.path / "site.toml")  # the hospital's own settings and [policy]
    coordinator_signing_pub = property(lambda self: self.path / COORDINATOR_SIGNING_PUB)


def check_name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise KitError(f"{what} '{name}': use lowercase letters, digits and '-' (at most 63 characters)")
    return name


def _read_kit(path: Path, role: str) -> tuple[Fields, dict, dict, str]:
    """(reader, [kit] table, [coordinator] table, study hash) of a kit folder of `role`, its study checked."""
    kit_file = Path(path) / "kit.toml"
    raw = read_toml(kit_file, KitError, f"not found; is {path} a fedcare kit folder?")
    fields = Fields(str(kit_file), KitError)
    kit = fields.table(raw, "[kit]")
    found = kit.get("role")
    if found != role:
        raise KitError(f"{kit_file}: this is a {found or 'unknown'} kit, not a {role} kit")
    study_hash = fields.string(kit, "kit.study_hash")
    if load_study(Path(path) / "study.toml").hash != study_hash:
        raise KitError(f"{Path(path) / 'study.toml'}: does not match the study hash recorded in {kit_file}")
    return fields, kit, fields.table(raw, "[coordinator]"), study_hash


def load_coordinator_kit(path: str | Path) -> CoordinatorKit:
    path = Path(path).resolve()
    fields, _, coordinator, study_hash = _read_kit(path, "coordinator")
    # TLS files are checked where they are used: `coordinator start` refuses to run without them.
    hosts = tuple(fields.string_list(coordinator, "coordinator.hosts"))
    state = None
    if "state_dir" in coordinator:  # e.g. a container's writable volume, the kit itself being read-only
        state = Path(fields.string(coordinator, "coordinator.state_dir", non_empty=True))
        state = state if state.is_absolute() else path / state
    return CoordinatorKit(path, hosts, fields.integer(coordinator, "coordinator.port", minimum=1), study_hash, state)


def load_hospital_kit(path: str | Path, *, need_keys: bool = True) -> HospitalKit:
    path = Path(path).resolve()
    fields, kit_table, coordinator, study_hash = _read_kit(path, "hospital")
    kit = HospitalKit(path, fields.string(kit_table, "kit.name", non_empty=True),
                      fields.string(coordinator, "coordinator.address", non_empty=True), study_hash)
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
    fields = Fields(str(kit.site_file), KitError)
    site = fields.table(raw, "[site]", optional=True)
    state = Path(fields.string(site, "site.state_dir", "state", non_empty=True))
    return {
        **({"data": fields.string(site, "site.data", non_empty=True)} if "data" in site else {}),
        "state_dir": str(state if state.is_absolute() else kit.path / state),
    }


def coordinator_artifact_key(kit: CoordinatorKit) -> ArtifactKey | None:
    """The key the coordinator's run artifacts are sealed under (`artifact.key`), or None if the kit has none."""
    return ArtifactKey.load(kit.artifact_key) if kit.artifact_key.exists() else None


def coordinator_signing_key(kit: CoordinatorKit) -> Ed25519PrivateKey:
    """The coordinator kit's package signing key (0600 enforced, checked against `signing.pub`)."""
    return load_signing_key(kit.signing_key, kit.signing_pub)


def load_kit(path: str | Path) -> CoordinatorKit | HospitalKit:
    """A hospital kit (the usual case) or the coordinator's kit, by the role its kit.toml names."""
    path = Path(path).resolve()
    raw = read_toml(path / "kit.toml", KitError, f"not found; is {path} a fedcare kit folder?")
    kit = raw.get("kit")
    if isinstance(kit, dict) and kit.get("role") == "coordinator":
        return load_coordinator_kit(path)
    return load_hospital_kit(path, need_keys=False)  # any other role: the kit's own one-line error


def package_verification_key(kit: CoordinatorKit | HospitalKit) -> tuple[Ed25519PublicKey, Path]:
    """The key that verifies model packages, from a hospital kit (`coordinator-signing.pub`) or the
    coordinator kit (`signing.pub`); with the file it came from."""
    if isinstance(kit, HospitalKit):
        source = kit.coordinator_signing_pub
        if not source.exists():
            raise KitError(f"{source}: missing from the hospital kit; ask the coordinator for its signing.pub "
                           f"and save it there")
    else:
        source = kit.signing_pub
        if not source.exists():
            raise KitError(f"{source}: missing; the coordinator kit has no package signing key yet (`fedcare export` creates it)")
    return load_signing_public_key(source), source
