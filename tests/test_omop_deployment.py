"""A real federation (SuperLink, three SuperNodes, TLS, node authentication, SecAgg+, DP) in which
one hospital's node reads its OMOP CDM live from PostgreSQL, given to `fedcare node start` as a
`postgresql://` URL: the node checks the database before it connects, and its ClientApps read it
in every round."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from deploy.flower import free_port
from fedcare.study import load_study
from simulations.cohorts import write_cohorts

from .federation import Processes, provision_federation, start_coordinator
from .postgres import postgres_cluster  # noqa: F401 - the session-scoped cluster fixture (one per xdist worker)
from .test_omop import OMOP_STUDY

HOSPITALS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def federation(postgres_cluster, tmp_path_factory):  # noqa: F811
    import psycopg

    from simulations.omop_cdm import write_omop_site

    work = tmp_path_factory.mktemp("omop-federation")
    base = load_study(OMOP_STUDY)
    study = dataclasses.replace(base, secure_aggregation=dataclasses.replace(base.secure_aggregation,
                                                                              timeout_seconds=90.0))
    port = free_port()
    provision_federation(work, study.to_toml(), HOSPITALS, port)
    write_cohorts(study, work / "sites", len(HOSPITALS), seed=7, size_scale=0.2)
    cluster = postgres_cluster
    cluster.create_database("hospital_c")
    cluster.create_role("c_reader", "c-reader-pw")
    secret = work / "c_reader.pass"
    secret.write_text("c-reader-pw\n")
    os.chmod(secret, 0o600)
    with psycopg.connect(cluster.superuser_conninfo(dbname="hospital_c")) as conn:
        write_omop_site(study, work / "sites" / "hospital-03", conn, cdm_schema="cdm", vocabulary_schema="vocab")
        conn.execute("GRANT USAGE ON SCHEMA cdm, vocab TO c_reader")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA cdm, vocab TO c_reader")
        conn.commit()
    url = (f"postgresql://c_reader@127.0.0.1:{cluster.port}/hospital_c?cdm_schema=cdm&vocabulary_schema=vocab"
           f"&password_file={secret}")
    procs = Processes(work)
    try:
        start_coordinator(procs, work, HOSPITALS)
        nodes = {}
        for i, name in enumerate(HOSPITALS, start=1):
            data = url if name == "c" else str(work / "sites" / f"hospital-{i:02d}")
            nodes[name] = procs.start(f"node-{name}", "node", "start", "--kit", str(work / "kits" / name), "--data", data)
        for name, node in nodes.items():
            assert node.wait_for(f"node '{name}' connected", 180), node.text()
        yield {"work": work, "procs": procs, "nodes": nodes, "study": study}
    finally:
        procs.stop_all()


def test_a_node_whose_site_is_a_database_trains_with_the_others(federation):
    work, procs, nodes = federation["work"], federation["procs"], federation["nodes"]
    node_c = nodes["c"].text()
    assert "read-only role c_reader checked" in node_c and "concepts found in the vocabulary" in node_c, node_c[-3000:]
    assert "c-reader-pw" not in node_c
    kept = work / "kits" / "c" / "state" / "database.toml"
    assert kept.is_file() and "c-reader-pw" not in kept.read_text()
    run = procs.start("run", "run", "--kit", str(work / "kits" / "coordinator"), "--rounds", "1")
    assert run.proc.wait(timeout=900) == 0, run.text()[-4000:]
    assert "round 1/1 aggregated (3 sites)" in run.text(), run.text()[-4000:]
    report_path = sorted((work / "kits" / "coordinator" / "state" / "runs").glob("*/report.json"))[-1]
    report = json.loads(report_path.read_text())
    assert [(r["round"], r["aggregated"]) for r in report["rounds"]] == [(1, True)]
    assert report["rounds"][0]["sites_evaluated"] == 3
    from privacy.ledger import PrivacyLedger

    spent = PrivacyLedger(work / "kits" / "c" / "state").entries()
    assert [e.round for e in spent] == [1] and 0 < spent[-1].epsilon_study
