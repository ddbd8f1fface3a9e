"""A real federation on loopback: a SuperLink and four SuperNodes started through the `fedcare`
commands, with TLS and node authentication, running a SecAgg+ DP study; refusals of nodes that
are not registered or do not trust the study CA; a coordinator without certificates."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from deploy.coordinator import FlowerCLI, flwr_home
from deploy.flower import flower_command, flower_env
from deploy.kits import load_coordinator_kit
from deploy.pki import CertificateAuthority, node_tls_key
from deploy.provision import node_keygen
from deploy.flower import free_port
from fedcare.study import load_study
from privacy.ledger import PrivacyLedger
from simulations.cohorts import write_cohorts

from .conftest import DEFAULT_STUDY, ROOT
from .federation import Processes, fedcare, provision_federation, start_coordinator, start_nodes

HOSPITALS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    base = load_study(DEFAULT_STUDY)
    study = dataclasses.replace(
        base, secure_aggregation=dataclasses.replace(base.secure_aggregation, timeout_seconds=90.0)
    )
    port = free_port()
    provision_federation(work, study.to_toml(), HOSPITALS, port)
    write_cohorts(study, work / "sites", len(HOSPITALS), seed=42, size_scale=0.3)
    procs = Processes(work)
    try:
        coordinator = start_coordinator(procs, work, HOSPITALS)
        nodes = start_nodes(procs, work, HOSPITALS)
        yield {"work": work, "port": port, "procs": procs, "nodes": nodes, "study": study, "coordinator": coordinator}
    finally:
        procs.stop_all()


def test_node_trusting_another_ca_cannot_connect(federation, tmp_path):
    work = federation["work"]
    proc = fedcare("provision", "--study", str(work / "study.toml"), "--coordinator-host", "127.0.0.1",
                   "--hospitals", "x,y,z", "--out", str(tmp_path / "other"), "--port", str(federation["port"]))
    assert proc.returncode == 0
    started = time.monotonic()
    proc = fedcare("node", "start", "--kit", str(tmp_path / "other" / "x"), "--data", str(work / "sites" / "hospital-01"))
    assert proc.returncode == 2
    assert "is not this study's coordinator: its TLS certificate does not verify against the study CA" in proc.stderr
    assert time.monotonic() - started < 60


def test_node_with_unregistered_key_is_refused_and_says_so(federation, tmp_path):
    work = federation["work"]
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    for name in ("kit.toml", "ca.crt", "study.toml", "site.toml"):
        shutil.copyfile(work / "kits" / "a" / name, intruder / name)
    node_keygen(intruder)
    # Even with a client certificate from the coordinator's node CA, a node the coordinator did not
    # accept is refused by the edge.
    node_ca = CertificateAuthority.load(work / "kits" / "coordinator" / "node-ca.key", work / "kits" / "coordinator" / "node-ca.crt")
    (intruder / "node.crt").write_bytes(node_ca.issue_client("intruder", (intruder / "node.pub").read_bytes()))
    started = time.monotonic()
    proc = fedcare("node", "start", "--kit", str(intruder), "--data", str(work / "sites" / "hospital-01"), timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "the coordinator's edge refused this node's TLS client certificate" in proc.stderr
    assert time.monotonic() - started < 60


def test_node_with_data_that_does_not_fit_stops_before_connecting(federation, tmp_path):
    work = federation["work"]
    bad = tmp_path / "bad-site"
    bad.mkdir()
    (bad / "train.csv").write_text("age,episode_12m\n40,1\n")
    (bad / "test.csv").write_text("age,episode_12m\n40,1\n")
    proc = fedcare("node", "start", "--kit", str(work / "kits" / "a"), "--data", str(bad))
    assert proc.returncode == 2
    assert "site data does not fit the study 'depression-risk'" in proc.stderr
    assert "missing columns required by the study: sex_female" in proc.stderr


def test_coordinator_without_certificates_refuses_to_start(federation, tmp_path):
    kit = tmp_path / "coordinator"
    shutil.copytree(federation["work"] / "kits" / "coordinator", kit, ignore=shutil.ignore_patterns("state"))
    (kit / "server.crt").unlink()
    (kit / "server.key").unlink()
    proc = fedcare("coordinator", "start", "--kit", str(kit), "--port", str(free_port()))
    assert proc.returncode == 2
    assert "refusing to start without TLS" in proc.stderr and "--insecure-dev" in proc.stderr
    assert not (kit / "state" / "superlink.db").exists()


def _attacker_flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([flower_command("flwr"), *args], capture_output=True, text=True, timeout=120, env=env)


def _changed_app(target: Path) -> Path:
    """A copy of the App with one changed line in the ClientApp."""
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "tests", "bench", "docs", "*.egg-info",
                                                                 "__pycache__", "out"))
    app_file = target / "client" / "app.py"
    app_file.write_text(app_file.read_text() + "\nCHANGED = True  # not the release the sites installed\n")
    return target


def test_the_study_ca_certificate_alone_drives_nothing(federation, tmp_path):
    """Flower's Control API sits behind the edge: with the public CA certificate in a `flwr`
    configuration of one's own, listing runs or nodes, registering a key, running an App and
    stopping a run all fail, and nothing changes at the coordinator."""
    work, port = federation["work"], federation["port"]
    home = tmp_path / "attacker-flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "attacker"\n\n[superlink.attacker]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{work / "kits" / "a" / "ca.crt"}"\n')
    node_keygen(tmp_path / "key")
    attempts = {
        "list runs": ["ls", "attacker", "--format", "json"],
        "list nodes": ["supernode", "ls", "attacker", "--format", "json"],
        "register a key": ["supernode", "register", str(tmp_path / "key" / "node.pub"), "attacker", "--format", "json"],
        "run a changed App": ["run", str(_changed_app(tmp_path / "app")), "attacker", "--format", "json"],
        "stop a run": ["stop", "1", "attacker", "--format", "json"],
    }
    for what, args in attempts.items():
        proc = _attacker_flwr(home, *args)
        assert proc.returncode != 0 or '"success": false' in proc.stdout, f"{what}: {proc.stdout} {proc.stderr}"
    # the coordinator's operator sees only its own four nodes and no run
    operator = FlowerCLI(load_coordinator_kit(work / "kits" / "coordinator"))
    assert len(operator.nodes()) == len(HOSPITALS)
    assert operator.runs() == []
    # and nginx answered every one of them itself (no client certificate: 400 before any request is read)
    access = (work / "kits" / "coordinator" / "state" / "edge" / "access.log").read_text()
    assert 'node="" ' in access and "/v1/control/" in access


def test_a_hospital_certificate_reaches_only_the_fleet_api(federation, tmp_path):
    """Even a hospital's own client certificate gets only the node-facing calls: the Control API
    and Flower's node self-registration answer 403 at the edge."""
    work, port = federation["work"], federation["port"]
    kit = work / "kits" / "a"
    (tmp_path / "tls.key").write_bytes(node_tls_key((kit / "node.key").read_bytes()))
    context = ssl.create_default_context(cafile=str(kit / "ca.crt"))
    context.load_cert_chain(str(kit / "node.crt"), str(tmp_path / "tls.key"))
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",
                 "/v1/fleet/register-node", "/v1/serverappio/pull-messages", "/health"):
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        connection.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        assert connection.getresponse().status == 403, path
        connection.close()


def test_a_changed_app_pushed_by_the_coordinator_is_refused_by_every_site(federation, tmp_path):
    """The real coordinator runs a copy of the App with one changed line: every site refuses it
    before any of its code runs, trains and charges nothing, and says why on both sides."""
    work, nodes = federation["work"], federation["nodes"]
    kit = load_coordinator_kit(work / "kits" / "coordinator")
    cli = FlowerCLI(kit)
    run_id = cli.start_run(_changed_app(tmp_path / "app"), {"study": str(kit.study_file), "out-dir": str(tmp_path / "run"),
                                                            "rounds": 0, "epsilon": 0.0})
    for name, node in nodes.items():
        assert node.wait_for(f"refused run {run_id}", 120), node.text()[-2000:]
    deadline = time.monotonic() + 240
    while not str(cli.runs(run_id)[0].get("status", "")).startswith("finished") and time.monotonic() < deadline:
        time.sleep(2)
    log = subprocess.run([flower_command("flwr"), "log", str(run_id), "fedcare", "--show"], capture_output=True, text=True,
                         timeout=60, env=flower_env(flwr_home(kit))).stdout
    assert "refused (app): this site runs only Apps it approved" in log, log[-3000:]
    assert "study stopped: sites refused this run's App" in log, log[-3000:]
    for name in HOSPITALS:
        state = work / "kits" / name / "state"
        assert not (state / "ledger.jsonl").exists(), f"site {name} charged a round of a refused App"
        assert "CHANGED" not in (state / "supernode.log").read_text()


def test_study_completes_with_tls_auth_secagg_dp_despite_a_killed_node(federation):
    work, procs, nodes = federation["work"], federation["procs"], federation["nodes"]
    run = procs.start("run", "run", "--kit", str(work / "kits" / "coordinator"), "--rounds", "2")
    # Kill node d (SIGKILL to its whole process group: fedcare, SuperNode, SuperExec, ClientApps)
    # in round 2 once the keys are shared, i.e. while it trains and uploads its masked vector: the
    # round must complete with the three others (SecAgg+ reconstructs d's share of the masks).
    assert run.wait_for("round 1/2 aggregated", 600), run.text()[-4000:]
    assert (work / "kits" / "d" / "state" / "ledger.jsonl").exists(), "node d trained in round 1"
    assert run.wait_for("round 2/2: sharing keys (4/4 sites answered", 300), run.text()[-4000:]
    nodes["d"].stop(signal.SIGKILL)
    assert run.proc.wait(timeout=900) == 0, run.text()[-4000:]

    out = run.text()
    assert "round 2/2 aggregated (3 sites)" in out and "report:" in out
    report_path = sorted((work / "kits" / "coordinator" / "state" / "runs").glob("*/report.json"))[-1]
    report = json.loads(report_path.read_text())
    assert report["secure_aggregation"] is True
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["aggregated"] for r in report["rounds"])
    assert report["rounds"][1]["sites_evaluated"] == 3
    assert 0.5 < report["final"]["auc"] <= 1.0
    # the coordinator holds no per-site privacy spend or metrics
    assert {s["name"] for s in report["sites"]} <= set(HOSPITALS)
    assert all(s["epsilon"] is None and s["auc"] is None for s in report["sites"])
    for key in ("onnx", "onnx_int8"):
        assert report["export"][key].endswith(".onnx")
    # the global model's weights are sealed at rest under the coordinator kit's artifact.key ...
    run_dir = report_path.parent
    sealed = sorted(run_dir.glob("checkpoints/round-*.npz")) + sorted(run_dir.glob("export/*.onnx"))
    assert len(sealed) >= 4 and all(p.read_bytes().startswith(b"FCSEAL/1\n") for p in sealed), sealed
    assert json.loads((run_dir / "run.json").read_text())["sealed"]["key"].startswith("SHA256:")
    # ... and the kit opens them: the signed package, encrypted for site a by name
    pkg = work / "pkg-sealed"
    exported = fedcare("export", "--run", str(run_dir), "--kit", str(work / "kits" / "coordinator"), "--out", str(pkg),
                       "--encrypt-for", "a")
    assert exported.returncode == 0, exported.stderr
    opened = fedcare("verify", str(work / "pkg-sealed.enc"), "--kit", str(work / "kits" / "a"))
    assert opened.returncode == 0 and "(decrypted in memory) is signed by" in opened.stdout, opened.stderr
    # the sites recorded their spend in their ledgers, within the study's target
    for name in ("a", "b", "c"):
        spent = PrivacyLedger(work / "kits" / name / "state").entries()
        assert [e.round for e in spent] == [1, 2]
        assert 0 < spent[-1].epsilon_study <= federation["study"].privacy.epsilon * 1.001
    report = fedcare("privacy", "report", "--kit", str(work / "kits" / "a"))
    assert report.returncode == 0 and "chain verified: 2 entries" in report.stdout
    status = fedcare("status", "--kit", str(work / "kits" / "coordinator"))
    assert status.returncode == 0
    assert "a " in status.stdout and "online" in status.stdout and "finished:completed" in status.stdout
    # the node killed mid-study is shown offline (its heartbeats stopped: 2 x 10 s at most)
    assert [line.split()[-1] for line in status.stdout.splitlines() if line.startswith("d ")] == ["offline"], status.stdout


def test_ctrl_c_stops_a_node_that_has_been_through_runs_with_its_flower_processes(federation):
    node = federation["nodes"]["a"]
    assert node.proc.poll() is None
    os.killpg(node.proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    assert node.proc.wait(timeout=5) == 0
    out = node.text()
    assert "node 'a' stopped" in out and "Traceback" not in out
    assert _group_members(node.proc.pid) == [], "processes left in node a's process group"


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_a_removed_node_is_turned_away_at_the_edge_and_unregistered(federation):
    work = federation["work"]
    coordinator_kit = work / "kits" / "coordinator"
    proc = fedcare("coordinator", "remove-node", "--kit", str(coordinator_kit), "--name", "a")
    assert proc.returncode == 0, proc.stderr
    coordinator = federation["coordinator"]
    assert coordinator.wait_for("accepted hospitals: b, c, d\n", 30), coordinator.text()[-2000:]
    actions = [json.loads(line) for line in (coordinator_kit / "state" / "audit.jsonl").read_text().splitlines()]
    assert {"node removed", "node unregistered"} <= {a["action"] for a in actions if a.get("name") == "a"}
    proc = fedcare("node", "start", "--kit", str(work / "kits" / "a"), "--data", str(work / "sites" / "hospital-01"),
                   timeout=120)
    assert proc.returncode == 3
    assert "the coordinator's edge refused this node's TLS client certificate" in proc.stderr
