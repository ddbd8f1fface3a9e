"""The audit log of `fedcare serve` cannot take the service down, and cannot fill the disk.

In-process: rotation by size and by age, the number of rotated files and the cap on their total,
0600 everywhere, the HMAC pseudonym kept, the rate-limited summary of unauthenticated requests,
a short write truncated back, settings and their one-line refusals. Over real HTTP (a `fedcare
serve` subprocess): a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored; stderr on /dev/full) makes
the audit file unwritable: /v1/analyze answers 503 with the reason and Retry-After, /healthz 503
with the reason, /metrics says why, never a 500; raising the limit again (prlimit) and the
service recovers by itself, the gap recorded in the log. Rotation flags on a live server; a
flood of unauthenticated requests costs no line each.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inference.audit import AUDIT_FILE, AuditConfigError, AuditLog, AuditSettings, AuditUnavailable, parse_age, parse_size

from .test_serve import ROOT, ServerProcess, add_token, build_world, fedcare_main, metric_values, valid_features

KEY = b"k" * 32


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(i: int, log: AuditLog) -> dict:
    return {"token": "clinic", "endpoint": "/v1/analyze", "method": "POST", "status": 200, "model": "int8",
            "latency_ms": 0.5, "patient": log.pseudonym(f"MRN-{i}"), "reason": None, "feature": None,
            "client": "127.0.0.1"}


def audit_files(state: Path) -> list[Path]:
    return sorted(p for p in state.iterdir() if p.name.startswith(AUDIT_FILE))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- in-process: rotation, caps, modes -----------------------------------------------------------


def test_rotates_by_size_keeps_n_and_stays_under_the_cap(tmp_path):
    settings = AuditSettings(max_bytes=4096, keep=3, max_total_bytes=16384)
    log = AuditLog(tmp_path, KEY, settings, clock=Clock())
    for i in range(400):  # ~100 KB of lines
        log.write(record(i, log))
    files = audit_files(tmp_path)
    assert [p.name for p in files] == [AUDIT_FILE, f"{AUDIT_FILE}.1", f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.3"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert all(p.stat().st_size <= 4096 for p in files)
    assert sum(p.stat().st_size for p in files) <= 16384 == settings.max_total_bytes
    assert log.rotations > 20 and log.deleted == log.rotations - 3
    # the newest lines are in the current file, in order, across the rotated ones; patient ids stay HMACs
    newest = [rec for p in reversed(files) for rec in lines(p)]
    expected = [hmac.new(KEY, f"MRN-{i}".encode(), hashlib.sha256).hexdigest() for i in range(400)][-len(newest):]
    assert [rec["patient"] for rec in newest] == expected
    assert "MRN-" not in "".join(p.read_text() for p in files)
    log.close()


def test_total_cap_deletes_oldest_before_keep(tmp_path):
    settings = AuditSettings(max_bytes=4096, keep=100, max_total_bytes=3 * 4096)  # room for 2 rotated files
    log = AuditLog(tmp_path, KEY, settings, clock=Clock())
    for i in range(300):
        log.write(record(i, log))
    files = audit_files(tmp_path)
    assert [p.name for p in files] == [AUDIT_FILE, f"{AUDIT_FILE}.1", f"{AUDIT_FILE}.2"]
    assert log.disk_bytes() == sum(p.stat().st_size for p in files) <= settings.max_total_bytes


def test_rotates_by_age_and_resumes_the_age_of_an_existing_file(tmp_path):
    clock = Clock()
    settings = AuditSettings(max_age=3600, keep=5)
    log = AuditLog(tmp_path, KEY, settings, clock=clock)
    log.write(record(0, log))
    clock.now += 1800
    log.write(record(1, log))
    assert log.rotations == 0
    log.close()
    # a restarted service takes the file's age from its first line
    clock.now += 1000
    log = AuditLog(tmp_path, KEY, settings, clock=clock)
    log.write(record(2, log))
    assert log.rotations == 0
    clock.now += 900  # 3700 s after the first line
    log.write(record(3, log))
    assert log.rotations == 1
    assert [len(lines(p)) for p in audit_files(tmp_path)] == [1, 3]
    clock.now += 7200  # idle for longer than max_age: the next line rotates again
    log.write(record(4, log))
    assert log.rotations == 2


def test_startup_applies_smaller_limits_to_existing_files(tmp_path):
    log = AuditLog(tmp_path, KEY, AuditSettings(max_bytes=4096, keep=10, max_total_bytes=10**6), clock=Clock())
    for i in range(400):
        log.write(record(i, log))
    log.close()
    assert len(audit_files(tmp_path)) == 11
    AuditLog(tmp_path, KEY, AuditSettings(max_bytes=4096, keep=2, max_total_bytes=10**6)).close()
    assert [p.name for p in audit_files(tmp_path)] == [AUDIT_FILE, f"{AUDIT_FILE}.1", f"{AUDIT_FILE}.2"]


def test_two_services_on_one_kit_follow_each_others_rotation(tmp_path):
    settings = AuditSettings(max_bytes=4096, keep=50, max_total_bytes=10**6)
    a, b = (AuditLog(tmp_path, KEY, settings, clock=Clock()) for _ in range(2))
    for i in range(300):
        (a if i % 2 else b).write(record(i, log=a))
    files = audit_files(tmp_path)
    every = [rec["patient"] for p in files for rec in lines(p)]
    assert len(every) == 300 and len(set(every)) == 300  # no line lost, none twice
    assert all(p.stat().st_size <= 2 * 4096 for p in files)


def test_unauthenticated_requests_are_summarized_at_most_once_a_second(tmp_path):
    clock = Clock()
    log = AuditLog(tmp_path, KEY, AuditSettings(), clock=clock)
    for i in range(10_000):
        clock.now += 0.0003  # 3 s of a flood from many addresses
        log.unauthenticated("/v1/analyze", "bad_token" if i % 3 else "no_token", f"10.0.{i // 256 % 256}.{i % 256}")
    log.write(record(1, log))
    clock.now += 2
    log.tick()
    recs = lines(tmp_path / AUDIT_FILE)
    summaries = [r for r in recs if r.get("event") == "unauthenticated"]
    assert 3 <= len(summaries) <= 5 and len(recs) == len(summaries) + 1
    assert sum(r["count"] for r in summaries) == 10_000
    assert sum(r["reasons"].get("no_token", 0) for r in summaries) == 3334
    assert all(len(r["clients"]) <= 17 for r in summaries)  # 16 addresses and "others"
    assert (tmp_path / AUDIT_FILE).stat().st_size < 10_000  # vs ~2.6 MB at one line per request
    assert log.unauthenticated_total == {"bad_token": 6666, "no_token": 3334}


def test_settings_parse_and_refuse_in_one_line():
    assert parse_size("64M", "x") == 64 * 1024**2 and parse_size("4k", "x") == 4096 and parse_size("100", "x") == 100
    assert parse_age("24h", "x") == 86400 and parse_age("90", "x") == 90 and parse_age("1.5m", "x") == 90
    assert AuditSettings.from_env({"FEDCARE_SERVE_AUDIT_MAX_SIZE": "8K", "FEDCARE_SERVE_AUDIT_KEEP": "2"}) == \
        AuditSettings(max_bytes=8192, keep=2)
    assert AuditSettings.resolve({"keep": "4"}, {"FEDCARE_SERVE_AUDIT_KEEP": "2"}).keep == 4
    with pytest.raises(AuditConfigError, match=r"^FEDCARE_SERVE_AUDIT_MAX_SIZE: 'lots' is not a size"):
        AuditSettings.from_env({"FEDCARE_SERVE_AUDIT_MAX_SIZE": "lots"})
    with pytest.raises(AuditConfigError, match=r"^--audit-max-total: 8192 bytes is less than twice --audit-max-size"):
        AuditSettings.resolve({"max_bytes": "8K", "max_total_bytes": "8K"}, {})
    with pytest.raises(AuditConfigError, match=r"^--audit-max-size: 100 bytes is too small"):
        AuditSettings.resolve({"max_bytes": "100"}, {})


def test_serve_flag_refusal_is_one_line(world):
    status, out, err = fedcare_main("serve", "--package", str(world.package), "--kit", str(world.hospital),
                                    "--audit-keep", "0")
    assert (status, out, err) == (2, "", "fedcare: error: --audit-keep: 0 is not between 1 and 10000\n")


def test_short_write_is_truncated_back_and_failure_recovers(tmp_path):
    """In a child process with RLIMIT_FSIZE: the line that crosses the limit is not left half-written."""
    code = f"""
import json, resource, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from inference.audit import AuditLog, AuditUnavailable
log = AuditLog({str(tmp_path)!r}, b"k" * 32)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))
ok = failed = 0
for i in range(100):
    try:
        log.write({{"i": i, "pad": "x" * 200}})
        ok += 1
    except AuditUnavailable as err:
        failed += 1
        reason = err.reason
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
still = log.check()  # retried at most once a second
time.sleep(1.05)
failure = log.check()
log.write({{"i": "after"}})
print(json.dumps({{"ok": ok, "failed": failed, "reason": reason, "still": still, "failure_after": failure,
                  "write_failures": log.write_failures}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] > 10 and result["failed"] > 10 and result["reason"] == "File too large"
    assert result["still"] == "File too large" and result["failure_after"] is None  # recovered
    assert "audit log" in proc.stderr and "cannot be written (File too large)" in proc.stderr
    recs = lines(tmp_path / AUDIT_FILE)  # every line parses: the crossing line was truncated back
    assert [r["i"] for r in recs if "i" in r] == [*range(result["ok"]), "after"]
    resumed = [r for r in recs if r.get("event") == "audit_resumed"]
    assert len(resumed) == 1 and resumed[0]["reason"] == "File too large"


# -- over real HTTP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "serve-world")


def fresh_kit(world, name: str) -> tuple[Path, str]:
    """A copy of the hospital kit with an empty state directory (its own audit log) and a token."""
    kit = world.root / name
    shutil.rmtree(kit, ignore_errors=True)
    shutil.copytree(world.hospital, kit, ignore=shutil.ignore_patterns("state"))
    return kit, add_token(kit, "clinic", "analyze", "models")


class LimitedServer(ServerProcess):
    """`fedcare serve` whose files may grow to `limit` bytes (RLIMIT_FSIZE soft limit, SIGXFSZ ignored)
    and whose stderr is /dev/full: both the audit log and stderr end up unwritable."""

    def __init__(self, package: Path, kit: Path, log_dir: Path, limit: int) -> None:
        from deploy.flower import free_port

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"serve-{self.port}.out"
        self.stderr_path = Path("/dev/full")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

        def limit_files() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death (Python ignores it too)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        with open(self.stdout_path, "wb") as out, open("/dev/full", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve", "--package", str(package), "--kit", str(kit),
                 "--port", str(self.port)],
                cwd=ROOT, stdout=out, stderr=err, env=env, preexec_fn=limit_files)

    @property
    def stderr(self) -> str:
        return "(stderr is /dev/full)"

    def set_limit(self, limit: int) -> None:
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_full_disk_fails_closed_and_visibly_then_recovers(world):
    kit, token = fresh_kit(world, "kit-full-disk")
    limit = 16_384
    server = LimitedServer(world.package, kit, world.root / "logs-audit", limit)
    try:
        server.wait_ready()
        auth = {"Authorization": f"Bearer {token}"}
        body = {"patient_id": "MRN-FULL-1", "features": valid_features(world)}
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            statuses = []
            for _ in range(200):
                r = client.post("/v1/analyze", json=body, headers=auth)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    break
            assert statuses[:-1] == [200] * (len(statuses) - 1) and len(statuses) > 20
            reason = "audit log cannot be written: File too large"
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5" and r.headers["content-type"] == "application/json"
            assert r.json()["reason"] == reason and r.json()["detail"].startswith(reason)
            # stays closed: analyze (any outcome), models; the health check says why
            for _ in range(5):
                r = client.post("/v1/analyze", json=body, headers=auth)
                assert (r.status_code, r.json()["reason"]) == (503, reason)
            r = client.post("/v1/analyze", json={**body, "model": "fp16"}, headers=auth)
            assert r.status_code == 503
            assert client.get("/v1/models", headers=auth).status_code == 503
            health = client.get("/healthz")
            assert health.status_code == 503 and health.headers["retry-after"] == "5"
            assert health.json() | {"model_version": None, "provider": None} == {
                "status": "unhealthy", "reason": reason, "model_version": None, "provider": None}
            # without a valid token nothing is audited per request: still a 401
            assert client.post("/v1/analyze", json=body).status_code == 401
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            values = metric_values(metrics.text)
            assert values["fedcare_serve_audit_writable"] == 0
            assert values['fedcare_serve_audit_failure{reason="File too large"}'] == 1
            assert values["fedcare_serve_audit_refused_total"] >= 8
            assert values["fedcare_serve_audit_write_failures_total"] >= 8
            assert values['fedcare_serve_requests_total{endpoint="/v1/analyze",method="POST",code="503"}'] >= 7
            assert values["fedcare_serve_unhandled_errors_total"] == 0
            assert not [k for k in values if 'code="500"' in k]
            assert (kit / "state" / AUDIT_FILE).stat().st_size <= limit

            # room again: the service recovers by itself (the next request, or /healthz, retries)
            server.set_limit(resource.RLIM_INFINITY)
            deadline = time.monotonic() + 10
            while client.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert client.get("/healthz").json()["status"] == "ok"
            r = client.post("/v1/analyze", json={**body, "patient_id": "MRN-FULL-2"}, headers=auth)
            assert r.status_code == 200
            values = metric_values(client.get("/metrics").text)
            assert values["fedcare_serve_audit_writable"] == 1
            assert not [k for k in values if k.startswith("fedcare_serve_audit_failure{")]
        recs = lines(kit / "state" / AUDIT_FILE)  # every line parses: no half-written line at the limit
        resumed = [r for r in recs if r.get("event") == "audit_resumed"]
        assert len(resumed) == 1 and resumed[0]["reason"] == "File too large" and resumed[0]["refused"] >= 8
        key = (kit / "state" / "audit.key").read_bytes()
        last = hmac.new(key, b"MRN-FULL-2", hashlib.sha256).hexdigest()
        assert recs[-1]["patient"] == last and recs[-1]["status"] == 200
        assert "MRN-FULL" not in (kit / "state" / AUDIT_FILE).read_text()
        assert server.proc.poll() is None  # alive throughout
    finally:
        server.stop()


def test_rotation_flags_on_a_live_server(world):
    kit, token = fresh_kit(world, "kit-rotation")
    server = ServerProcess(world.package, kit, world.root / "logs-audit", "--audit-max-size", "4K",
                           "--audit-keep", "3", "--audit-max-total", "16K")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
            for i in range(150):
                assert c.post("/v1/analyze", json={"patient_id": f"p{i}", "features": valid_features(world)}).status_code == 200
            values = metric_values(c.get("/metrics").text)
        files = audit_files(kit / "state")
        assert [p.name for p in files] == [AUDIT_FILE, f"{AUDIT_FILE}.1", f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.3"]
        sizes = [p.stat().st_size for p in files]
        assert max(sizes) <= 4096 and sum(sizes) <= 16 * 1024
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
        assert values["fedcare_serve_audit_rotations_total"] >= 8
        assert values["fedcare_serve_audit_bytes"] <= values["fedcare_serve_audit_max_bytes"] == 16 * 1024
        assert server.stderr == ""
    finally:
        server.stop()


def test_unauthenticated_flood_writes_summaries_only(world):
    kit, token = fresh_kit(world, "kit-flood")
    server = ServerProcess(world.package, kit, world.root / "logs-audit")
    try:
        server.wait_ready()
        audit = kit / "state" / AUDIT_FILE
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            before = audit.stat().st_size
            start = time.monotonic()
            for i in range(600):
                headers = {"Authorization": "Bearer wrong"} if i % 2 else {}
                assert c.post("/v1/analyze", json={"patient_id": "p"}, headers=headers).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            seconds = time.monotonic() - start
            time.sleep(1.1)
            assert c.get("/healthz").status_code == 200  # flushes the summary that is due
            values = metric_values(c.get("/metrics").text)
        assert values['fedcare_serve_unauthenticated_total{reason="bad_token"}'] == 301
        assert values['fedcare_serve_unauthenticated_total{reason="no_token"}'] == 300
        summaries = lines(audit)
        assert all(r["event"] == "unauthenticated" for r in summaries)
        assert sum(r["count"] for r in summaries) == 601
        assert len(summaries) <= seconds + 3  # at most one a second (plus the first and the last)
        assert audit.stat().st_size - before < 400 * (seconds + 3)  # vs ~156 KB at one line per request
    finally:
        server.stop()
