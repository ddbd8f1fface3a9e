"""The audit logs are hash-chained: a removed, edited, moved or forged line, a cut tail, a deleted file
or a replaced head is found by `fedcare audit verify`, with one line naming the file and line; the
disk cap's deletions verify OK and say so.

The service's log is written through the real `AuditLog` (rotation by size across many files, two
services on one kit, restarts), the coordinator's through `deploy.audit.audit`; the CLI runs as a
subprocess (`python -m cli audit verify`), and once over a real `fedcare serve`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedcare.audit_chain import DOMAIN_LINE, GENESIS, AuditChainError, Mac, mac_hex
from inference.audit import AUDIT_FILE, AUDIT_HEAD, CHAIN_LABEL, AuditLog, AuditSettings, load_audit_key
from inference.audit_verify import verify_serve_log

from .conftest import ROOT
from .test_serve import ServerProcess, add_token, build_world, valid_features
from .test_serve_audit import Clock, record

SMALL = AuditSettings(max_bytes=4096, keep=50, max_total_bytes=10**6)  # ~10 lines a file, nothing pruned


def write_log(state: Path, n: int, settings: AuditSettings = SMALL, clock: Clock | None = None) -> AuditLog:
    log = AuditLog(state, load_audit_key(state), settings, clock=clock or Clock())
    for i in range(n):
        log.write(record(i, log))
    log.close()
    return log


def oldest_first(state: Path) -> list[Path]:
    rotated = sorted((p for p in state.iterdir() if p.name.startswith(AUDIT_FILE + ".")),
                     key=lambda p: int(p.name.rsplit(".", 1)[1]))
    return [*rotated[::-1], state / AUDIT_FILE]


def read(path: Path) -> list[str]:
    return path.read_text().splitlines()


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def seq(line: str) -> int:
    return json.loads(line)["chain"]["seq"]


def problem(state: Path) -> str:
    with pytest.raises(AuditChainError) as caught:
        verify_serve_log(state)
    assert caught.value.exit_code == 3
    return caught.value.line


@pytest.fixture
def chained(tmp_path) -> tuple[Path, list[Path]]:
    """120 request lines through AuditLog, rotated into 13 files, nothing pruned."""
    write_log(tmp_path, 120)
    files = oldest_first(tmp_path)
    assert len(files) >= 10 and all(len(read(p)) >= 5 for p in files[:-1])
    return tmp_path, files


# -- a clean log ---------------------------------------------------------------------------------


def test_every_line_is_chained_across_rotations_and_verifies(chained):
    state, files = chained
    every = [line for p in files for line in read(p)]
    assert [seq(line) for line in every] == list(range(1, 121))
    chains = [json.loads(line)["chain"] for line in every]
    assert chains[0]["prev"] == GENESIS
    assert all(c["prev"] == p["mac"] for p, c in zip(chains, chains[1:]))  # also file to file
    report = verify_serve_log(state)
    assert report.line() == (f"{state / AUDIT_FILE}: OK: {len(files)} files, 120 lines (120 chained, seq 1..120), "
                             "2027-01-15T08:00:00.000Z to 2027-01-15T08:00:00.000Z")
    head = json.loads((state / AUDIT_HEAD).read_text())
    assert head["seq"] == 120 and head["mac"] == chains[-1]["mac"]
    assert (state / AUDIT_HEAD).stat().st_mode & 0o777 == 0o600


def test_the_chain_continues_across_restarts_and_two_services(tmp_path):
    key = load_audit_key(tmp_path)
    write_log(tmp_path, 30)
    a, b = (AuditLog(tmp_path, key, SMALL, clock=Clock()) for _ in range(2))  # two services on one kit
    for i in range(200):
        (a if i % 3 else b).write(record(i, a))
    a.close()
    b.close()
    write_log(tmp_path, 5)  # and a restart
    assert verify_serve_log(tmp_path).line().startswith(
        f"{tmp_path / AUDIT_FILE}: OK: {len(oldest_first(tmp_path))} files, 235 lines (235 chained, seq 1..235)")


def test_the_precomputed_hmac_is_hmac_sha256():
    for key in (b"k" * 32, b"x" * 100, b""):
        for data in (b"", b"a line", b"x" * 1000):
            assert Mac(key).hex(DOMAIN_LINE, data) == mac_hex(key, DOMAIN_LINE, data) == \
                hmac.new(key, DOMAIN_LINE + data, hashlib.sha256).hexdigest()[:32]


def test_chain_key_is_out_of_reach_of_pseudonyms():
    """The chain key is HMAC(audit.key, label); a pseudonym is HMAC(audit.key, patient id as UTF-8). The label is
    no UTF-8 text, so no patient id can make its pseudonym (written in the log) equal the chain key."""
    with pytest.raises(UnicodeDecodeError):
        CHAIN_LABEL.decode("utf-8", "surrogatepass")


# -- each tampering, found and named ---------------------------------------------------------------


def test_an_edited_line(chained):
    state, files = chained
    lines = read(files[3])
    n = seq(lines[4])
    lines[4] = lines[4].replace('"status":200', '"status":500')
    rewrite(files[3], lines)
    assert problem(state) == f"{files[3]}:5: edited: the line does not match its MAC (seq {n})"


def test_a_removed_middle_line(chained):
    state, files = chained
    lines = read(files[3])
    n = seq(lines[4])
    rewrite(files[3], lines[:4] + lines[5:])
    assert problem(state) == f"{files[3]}:5: removed: 1 line (seq {n}) missing before this line"


def test_a_truncated_tail(chained):
    state, files = chained
    lines = read(files[-1])
    rewrite(files[-1], lines[:-2])
    assert problem(state) == (f"{files[-1]}:{len(lines) - 2}: truncated: the log ends at seq 118 but its head "
                              "records seq 120: 2 lines removed at the tail")
    files[-1].write_text("")  # the whole current file emptied: the end is now in .1
    last = len(read(files[-2]))
    assert problem(state) == (f"{files[-2]}:{last}: truncated: the log ends at seq {seq(read(files[-2])[-1])} but its "
                              f"head records seq 120: {len(lines)} lines removed at the tail")


def test_two_lines_swapped(chained):
    state, files = chained
    lines = read(files[3])
    n = seq(lines[3])
    lines[3], lines[4] = lines[4], lines[3]
    rewrite(files[3], lines)
    assert problem(state) == (f"{files[3]}:4: reordered: holds seq {n + 1} where seq {n} was expected; "
                              f"seq {n} is at {files[3]}:5")


def test_a_forged_line_inserted(chained):
    state, files = chained
    lines = read(files[3])
    forged = json.loads(lines[3])
    forged["patient"] = "0" * 64  # someone without the key: a plausible line, a copied chain field
    rewrite(files[3], lines[:4] + [json.dumps(forged, separators=(",", ":"))] + lines[4:])
    assert problem(state) == (f"{files[3]}:5: inserted: this line is not in the chain (its MAC does not match) and the "
                              "lines before and after it link to each other")
    plain = {k: v for k, v in forged.items() if k != "chain"}  # or a line without any chain field
    rewrite(files[3], lines[:4] + [json.dumps(plain)] + lines[4:])
    assert problem(state) == (f"{files[3]}:5: inserted or edited: a line without a chain field after the chain "
                              f"started at {files[0]}:1")


def test_a_whole_rotated_file_deleted(chained):
    state, files = chained
    gone = read(files[4])
    files[4].unlink()
    assert problem(state) == (f"{files[5]}:1: removed: {len(gone)} lines (seq {seq(gone[0])}..{seq(gone[-1])}) "
                              "missing before this line at the start of this file: a whole file, or the end of the "
                              "one before, was deleted")


def test_the_oldest_file_deleted_is_not_pruning(chained):
    state, files = chained
    gone = read(files[0])
    files[0].unlink()
    assert problem(state) == (f"{files[1]}:1: removed: the chain starts at seq {len(gone) + 1}; seq 1..{len(gone)} "
                              "are missing and no deletion by the cap records them")


def test_the_head_replaced_altered_or_deleted(tmp_path):
    write_log(tmp_path, 40)
    old_head = (tmp_path / AUDIT_HEAD).read_bytes()
    write_log(tmp_path, 40)
    head = tmp_path / AUDIT_HEAD
    good = head.read_bytes()
    head.write_bytes(old_head)  # an older, genuine head put back
    assert problem(tmp_path) == (f"{head}: head replaced: it records seq 40 but the log goes on to seq 80 "
                                 "(an older head put back?)")
    head.write_bytes(good.replace(b'"seq":80', b'"seq":81'))
    assert problem(tmp_path) == f"{head}: head altered: its MAC does not match"
    head.unlink()
    assert problem(tmp_path) == (f"{head}: head missing: the log holds 80 chained lines but no head (deleted?), so a "
                                 "truncated tail cannot be ruled out")
    head.write_bytes(good)
    verify_serve_log(tmp_path)


def test_a_missing_key(chained):
    state, _ = chained
    (state / "audit.key").unlink()
    assert problem(state) == (f"{state / 'audit.key'}: key missing: the chain of {state / AUDIT_FILE} cannot be "
                              "verified without it")


def test_truncation_while_stopped_then_restart_still_shows(chained):
    """A tail cut while the service is down: the restarted service continues from the head, so the gap stays."""
    state, files = chained
    lines = read(files[-1])
    rewrite(files[-1], lines[:-3])
    write_log(state, 2)
    assert problem(state) == (f"{files[-1]}:{len(lines) - 2}: removed: 3 lines (seq 118..120) missing before this line")


def test_head_deleted_then_restart_is_not_silently_healed(chained):
    state, files = chained
    (state / AUDIT_HEAD).unlink()
    write_log(state, 2)
    where = [(p, i) for p in oldest_first(state) for i, line in enumerate(read(p), 1) if seq(line) == 121]
    assert len(where) == 1
    path, number = where[0]
    assert json.loads(read(path)[number - 1])["chain"]["resumed"] == "head missing"
    assert problem(state) == (f"{path}:{number}: the chain was resumed here with its head missing: lines at the "
                              "tail before it (after seq 120) may have been removed")


# -- allowed deletion: the disk cap ----------------------------------------------------------------


def test_pruning_by_the_cap_verifies_and_says_so(tmp_path):
    settings = AuditSettings(max_bytes=4096, keep=3, max_total_bytes=16384)
    log = write_log(tmp_path, 400, settings)
    assert log.deleted > 20
    files = oldest_first(tmp_path)
    assert len(files) == 4
    first = seq(read(files[0])[0])
    line = verify_serve_log(tmp_path).line()
    assert line.startswith(f"{tmp_path / AUDIT_FILE}: OK: 4 files, {400 - first + 1} lines "
                           f"({400 - first + 1} chained, seq {first}..400), ")
    assert "; older lines pruned by the cap at 2027-01-15T08:00:00.000Z (1 file, seq " in line
    assert f"..{first - 1}; recorded at " in line
    # but deleting one more file than the cap did is a hole
    files[0].unlink()
    assert problem(tmp_path) == (f"{files[1]}:1: removed: the chain starts at seq {seq(read(files[1])[0])}; seq "
                                 f"1..{seq(read(files[1])[0]) - 1} are missing and no deletion by the cap records them")


def test_smaller_limits_at_start_prune_and_say_so_in_the_chain(tmp_path):
    write_log(tmp_path, 200)
    AuditLog(tmp_path, load_audit_key(tmp_path), AuditSettings(max_bytes=4096, keep=2, max_total_bytes=10**6)).close()
    files = oldest_first(tmp_path)
    assert len(files) == 3
    last = json.loads(read(files[-1])[-1])
    assert last["event"] == "audit_pruned" and last["chain"]["pruned"]["count"] >= 10
    assert "older lines pruned by the cap at" in verify_serve_log(tmp_path).line()


# -- logs written before chaining ------------------------------------------------------------------


def test_unchained_lines_before_the_chain_are_reported_not_trusted(tmp_path):
    legacy = tmp_path / AUDIT_FILE
    rewrite(legacy, [json.dumps({"time": "2027-01-15T07:00:00.000Z", "token": "old", "status": 200})] * 3)
    assert verify_serve_log(tmp_path).line() == (
        f"{legacy}: OK: 1 file, 3 lines (none chained), 2027-01-15T07:00:00.000Z to 2027-01-15T07:00:00.000Z; "
        "3 unchained lines: the chain has not started")
    write_log(tmp_path, 4)
    assert verify_serve_log(tmp_path).line() == (
        f"{legacy}: OK: 1 file, 7 lines (4 chained, seq 1..4), 2027-01-15T07:00:00.000Z to 2027-01-15T08:00:00.000Z; "
        f"3 unchained lines before the chain started at {legacy}:4")
    with legacy.open("a") as f:  # an unchained line after chained ones is tampering
        f.write(json.dumps({"time": "2027-01-16T00:00:00.000Z", "token": "x"}) + "\n")
    assert problem(tmp_path) == (f"{legacy}:8: inserted or edited: a line without a chain field after the chain "
                                 f"started at {legacy}:4")


# -- the command line, the real service, the coordinator -------------------------------------------


def fedcare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_verify_ok_and_tampered(chained):
    state, files = chained
    proc = fedcare("audit", "verify", "--state-dir", str(state))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"{state / AUDIT_FILE}: OK: {len(files)} files, 120 lines (120 chained, seq 1..120), " \
                          "2027-01-15T08:00:00.000Z to 2027-01-15T08:00:00.000Z\n"
    lines = read(files[2])
    rewrite(files[2], lines[:1] + lines[2:])
    proc = fedcare("audit", "verify", "--state-dir", str(state))
    assert (proc.returncode, proc.stdout) == (3, "")
    assert proc.stderr == f"fedcare: error: {files[2]}:2: removed: 1 line (seq {seq(lines[1])}) missing before this line\n"
    proc = fedcare("audit", "verify")
    assert (proc.returncode, proc.stderr) == (2, "fedcare: error: audit verify: give --kit or --state-dir (one of them)\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "serve-world")


def test_real_service_log_verifies(world):
    kit = world.root / "kit-chain"
    shutil.rmtree(kit, ignore_errors=True)
    shutil.copytree(world.hospital, kit, ignore=shutil.ignore_patterns("state"))
    token = add_token(kit, "clinic", "analyze", "models")
    server = ServerProcess(world.package, kit, world.root / "logs-chain", "--audit-max-size", "4K")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
            for i in range(25):
                assert c.post("/v1/analyze", json={"patient_id": f"p{i}", "features": valid_features(world)}).status_code == 200
            assert c.post("/v1/analyze", json={"patient_id": "p"}, headers={"Authorization": "Bearer no"}).status_code == 401
    finally:
        server.stop()
    proc = fedcare("audit", "verify", "--kit", str(kit))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{kit / 'state' / AUDIT_FILE}: OK: ") and " 26 lines (26 chained, seq 1..26)" in proc.stdout


def test_coordinator_log_is_chained_and_verified(world, tmp_path):
    from deploy.audit import CHAIN_KEY, HEAD, audit, audit_entries
    from deploy.kits import load_coordinator_kit

    kit_dir = tmp_path / "coordinator"
    shutil.copytree(world.coordinator, kit_dir, ignore=shutil.ignore_patterns("state"))
    kit = load_coordinator_kit(kit_dir)
    log = kit.audit_log
    log.parent.mkdir(parents=True)
    rewrite(log, [json.dumps({"action": "coordinator started", "time": "2027-01-01T00:00:00Z", "user": "op"})])
    for action in ("coordinator started", "node removed", "run started", "run finished"):
        audit(kit, action, name="a")
    assert (kit.state_dir / CHAIN_KEY).stat().st_mode & 0o777 == 0o600
    assert [e["action"] for e in audit_entries(log)][-3:] == ["node removed", "run started", "run finished"]
    proc = fedcare("audit", "verify", "--kit", str(kit_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{log}: OK: 1 file, 5 lines (4 chained, seq 1..4), 2027-01-01T00:00:00Z to ")
    assert proc.stdout.endswith(f"; 1 unchained line before the chain started at {log}:2\n")
    lines = read(log)
    rewrite(log, lines[:2] + [lines[2].replace("node removed", "node admitted")] + lines[3:])
    proc = fedcare("audit", "verify", "--kit", str(kit_dir))
    assert (proc.returncode, proc.stderr) == (3, f"fedcare: error: {log}:3: edited: the line does not match its MAC (seq 2)\n")
    rewrite(log, lines[:-1])
    proc = fedcare("audit", "verify", "--kit", str(kit_dir))
    assert (proc.returncode, proc.stderr) == (3, f"fedcare: error: {log}:4: truncated: the log ends at seq 3 but its "
                                                 "head records seq 4: 1 line removed at the tail\n")
    assert (kit.state_dir / HEAD).exists() and os.stat(kit.state_dir / HEAD).st_mode & 0o777 == 0o600


def test_services_in_parallel_processes_keep_one_chain_and_verify_while_writing(tmp_path):
    """Four processes write the log at once (rotating, pruning by the cap); verify runs meanwhile, and after."""
    load_audit_key(tmp_path)
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from inference.audit import AuditLog, AuditSettings, load_audit_key
log = AuditLog({str(tmp_path)!r}, load_audit_key({str(tmp_path)!r}),
               AuditSettings(max_bytes=4096, keep=200, max_total_bytes=16 * 4096))
for i in range(300):
    log.write({{"token": "p" + sys.argv[1], "i": i, "status": 200}})
log.close()
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)]) for n in range(4)]
    checked = 0
    while any(p.poll() is None for p in procs):
        if (tmp_path / AUDIT_FILE).exists():
            verify_serve_log(tmp_path)  # a consistent snapshot under the writers' lock
            checked += 1
    assert [p.wait() for p in procs] == [0] * 4 and checked > 0
    line = verify_serve_log(tmp_path).line()
    assert ", seq " in line and "..1200), " in line and "older lines pruned by the cap at" in line
    every = [json.loads(x) for p in oldest_first(tmp_path) for x in read(p)]
    assert len({(r["token"], r["i"]) for r in every}) == len(every)  # none twice


def test_sealed_size_is_exact_for_lines_without_extras(tmp_path):
    log = AuditLog(tmp_path, load_audit_key(tmp_path), SMALL, clock=Clock())
    chain = log._chain
    data = b'{"a":1}\n{"time":"x","b":[1,2]}\n'
    with chain.locked():
        chain.sync()
        assert chain.sealed_size(data) == len(chain.seal(data))
        chain.rollback()
    log.close()


def test_everything_deleted(chained):
    state, files = chained
    for path in files:
        path.unlink()
    assert problem(state) == f"{state / AUDIT_FILE}: no audit log (its head remains): never written, or deleted"
    (state / AUDIT_HEAD).unlink()
    assert problem(state) == f"{state / AUDIT_FILE}: no audit log (nothing remains): never written, or deleted"
