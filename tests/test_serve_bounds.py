"""`fedcare serve` bounded everywhere a client can push (issue 13 item 1), against a real server over real sockets.

One server with small limits (8 connections, 2 s header and body timeouts, 1 s keep-alive) for the
attacks; one more under a 256 open-file limit with the default connection limit. Behaviour is
asserted (the refusal, its status, that the connection closes, that others are served meanwhile),
never a tight time budget; speed is bench/serve_attacks.py's.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from deploy.flower import free_port

from .conftest import ROOT
from .test_serve import ServerProcess, add_token, build_world, fedcare_main

MAX_CONNECTIONS = 8
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
KEEP_ALIVE = 1.0
MARGIN = 3.0  # seconds beyond a timeout before a test calls it broken (a loaded 2-core machine)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "serve-world")


@pytest.fixture(scope="module")
def token(world):
    return add_token(world.hospital, "bounds-test", "analyze")


@pytest.fixture(scope="module")
def server(world, token):
    proc = ServerProcess(world.package, world.hospital, world.root / "logs",
                         "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(HEADER_TIMEOUT),
                         "--body-timeout", str(BODY_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def analyze(server, world, token) -> httpx.Response:
    """One authenticated POST /v1/analyze on a fresh connection (closed afterwards)."""
    values = {f.name: round((f.low + f.high) / 2, 3) for f in world.study.features}
    return httpx.post(f"{server.base_url}/v1/analyze", timeout=10, headers={"Authorization": f"Bearer {token}"},
                      json={"patient_id": "bounds", "features": values})


def connect(server, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_answer(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """(everything the server sent, whether it then closed the connection) within `timeout`."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole response (head and Content-Length body) from a keep-alive connection."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-body: {data!r}"
        body += chunk
    assert len(body) == length
    return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """(what arrived, seconds until the server closed the connection, or None if it did not within timeout)."""
    start = time.monotonic()
    data, closed = read_answer(sock, timeout)
    return data, (time.monotonic() - start) if closed else None


def settle() -> None:
    time.sleep(0.3)  # the server sees the previous test's sockets close


# -- startup and flags -----------------------------------------------------------------------------


def test_startup_states_the_limits(server):
    line = next(line for line in server.stdout.splitlines() if line.startswith("fedcare serve: limits: "))
    assert f"{MAX_CONNECTIONS} connections (open-file limit " in line
    assert "request head 16 KiB / 100 fields / request line 8 KiB, body 64 KiB" in line
    assert "header timeout 2 s, body timeout 2 s, keep-alive 1 s" in line
    assert "503 Retry-After 2" in line


@pytest.mark.parametrize("flag,value,error", [
    ("--max-connections", "0", "--max-connections: expected a positive number, got 0"),
    ("--header-timeout", "0", "--header-timeout: expected seconds in (0, 3600], got 0"),
    ("--body-timeout", "nan", "--body-timeout: expected seconds in (0, 3600], got nan"),
    ("--keep-alive-timeout", "-1", "--keep-alive-timeout: expected seconds in (0, 3600], got -1"),
])
def test_bad_limit_flags_are_one_named_line(world, flag, value, error):
    status, out, err = fedcare_main("serve", "--package", str(world.package), "--kit", str(world.hospital),
                                    "--port", str(free_port()), flag, value)
    assert (status, out, err) == (2, "", f"fedcare: error: {error}\n")


def test_max_connections_above_the_open_file_limit_is_refused(world):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    too_many = 10**7 if hard == resource.RLIM_INFINITY else hard + 1000
    status, _, err = fedcare_main("serve", "--package", str(world.package), "--kit", str(world.hospital),
                                  "--port", str(free_port()), "--max-connections", str(too_many))
    assert status == 2
    assert err.startswith(f"fedcare: error: --max-connections: {too_many} does not fit under the open-file limit")
    assert err.count("\n") == 1


# -- request heads -----------------------------------------------------------------------------------


def test_oversized_header_is_refused_while_others_are_served(server, world, token):
    settle()
    attacker = connect(server)
    sent, stopped = [0], threading.Event()

    def stream() -> None:  # a 64 MiB header, as fast as the socket takes it
        try:
            attacker.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"a" * (1 << 20)
            for _ in range(64):
                attacker.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass
        stopped.set()

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    start = time.monotonic()
    r = analyze(server, world, token)
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert elapsed < 2.0, f"a concurrent request took {elapsed:.2f} s"
    answer, closed = read_answer(attacker, 15)
    assert status_of(answer) == 431
    assert b"connection: close" in answer.lower()
    assert answer.endswith(b'{"detail":"the request head is larger than 16384 bytes"}')
    assert closed
    assert stopped.wait(15) and sent[0] < 64 << 20  # the server stopped reading long before 64 MiB
    attacker.close()
    assert analyze(server, world, token).status_code == 200


def test_too_many_header_fields_are_refused(server, world, token):
    settle()
    with connect(server) as sock:
        fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(101))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        answer, closed = read_answer(sock)
    assert status_of(answer) == 431 and closed
    assert answer.endswith(b'{"detail":"more than 100 header fields"}')
    with connect(server) as sock:  # 100 fields in all is fine
        fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(98))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n")
        answer, _ = read_answer(sock)
    assert status_of(answer) == 200


def test_long_request_line_is_refused(server, world, token):
    settle()
    before = refused_by_bounds(server, token)
    with connect(server) as sock:
        sock.sendall(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, closed = read_answer(sock)
    assert status_of(answer) == 414 and closed
    assert answer.endswith(b'{"detail":"the request line is longer than 8192 bytes"}')
    with connect(server) as sock:  # the same line, slowly: refused as soon as it passes the limit
        sock.sendall(b"GET /" + b"a" * 5000)
        time.sleep(0.1)
        sock.sendall(b"a" * 5000)
        answer, closed = read_answer(sock)
    assert status_of(answer) == 414 and closed
    assert analyze(server, world, token).status_code == 200
    assert refused_by_bounds(server, token) - before == 2  # counted in /metrics (no token: never audited)


def test_head_split_anywhere_is_served(server):
    """The head counting finds the end of a head cut into 1-byte reads (and the CRLF of the request line)."""
    settle()
    with connect(server) as sock:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n":
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        answer, closed = read_answer(sock)
    assert status_of(answer) == 200 and closed


# -- slow, silent and idle connections -----------------------------------------------------------


def test_slowloris_head_is_closed_within_the_header_timeout(server, world, token):
    settle()
    sock = connect(server)
    start = time.monotonic()
    closed_after = None
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        for byte in b"X-Slow: " + b"s" * 100:  # one byte every 0.25 s: would take 27 s
            if time.monotonic() - start > HEADER_TIMEOUT + MARGIN:
                break
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
    except OSError:
        pass
    answer, seconds = wait_closed(sock, HEADER_TIMEOUT + MARGIN)
    closed_after = time.monotonic() - start
    sock.close()
    assert seconds is not None, "the server kept a slowloris connection open"
    assert closed_after < HEADER_TIMEOUT + MARGIN
    assert status_of(answer) == 408
    assert answer.endswith(b'{"detail":"the request head did not arrive within 2 s"}')
    assert analyze(server, world, token).status_code == 200


def test_slow_body_is_closed_within_the_body_timeout(server, world, token):
    settle()
    with connect(server) as sock:
        sock.sendall(f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{".encode())
        answer, seconds = wait_closed(sock, BODY_TIMEOUT + MARGIN)
    assert seconds is not None and status_of(answer) == 408
    assert answer.endswith(b'{"detail":"the request body did not arrive within 2 s"}')


def test_silent_connection_is_closed_after_the_header_timeout(server):
    settle()
    with connect(server) as sock:
        answer, seconds = wait_closed(sock, HEADER_TIMEOUT + MARGIN)
    assert seconds is not None and answer == b""  # closed without an answer: it never asked anything
    assert seconds > HEADER_TIMEOUT * 0.5


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(server):
    settle()
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        start = time.monotonic()
        rest, seconds = wait_closed(sock, KEEP_ALIVE + MARGIN)
    assert seconds is not None and rest == b""
    assert time.monotonic() - start >= KEEP_ALIVE * 0.5


def test_keep_alive_serves_several_requests(server):
    settle()
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(read_response(sock)) == 200
            time.sleep(KEEP_ALIVE * 0.3)


# -- the connection limit --------------------------------------------------------------------------


def test_silent_connections_past_the_limit_make_room_for_requests(server, world, token):
    """limit + 4 connections that send nothing: the oldest idle ones are closed; requests are still served."""
    settle()
    silent = [connect(server) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        time.sleep(0.3)
        for _ in range(3):
            assert analyze(server, world, token).status_code == 200
        closed = 0
        for sock in silent:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 4 + 3  # 4 over the limit, and one for each request
    finally:
        for sock in silent:
            sock.close()
    settle()
    assert analyze(server, world, token).status_code == 200


def metric_values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("fedcare_serve_")}


def refused_by_bounds(server, token) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5).text
    return metric_values(text)["fedcare_serve_requests_refused_by_bounds_total"]


def test_busy_connections_at_the_limit_get_503_with_retry_after(server, world, token):
    """Every connection is mid-request (a slow head): a new one gets 503 + Retry-After and is closed."""
    settle()
    busy = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = connect(server)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            busy.append(sock)
        time.sleep(0.2)
        refused = []
        for _ in range(3):
            with connect(server) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                refused.append(read_answer(sock, 5))
        for answer, closed in refused:
            assert status_of(answer) == 503 and closed
            head = answer.lower()
            assert b"retry-after: 2\r\n" in head and b"connection: close\r\n" in head
            assert answer.endswith(b'{"detail":"the service is at its connection limit; retry later"}')
    finally:
        for sock in busy:
            sock.close()
    settle()
    assert analyze(server, world, token).status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5).text
    refused = metric_values(metrics)
    assert refused['fedcare_serve_connections_refused_total{reason="busy"}'] >= 3  # the three above, at least
    assert refused["fedcare_serve_connections_limit"] == MAX_CONNECTIONS


# -- at a low open-file limit, with the default connection limit ---------------------------------


class LowFileLimitServer(ServerProcess):
    """`fedcare serve` under RLIMIT_NOFILE 256 (set in the child only)."""

    def __init__(self, package, kit, log_dir, nofile: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / f"serve-{self.port}.out", log_dir / f"serve-{self.port}.err"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve", "--package", str(package), "--kit", str(kit),
                 "--port", str(self.port), "--header-timeout", "3"],
                cwd=ROOT, stdout=out, stderr=err, env=env, preexec_fn=limit)


def test_more_silent_connections_than_open_files(world, token):
    """The measured failure: more silent connections than the process has file descriptors. The server
    stays under its limit, keeps answering, and logs no accept errors."""
    proc = LowFileLimitServer(world.package, world.hospital, world.root / "logs", 256)
    silent: list[socket.socket] = []
    try:
        proc.wait_ready()
        line = next(line for line in proc.stdout.splitlines() if line.startswith("fedcare serve: limits: "))
        count = int(line.split("limits: ")[1].split()[0])
        assert 0 < count < 256 and "(open-file limit 256;" in line
        for _ in range(300):
            silent.append(socket.create_connection(("127.0.0.1", proc.port), timeout=10))
        time.sleep(0.5)
        for _ in range(5):
            assert analyze(proc, world, token).status_code == 200
    finally:
        for sock in silent:
            sock.close()
        proc.stop()
    assert proc.proc.returncode == 0
    assert "Too many open files" not in proc.stderr


# -- stopping --------------------------------------------------------------------------------------


def test_sigterm_stops_gracefully_and_says_so(server, world, token):
    """Last: SIGTERM with an idle keep-alive and a slow connection open; the stopped line, exit 0, audit closed."""
    assert analyze(server, world, token).status_code == 200
    idle, slow = connect(server), connect(server)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    status = server.proc.wait(timeout=30)
    idle.close()
    slow.close()
    assert status == 0, server.stderr
    assert server.stdout.splitlines()[-1] == "fedcare serve: stopped"
    assert "Traceback" not in server.stderr
    audit = world.hospital / "state" / "serve-audit.jsonl"
    assert audit.read_text().endswith("\n")  # flushed and closed: the last record is whole
