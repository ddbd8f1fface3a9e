"""Encryption at rest: a package encrypted for one site and served from memory, the coordinator's
sealed run artifacts, and kit keys protected by a passphrase. Real crypto, real HTTP, real files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedcare.errors import KeyMaterialError
from fedcare.run_record import RunRecord, RunRecordError
from fedcare.sealing import ARTIFACT_MAGIC, ArtifactKey
from fedcare.study import Overrides

from .test_serve import ServerProcess, add_token, build_world, fedcare_main, serving, valid_features

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("at-rest"))


@pytest.fixture
def kits(world, tmp_path):
    """Fresh copies of the world's kits (north and south hospitals, the coordinator) for one test."""
    return {name: Path(shutil.copytree(world.root / "kits" / name, tmp_path / "kits" / name))
            for name in ("north", "south", "coordinator")}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_provision_gives_every_site_a_package_key_and_the_coordinator_an_artifact_key(world):
    kits = world.root / "kits"
    for site in ("north", "south", "east"):
        assert stat.S_IMODE((kits / site / "package.key").stat().st_mode) == 0o600
        assert (kits / "coordinator" / "nodes" / f"{site}.package.pub").read_bytes() == (kits / site / "package.pub").read_bytes()
    assert stat.S_IMODE((kits / "coordinator" / "artifact.key").stat().st_mode) == 0o600
    assert ArtifactKey.load(kits / "coordinator" / "artifact.key").fingerprint.startswith("SHA256:")
    from deploy.kits import load_coordinator_kit

    assert sorted(load_coordinator_kit(kits / "coordinator").node_keys()) == ["east", "north", "south"]  # not the package keys


def test_export_encrypts_for_a_site_by_name_and_serve_decrypts_it_in_memory_only(world, kits, tmp_path):
    pkg = tmp_path / "pkg"
    status, out, err = fedcare_main("export", "--run", str(world.root / "run"), "--kit", str(kits["coordinator"]),
                                    "--out", str(pkg), "--encrypt-for", "north")
    assert status == 0, err
    enc = tmp_path / "pkg.enc"
    assert f"encrypted for north: {enc}" in out
    data = enc.read_bytes()
    assert b"manifest" not in data and b"onnx" not in data.lower() and world.study.name.encode() not in data
    status, _, err = fedcare_main("export", "--run", str(world.root / "run"), "--kit", str(kits["coordinator"]),
                                  "--out", str(tmp_path / "pkg2"), "--encrypt-for", "west")
    assert status == 2 and err.startswith("fedcare: error: --encrypt-for: no package key for site 'west'") \
        and "(sites with one: east, north, south)" in err and err.count("\n") == 1

    # served from the encrypted file alone: the plain package is gone, and nothing decrypted is written
    plain_models = fedcare_main("verify", str(pkg), "--kit", str(kits["north"]))[1]
    shutil.rmtree(pkg)
    token = add_token(kits["north"], "ehr", "analyze", "models")
    before = _files(tmp_path)
    body = {"patient_id": "p-1", "features": valid_features(world)}
    headers = {"Authorization": f"Bearer {token}"}
    with serving(enc, kits["north"], tmp_path / "logs-enc") as server:
        models = httpx.get(f"{server.base_url}/v1/models", headers=headers).json()
        risk = httpx.post(f"{server.base_url}/v1/analyze", json=body, headers=headers).json()["risk"]
    state = kits["north"] / "state"
    after = _files(tmp_path)
    changed = {name for name in after if before.get(name) != after[name]}
    assert all(name.startswith(("logs-enc/", str(state.relative_to(tmp_path)) + "/")) for name in changed), changed
    for name in changed:
        assert b"onnx" not in after[name].lower() or name.startswith("logs-enc/"), name  # no model bytes on disk
    # the same package, served as a directory, answers identically
    plain = tmp_path / "plain"
    fedcare_main("verify", str(enc), "--kit", str(kits["north"]), "--out", str(plain))
    with serving(plain, kits["north"], tmp_path / "logs-plain") as server:
        served = httpx.get(f"{server.base_url}/v1/models", headers=headers).json()
        timing = "default_choice"  # measured at each start
        assert {k: v for k, v in served.items() if k != timing} == {k: v for k, v in models.items() if k != timing}
        assert httpx.post(f"{server.base_url}/v1/analyze", json=body, headers=headers).json()["risk"] == risk
    assert "every file matches the manifest" in plain_models


@pytest.mark.parametrize("case", ["another site", "tampered"])
def test_serve_refuses_a_package_for_another_site_or_modified_in_one_line(world, kits, tmp_path, case):
    pkg = tmp_path / "pkg"
    assert fedcare_main("export", "--run", str(world.root / "run"), "--kit", str(kits["coordinator"]),
                        "--out", str(pkg), "--encrypt-for", "north")[0] == 0
    enc = tmp_path / "pkg.enc"
    kit = kits["south"] if case == "another site" else kits["north"]
    if case == "tampered":
        data = bytearray(enc.read_bytes())
        data[len(data) // 2] ^= 0x01
        enc.write_bytes(bytes(data))
    server = ServerProcess(enc, kit, tmp_path / "logs")
    assert server.proc.wait(timeout=120) == 2
    assert server.stderr == f"fedcare: error: {enc}: cannot decrypt: encrypted for another site's key, or modified\n"


def _weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]


def test_run_artifacts_are_sealed_under_the_coordinator_key(world, kits, tmp_path):
    key = ArtifactKey.load(kits["coordinator"] / "artifact.key")
    record = RunRecord(tmp_path / "run", key=key)
    record.start(world.study, Overrides())
    weights = _weights(1)
    path = record.save_checkpoint(1, weights, world.study.hash)
    state = record.save_optimizer_state(1, {"m": weights[0] * 2}, world.study.hash)
    for sealed in (path, state):
        data = sealed.read_bytes()
        assert data.startswith(ARTIFACT_MAGIC) and not data[len(ARTIFACT_MAGIC):].startswith(b"PK")
        assert weights[0].tobytes()[:16] not in data
    assert json.loads((tmp_path / "run" / "run.json").read_text())["sealed"]["key"] == key.fingerprint
    opened, _ = RunRecord(tmp_path / "run", key=key).final_weights(world.study.hash)
    assert all(np.array_equal(a, b) for a, b in zip(opened, weights))
    assert np.array_equal(RunRecord(tmp_path / "run", key=key).optimizer_state(1, world.study.hash)["m"], weights[0] * 2)

    with pytest.raises(RunRecordError, match=r"round-001\.npz: sealed under the coordinator's artifact\.key "
                                             r"\(SHA256:.*\); give the coordinator kit that holds it \(--kit\)$"):
        RunRecord(tmp_path / "run").final_weights(world.study.hash)
    other = tmp_path / "other.key"
    from fedcare.sealing import ensure_artifact_key

    ensure_artifact_key(other)
    with pytest.raises(RunRecordError, match="cannot open: sealed under another coordinator's artifact.key, or modified or renamed"):
        RunRecord(tmp_path / "run", key=ArtifactKey.load(other)).final_weights(world.study.hash)
    # a sealed checkpoint moved to another round's name, a flipped bit, an unsealed file in its place
    record.save_checkpoint(2, _weights(2), world.study.hash)
    renamed = record.checkpoint_path(3)
    shutil.copyfile(record.checkpoint_path(1), renamed)
    with pytest.raises(RunRecordError, match="or modified or renamed"):
        record.final_weights(world.study.hash)
    data = bytearray(record.checkpoint_path(2).read_bytes())
    data[-5] ^= 1
    renamed.write_bytes(bytes(data))
    with pytest.raises(RunRecordError, match="or modified or renamed"):
        record.final_weights(world.study.hash)
    RunRecord(tmp_path / "plain").save_checkpoint(3, _weights(3), world.study.hash)
    shutil.copyfile(tmp_path / "plain" / "checkpoints" / "round-003.npz", renamed)
    with pytest.raises(RunRecordError, match=r"round-003\.npz: not sealed, but this run seals its artifacts under "
                                             r"SHA256:.*: the file was replaced; refusing it$"):
        record.final_weights(world.study.hash)


def test_export_opens_a_sealed_run_with_the_kit_and_refuses_without_it(world, kits, tmp_path):
    run = Path(shutil.copytree(world.root / "run", tmp_path / "run"))
    plain_weights, _ = RunRecord(run).final_weights(world.study.hash)
    (run / "checkpoints" / "round-003.npz").unlink()
    record = RunRecord(run, key=ArtifactKey.load(kits["coordinator"] / "artifact.key"))
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "sealed": {"key": record.key.fingerprint}}))
    record.save_checkpoint(3, plain_weights, world.study.hash)
    status, out, err = fedcare_main("export", "--run", str(run), "--kit", str(kits["coordinator"]), "--out", str(tmp_path / "pkg"))
    assert status == 0, err
    sealed_pkg = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    plain_pkg = json.loads((world.package / "manifest.json").read_text())
    assert sealed_pkg["inputs"] == plain_pkg["inputs"] and sealed_pkg["study"] == plain_pkg["study"]
    other = Path(shutil.copytree(kits["coordinator"], tmp_path / "other-coordinator"))
    (other / "artifact.key").unlink()
    status, _, err = fedcare_main("export", "--run", str(run), "--kit", str(other), "--out", str(tmp_path / "pkg-x"))
    assert status == 2 and "round-003.npz: sealed under the coordinator's artifact.key" in err and err.count("\n") == 1


def test_a_passphrase_protects_the_kit_keys_and_services_read_it_from_the_environment(world, kits, tmp_path, monkeypatch):
    import fedcare.keys as keys

    monkeypatch.setattr(keys, "_passphrases", {})
    coordinator = kits["coordinator"]
    monkeypatch.setenv("FEDCARE_KIT_PASSPHRASE", "too short")
    status, _, err = fedcare_main("kit", "protect", "--kit", str(coordinator))
    assert status == 2 and err == "fedcare: error: the passphrase is 9 characters; use at least 12\n"
    monkeypatch.setenv("FEDCARE_KIT_PASSPHRASE", PASSPHRASE)
    status, out, err = fedcare_main("kit", "protect", "--kit", str(coordinator))
    assert status == 0, err
    for name in ("signing.key", "node-ca.key", "artifact.key"):
        assert f"{coordinator / name}: protected by the passphrase" in out
        data = (coordinator / name).read_bytes()
        assert data.startswith(b"-----BEGIN FEDCARE PROTECTED KEY-----")
        assert stat.S_IMODE((coordinator / name).stat().st_mode) == 0o600
    assert PASSPHRASE not in out + err
    assert "already protected (kept)" in fedcare_main("kit", "protect", "--kit", str(coordinator))[1]

    run = world.root / "run"
    status, _, err = fedcare_main("export", "--run", str(run), "--kit", str(coordinator), "--out", str(tmp_path / "p1"))
    assert status == 0, err  # the passphrase from the environment unlocks signing.key
    monkeypatch.setattr(keys, "_passphrases", {})
    monkeypatch.delenv("FEDCARE_KIT_PASSPHRASE")
    status, _, err = fedcare_main("export", "--run", str(run), "--kit", str(coordinator), "--out", str(tmp_path / "p2"))
    assert status == 2 and err == (f"fedcare: error: {coordinator / 'signing.key'}: protected by the kit's passphrase; "
                                   "set FEDCARE_KIT_PASSPHRASE_FILE (a file holding it) or FEDCARE_KIT_PASSPHRASE, "
                                   "or run the command on a terminal\n")
    assert not (tmp_path / "p2").exists()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase at all\n")
    monkeypatch.setenv("FEDCARE_KIT_PASSPHRASE_FILE", str(wrong))
    status, _, err = fedcare_main("export", "--run", str(run), "--kit", str(coordinator), "--out", str(tmp_path / "p3"))
    assert status == 2 and err == f"fedcare: error: {coordinator / 'signing.key'}: wrong passphrase (or the key file is damaged)\n"
    right = tmp_path / "right"
    right.write_text(PASSPHRASE + "\n")  # a mounted secret, with its trailing newline
    monkeypatch.setenv("FEDCARE_KIT_PASSPHRASE_FILE", str(right))
    status, out, err = fedcare_main("kit", "unprotect", "--kit", str(coordinator))
    assert status == 0 and f"{coordinator / 'signing.key'}: unprotected (plain PKCS8, 0600)" in out
    assert not (coordinator / "signing.key").read_bytes().startswith(b"-----BEGIN FEDCARE")


def test_serve_opens_a_protected_package_key_with_the_passphrase_file(world, kits, tmp_path, monkeypatch):
    import fedcare.keys as keys

    monkeypatch.setattr(keys, "_passphrases", {})
    pkg = tmp_path / "pkg"
    assert fedcare_main("export", "--run", str(world.root / "run"), "--kit", str(kits["coordinator"]),
                        "--out", str(pkg), "--encrypt-for", "north")[0] == 0
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE)
    os.chmod(secret, 0o600)
    monkeypatch.setenv("FEDCARE_KIT_PASSPHRASE_FILE", str(secret))
    status, out, err = fedcare_main("kit", "protect", "--kit", str(kits["north"]))
    assert status == 0 and f"{kits['north'] / 'package.key'}: protected by the passphrase" in out, err
    with serving(tmp_path / "pkg.enc", kits["north"], tmp_path / "logs") as server:  # inherits the variable
        assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    monkeypatch.delenv("FEDCARE_KIT_PASSPHRASE_FILE")
    server = ServerProcess(tmp_path / "pkg.enc", kits["north"], tmp_path / "logs2")
    assert server.proc.wait(timeout=120) == 2
    assert server.stderr.startswith(f"fedcare: error: {kits['north'] / 'package.key'}: protected by the kit's passphrase")


def test_a_protected_key_with_loose_permissions_is_still_refused(kits):
    from fedcare.keys import load_private_key
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    path = kits["coordinator"] / "artifact.key"
    os.chmod(path, 0o640)
    with pytest.raises(KeyMaterialError, match="private key permissions are 640"):
        load_private_key(path, X25519PrivateKey, "x")
