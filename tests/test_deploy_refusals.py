"""Deployment commands that must refuse or warn without a running federation."""

from __future__ import annotations

import socket
import time

import pytest

from deploy.provision import provision
from deploy.flower import free_port
from simulations.cohorts import write_cohorts

from .conftest import DEFAULT_STUDY
from .federation import Processes, fedcare


@pytest.fixture()
def kits(tmp_path, study):
    port = free_port()
    made = provision(DEFAULT_STUDY, ["127.0.0.1"], ["a", "b", "c"], tmp_path / "kits", port=port)
    write_cohorts(study, tmp_path / "sites", 3, seed=1, size_scale=0.2)
    return made, port, tmp_path


def test_unreachable_coordinator_is_reported_within_seconds(kits):
    made, port, tmp = kits
    started = time.monotonic()
    proc = fedcare("node", "start", "--kit", str(made["a"]), "--data", str(tmp / "sites" / "hospital-01"))
    assert proc.returncode == 2
    assert f"cannot reach the coordinator at 127.0.0.1:{port}" in proc.stderr
    assert "Is `fedcare coordinator start` running there" in proc.stderr
    assert time.monotonic() - started < 30


def test_node_with_the_template_data_path_says_which_directory_is_missing(kits):
    made, _, _ = kits
    proc = fedcare("node", "start", "--kit", str(made["a"]))  # site.toml still holds the template path
    assert proc.returncode == 2
    assert "/path/to/ehr-export: site data directory not found" in proc.stderr


def test_insecure_dev_coordinator_warns_loudly_and_serves_plain_http(kits):
    made, port, tmp = kits
    procs = Processes(tmp)
    try:
        coordinator = procs.start("coordinator", "coordinator", "start", "--kit", str(made["coordinator"]),
                                  "--bind", "127.0.0.1", "--insecure-dev")
        assert coordinator.wait_for("coordinator listening", 90), coordinator.text()
        text = coordinator.text()
        assert "INSECURE DEV MODE: coordinator started with --insecure-dev" in text
        assert "TLS OFF, node authentication OFF" in text
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(16).startswith(b"HTTP/1.")  # plain HTTP: no TLS
    finally:
        procs.stop_all()


def test_a_node_without_its_client_certificate_says_where_to_get_it(kits):
    made, _, tmp = kits
    (made["a"] / "node.crt").unlink()
    proc = fedcare("node", "start", "--kit", str(made["a"]), "--data", str(tmp / "sites" / "hospital-01"))
    assert proc.returncode == 2
    assert f"{made['a'] / 'node.crt'}: missing. The coordinator's edge admits only nodes with a TLS client certificate" \
        in proc.stderr


def test_resume_without_an_interrupted_run_is_refused_before_touching_the_federation(kits):
    made, _, _ = kits
    proc = fedcare("run", "--kit", str(made["coordinator"]), "--resume")
    assert proc.returncode == 2
    assert "no interrupted run to resume in" in proc.stderr and "start a new one with `fedcare run --kit" in proc.stderr


def test_the_coordinator_without_nginx_names_the_package(monkeypatch):
    from deploy import edge

    monkeypatch.setattr(edge.shutil, "which", lambda name: None)
    monkeypatch.setattr(edge, "NGINX_PATHS", ())
    with pytest.raises(edge.EdgeError, match=r"nginx not found: .*`apt-get install nginx`"):
        edge.nginx_binary()
