"""A site whose data lives in PostgreSQL: where it is (`DatabaseSource`), how the node connects
(`connect`: read-only, checked), and which split a patient falls in (`assign_split`).

A site says where its database is in `database.toml` (a `[database]` table) in its data folder, or
passes that file, or a `postgresql://user@host:port/dbname?cdm_schema=…` URL, as `--data`:

    [database]
    kind = "omop"                       # "omop": an OMOP CDM (client/omop.py); "sql": a query the site owns
    host = "cdm.hospital.internal"
    port = 5432
    dbname = "cdm"
    user = "fedcare_reader"
    password_file = "/etc/fedcare/cdm.pass"   # or password_env = "FEDCARE_CDM_PASSWORD"
    sslmode = "verify-full"            # default off loopback; "prefer" on loopback
    sslrootcert = "/etc/fedcare/cdm-ca.pem"
    cdm_schema = "cdm"
    vocabulary_schema = "vocab"        # default: cdm_schema
    test_fraction = 0.2                # the share of patients held out for evaluation
    # kind = "sql": query = "SELECT …" or query_file = "cohort.sql", one row per patient with
    # patient_id, the study's feature columns and its label column

A password never sits in the file, the URL or the command line, and is never logged. The node
refuses a role that can write (`check_read_only`: superuser, CREATEROLE/CREATEDB, CREATE on the
database or a schema, INSERT/UPDATE/DELETE/TRUNCATE/TRIGGER on any table), and reads inside
read-only transactions of a read-only session anyway.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import tomllib
import urllib.parse
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from client.tables import SiteDataError
from fedcare.fields import Fields

log = logging.getLogger(__name__)

SOURCE_FILE = "database.toml"
APPLICATION_NAME = "fedcare-site"
CONNECT_TIMEOUT_SECONDS = 15
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TEST_SCALE = 2 ** 64


class DatabaseSourceError(SiteDataError):
    """The database source is misconfigured, unreachable, or not safe to read (the message says which)."""


class SourceKind(str, Enum):
    OMOP = "omop"  # an OMOP CDM v5.4 schema and its vocabulary, mapped by the study's [omop]
    SQL = "sql"  # the site's own query: one row per patient with the study's columns


class Split(str, Enum):
    TRAIN = "train"
    TEST = "test"


def assign_split(patient_id: int | str, test_fraction: float) -> Split:
    """The split of one patient: a hash of its id, so it never changes between reads or runs."""
    digest = hashlib.sha256(b"fedcare-split\0" + str(patient_id).encode()).digest()
    return Split.TEST if int.from_bytes(digest[:8], "big") < test_fraction * _TEST_SCALE else Split.TRAIN


@dataclass(frozen=True)
class DatabaseSource:
    """Where a site's database is and how to read it (no secret: the password is read when connecting)."""

    kind: SourceKind
    host: str
    port: int
    dbname: str
    user: str
    cdm_schema: str
    vocabulary_schema: str
    password_file: Path | None = None
    password_env: str | None = None
    sslmode: str = "verify-full"
    sslrootcert: Path | None = None
    query: str | None = None  # kind sql
    test_fraction: float = 0.2
    insecure_tls: bool = False  # a weaker sslmode than verify-ca off loopback, allowed explicitly (warned)
    origin: str = SOURCE_FILE  # where it was declared, for messages

    def describe(self) -> str:
        """Where the data is, without a secret (for reports and logs)."""
        where = f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"
        if self.kind is SourceKind.OMOP:
            return f"{where} (OMOP CDM schema {self.cdm_schema}, vocabulary {self.vocabulary_schema})"
        return f"{where} (the site's query)"


def is_database_path(path: str | Path) -> bool:
    """Whether a site's `data` names a database source: a .toml file, or a folder holding database.toml."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".toml") or (path / SOURCE_FILE).is_file()


def load_database_source(path: str | Path) -> DatabaseSource:
    """The `[database]` table of `path` (a database.toml, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SOURCE_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatabaseSourceError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DatabaseSourceError(f"{path}: not a readable TOML file: {err}") from None
    fields = Fields(str(path), DatabaseSourceError)
    table = fields.table(raw, "[database]")
    return _source(fields, table, base=path.parent, origin=str(path))


_KEYS = ("kind", "host", "port", "dbname", "user", "password_file", "password_env", "sslmode", "sslrootcert", "insecure_tls",
         "cdm_schema", "vocabulary_schema", "query", "query_file", "test_fraction")


def _source(fields: Fields, table: dict[str, Any], *, base: Path, origin: str, at: str = "database") -> DatabaseSource:
    if "password" in table:
        raise fields.fail(f"{at}.password", "a password is never written here: use password_file or password_env")
    fields.no_unknown_keys(table, at, _KEYS)
    kind = SourceKind(fields.choice(table, f"{at}.kind", tuple(k.value for k in SourceKind)))
    host = fields.string(table, f"{at}.host", "127.0.0.1", non_empty=True)
    loopback = is_loopback(host)
    port = fields.integer(table, f"{at}.port", minimum=1, default=5432)
    if port > 65535:
        raise fields.fail(f"{at}.port", f"must be <= 65535, got {port}")
    password_file = password_env = None
    if "password_file" in table and "password_env" in table:
        raise fields.fail(f"{at}.password_env", "give password_file or password_env, not both")
    if "password_file" in table:
        password_file = _path(Path(fields.string(table, f"{at}.password_file", non_empty=True)), base)
    if "password_env" in table:
        password_env = fields.string(table, f"{at}.password_env", non_empty=True)
    cdm_schema = _identifier(fields, table, f"{at}.cdm_schema", "cdm")
    query = None
    if kind is SourceKind.SQL:
        if ("query" in table) == ("query_file" in table):
            raise fields.fail(f"{at}.query", "kind 'sql' needs exactly one of query and query_file")
        if "query" in table:
            query = fields.string(table, f"{at}.query", non_empty=True)
        else:
            query_path = _path(Path(fields.string(table, f"{at}.query_file", non_empty=True)), base)
            try:
                query = query_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise fields.fail(f"{at}.query_file", f"cannot read {query_path}: {err}") from None
    elif "query" in table or "query_file" in table:
        raise fields.fail(f"{at}.query", "only kind 'sql' runs a query (kind 'omop' reads the CDM by the study's [omop])")
    test_fraction = float(fields.number(table, f"{at}.test_fraction", minimum=0.0, below=1.0, default=0.2))
    sslmode = fields.choice(table, f"{at}.sslmode", SSL_MODES, "prefer" if loopback else "verify-full")
    insecure_tls = fields.boolean(table, f"{at}.insecure_tls", default=False)
    if not loopback and sslmode not in ("verify-ca", "verify-full"):
        if not insecure_tls:
            raise fields.fail(f"{at}.sslmode", f"'{sslmode}' to {host} does not verify the server: whoever is in the "
                                               "middle could ask for the password in clear. Use verify-full (with "
                                               "sslrootcert), or set insecure_tls = true for a trial")
        log.warning("INSECURE: %s: sslmode '%s' to %s (insecure_tls = true): the database server is not verified, "
                    "and the password can be taken by whoever is in the middle", origin, sslmode, host)
    source = DatabaseSource(
        kind=kind, host=host, port=port, dbname=fields.string(table, f"{at}.dbname", non_empty=True),
        user=fields.string(table, f"{at}.user", non_empty=True), cdm_schema=cdm_schema,
        vocabulary_schema=_identifier(fields, table, f"{at}.vocabulary_schema", cdm_schema),
        password_file=password_file, password_env=password_env, sslmode=sslmode,
        sslrootcert=_sslrootcert(fields.string(table, f"{at}.sslrootcert", non_empty=True), base)
        if "sslrootcert" in table else None,
        query=query, test_fraction=test_fraction, origin=origin, insecure_tls=insecure_tls,
    )
    return source


def source_from_url(url: str) -> DatabaseSource:
    """`postgresql://user@host:port/dbname?kind=omop&cdm_schema=cdm&password_file=…` as a source.
    A password in the URL is refused (it would sit in the shell history and the process list)."""
    fields = Fields("--data", DatabaseSourceError)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise fields.fail("scheme", f"expected postgresql://, got {parts.scheme or 'none'}://")
    if parts.password is not None:
        raise DatabaseSourceError("--data: a password is never given on the command line: "
                                  "add ?password_file=PATH or ?password_env=NAME to the URL")
    try:
        port = parts.port
    except ValueError:
        raise fields.fail("port", f"not a port number in {parts.netloc!r}") from None
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    table: dict[str, Any] = {key: values[-1] for key, values in query.items()}
    for key in ("test_fraction",):
        if key in table:
            try:
                table[key] = float(table[key])
            except ValueError:
                raise fields.fail(key, f"expected a number, got {table[key]!r}") from None
    table.setdefault("kind", "omop")
    table.update({"host": parts.hostname or "127.0.0.1", "dbname": parts.path.lstrip("/"),
                  "user": urllib.parse.unquote(parts.username or "")})
    if port is not None:
        table["port"] = port
    for key in ("dbname", "user"):
        if not table[key]:
            raise fields.fail(key, f"missing in the URL (postgresql://USER@HOST:PORT/DBNAME), got {url.split('?')[0]!r}")
    return _source(fields, table, base=Path.cwd(), origin="--data", at="url")


def is_database_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def data_argument(text: str, *, state_dir: Path) -> Path:
    """A site's `--data` as a path: a `postgresql://` URL becomes `<state_dir>/database.toml`
    (written each time, no secret in it); anything else is the path it names."""
    if not is_database_url(text):
        return Path(text)
    source = source_from_url(text)
    state_dir.mkdir(parents=True, exist_ok=True)
    return write_database_source(source, state_dir / SOURCE_FILE)


def write_database_source(source: DatabaseSource, path: Path) -> Path:
    """`source` as a database.toml (no secret in it) that `load_database_source` reads back."""
    def quoted(value: object) -> str:
        return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string

    lines = ["[database]", f"kind = {quoted(source.kind.value)}", f"host = {quoted(source.host)}",
             f"port = {source.port}", f"dbname = {quoted(source.dbname)}", f"user = {quoted(source.user)}",
             f"cdm_schema = {quoted(source.cdm_schema)}", f"vocabulary_schema = {quoted(source.vocabulary_schema)}",
             f"sslmode = {quoted(source.sslmode)}", f"test_fraction = {source.test_fraction!r}"]
    if source.password_file is not None:
        lines.append(f"password_file = {quoted(source.password_file)}")
    if source.password_env is not None:
        lines.append(f"password_env = {quoted(source.password_env)}")
    if source.sslrootcert is not None:
        lines.append(f"sslrootcert = {quoted(source.sslrootcert)}")
    if source.insecure_tls:
        lines.append("insecure_tls = true")
    if source.query is not None:
        lines.append(f"query = {quoted(source.query)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sslrootcert(text: str, base: Path) -> Path:
    """libpq's `system` (the operating system's trusted CAs) stays as written; a path is taken from `base`."""
    return Path(text) if text == "system" else _path(Path(text), base)


def _path(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def _identifier(fields: Fields, table: dict[str, Any], field: str, default: str) -> str:
    value = fields.string(table, field, default, non_empty=True)
    if not value.replace("_", "a").isalnum() or not (value[0].isalpha() or value[0] == "_") or len(value) > 63:
        raise fields.fail(field, f"expected a schema name (letters, digits, _), got {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """A unix socket directory, localhost or a loopback address (sslmode defaults to prefer there)."""
    if host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_password(source: DatabaseSource) -> str | None:
    """The password of `source` from its 0600 file or its environment variable (None: neither is set)."""
    if source.password_file is not None:
        try:
            text = source.password_file.read_text(encoding="utf-8")
        except OSError as err:
            raise DatabaseSourceError(f"{source.origin}: password_file {source.password_file}: "
                                      f"cannot read it ({err.strerror or err})") from None
        if source.password_file.stat().st_mode & 0o077:
            raise DatabaseSourceError(f"{source.origin}: password_file {source.password_file}: readable by others "
                                      "(chmod 600 it)")
        return text.strip("\r\n")
    if source.password_env is not None:
        value = os.environ.get(source.password_env)
        if value is None:
            raise DatabaseSourceError(f"{source.origin}: password_env: the environment variable "
                                      f"{source.password_env} is not set")
        return value
    return None


def connect(source: DatabaseSource, *, check: bool = True) -> Any:
    """A read-only session to the site's database (psycopg 3). With `check` (always, outside tests of
    the check itself), a role that can write is refused before anything is read."""
    import psycopg

    options = "-c default_transaction_read_only=on -c idle_in_transaction_session_timeout=600000"
    try:
        conn = psycopg.connect(
            host=source.host, port=source.port, dbname=source.dbname, user=source.user, password=read_password(source),
            sslmode=source.sslmode, sslrootcert=str(source.sslrootcert) if source.sslrootcert else None,
            application_name=APPLICATION_NAME, connect_timeout=CONNECT_TIMEOUT_SECONDS, options=options,
        )
    except psycopg.OperationalError as err:
        raise DatabaseSourceError(f"{source.origin}: cannot connect to {source.describe()}: "
                                  f"{first_line(err)}") from None
    conn.read_only = True
    if check:
        try:
            check_read_only(conn, source)
        except psycopg.Error as err:
            conn.close()
            raise DatabaseSourceError(f"{source.origin}: checking the role {source.user} failed: "
                                      f"{type(err).__name__}: {first_line(err)}") from None
        except BaseException:
            conn.close()
            raise
    return conn


_WRITABLE_TABLES = """
SELECT n.nspname, c.relname,
       array_remove(ARRAY[
         CASE WHEN has_table_privilege(%(role)s, c.oid, 'INSERT')
                   OR has_any_column_privilege(%(role)s, c.oid, 'INSERT') THEN 'INSERT' END,
         CASE WHEN has_table_privilege(%(role)s, c.oid, 'UPDATE')
                   OR has_any_column_privilege(%(role)s, c.oid, 'UPDATE') THEN 'UPDATE' END,
         CASE WHEN has_table_privilege(%(role)s, c.oid, 'DELETE') THEN 'DELETE' END,
         CASE WHEN has_table_privilege(%(role)s, c.oid, 'TRUNCATE') THEN 'TRUNCATE' END,
         CASE WHEN has_table_privilege(%(role)s, c.oid, 'TRIGGER') THEN 'TRIGGER' END], NULL)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
  AND n.nspname NOT LIKE 'pg_temp%%'
  AND (has_table_privilege(%(role)s, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER')
       OR has_any_column_privilege(%(role)s, c.oid, 'INSERT, UPDATE'))
ORDER BY 1, 2 LIMIT 6
"""


_SERVER_ROLES = ("pg_write_server_files", "pg_execute_server_program")  # write files / run programs on the server


def check_read_only(conn: Any, source: DatabaseSource) -> None:
    """Refuse a role that can change anything in this database, naming what it can do: by itself, or
    through any role it may SET ROLE to (membership, inherited or not)."""
    user = source.user
    reasons: list[str] = []
    with conn.cursor() as cur:
        cur.execute("SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb FROM pg_roles r "
                    "WHERE pg_has_role(current_user, r.oid, 'MEMBER') ORDER BY r.rolname = current_user DESC, 1")
        for role, superuser, createrole, createdb in cur.fetchall():
            who = f"role {user}" if role == user else f"role {user} can SET ROLE {role}, which"
            if role in _SERVER_ROLES:
                reasons.append(f"role {user} is a member of {role} (it can write on the database server)")
            if superuser:
                reasons.append(f"{who} is a superuser (it can write everything)")
                continue
            if createrole:
                reasons.append(f"{who} has CREATEROLE (it can grant itself write access)")
            if createdb:
                reasons.append(f"{who} has CREATEDB")
            reasons += _write_privileges(cur, role, who, source.dbname)
        cur.execute("SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                    "AND has_function_privilege(p.oid, 'EXECUTE') ORDER BY 1, 2 LIMIT 6")
        for schema, function in cur.fetchall():
            reasons.append(f"role {user} may EXECUTE the SECURITY DEFINER function {schema}.{function} "
                           "(it runs with its owner's rights; REVOKE EXECUTE on it)")
        conn.rollback()
    if reasons:
        raise DatabaseSourceError(
            f"{source.origin}: refusing to read with a role that can write: {'; '.join(dict.fromkeys(reasons))}. "
            f"Connect as a role with SELECT only (docs/OMOP.md, \"A read-only role\")")


def _write_privileges(cur: Any, role: str, who: str, dbname: str) -> list[str]:
    """What `role` itself may change: CREATE on the database or a schema, writes on a table."""
    reasons = []
    cur.execute("SELECT has_database_privilege(%s, current_database(), 'CREATE')", (role,))
    if cur.fetchone()[0]:
        reasons.append(f"{who} can CREATE schemas in database {dbname}")
    cur.execute("SELECT nspname FROM pg_namespace WHERE has_schema_privilege(%s, oid, 'CREATE') "
                "AND nspname NOT LIKE 'pg_temp%%' AND nspname NOT LIKE 'pg_toast%%' ORDER BY 1", (role,))
    schemas = [row[0] for row in cur.fetchall()]
    if schemas:
        reasons.append(f"{who} can CREATE in schema {', '.join(schemas)}")
    cur.execute(_WRITABLE_TABLES, {"role": role})
    for schema, table, privileges in cur.fetchall():
        reasons.append(f"{who} has {'/'.join(privileges)} on {schema}.{table}")
    return reasons


def connection_lost(conn: Any, err: BaseException) -> bool:
    """Whether `err` means the session is gone (a dropped network, a restart, an ended backend), however
    psycopg classed it: a session ended mid-FETCH can surface as an InternalError of the half-read reply."""
    import psycopg
    from psycopg import pq

    return isinstance(err, psycopg.OperationalError) and not isinstance(err, psycopg.errors.QueryCanceled) \
        or conn.broken or conn.closed or conn.info.status != pq.ConnStatus.OK


def first_line(err: BaseException) -> str:
    """A database error's message as one line (its first), or its type's name."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__

