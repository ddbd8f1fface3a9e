"""The site's privacy ledger: tamper evidence, durability, and a crash between record and send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from privacy.ledger import ENTRY_FIELDS, LedgerTampered, PrivacyLedger

ROUND = dict(
    event="round", study_hash="ab" * 32, run_id=7, noise_multiplier=1.25, sample_rate=0.05, steps=40,
    accountant="prv", delta=1e-5, epsilon_study=0.0, epsilon_lifetime=0.0, note="",
)


def _ledger(tmp_path, rounds=3) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "state")
    for r in range(1, rounds + 1):
        ledger.append(**{**ROUND, "round": r, "epsilon_study": 0.5 * r, "epsilon_lifetime": 0.5 * r})
    return ledger


def _lines(ledger):
    return ledger.path.read_text().splitlines()


def test_entries_chain_and_key_is_private(tmp_path):
    ledger = _ledger(tmp_path)
    entries = ledger.entries()
    assert [e.seq for e in entries] == [1, 2, 3] and [e.round for e in entries] == [1, 2, 3]
    assert entries[1].prev == entries[0].mac and entries[0].prev == "0" * 64
    assert os.stat(ledger.key_path).st_mode & 0o777 == 0o600
    assert ledger.key_path.read_bytes().hex() not in ledger.path.read_text()


@pytest.mark.parametrize("field", [f for f in ENTRY_FIELDS if f != "mac"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_altering_any_field_of_any_entry_is_detected(tmp_path, field, index):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    entry = json.loads(lines[index])
    value = entry[field]
    entry[field] = (not value) if isinstance(value, bool) else value + 1 if isinstance(value, int | float) else value + "x"
    lines[index] = json.dumps(entry, sort_keys=True)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerTampered, match=f"ledger.jsonl:{index + 1}: entry was altered"):
        ledger.entries()


def test_removed_reordered_truncated_or_missing_is_detected(tmp_path):
    ledger = _ledger(tmp_path)
    original = _lines(ledger)
    cases = {
        "removed": [original[0], original[2]],
        "reordered": [original[1], original[0], original[2]],
        "truncated": original[:2],
        "garbage": [*original[:2], "{not json"],
    }
    expected = {
        "removed": "chain is broken before entry 3",
        "reordered": "chain is broken before entry 2",
        "truncated": "holds 2 entries but the head records 3",
        "garbage": "ledger.jsonl:3: not a ledger entry",
    }
    for name, lines in cases.items():
        ledger.path.write_text("\n".join(lines) + "\n")
        with pytest.raises(LedgerTampered, match=expected[name]):
            ledger.entries()
    ledger.path.unlink()
    with pytest.raises(LedgerTampered, match="missing although the ledger's key exists"):
        ledger.entries()


def test_a_tampered_ledger_blocks_appending_until_resealed(tmp_path):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    entry = json.loads(lines[0])
    entry["steps"] = 1  # someone tries to make round 1 look cheaper
    lines[0] = json.dumps(entry)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerTampered):
        ledger.append(**{**ROUND, "round": 4})
    problem = ledger.reseal("restored from the 2026-11-20 backup after an editor accident")
    assert "ledger.jsonl:1: entry was altered" in problem
    entries = ledger.entries()
    assert entries[-1].event == "reseal" and "editor accident" in entries[-1].note and "ledger.jsonl:1" in entries[-1].note
    ledger.append(**{**ROUND, "round": 4})  # training may resume; the reseal stays on record
    assert [e.event for e in ledger.entries()] == ["round"] * 3 + ["reseal", "round"]


def test_crash_between_ledger_write_and_send_never_undercounts(study, cohorts_dir, tmp_path):
    """A site process dies right after the round is recorded, before any update leaves (here: the
    moment training would start). The next round composes the crashed round's cost too."""
    path = tmp_path / "study.toml"
    path.write_text(study.with_overrides(rounds=3).to_toml())
    state = tmp_path / "state"
    script = textwrap.dedent(f"""
        import os, client.training
        from client.site_client import SiteClient
        from fedcare.site import SitePaths
        from fedcare.model import build_model, get_weights
        def crash(*args, **kwargs):
            os._exit(137)  # the process dies: nothing is returned, nothing is sent
        client.training.train_round = crash
        paths = SitePaths(study=__import__("pathlib").Path({str(path)!r}), data=__import__("pathlib").Path({str(cohorts_dir / "hospital-02")!r}),
                          state_dir=__import__("pathlib").Path({str(state)!r}), policy=None)
        c = SiteClient(paths, run_id=5)
        from fedcare.contribution import scaling_bytes
        from fedcare.features import scaling
        c.fit(get_weights(build_model(c.study)), {{"study_hash": c.study.hash, "phase": "train", "round": 1,
                                                 "scaling": scaling_bytes(*scaling(c.study))}})
        os._exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    [crashed] = PrivacyLedger(state).entries()
    assert crashed.round == 1 and crashed.epsilon_study > 0

    from client.site_client import SiteClient, SitePaths
    from fedcare.model import build_model, get_weights

    client = SiteClient(SitePaths(study=path, data=cohorts_dir / "hospital-02", state_dir=state, policy=None), run_id=5)
    from fedcare.contribution import scaling_bytes
    from fedcare.features import scaling

    client.fit(get_weights(build_model(client.study)),
               {"study_hash": client.study.hash, "phase": "train", "round": 2, "scaling": scaling_bytes(*scaling(client.study))})
    first, second = PrivacyLedger(state).entries()
    assert second.epsilon_study > first.epsilon_study  # the crashed round still counts
    assert second.noise_multiplier == first.noise_multiplier  # the run keeps its σ


def test_crash_while_writing_leaves_the_previous_ledger(tmp_path):
    ledger = _ledger(tmp_path, rounds=2)
    before = ledger.path.read_bytes()
    script = textwrap.dedent(f"""
        import os
        from privacy.ledger import PrivacyLedger
        real_replace = os.replace
        def die(src, dst):
            os._exit(137)  # killed after the temporary file is written, before the rename
        os.replace = die
        PrivacyLedger({str(ledger.dir)!r}).append(**{ROUND!r}, round=3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert ledger.path.read_bytes() == before
    assert len(ledger.entries()) == 2  # still verifies: the old ledger, whole


def test_privacy_report_cli_verifies_then_flags_tampering(tmp_path):
    ledger = _ledger(tmp_path, rounds=2)
    cli = [sys.executable, "-m", "cli", "privacy", "report", "--state-dir", str(ledger.dir)]
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "chain verified: 2 entries" in ok.stdout and "abababababab" in ok.stdout
    lines = _lines(ledger)
    ledger.path.write_text(lines[0] + "\n")  # the latest round's entry removed
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3
    assert "LEDGER FAILED VERIFICATION" in bad.stderr and "holds 1 entries but the head records 2" in bad.stderr
    assert "fedcare privacy reseal" in bad.stderr
