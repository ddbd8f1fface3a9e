"""The site's SuperNode process changes named attributes of Flower 1.42.0 in its own process
(`deploy/supernode.py`). These tests fail on any Flower upgrade, so each change is re-verified
against the new source before the pin moves; the deployment tests show the changes at work."""

from __future__ import annotations

import hashlib
import inspect

import flwr
import pytest
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection
from flwr.supernode import start_client_internal as sci
from flwr.supernode.fleet_http_client import FleetHttpClient

from deploy import supernode
from deploy.approval import AppApproval, app_hash
from fedcare import APP_DIR

# SHA-256 of the Flower functions whose behaviour the changes rely on, as read in flwr 1.42.0.
PINNED_SOURCES = {
    "start_client_internal": (sci.start_client_internal, "time.sleep(3)"),
    "_pull_and_store_message": (sci._pull_and_store_message, "get_fab(run_info.fab_hash, run_id)"),
    "_push_messages": (sci._push_messages, "time.sleep(0.5)"),
    "superexec launch": (None, "subprocess.Popen(args)"),
}


def test_flower_is_the_version_the_changes_were_written_for():
    assert flwr.__version__ == supernode.FLOWER_VERSION == "1.42.0"
    supernode.check_flower_version()


@pytest.mark.parametrize("name", sorted(PINNED_SOURCES))
def test_the_changed_code_paths_are_still_there(name):
    function, needle = PINNED_SOURCES[name]
    if function is None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        function = SubprocessExecutor.launch
    assert needle in inspect.getsource(function)


def test_the_supernode_starts_the_superexec_by_name():
    source = inspect.getsource(sci.start_client_internal)
    assert 'command = ["flower-superexec"]' in source and "subprocess.Popen(command)" in source


def test_the_pull_step_is_called_with_keywords_the_approval_wrapper_reads():
    source = inspect.getsource(sci.start_client_internal)
    for keyword in ("state=state", "object_store=store", "receive=receive", "get_fab=get_fab"):
        assert keyword in source
    assert list(inspect.signature(sci._insert_message).parameters) == ["msg", "state", "store"]


def test_the_fleet_client_and_heartbeat_hooks_exist():
    assert list(inspect.signature(FleetHttpClient.from_server_address).parameters)[:4] == [
        "server_address", "insecure", "root_certificates", "interceptors"]
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 30
    assert "FleetHttpClient.from_server_address" in inspect.getsource(fleet_http_connection.http_request_response)


def test_waits_replace_only_the_two_fixed_sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    waits = supernode._Waits({3: 0.5, 0.5: 0.25})
    for seconds in (3, 0.5, 7):
        waits.sleep(seconds)
    assert slept == [0.5, 0.25, 7]
    assert waits.monotonic is supernode.time.monotonic


def test_the_installed_release_is_approved_by_its_content_hash():
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(APP_DIR)
    approval = AppApproval(hashes={app_hash(APP_DIR): "installed release"})
    assert approval.approves(fab)
    assert not approval.approves(fab + b"\n")
    assert hashlib.sha256(fab).hexdigest() in approval.hashes
    refusal = supernode.app_refusal("ab" * 32)
    assert refusal.kind.value == "app" and "nothing was trained or charged" in refusal.reason()


def test_a_site_lists_extra_approved_apps_in_its_site_toml_and_a_bad_entry_is_named(tmp_path):
    from deploy.kits import KitError, load_hospital_kit
    from deploy.provision import provision
    from deploy.approval import site_approval

    from .conftest import DEFAULT_STUDY

    kits = provision(DEFAULT_STUDY, ["127.0.0.1"], ["a", "b", "c"], tmp_path / "kits")
    site = kits["a"] / "site.toml"
    base = site.read_text()
    reviewed = "cd" * 32
    site.write_text(base + f'\n[approval]\napps = ["{reviewed}"]\ninstalled_release = false\n')
    assert site_approval(load_hospital_kit(kits["a"])).hashes == {reviewed: "site.toml [approval] apps"}
    site.write_text(base + '\n[approval]\napps = ["not-a-hash"]\n')
    with pytest.raises(KitError, match=r"approval.apps: 'not-a-hash' is not a SHA-256 hash"):
        site_approval(load_hospital_kit(kits["a"]))
    site.write_text(base + "\n[approval]\ninstalled_release = false\n")
    with pytest.raises(KitError, match="this node would refuse every run"):
        site_approval(load_hospital_kit(kits["a"]))
