"""The masked-only guard in the real ClientApp chain (guard -> secaggplus_mod -> client)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.common import EvaluateIns, FitIns, GetParametersIns

from client.app import app
from fedcare.model import build_model, get_weights
from fedcare.protocol import REFUSAL_CODE, Refusal, RefusalKind


def _context(tmp_path, study_path, site_dir, policy=None) -> Context:
    node_config = {"data": str(site_dir), "study": str(study_path), "state-dir": str(tmp_path / "state")}
    if policy is not None:
        node_config["policy"] = str(policy)
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _refusal(message: Message, context: Context) -> Refusal | None:
    """Run the ClientApp; the refusal its reply carries (structured: kind and message), or None if it answered."""
    reply = app(message, context)
    if reply.has_error():
        assert reply.error.code == REFUSAL_CODE, reply.error.reason
        assert not reply.has_content()  # a refusal carries its reason and nothing else
        return Refusal.from_reply(reply.error.code, reply.error.reason)
    assert not any(len(r) for r in reply.content.array_records.values()), "no arrays may come back"
    return None


def _call(message: Message, context: Context) -> str:
    """The refusal's message, or '' if the ClientApp answered."""
    refusal = _refusal(message, context)
    return "" if refusal is None else str(refusal)


def _setup(sample: int, threshold: int) -> Message:
    cfg = ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: sample, Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 20000.0,
    })
    return Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=7, message_type="train")


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; a unit test sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture()
def site(study, cohorts_dir, tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(study.to_toml())
    return path, cohorts_dir / "hospital-01"


def test_get_parameters_is_refused(site, tmp_path):
    content = compat.getparametersins_to_recorddict(GetParametersIns(config={}))
    reason = _call(Message(content, dst_node_id=7, message_type="get_parameters"), _context(tmp_path, *site))
    assert "'get_parameters' request refused: this site answers only SecAgg+ training rounds" in reason


def test_plaintext_evaluation_is_refused(site, study, tmp_path):
    weights = get_weights(build_model(study))
    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(weights), {"study_hash": study.hash}), True)
    reason = _call(Message(content, dst_node_id=7, message_type="evaluate"), _context(tmp_path, *site))
    assert "'evaluate' request refused: this site answers only SecAgg+ training rounds" in reason


def test_plain_fit_outside_secagg_is_refused_before_training(site, study, tmp_path):
    weights = get_weights(build_model(study))
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {"study_hash": study.hash}), True)
    reason = _call(Message(content, dst_node_id=7, message_type="train"), _context(tmp_path, *site))
    assert "training request outside SecAgg+ refused" in reason
    assert _refusal(Message(content, dst_node_id=7, message_type="train"), _context(tmp_path, *site)).kind is RefusalKind.GUARD
    assert not (tmp_path / "state").exists()  # nothing trained, nothing spent


def test_secagg_setup_below_site_policy_is_refused(site, tmp_path):
    policy = tmp_path / "site.toml"
    policy.write_text("[policy]\nmin_cohort = 5\nmin_threshold = 3\n")
    context = _context(tmp_path, *site, policy=policy)
    assert "cohort of 4 sites is below this site's policy min_cohort = 5" in _call(_setup(4, 3), context)
    assert _refusal(_setup(4, 3), context).kind is RefusalKind.POLICY
    assert "reconstruction threshold 2 is below this site's policy min_threshold = 3" in _call(_setup(6, 2), context)
    assert _call(_setup(6, 4), context) == ""  # meets the policy: the SecAgg+ setup answers (public keys only)


def test_default_policy_refuses_a_two_site_cohort(site, tmp_path):
    assert "below this site's policy min_cohort = 3" in _call(_setup(2, 2), _context(tmp_path, *site))


def test_simulated_site_policy_comes_from_its_directory(study, tmp_path, cohorts_dir):
    """In simulation a site's own site.toml (next to its data) is its policy, as a kit's is in deployment."""
    import shutil

    sites = tmp_path / "sites"
    shutil.copytree(cohorts_dir / "hospital-01", sites / "hospital-01")
    (sites / "hospital-01" / "site.toml").write_text("[policy]\nmin_cohort = 6\n")
    path = tmp_path / "study.toml"
    path.write_text(study.to_toml())
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={"study": str(path), "sim-sites-dir": str(sites)})
    assert "below this site's policy min_cohort = 6" in _call(_setup(5, 3), context)


def test_a_refusal_names_the_site_and_a_broken_input_is_a_one_line_refusal(site, tmp_path):
    """The coordinator's operator reads who declined and why: the site's name travels with the refusal;
    a site's own unusable input (here an invalid site.toml) is a structured refusal, not a crash."""
    study_path, data = site
    refusal = _refusal(_setup(2, 2), _context(tmp_path, study_path, data))
    assert refusal.site == data.name  # no `site` in the node config: the data folder's name (simulation)
    named = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                    node_config={"data": str(data), "study": str(study_path), "site": "st-marys"})
    assert _refusal(_setup(2, 2), named).site == "st-marys"  # `fedcare node start` sets the kit's name
    policy = tmp_path / "site.toml"
    policy.write_text("[policy]\nmin_cohort = 'three'\n")
    broken = _refusal(_setup(4, 3), _context(tmp_path, study_path, data, policy=policy))
    assert broken.kind is RefusalKind.POLICY and "min_cohort" in str(broken) and "\n" not in str(broken)


def test_a_site_data_error_reaches_the_coordinator_without_its_details(site, tmp_path, caplog):
    """An input error below the guard (the site's export, as `client.data` raises it) is a `data` refusal;
    its reason (file, line, counts) stays in the site's log, the coordinator reads no per-site detail."""
    import logging

    from client.tables import SiteDataError
    from privacy.guard import masked_only_guard

    def unreadable_export(message, context):
        raise SiteDataError("/exports/north/test.csv: line 812: 9 of 14 lines unreadable")

    with caplog.at_level(logging.WARNING):
        reply = masked_only_guard(_setup(4, 3), _context(tmp_path, *site), unreadable_export)
    refusal = Refusal.from_reply(reply.error.code, reply.error.reason)
    assert refusal.kind is RefusalKind.DATA and refusal.site == site[1].name
    assert str(refusal) == ("the site's data cannot be used for this study (SiteDataError); "
                            "the file and reason are in the site's own log")
    assert "812" not in reply.error.reason and "9 of 14" not in reply.error.reason
    assert "line 812: 9 of 14 lines unreadable" in caplog.text  # the site's operator sees why
