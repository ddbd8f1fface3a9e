"""What the hash chain costs a request: `AuditLog.write` of one request line, chained vs unchained, same run.

    .venv/bin/python bench/audit_chain.py [--writes 20000] [--repeats 5]

Variants, timed interleaved (a noisy moment hits each alike), best of `--repeats`, µs per write:

- `raw append`: orjson of the record + one `os.write` on an O_APPEND descriptor: the core of the write
  path before chaining (no rotation check);
- `unchained AuditLog`: the real class with its chain replaced by a no-op (rotation checks, and the
  per-write `stat` that follows another service's rotation);
- `chained AuditLog`: the real class: flock on the head, stat, 128-bit HMAC-SHA256 of the line, the
  write, the head rewritten in place with one `pwrite`, unlock;
- `chained, head by rename+fsync`: the same with the head written like the privacy ledger's (temporary
  file, fsync, rename) — the alternative design, for comparison (fewer writes: it is slow).

The log is in a temporary directory on the same disk as the repository's tmp; files are 64 MiB
(no rotation during a repeat). Ratios are against `unchained AuditLog` and `raw append`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedcare.audit_chain import ChainWriter  # noqa: E402
from fedcare.files import atomic_write_bytes  # noqa: E402
from inference.audit import AuditLog, AuditSettings, load_audit_key  # noqa: E402


class NullChain:
    """ChainWriter's interface, doing nothing: the unchained write path of the same class."""

    pending = None

    def acquire(self):
        pass

    def release(self):
        pass

    @contextlib.contextmanager
    def locked(self):
        yield self

    def sync(self, fingerprint=None):
        pass

    def sealed_size(self, data: bytes) -> int:
        return len(data)

    def seal(self, data: bytes) -> bytes:
        return data

    def commit(self, fingerprint=None):
        pass

    def rollback(self):
        pass

    def close(self):
        pass


class RenameHeadChain(ChainWriter):
    """The head written to a sibling file by temporary file + fsync + rename (the lock stays on the head file)."""

    def _write_head(self) -> None:
        atomic_write_bytes(self.head_path.with_name("renamed.head"), f"{self.seq} {self.mac}".encode())


def record(i: int) -> dict:
    return {"token": "clinic", "endpoint": "/v1/analyze", "method": "POST", "status": 200, "model": "int8",
            "latency_ms": 0.512, "patient": f"{i:064x}", "reason": None, "feature": None, "client": "127.0.0.1"}


def make_log(root: Path, name: str, chain: str) -> AuditLog:
    state = root / name
    state.mkdir()
    key = load_audit_key(state)
    log = AuditLog(state, key, AuditSettings())
    if chain == "null":
        log._chain = NullChain()
    elif chain == "rename":
        log._chain.close()
        log._chain = RenameHeadChain(log._chain._key, log._chain.head_path, lambda: [log.path, *log.rotated_files()])
    return log


def time_log(log: AuditLog, writes: int) -> float:
    records = [record(i) for i in range(writes)]
    start = time.perf_counter()
    for rec in records:
        log.write(rec)
    return (time.perf_counter() - start) / writes * 1e6


def time_raw(path: Path, writes: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    records = [record(i) for i in range(writes)]
    try:
        start = time.perf_counter()
        for rec in records:
            os.write(fd, orjson.dumps({"time": "2026-12-02T00:00:00.000Z", **rec}, option=orjson.OPT_APPEND_NEWLINE))
        return (time.perf_counter() - start) / writes * 1e6
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedcare-audit-chain-") as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):
            logs = {name: make_log(root, f"{name}-{repeat}", chain)
                    for name, chain in (("unchained AuditLog", "null"), ("chained AuditLog", "chain"),
                                        ("chained, head by rename+fsync", "rename"))}
            times = {"raw append": time_raw(root / f"raw-{repeat}.jsonl", args.writes)}
            for name, log in logs.items():
                times[name] = time_log(log, args.writes if "rename" not in name else max(200, args.writes // 50))
                log.close()
            for name, value in times.items():
                best[name] = min(best.get(name, float("inf")), value)
        chained_bytes = (root / "chained AuditLog-0" / "serve-audit.jsonl").stat().st_size
        plain_bytes = (root / "unchained AuditLog-0" / "serve-audit.jsonl").stat().st_size
    base = best["unchained AuditLog"]
    print(f"audit line write, µs per write (best of {args.repeats} interleaved repeats of {args.writes} writes):")
    for name, value in best.items():
        print(f"  {name:<32} {value:8.2f} µs   {value / base:5.2f}× unchained AuditLog   "
              f"{value / best['raw append']:5.2f}× raw append")
    print(f"chained AuditLog / unchained AuditLog: {best['chained AuditLog'] / base:.2f}× "
          f"(+{best['chained AuditLog'] - base:.2f} µs per request line)")
    print(f"line size: {chained_bytes / args.writes:.0f} bytes chained vs {plain_bytes / args.writes:.0f} unchained "
          f"({chained_bytes / plain_bytes:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
