"""A throwaway PostgreSQL cluster for tests: `PostgresCluster` and the `postgres_cluster` fixture.

The cluster lives in its own temporary directory (data, unix socket, log, password file), listens
on a random free port of 127.0.0.1 only, and takes scram-sha-256 password logins over TCP (a local
socket login is trusted, for the bootstrap superuser only). Debian's server binaries are found by
globbing /usr/lib/postgresql/*/bin (the newest major version wins); when they are missing, starting
fails with a message saying what to install: a test that needs a database never skips silently.

initdb refuses to run as root, so when the tests run as root every server command runs as the
`postgres` system user (`runuser -u postgres -- ...`) and the directory is handed to it.

Usage, in a test module:

    from .postgres import postgres_cluster  # noqa: F401  (a session fixture: one cluster per process)

    def test_x(postgres_cluster):
        postgres_cluster.create_database("cdm")
        with psycopg.connect(postgres_cluster.superuser_conninfo(dbname="cdm")) as conn: ...

Each pytest-xdist worker is its own process, so each gets its own cluster on its own port.
`cluster_fixture(scope)` makes a fixture of another scope.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVICE_USER = "postgres"
SUPERUSER = "postgres"
START_TIMEOUT_SECONDS = 60
PORT_ATTEMPTS = 5


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries missing, or the server did not come up)."""


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb, pg_ctl and postgres."""
    found = []
    for candidate in glob.glob(BIN_GLOB):
        path = Path(candidate)
        if all(os.access(path / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            match = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/bin$", candidate)
            found.append(((int(match[1]), int(match[2] or 0)) if match else (0, 0), path))
    if not found:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under {BIN_GLOB}: install the "
            "Debian package 'postgresql' (apt-get install postgresql; .ci/run does it)")
    return max(found)[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL cluster in a temporary directory, owned by this process.

    `start()` runs initdb and pg_ctl start (retrying on another port if the one picked was taken);
    `stop()` stops it (`pg_ctl stop -m fast`, then SIGKILL to the postmaster it started if that is
    still alive) and removes the directory. The superuser's password is random, given to initdb
    with --pwfile and never logged.
    """

    def __init__(self, base_dir: str | Path | None = None) -> None:
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.superuser = SUPERUSER
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.root: Path | None = None
        self.bin_dir: Path | None = None
        self.postmaster_pid: int | None = None
        self._as_service_user = os.geteuid() == 0

    # paths

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "server.log"

    # lifecycle

    def start(self) -> PostgresCluster:
        """initdb + start; returns self. Raises `PostgresUnavailable` with the reason."""
        if self.postmaster_pid is not None:
            return self
        self.bin_dir = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="fedcare-pg-", dir=self.base_dir))
        try:
            self.socket_dir.mkdir()
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n", encoding="utf-8")
            pwfile.chmod(0o600)
            if self._as_service_user:
                shutil.chown(self.root, SERVICE_USER, SERVICE_USER)
                for path in (self.socket_dir, pwfile):
                    shutil.chown(path, SERVICE_USER, SERVICE_USER)
                self._check_reachable()
            self._run("initdb", "-D", str(self.data_dir), "-U", self.superuser, "--pwfile", str(pwfile),
                      "-E", "UTF8", "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256")
            pwfile.unlink()
            (self.data_dir / "pg_hba.conf").write_text(
                "# fedcare test cluster: local socket trusted (bootstrap superuser), TCP by password only\n"
                "local all all trust\n"
                "host all all 127.0.0.1/32 scram-sha-256\n", encoding="utf-8")
            self._start_server()
        except BaseException:
            self._remove()
            raise
        atexit.register(self.stop)
        log.info("PostgreSQL test cluster on 127.0.0.1:%d (%s)", self.port, self.root)
        return self

    def _check_reachable(self) -> None:
        assert self.root is not None
        probe = subprocess.run(["runuser", "-u", SERVICE_USER, "--", "test", "-w", str(self.root)],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            raise PostgresUnavailable(
                f"user {SERVICE_USER} cannot write {self.root} (a parent directory is not traversable by it): "
                "pass a base_dir it can reach, e.g. /tmp")

    def _start_server(self) -> None:
        last = ""
        for _ in range(PORT_ATTEMPTS):
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50 "
                       "-c shared_buffers=32MB -c password_encryption=scram-sha-256")
            result = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
                               "-w", "-t", str(START_TIMEOUT_SECONDS), "start", check=False)
            if result.returncode == 0:
                self.postmaster_pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
                return
            last = self._log_tail()
            if "could not bind" not in last and "in use" not in last:
                break
        raise PostgresUnavailable(f"PostgreSQL did not start (pg_ctl start failed): {last or 'no server log'}")

    def stop(self) -> None:
        """Stop the server (fast shutdown; SIGKILL to its postmaster if it lingers) and remove the directory."""
        pid, self.postmaster_pid = self.postmaster_pid, None
        if pid is not None and self.root is not None and self.data_dir.is_dir():
            self._run("pg_ctl", "-D", str(self.data_dir), "stop", "-m", "fast", "-w", "-t", "30", check=False)
            deadline = time.monotonic() + 5
            while self._is_our_postmaster(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._is_our_postmaster(pid):
                log.warning("PostgreSQL test cluster: postmaster %d still running after pg_ctl stop; killing it", pid)
                os.kill(pid, signal.SIGKILL)
        self._remove()

    def _is_our_postmaster(self, pid: int) -> bool:
        """Whether `pid` is alive and still the postmaster of this data directory (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.data_dir).encode() in cmdline

    def _remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # commands

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        assert self.bin_dir is not None
        argv = [str(self.bin_dir / program), *args]
        if self._as_service_user:
            argv = ["runuser", "-u", SERVICE_USER, "--", *argv]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                                stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_SECONDS + 30)
        if check and result.returncode != 0:
            raise PostgresUnavailable(f"{program} failed ({result.returncode}): "
                                      f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:])
        except OSError:
            return ""

    # connections

    def superuser_conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for the superuser over TCP (password authentication)."""
        from psycopg.conninfo import make_conninfo

        if self.postmaster_pid is None:
            raise PostgresUnavailable("the cluster is not running (call start())")
        return make_conninfo(host="127.0.0.1", port=self.port, user=self.superuser, password=self.password,
                             dbname=dbname, connect_timeout=10)

    def conninfo(self, user: str, password: str, dbname: str = "postgres") -> str:
        """A connection string for another role over TCP."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host="127.0.0.1", port=self.port, user=user, password=password, dbname=dbname,
                             connect_timeout=10)

    def _execute(self, statement: Any, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.superuser_conninfo(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str, *, owner: str | None = None) -> str:
        """CREATE DATABASE `name` (owned by `owner`, default the superuser); returns the name."""
        from psycopg import sql

        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            statement = sql.SQL("{} OWNER {}").format(statement, sql.Identifier(owner))
        self._execute(statement)
        return name

    def create_role(self, name: str, password: str, *, login: bool = True) -> str:
        """CREATE ROLE `name` with a scram-sha-256 password (LOGIN unless `login` is false); returns the name."""
        from psycopg import sql

        self._execute(sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
            sql.Identifier(name), sql.SQL("LOGIN" if login else "NOLOGIN"), sql.Literal(password)))
        return name

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_fixture(scope: str = "session") -> Callable[..., Iterator[PostgresCluster]]:
    """A pytest fixture (of `scope`) yielding a started `PostgresCluster`, stopped afterwards."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _cluster() -> Iterator[PostgresCluster]:
        cluster = PostgresCluster().start()
        try:
            yield cluster
        finally:
            cluster.stop()

    return _cluster


postgres_cluster = cluster_fixture("session")
