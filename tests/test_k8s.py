"""The Kubernetes manifests (deploy/k8s/), the kit Secret generator and the compose federation (deploy/compose.yaml).

Offline: the manifests are validated against the Kubernetes 1.31 schemas shipped in `kubernetes-validate`
(strict: an unknown field is refused); every workload's security fields, resources, images, volumes and
the NetworkPolicies' allowed flows are asserted field by field; the kit Secret made from a real kit, the
init container's copy run with sh on a directory laid out as the kubelet lays out a Secret volume, and
fedcare's own loaders on the copy. Nothing here needs a cluster or a container engine.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .conftest import DEFAULT_STUDY, ROOT

K8S_VERSION = "1.31"  # the Kubernetes version the manifests are written for and validated against
K8S = ROOT / "deploy" / "k8s"
FOLDERS = ("coordinator", "hospital")
NAMESPACES = {"coordinator": "fedcare-coordinator", "hospital": "fedcare-hospital"}
HOSPITALS = ["hospital-01", "hospital-02", "hospital-03"]
UID = 10001
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")

# The contract with the images: (image, the main container's arguments).
CONTRACT = {
    "fedcare-coordinator": ("fedcare-coordinator:0.1.0", ["coordinator", "start", "--kit", "/run/fedcare/kit"]),
    "fedcare-node": ("fedcare-node:0.1.0", ["node", "start", "--kit", "/run/fedcare/kit"]),
    "fedcare-serve": ("fedcare-serve:0.1.0", ["serve", "--package", "/srv/fedcare/package", "--kit", "/run/fedcare/kit",
                                              "--host", "0.0.0.0", "--port", "8443"]),
}
KIT, KIT_SECRET, STATE, TMP = "/run/fedcare/kit", "/run/fedcare/kit-secret", "/var/lib/fedcare", "/tmp"
READ_ONLY_INPUTS = {"/srv/fedcare/data", "/srv/fedcare/package", "/run/fedcare/passphrase"}

NODE = (("app.kubernetes.io/name", "fedcare-node"),)
SERVE = (("app.kubernetes.io/name", "fedcare-serve"),)
COORDINATOR = (("app.kubernetes.io/name", "fedcare-coordinator"),)
# Every flow any NetworkPolicy allows, per namespace folder: (policy, direction, pods it selects, peer, protocol, port).
ALLOWED = {
    "coordinator": {
        ("allow-hospitals-to-coordinator", "Ingress", COORDINATOR, ("ipBlock", "192.0.2.0/24", ()), "TCP", 9092),
    },
    "hospital": {
        ("allow-node-to-coordinator", "Egress", NODE, ("ipBlock", "198.51.100.10/32", ()), "TCP", 9092),
        ("allow-node-dns", "Egress", NODE,
         ("pods", (("kubernetes.io/metadata.name", "kube-system"),), (("k8s-app", "kube-dns"),)), "UDP", 53),
        ("allow-node-dns", "Egress", NODE,
         ("pods", (("kubernetes.io/metadata.name", "kube-system"),), (("k8s-app", "kube-dns"),)), "TCP", 53),
        ("allow-ehr-gateway-to-serve", "Ingress", SERVE,
         ("pods", "this namespace", (("app.kubernetes.io/name", "ehr-gateway"),)), "TCP", 8443),
    },
}


def documents(folder: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted((K8S / folder).glob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    return found


def resources(folder: str, *kinds: str) -> list[dict]:
    return [doc for _, doc in documents(folder) if doc["kind"] in kinds]


def pod_spec(workload: dict) -> dict:
    spec = workload["spec"]
    if workload["kind"] == "Pod":
        return spec
    if workload["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def all_workloads() -> list[tuple[str, dict]]:
    return [(folder, w) for folder in FOLDERS for w in resources(folder, *WORKLOADS)]


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def quantity(value: str | int, kind: str) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes); an unknown form fails the test."""
    text = str(value)
    if kind == "cpu":
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text)
        assert match, f"cpu quantity {text!r}"
        return float(match[1]) / (1000 if match[2] else 1)
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", text)
    assert match, f"memory quantity {text!r}"
    return int(match[1]) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match[2]]


def test_every_manifest_validates_against_the_kubernetes_schemas_strictly():
    assert K8S_VERSION in {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    checked = 0
    for folder in FOLDERS:
        for path, doc in documents(folder):
            if doc["kind"] == "Kustomization":
                continue
            assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, path
            assert doc["metadata"].get("namespace", doc["metadata"]["name"]) == NAMESPACES[folder], path
            checked += 1
    assert checked >= 15
    broken = resources("hospital", "Deployment")[0]
    pod_spec(broken)["containers"][0]["securityContext"]["runAsNonroot"] = True  # a typo is an unknown field
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_each_kustomization_lists_every_manifest_of_its_folder():
    for folder in FOLDERS:
        kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Kustomization"
        files = {p.name for p in (K8S / folder).glob("*.yaml")} - {"kustomization.yaml"}
        assert sorted(kustomization["resources"]) == sorted(files), folder
        assert set(kustomization) == {"apiVersion", "kind", "resources"}  # no generator or patch slips anything in


def test_every_workload_and_container_is_hardened_with_requests_and_limits():
    assert {w["metadata"]["name"] for _, w in all_workloads()} == set(CONTRACT)
    for folder, workload in all_workloads():
        name, spec = workload["metadata"]["name"], pod_spec(workload)
        pod = spec["securityContext"]
        assert pod == {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                       "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}, name
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False, name
        for host in ("hostNetwork", "hostPID", "hostIPC", "hostUsers", "shareProcessNamespace"):
            assert host not in spec, (name, host)
        accounts = {sa["metadata"]["name"]: sa for sa in resources(folder, "ServiceAccount")}
        assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False, name
        assert not resources(folder, "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")  # no API rights
        assert all(set(v) & {"secret", "emptyDir", "persistentVolumeClaim"} for v in spec["volumes"]), name
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            assert container["securityContext"] == {
                "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "allowPrivilegeEscalation": False,
                "privileged": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}, where
            res = container["resources"]
            assert set(res) == {"requests", "limits"}, where
            for kind in ("cpu", "memory"):
                assert quantity(res["requests"][kind], kind) <= quantity(res["limits"][kind], kind), (where, kind)
            assert not container.get("envFrom"), where
            for port in container.get("ports", []):
                assert "hostPort" not in port, where


def test_images_and_arguments_are_the_contracts():
    for _, workload in all_workloads():
        name, spec = workload["metadata"]["name"], pod_spec(workload)
        image, args = CONTRACT[name]
        for container in containers(spec):
            assert container["image"] == image, name
            assert container["imagePullPolicy"] in ("IfNotPresent", "Never"), name
        (main,) = spec["containers"]
        assert main["args"] == args and "command" not in main, name  # the image's ENTRYPOINT ["fedcare"]
        assert {"name": "HOME", "value": STATE} in main["env"], name
    ports = {w["metadata"]["name"]: [p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])]
             for _, w in all_workloads()}
    assert ports == {"fedcare-coordinator": [9092], "fedcare-serve": [8443], "fedcare-node": []}
    services = {s["metadata"]["name"]: s["spec"] for f in FOLDERS for s in resources(f, "Service")}
    assert {k: [(p["port"], p["protocol"]) for p in v["ports"]] for k, v in services.items()} == {
        "fedcare-coordinator": [(9092, "TCP")], "fedcare-serve": [(8443, "TCP")]}
    assert services["fedcare-coordinator"]["externalTrafficPolicy"] == "Local"  # hospital addresses reach the ipBlock
    assert services["fedcare-serve"]["type"] == "ClusterIP"


def test_one_node_per_site_and_one_coordinator():
    for _, workload in all_workloads():
        assert workload["spec"]["replicas"] == 1, workload["metadata"]["name"]
        if workload["kind"] == "Deployment":
            assert workload["spec"]["strategy"] == {"type": "Recreate"}, workload["metadata"]["name"]
    (coordinator,) = resources("coordinator", "StatefulSet")
    (claim,) = coordinator["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_every_namespace_folder_denies_everything_by_default():
    for folder in FOLDERS:
        policies = resources(folder, "NetworkPolicy")
        deny = [p for p in policies if p["spec"]["podSelector"] == {}]
        assert len(deny) == 1, folder
        assert deny[0]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, folder
        (namespace,) = resources(folder, "Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _labels(selector: dict) -> tuple:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions would escape this test's reading
    return tuple(sorted(selector.get("matchLabels", {}).items()))


def _peer(peer: dict) -> tuple:
    if "ipBlock" in peer:
        assert set(peer) == {"ipBlock"}
        return ("ipBlock", peer["ipBlock"]["cidr"], tuple(peer["ipBlock"].get("except", ())))
    assert set(peer) <= {"podSelector", "namespaceSelector"} and "podSelector" in peer, peer
    namespaces = _labels(peer["namespaceSelector"]) if "namespaceSelector" in peer else "this namespace"
    return ("pods", namespaces, _labels(peer["podSelector"]))


def allowed_flows(policies: list[dict]) -> set[tuple]:
    """Every (policy, direction, selected pods, peer, protocol, port) these NetworkPolicies allow; a rule
    with no peers or no ports allows everything and shows up as 'ANY'."""
    flows = set()
    for policy in policies:
        spec, name = policy["spec"], policy["metadata"]["name"]
        assert spec["policyTypes"], name
        for key in ("ingress", "egress"):
            if key in spec:
                assert key.capitalize() in spec["policyTypes"], (name, key)  # a rule of a type not enforced
        for direction in spec["policyTypes"]:
            for rule in spec.get(direction.lower(), []):
                peers = rule.get("from" if direction == "Ingress" else "to") or [None]
                ports = rule.get("ports") or [None]
                for peer in peers:
                    for port in ports:
                        assert port is None or set(port) <= {"protocol", "port"}, (name, port)  # no endPort ranges
                        flows.add((name, direction, _labels(spec["podSelector"]),
                                   "ANY" if peer is None else _peer(peer),
                                   "ANY" if port is None else port.get("protocol", "TCP"),
                                   "ANY" if port is None else port["port"]))
    return flows


def test_the_only_allowed_flows_are_node_to_coordinator_and_gateway_to_inference():
    for folder in FOLDERS:
        assert allowed_flows(resources(folder, "NetworkPolicy")) == ALLOWED[folder], folder
        selected = {pod for _, _, pod, *_ in ALLOWED[folder]}
        labels = {tuple(sorted({k: v for k, v in w["spec"]["template"]["metadata"]["labels"].items()
                                if k == "app.kubernetes.io/name"}.items())) for w in resources(folder, *WORKLOADS)}
        assert selected <= labels, folder  # every policy selects a real workload
    # An allow-all added to a folder would show up: an empty rule admits ANY peer on ANY port.
    allow_all = {"kind": "NetworkPolicy", "metadata": {"name": "x"},
                 "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}}
    assert allowed_flows(resources("hospital", "NetworkPolicy") + [allow_all]) - ALLOWED["hospital"] == {
        ("x", "Ingress", (), "ANY", "ANY", "ANY")}


def _mounts(spec: dict) -> list[tuple[dict, dict, bool]]:
    """(container, mount, is-init) for every volume mount."""
    init = {c["name"] for c in spec.get("initContainers", [])}
    return [(c, m, c["name"] in init) for c in containers(spec) for m in c.get("volumeMounts", [])]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def test_secret_volumes_are_read_only_and_the_kit_is_copied_into_memory():
    for _, workload in all_workloads():
        name, spec = workload["metadata"]["name"], pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for claim in workload["spec"].get("volumeClaimTemplates", []):  # the StatefulSet's state volume
            volumes[claim["metadata"]["name"]] = {"name": claim["metadata"]["name"], "persistentVolumeClaim": claim}
        mounts = _mounts(spec)
        written = [m["mountPath"] for _, m, _ in mounts if not m.get("readOnly")]
        assert set(written) == {KIT, STATE, TMP}, name  # the kit only by the copy, in memory
        for container, mount, is_init in mounts:
            volume = volumes[mount["name"]]
            if "secret" in volume:
                assert mount.get("readOnly") is True, (name, mount)
                assert volume["secret"]["defaultMode"] == 0o440, name  # readable by fsGroup 10001, no one else
                assert not any(_under(mount["mountPath"], w) or _under(w, mount["mountPath"]) for w in written), name
            if mount["mountPath"] == KIT_SECRET:
                assert is_init and container["name"] == "kit-copy", name  # the kit's Secret only reaches the copy
                assert volume["secret"]["secretName"].endswith("-kit")
            if mount["mountPath"] == KIT:
                assert volume == {"name": mount["name"], "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}, name
                assert mount.get("readOnly", False) is (not is_init), (name, container["name"])
            if mount["mountPath"] in READ_ONLY_INPUTS:
                assert mount.get("readOnly") is True, (name, mount)
                claim = volume.get("persistentVolumeClaim")
                assert claim is None or claim["readOnly"] is True, name
            if not is_init:
                assert mount["mountPath"] in {KIT, STATE, TMP} | READ_ONLY_INPUTS, (name, mount)
        (init,) = spec["initContainers"]
        assert [m["mountPath"] for m in init["volumeMounts"]] == [KIT_SECRET, KIT], name
        assert {v["secret"]["secretName"] for v in volumes.values() if "secret" in v and v["secret"].get("optional")} <= {
            "fedcare-coordinator-kit-passphrase", "fedcare-serve-kit-passphrase"}
        assert volumes[[m for _, m, _ in mounts if m["mountPath"] == TMP][0]["name"]]["emptyDir"]["sizeLimit"]


def kit_copy_script() -> list[str]:
    """The init container's command, the same in every workload."""
    scripts = {tuple(pod_spec(w)["initContainers"][0]["command"] + pod_spec(w)["initContainers"][0]["args"])
               for _, w in all_workloads()}
    assert len(scripts) == 1
    (script,) = scripts
    assert script[0:2] == ("/bin/sh", "-c") and script[3:] == ("kit-copy", KIT_SECRET, KIT)
    return list(script[:4])


def test_serve_is_probed_on_healthz_over_https():
    (serve,) = [w for _, w in all_workloads() if w["metadata"]["name"] == "fedcare-serve"]
    (main,) = pod_spec(serve)["containers"]
    named = {p["name"]: p["containerPort"] for p in main["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = main[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["scheme"] == "HTTPS" and named.get(get["port"], get["port"]) == 8443
        assert "httpHeaders" not in get  # /healthz takes no token: none may sit in a manifest
    assert "GET  /healthz      health (no token)" in (ROOT / "inference" / "app.py").read_text()


def _repository_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "runs", "node_modules", "__pycache__", ".pytest_cache")]
        for name in files:
            yield Path(folder) / name


def test_no_secret_with_data_and_no_private_key_in_the_repository():
    for path in _repository_files():
        if path.suffix in (".yaml", ".yml", ".json") and b"Secret" in path.read_bytes():
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), path
        if path.is_relative_to(ROOT / "deploy"):
            assert b"PRIVATE KEY-----" not in path.read_bytes() and b"PROTECTED KEY-----" not in path.read_bytes(), path


# -- the kit Secret generator and the init container's copy, on real kits --------------------------------

@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    from deploy.provision import provision
    from deploy.serving_cert import issue_serving_certificate

    made = provision(DEFAULT_STUDY, ["coordinator.example.org"], HOSPITALS, tmp_path_factory.mktemp("k8s") / "kits")
    issue_serving_certificate(made["hospital-01"], ["fedcare-serve.fedcare-hospital.svc"])
    return made


def kit_secret(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(K8S / "kit-secret.sh"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=60)


def secret_volume(root: Path, data: dict[str, bytes], items: list[dict]) -> Path:
    """A directory laid out as the kubelet writes a Secret volume with `items` and defaultMode 0440:
    ..<timestamp>/ holding the files, ..data -> it, and a symlink into ..data per top-level name."""
    stamp = root / "..2024_05_01_10_00_00.123456789"
    for item in items:
        target = stamp / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[item["key"]])
        target.chmod(0o440)
    (root / "..data").symlink_to(stamp.name)
    for top in sorted({item["path"].split("/")[0] for item in items}):
        (root / top).symlink_to(f"..data/{top}")
    return root


def _items(workload_name: str) -> list[dict]:
    (workload,) = [w for _, w in all_workloads() if w["metadata"]["name"] == workload_name]
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == "kit-secret"]
    return volume["secret"]["items"]


ROLES = {  # role -> (kit, Secret name, workload, files deliberately left out of its pod)
    "coordinator": ("coordinator", "fedcare-coordinator-kit", "fedcare-coordinator", {"node-ca.key"}),
    "node": ("hospital-01", "fedcare-node-kit", "fedcare-node",
             {"node.pub", "coordinator-signing.pub", "package.key", "package.pub", "serve.crt", "serve.key",
              "serve-ca.crt", "serve-ca.key"}),
    "serve": ("hospital-01", "fedcare-serve-kit", "fedcare-serve",
              {"ca.crt", "node.key", "node.pub", "node.crt", "package.pub", "serve-ca.crt", "serve-ca.key"}),
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_kit_secret_holds_the_roles_files_and_the_copy_is_a_kit_fedcare_loads(role, kits, tmp_path):
    from deploy.kits import (coordinator_artifact_key, coordinator_signing_key, load_coordinator_kit,
                             load_hospital_kit, load_kit, package_verification_key, read_site_settings)
    from fedcare.errors import KeyMaterialError

    kit_name, secret_name, workload, left_out = ROLES[role]
    kit = kits[kit_name]
    made = kit_secret(kit, secret_name, "--role", role, "--namespace", NAMESPACES[
        "coordinator" if role == "coordinator" else "hospital"], "--container-paths")
    assert made.returncode == 0, made.stderr
    secret = yaml.safe_load(made.stdout)
    assert kubernetes_validate.validate(secret, K8S_VERSION, strict=True) == K8S_VERSION
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque" and secret["metadata"]["name"] == secret_name
    data = {key: base64.b64decode(value) for key, value in secret["data"].items()}

    # Exactly the manifest's items, and every file of the kit is either in the Secret or deliberately left out.
    items = _items(workload)
    assert sorted(data) == sorted(item["key"] for item in items)
    paths = {item["path"] for item in items}
    kit_files = {p.relative_to(kit).as_posix() for p in kit.rglob("*") if p.is_file()}
    assert paths | left_out == kit_files and not paths & left_out
    listed = kit_secret(kit, secret_name, "--role", role, "--container-paths", "--items")
    assert yaml.safe_load(listed.stdout)["items"] == items  # what the manifest's comment says to paste

    # The init container's copy, run with sh on a Secret-like volume, gives a kit whose keys fedcare accepts.
    volume = secret_volume(tmp_path / "secret", data, items)
    copy = tmp_path / "kit"
    copy.mkdir()
    (copy / "stale").write_text("from an earlier start")
    script = kit_copy_script()
    ran = subprocess.run([*script, str(volume), str(copy)], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    copied = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert copied == paths  # no ..data, no timestamped folder, no stale file
    for p in copy.rglob("*"):
        assert not p.is_symlink()
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    for path in paths:
        original = (kit / path).read_bytes()
        if path in ("kit.toml", "site.toml"):
            continue  # the container paths were set: checked through the loaders below
        assert (copy / path).read_bytes() == original, path

    if role == "coordinator":
        from deploy.coordinator import _check_tls_files

        loaded = load_coordinator_kit(copy)
        assert loaded.state_dir == Path("/var/lib/fedcare") and loaded.hosts == ("coordinator.example.org",)
        assert sorted(loaded.node_keys()) == HOSPITALS and sorted(loaded.node_certificates()) == HOSPITALS
        _check_tls_files(loaded)  # server.key 0600, node-ca.crt present
        coordinator_signing_key(loaded)
        assert coordinator_artifact_key(loaded) is not None
        assert all(loaded.site_package_key(h).is_file() for h in HOSPITALS)
        with pytest.raises(KeyMaterialError, match="permissions are 440"):  # why the copy exists at all
            _check_tls_files(load_coordinator_kit(volume / "..data"))
    else:
        loaded = load_hospital_kit(copy, need_keys=(role == "node"))
        assert loaded.name == "hospital-01"
        settings = read_site_settings(loaded)
        assert settings["state_dir"] == "/var/lib/fedcare"
        if role == "node":
            assert settings["data"] == "/srv/fedcare/data"
            with pytest.raises(KeyMaterialError, match="permissions are 440"):
                load_hospital_kit(volume / "..data")
        else:
            from deploy.serving_cert import kit_serving_certificate
            from export.signing import load_package_key
            from inference.commands import _check_tls

            assert isinstance(load_kit(copy), type(loaded))
            package_verification_key(loaded)
            _check_tls(*kit_serving_certificate(copy))  # serve.key 0600 and a usable certificate
            load_package_key(copy)
    original_site = (kit / "site.toml").read_text() if role != "coordinator" else None
    if original_site is not None:
        assert "[policy]" in (copy / "site.toml").read_text() and 'state_dir = "state"' in original_site  # kit untouched


def test_kit_secret_refuses_what_the_cluster_could_not_run(kits, tmp_path):
    no_paths = kit_secret(kits["coordinator"], "x")
    assert no_paths.returncode == 2 and 'state_dir = "/var/lib/fedcare"' in no_paths.stderr and not no_paths.stdout
    assert "--role node or --role serve" in kit_secret(kits["hospital-02"], "x").stderr
    assert "a fedcare kit folder" in kit_secret(kits["ca"], "x").stderr  # the study CA never becomes a Secret
    assert "serve.crt" in kit_secret(kits["hospital-02"], "x", "--role", "serve", "--container-paths").stderr
    assert "Secret name" in kit_secret(kits["hospital-02"], "Bad_Name", "--role", "node", "--container-paths").stderr
    loose = tmp_path / "loose"
    subprocess.run(["cp", "-a", str(kits["hospital-03"]), str(loose)], check=True)
    (loose / "node.key").chmod(0o644)
    refused = kit_secret(loose, "x", "--role", "node", "--container-paths")
    assert refused.returncode == 2 and "permissions are 644" in refused.stderr
    out = tmp_path / "folder"
    written = kit_secret(kits["hospital-03"], "x", "--role", "node", "--container-paths", "--out-dir", out)
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["kit.toml", "study.toml", "site.toml", "ca.crt", "node.key", "node.crt"])
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}


# -- compose ------------------------------------------------------------------------------------------

def test_compose_federation_has_the_same_hardening():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())  # merge keys (<<) resolved
    services = compose["services"]
    assert set(services) == {"coordinator", *HOSPITALS, "serve"}
    images = {"coordinator": "fedcare-coordinator", "serve": "fedcare-serve", **{h: "fedcare-node" for h in HOSPITALS}}
    networks = compose["networks"]
    assert all(net.get("internal") is True for net in networks.values())
    for name, service in services.items():
        image, args = CONTRACT[images[name]]
        assert service["image"] == image and service["command"] == args and service["pull_policy"] == "never", name
        assert service["user"] == f"{UID}:{UID}" and service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert not any("unconfined" in opt for opt in service["security_opt"]), name
        assert any(t.startswith("/tmp:") for t in service["tmpfs"]), name
        assert service["environment"]["HOME"] == STATE, name
        assert service.get("mem_limit") and service.get("cpus"), name
        for forbidden in ("privileged", "ports", "network_mode", "pid", "ipc", "devices", "volumes_from"):
            assert forbidden not in service, (name, forbidden)
        mounts = {}
        for volume in service["volumes"]:
            if volume.startswith("${"):  # a bind mount of a prepared folder: read-only, always
                source, target, mode = volume[volume.index("}") + 1:].split(":")
                assert mode == "ro", (name, volume)
            else:
                source, target = volume.split(":")
                assert source in compose["volumes"] and target == STATE, (name, volume)  # a named state volume
            mounts[target] = source
        assert set(mounts) >= {KIT, STATE}, name
        assert set(service["networks"]) <= set(networks), name
    assert {n for s in HOSPITALS for n in services[s]["networks"]} == {"federation"} == set(services["coordinator"]["networks"])
    assert services["serve"]["networks"] == ["ehr"] and services["serve"]["profiles"] == ["serve"]
    assert len({tuple(sorted(s["volumes"])) for s in services.values()}) == len(services)  # nothing shared
