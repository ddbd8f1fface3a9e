"""The signed model package: build at the coordinator, verify anywhere, calibrate int8 on site.

One short simulated study (3 hospitals, 1 round) gives a real run record (the simulation's
`--out` folder); the kits are provisioned from the default study, and the manifest records the
run's `--rounds 1` override, which a site applies to its own study file (the hash matches only
with it).
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from export.package import PackageError, site_study, verify_package, write_signed_manifest
from cli import main
from deploy.kits import coordinator_signing_key, load_coordinator_kit
from deploy.provision import add_node, node_keygen, provision
from export.signing import ensure_signing_key, load_signing_public_key, signing_fingerprint

from .conftest import DEFAULT_STUDY, ROOT

HOSPITALS = ["hospital-01", "hospital-02", "hospital-03"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("package")
    sim = base / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "simulate", "--hospitals", "3", "--rounds", "1", "--size-scale", "0.3",
         "--out", str(sim)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ},
    )
    try:
        kits = provision(DEFAULT_STUDY, ["127.0.0.1"], HOSPITALS, base / "kits")
        from export.onnx_export import export_fp32  # warm the exporter while the federation runs
        from fedcare.model import build_model
        from fedcare.study import load_study

        export_fp32(build_model(load_study(DEFAULT_STUDY)), load_study(DEFAULT_STUDY), base / "warm" / "m.onnx")
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    return {"base": base, "sim": sim, "run": sim, "kits": kits}


@pytest.fixture(scope="module")
def package(world):
    pkg = world["base"] / "pkg"
    rc = main(["export", "--run", str(world["run"]), "--kit", str(world["kits"]["coordinator"]), "--out", str(pkg)])
    assert rc == 0
    return pkg


def _key(world, party="hospital-01"):
    name = "signing.pub" if party == "coordinator" else "coordinator-signing.pub"
    return load_signing_public_key(world["kits"][party] / name)


def _copy(pkg, tmp_path):
    return shutil.copytree(pkg, tmp_path / "copy")


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_kits_hold_the_signing_key_and_hospitals_its_public_half(world):
    coordinator = world["kits"]["coordinator"]
    assert stat.S_IMODE((coordinator / "signing.key").stat().st_mode) == 0o600
    key = coordinator_signing_key(load_coordinator_kit(coordinator))
    for name in HOSPITALS:
        pub = world["kits"][name] / "coordinator-signing.pub"
        assert pub.read_bytes() == (coordinator / "signing.pub").read_bytes()
        assert signing_fingerprint(load_signing_public_key(pub)) == signing_fingerprint(key.public_key())
        assert not (world["kits"][name] / "signing.key").exists()


def test_build_and_verify(world, package, study):
    verified = verify_package(package, _key(world))
    m = verified.manifest
    report = json.loads((world["sim"] / "report.json").read_text())
    assert sorted(p.name for p in package.iterdir()) == [
        "manifest.json", "manifest.sig", "model.a16w8.onnx", "model.int8.onnx", "model.onnx"]
    assert len((package / "manifest.sig").read_bytes()) == 64
    assert m["format"] == "fedcare-model-package/2" and m["created"].endswith("Z")
    assert m["study"] == {"name": "depression-risk", "hash": report["study_hash"],
                          "overrides": {"rounds": 1, "epsilon": None}}
    assert m["study"]["hash"] == study.with_overrides(rounds=1).hash != study.hash
    assert m["label"]["name"] == "episode_12m"
    assert m["inputs"]["features"] == [f.name for f in study.features]
    assert m["inputs"]["model_inputs"] == study.input_names and m["inputs"]["clip"] == 5.0
    scaling = json.loads((world["run"] / "scaling.json").read_text())
    assert m["inputs"]["scaling_method"] == "federated"
    assert m["inputs"]["scaling"]["age"] == {"center": scaling["center"][0], "scale": scaling["scale"][0],
                                             "low": 18.0, "high": 100.0, "missing": "reject"}
    assert m["metrics"] == {"federated_auc": report["rounds"][-1]["auc"], "federated_loss": report["rounds"][-1]["loss"],
                            "rounds": 1}
    assert [s["name"] for s in m["privacy"]["sites"]] == HOSPITALS and m["privacy"]["delta"] == 1e-5
    assert m["signer"] == {"algorithm": "Ed25519", "key_fingerprint": signing_fingerprint(_key(world))}
    for kind, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"), ("a16w8", "model.a16w8.onnx")):
        assert m["models"][kind]["file"] == file and m["models"][kind]["bytes"] == (package / file).stat().st_size
        meta = {p.key: p.value for p in onnx.load(str(package / file)).metadata_props}
        assert meta["fedcare.study_hash"] == m["study"]["hash"] and json.loads(meta["fedcare.inputs"]) == study.input_names
    assert m["models"]["int8"]["calibration"].startswith("spec-derived") and m["models"]["a16w8"]["batch"] == 1
    # the coordinator kit verifies too
    assert verify_package(package, _key(world, "coordinator")).manifest == m


def test_models_are_the_checkpoint_in_the_three_forms(world, package, study):
    from client.data import load_site
    from export.onnx_export import run_onnx as logits
    from fedcare.features import model_inputs
    from fedcare.model import build_model, set_weights
    from fedcare.run_record import RunRecord, load_checkpoint

    record = RunRecord(world["run"])
    run_study_ = record.study()  # the study as run: --rounds 1 and the federated scaling
    assert run_study_.hash == study.with_overrides(rounds=1).hash
    model = build_model(study)
    set_weights(model, load_checkpoint(record.latest_checkpoint(), run_study_.hash))
    data = load_site(study, world["sim"] / "sites" / "hospital-03")
    x = model_inputs(run_study_, data.test.features)[:64]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits(package / "model.onnx", x), expected, atol=1e-5)
    for file in ("model.int8.onnx", "model.a16w8.onnx"):  # int8 weights either way; spec-derived calibration
        quantized = logits(package / file, x)                # may clip the rare extreme logit, so no max bound
        assert np.median(np.abs(quantized - expected)) < 0.1 and np.corrcoef(quantized, expected)[0, 1] > 0.95

    int8 = {i.name: i.data_type for i in onnx.load(str(package / "model.int8.onnx")).graph.initializer}
    assert int8["net.0.weight_quantized"] == onnx.TensorProto.INT8 and int8["features_zero_point"] == onnx.TensorProto.UINT8
    a16 = onnx.load(str(package / "model.a16w8.onnx"))
    types = {i.name: i.data_type for i in a16.graph.initializer}
    assert types["net.0.weight_quantized"] == onnx.TensorProto.INT8 and types["features_zero_point"] == onnx.TensorProto.UINT16
    weight_scales = {i.name: list(i.dims) for i in a16.graph.initializer}
    assert weight_scales["net.0.weight_scale"] == [32]  # per channel
    assert [d.dim_value for d in a16.graph.input[0].type.tensor_type.shape.dim] == [1, len(study.input_names)]
    assert {o.version for o in a16.opset_import if o.domain == ""} == {21}
    fp32 = onnx.load(str(package / "model.onnx"))
    assert fp32.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert not any(n.metadata_props for n in fp32.graph.node)  # exporter annotations (build paths) stripped


def test_a_site_applies_exactly_the_recorded_overrides(world, package, study):
    from fedcare.run_record import RunRecord
    from fedcare.study import Overrides, load_study

    assert RunRecord(world["run"]).overrides() == Overrides(rounds=1)
    manifest = verify_package(package, _key(world)).manifest
    on_site = site_study(study, manifest)  # the kit's study file, as written
    assert on_site.hash == manifest["study"]["hash"] == study.with_overrides(rounds=1).hash
    assert on_site.training.rounds == 1 and on_site.features[0].center == manifest["inputs"]["scaling"]["age"]["center"]
    without = {**manifest, "study": {**manifest["study"], "overrides": {"rounds": None, "epsilon": None}}}
    with pytest.raises(PackageError, match="^the package is for study depression-risk"):
        site_study(study, without)  # nothing is guessed: the recorded overrides, or no match
    other = world["base"] / "other.toml"
    other.write_text(DEFAULT_STUDY.read_text().replace("delta = 1e-5", "delta = 1e-6"))
    with pytest.raises(PackageError, match="^the package is for study depression-risk"):
        site_study(load_study(other), manifest)
    with pytest.raises(PackageError, match=r"^manifest.json: malformed: study.overrides"):
        site_study(study, {**manifest, "study": {"name": "depression-risk", "hash": manifest["study"]["hash"]}})


def test_a_tampered_model_byte_is_refused_naming_the_file(world, package, tmp_path):
    pkg = _copy(package, tmp_path)
    data = bytearray((pkg / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"^model\.int8\.onnx: sha256 does not match the signed manifest"):
        verify_package(pkg, _key(world))
    (pkg / "model.int8.onnx").write_bytes(bytes(data) + b"\0")
    with pytest.raises(PackageError, match=r"^model\.int8\.onnx: \d+ bytes, the signed manifest says"):
        verify_package(pkg, _key(world))


def test_a_tampered_manifest_is_a_bad_signature(world, package, tmp_path):
    pkg = _copy(package, tmp_path)
    manifest = pkg / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"clip": 5.0', '"clip": 50.0'))
    with pytest.raises(PackageError, match="^bad signature: manifest.json or manifest.sig was changed after signing"):
        verify_package(pkg, _key(world))


def test_a_package_signed_by_another_coordinator_key_is_refused(world, package, tmp_path):
    pkg = _copy(package, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    other = Ed25519PrivateKey.generate()
    write_signed_manifest(pkg, manifest, other)
    verify_package(pkg, other.public_key())  # a valid package, just not this coordinator's
    expected = signing_fingerprint(_key(world))
    message = f"signed by another key ({signing_fingerprint(other.public_key())}); expected the coordinator key {expected}"
    with pytest.raises(PackageError, match="^" + re.escape(message)):
        verify_package(pkg, _key(world))


def test_unlisted_and_missing_files_are_refused(world, package, tmp_path):
    pkg = _copy(package, tmp_path)
    (pkg / "site").mkdir()
    (pkg / "site" / "anything").write_text("site-side artifacts are allowed here")
    verify_package(pkg, _key(world))
    (pkg / "notes.txt").write_text("extra")
    with pytest.raises(PackageError, match="^unlisted file notes.txt: not in the signed manifest"):
        verify_package(pkg, _key(world))
    (pkg / "notes.txt").unlink()
    (pkg / "model.a16w8.onnx").unlink()
    with pytest.raises(PackageError, match=r"^missing file model\.a16w8\.onnx"):
        verify_package(pkg, _key(world))
    (pkg / "manifest.sig").unlink()
    with pytest.raises(PackageError, match=r"^missing file manifest\.sig \(the package is unsigned\)"):
        verify_package(pkg, _key(world))


def test_a_malformed_manifest_is_refused_even_when_signed(world, package, tmp_path):
    pkg = _copy(package, tmp_path)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["models"]["int8"]["file"] = "../model.int8.onnx"
    key = coordinator_signing_key(load_coordinator_kit(world["kits"]["coordinator"]))
    write_signed_manifest(pkg, manifest, key)
    with pytest.raises(PackageError, match=r"^manifest.json: malformed: models.int8.file must be a plain file name"):
        verify_package(pkg, _key(world))


def test_quantize_on_site_writes_the_site_model_and_its_delta_auc(world, package, tmp_path, capsys):
    pkg = _copy(package, tmp_path)
    site = world["sim"] / "sites" / "hospital-03"
    rc, out, err = _cli(capsys, "quantize", "--package", pkg, "--kit", world["kits"]["hospital-03"], "--data", site)
    assert rc == 0, err
    assert "site-calibrated int8:" in out and "|ΔAUC|" in out
    result = json.loads((pkg / "site" / "quantization.json").read_text())
    assert sorted(p.name for p in (pkg / "site").iterdir()) == ["model.int8.site.onnx", "quantization.json"]
    assert result["rows_used"] == result["train_rows"] > 0 and result["test_rows"] > 0
    assert result["calibration"] == "site data (fedcare quantize)"
    assert result["abs_delta_auc_site"] == pytest.approx(abs(result["auc_fp32"] - result["auc_int8_site"]), abs=2e-6)
    assert result["abs_delta_auc_site"] <= 0.01 and "abs_delta_auc_package" in result
    assert result["bytes"] == (pkg / "site" / "model.int8.site.onnx").stat().st_size
    verify_package(pkg, _key(world))  # the signed part is untouched; site/ is allowed


def test_cli_verify_ok_and_refusals_are_one_line_exit_2(world, package, tmp_path, capsys):
    rc, out, err = _cli(capsys, "verify", package, "--kit", world["kits"]["hospital-02"])
    assert rc == 0 and err == ""
    assert out.startswith(f"OK: {package} is signed by {signing_fingerprint(_key(world))}")
    assert "study depression-risk" in out and "a16w8" in out
    assert "the run's overrides rounds=1" in out
    rc, out, err = _cli(capsys, "verify", package, "--kit", world["kits"]["coordinator"])  # the coordinator kit too
    assert rc == 0 and err == "" and out.startswith(f"OK: {package} is signed by {signing_fingerprint(_key(world))}")

    pkg = _copy(package, tmp_path)
    (pkg / "model.onnx").write_bytes(b"\0" + (pkg / "model.onnx").read_bytes()[1:])
    rc, out, err = _cli(capsys, "verify", pkg, "--kit", world["kits"]["hospital-02"])
    assert rc == 2 and out == ""
    assert err == "fedcare: error: model.onnx: sha256 does not match the signed manifest (modified after signing)\n"

    rc, _, err = _cli(capsys, "export", "--run", world["run"], "--kit", world["kits"]["coordinator"], "--out", package)
    assert rc == 2 and err.startswith("fedcare: error: --out:") and err.count("\n") == 1

    rc, _, err = _cli(capsys, "export", "--run", tmp_path, "--kit", world["kits"]["coordinator"], "--out", tmp_path / "p")
    assert rc == 2 and "no report.json" in err and err.count("\n") == 1

    rc, _, err = _cli(capsys, "verify", tmp_path / "nope", "--kit", world["kits"]["hospital-02"])
    assert rc == 2 and err == f"fedcare: error: {tmp_path / 'nope'}: not a package directory\n"

    rc, _, err = _cli(capsys, "quantize", "--package", package, "--kit", world["kits"]["hospital-01"])
    assert rc == 2 and err == "fedcare: error: /path/to/ehr-export: site data directory not found\n"  # site.toml template

    kit = shutil.copytree(world["kits"]["hospital-01"], tmp_path / "kit")
    (kit / "coordinator-signing.pub").unlink()
    rc, _, err = _cli(capsys, "verify", package, "--kit", kit)
    assert rc == 2 and "coordinator-signing.pub: missing from the hospital kit" in err and err.count("\n") == 1


def test_kits_from_before_package_signing(world, tmp_path, capsys):
    old = shutil.copytree(world["kits"]["coordinator"], tmp_path / "coordinator")
    (old / "signing.key").unlink()
    (old / "signing.pub").unlink()
    kit = load_coordinator_kit(old)
    private, public = node_keygen(tmp_path / "hospital-d")
    add_node(old, "hospital-d", public, hospital_kit_out=tmp_path / "hospital-d")  # creates the key, ships the public half
    assert stat.S_IMODE(kit.signing_key.stat().st_mode) == 0o600
    assert (tmp_path / "hospital-d" / "coordinator-signing.pub").read_bytes() == kit.signing_pub.read_bytes()
    assert ensure_signing_key(kit.signing_key, kit.signing_pub) is False  # existing keys are never replaced

    (old / "signing.key").unlink()
    (old / "signing.pub").unlink()
    rc, out, err = _cli(capsys, "export", "--run", world["run"], "--kit", old, "--out", tmp_path / "pkg")
    assert rc == 0, err
    assert "created the coordinator's package signing key" in out
    verify_package(tmp_path / "pkg", load_signing_public_key(old / "signing.pub"))
    with pytest.raises(PackageError, match="^signed by another key"):
        verify_package(tmp_path / "pkg", _key(world))  # hospitals holding the first key refuse it


def test_a_package_encrypted_for_one_site_opens_only_there(world, package, tmp_path, capsys):
    from deploy.kits import load_hospital_kit
    from export.encryption import decrypt_package, encrypt_package
    from export.signing import ensure_package_key, load_package_key, load_package_public_key

    sites = {}
    for name in ("hospital-01", "hospital-02"):
        kit = load_hospital_kit(shutil.copytree(world["kits"][name], tmp_path / name), need_keys=False)
        for made_by_provision in ("package.key", "package.pub"):  # as a kit provisioned before package keys
            (kit.path / made_by_provision).unlink()
        if name == "hospital-01":  # the command a hospital runs ...
            rc, out, _ = _cli(capsys, "node", "package-key", "--kit", kit.path)
            assert rc == 0 and "created" in out
            rc, out, _ = _cli(capsys, "node", "package-key", "--kit", kit.path)
            assert rc == 0 and "already present (kept)" in out  # never a new identity
        else:  # ... and the function behind it
            assert ensure_package_key(kit.path) is True and ensure_package_key(kit.path) is False
        assert stat.S_IMODE((kit.path / "package.key").stat().st_mode) == 0o600
        sites[name] = kit
    site_pub = sites["hospital-01"].path / "package.pub"

    # fedcare export --encrypt-for writes PKG.enc beside PKG; fedcare verify PKG.enc --out decrypts and verifies
    pkg = tmp_path / "pkg"
    rc, out, err = _cli(capsys, "export", "--run", world["run"], "--kit", world["kits"]["coordinator"], "--out", pkg,
                        "--encrypt-for", site_pub)
    assert rc == 0, err
    enc = tmp_path / "pkg.enc"
    assert f"encrypted for {site_pub}: {enc}" in out
    assert b"risk_logit" not in enc.read_bytes() and b"depression-risk" not in enc.read_bytes()
    rc, out, err = _cli(capsys, "verify", enc, "--kit", sites["hospital-01"].path, "--out", tmp_path / "opened-cli")
    assert rc == 0 and err == ""
    assert out.startswith(f"decrypted {enc} into {tmp_path / 'opened-cli'}\nOK: {enc} is signed by "
                          f"{signing_fingerprint(_key(world))}")
    assert verify_package(tmp_path / "opened-cli", _key(world)).manifest == verify_package(pkg, _key(world)).manifest
    rc, out, err = _cli(capsys, "verify", enc, "--kit", sites["hospital-02"].path, "--out", tmp_path / "other-cli")
    assert (rc, out) == (2, "") and err == f"fedcare: error: {enc}: cannot decrypt: encrypted for another site's key, or modified\n"
    assert not (tmp_path / "other-cli").exists()  # nothing undecrypted or unverified stays behind
    rc, out, err = _cli(capsys, "verify", enc, "--kit", sites["hospital-01"].path)  # in memory: nothing written
    assert rc == 0 and out.startswith(f"OK: {enc} (decrypted in memory) is signed by ") and err == ""
    no_key = shutil.copytree(world["kits"]["hospital-03"], tmp_path / "hospital-03")
    (no_key / "package.key").unlink()
    rc, _, err = _cli(capsys, "verify", enc, "--kit", no_key, "--out", tmp_path / "no-key")
    assert rc == 2 and "package.key: not found; this kit has no package decryption key" in err and err.count("\n") == 1
    rc, _, err = _cli(capsys, "export", "--run", world["run"], "--kit", world["kits"]["coordinator"], "--out",
                      tmp_path / "pkg2", "--encrypt-for", world["kits"]["coordinator"] / "signing.pub")
    assert rc == 2 and "package encryption needs an X25519 key" in err and not (tmp_path / "pkg2").exists()

    # the same through the functions the commands call
    enc = encrypt_package(package, tmp_path / "api.enc", load_package_public_key(site_pub))
    assert b"risk_logit" not in enc.read_bytes() and b"depression-risk" not in enc.read_bytes()
    opened = decrypt_package(enc, tmp_path / "opened", load_package_key(sites["hospital-01"].path))
    assert verify_package(opened, _key(world)).manifest == verify_package(package, _key(world)).manifest
    with pytest.raises(PackageError, match="cannot decrypt: encrypted for another site's key, or modified"):
        decrypt_package(enc, tmp_path / "other", load_package_key(sites["hospital-02"].path))
    data = bytearray(enc.read_bytes())
    data[-20] ^= 1
    (tmp_path / "bad.enc").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="cannot decrypt"):
        decrypt_package(tmp_path / "bad.enc", tmp_path / "bad", load_package_key(sites["hospital-01"].path))
    rc, _, err = _cli(capsys, "verify", tmp_path / "bad.enc", "--kit", sites["hospital-01"].path, "--out", tmp_path / "bad-cli")
    assert rc == 2 and "cannot decrypt" in err and err.count("\n") == 1


def test_the_coordinator_signs_only_runs_of_its_own_study(world, tmp_path, capsys):
    """A run folder whose study is not the kit's study (with the run's recorded overrides) is refused before anything is built."""
    run = shutil.copytree(world["run"], tmp_path / "run", ignore=shutil.ignore_patterns("sites", "export"))
    study_file = run / "study.toml"
    study_file.write_text(study_file.read_text().replace('description = "', 'description = "edited: ', 1))
    rc, out, err = _cli(capsys, "export", "--run", run, "--kit", world["kits"]["coordinator"], "--out", tmp_path / "pkg")
    assert rc == 2 and out == ""
    assert err.startswith(f"fedcare: error: {study_file}: the run is not of this kit's study") and err.count("\n") == 1
    assert not (tmp_path / "pkg").exists()
