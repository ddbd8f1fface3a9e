"""Provisioning: the study CA, the coordinator's TLS certificate, node keys Flower accepts, kits."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.kits import KitError, load_coordinator_kit, load_hospital_kit
from deploy.provision import add_node, node_keygen, provision
from fedcare.errors import KeyMaterialError

from .conftest import DEFAULT_STUDY


@pytest.fixture()
def kits(tmp_path):
    return provision(DEFAULT_STUDY, ["127.0.0.1", "coordinator.example.org"], ["a", "b", "c"], tmp_path / "kits", port=9555)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_0600_and_only_in_their_own_kit(kits):
    for party in ("a", "b", "c"):
        kit = kits[party]
        assert sorted(p.name for p in kit.iterdir()) == [
            "ca.crt", "coordinator-signing.pub", "kit.toml", "node.crt", "node.key", "node.pub", "package.key",
            "package.pub", "site.toml", "study.toml"]
        assert _mode(kit / "node.key") == 0o600 and _mode(kit / "package.key") == 0o600
    coordinator = kits["coordinator"]
    assert _mode(coordinator / "server.key") == 0o600 and _mode(coordinator / "signing.key") == 0o600
    assert _mode(coordinator / "node-ca.key") == 0o600 and _mode(coordinator / "artifact.key") == 0o600
    assert _mode(kits["ca"] / "ca.key") == 0o600
    assert not list(coordinator.rglob("*.key")) == [] and sorted(p.name for p in coordinator.rglob("*.key")) == [
        "artifact.key", "node-ca.key", "server.key", "signing.key"]
    assert sorted(p.name for p in (coordinator / "nodes").iterdir()) == [
        f"{n}{suffix}" for n in "abc" for suffix in (".crt", ".package.pub", ".pub")]


def test_each_node_certificate_is_a_client_certificate_for_its_own_key_from_the_node_ca(kits):
    coordinator = kits["coordinator"]
    node_ca = x509.load_pem_x509_certificate((coordinator / "node-ca.crt").read_bytes())
    study_ca = x509.load_pem_x509_certificate((kits["ca"] / "ca.crt").read_bytes())
    for party in ("a", "b", "c"):
        cert = x509.load_pem_x509_certificate((kits[party] / "node.crt").read_bytes())
        assert cert.issuer == node_ca.subject != study_ca.subject
        cert.verify_directly_issued_by(node_ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == party
        assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH])
        node_public = serialization.load_ssh_public_key((kits[party] / "node.pub").read_bytes())
        assert cert.public_key() == node_public
        assert (coordinator / "nodes" / f"{party}.crt").read_bytes() == (kits[party] / "node.crt").read_bytes()


def test_server_certificate_is_signed_by_the_study_ca_with_sans(kits):
    coordinator = kits["coordinator"]
    ca = x509.load_pem_x509_certificate((coordinator / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((coordinator / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_keys_load_as_flower_loads_them(kits):
    kit = kits["a"]
    private = load_ssh_private_key((kit / "node.key").read_bytes(), password=None)
    public = load_ssh_public_key((kit / "node.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert (kits["coordinator"] / "nodes" / "a.pub").read_bytes() == (kit / "node.pub").read_bytes()


def test_kits_load_and_check_their_role(kits):
    coordinator = load_coordinator_kit(kits["coordinator"])
    assert coordinator.port == 9555 and set(coordinator.node_keys()) == {"a", "b", "c"}
    hospital = load_hospital_kit(kits["b"])
    assert hospital.name == "b" and hospital.coordinator == "127.0.0.1:9555"
    with pytest.raises(KitError, match="this is a hospital kit, not a coordinator kit"):
        load_coordinator_kit(kits["b"])


def test_loose_key_permissions_are_refused(kits):
    (kits["a"] / "node.key").chmod(0o644)
    with pytest.raises(KeyMaterialError, match="permissions are 644; run `chmod 600"):
        load_hospital_kit(kits["a"])


def test_a_tampered_study_file_is_refused(kits):
    study = kits["c"] / "study.toml"
    study.write_text(study.read_text().replace("epsilon = 3.0", "epsilon = 13.0"))
    with pytest.raises(KitError, match="does not match the study hash recorded in"):
        load_hospital_kit(kits["c"])


def test_provision_refuses_bad_input(tmp_path):
    with pytest.raises(KitError, match="--hospitals: name 'A B'"):
        provision(DEFAULT_STUDY, ["127.0.0.1"], ["A B", "b", "c"], tmp_path / "k1")
    with pytest.raises(KitError, match="needs at least strategy.min_sites = 3"):
        provision(DEFAULT_STUDY, ["127.0.0.1"], ["a", "b"], tmp_path / "k2")
    (tmp_path / "k3").mkdir()
    (tmp_path / "k3" / "x").write_text("")
    with pytest.raises(KitError, match="is not empty"):
        provision(DEFAULT_STUDY, ["127.0.0.1"], ["a", "b", "c"], tmp_path / "k3")


def test_distributed_mode_keeps_the_private_key_at_the_hospital(kits, tmp_path):
    site = tmp_path / "hospital-d"
    private, public = node_keygen(site)
    assert _mode(private) == 0o600
    with pytest.raises(KeyMaterialError, match="refusing to overwrite a private key"):
        node_keygen(site)
    add_node(kits["coordinator"], "d", public, hospital_kit_out=site)
    assert "d" in load_coordinator_kit(kits["coordinator"]).node_keys()
    assert (site / "node.crt").read_bytes() == (kits["coordinator"] / "nodes" / "d.crt").read_bytes()
    assert load_hospital_kit(site).name == "d"
    with pytest.raises(KitError, match="already registered as 'd'"):
        add_node(kits["coordinator"], "e", public)
    with pytest.raises(KeyMaterialError, match="not an OpenSSH public key"):
        add_node(kits["coordinator"], "f", private)


def test_remove_node_takes_key_and_certificate_away_and_names_an_unknown_node(kits):
    from deploy.provision import remove_node

    coordinator = kits["coordinator"]
    remove_node(coordinator, "b")
    assert set(load_coordinator_kit(coordinator).node_keys()) == {"a", "c"}
    assert not (coordinator / "nodes" / "b.crt").exists()
    with pytest.raises(KitError, match=r"--name: no node named 'b' in .* \(accepted: a, c\)"):
        remove_node(coordinator, "b")

