"""`fedcare audit verify` for the service's audit log: `serve-audit.jsonl.N` ... `.1`, `serve-audit.jsonl`,
their head `serve-audit.head`, under the chain key derived from `audit.key` (`inference.audit`).

Reads only: the key is not created when it is missing (that is "key missing"), nothing is rotated.
"""

from __future__ import annotations

from pathlib import Path

from fedcare.audit_chain import read_chain_key
from fedcare.audit_verify import ChainReport, verify_chain
from inference.audit import AUDIT_FILE, AUDIT_HEAD, AUDIT_KEY, chain_key, rotated_files


def serve_log_present(state_dir: Path) -> bool:
    state_dir = Path(state_dir)
    return (state_dir / AUDIT_FILE).exists() or (state_dir / AUDIT_HEAD).exists() \
        or bool(rotated_files(state_dir / AUDIT_FILE))


def verify_serve_log(state_dir: Path) -> ChainReport:
    """Verify the service's audit log in a state directory; raises AuditChainError naming file and line."""
    state_dir = Path(state_dir)
    path = state_dir / AUDIT_FILE
    key_path = state_dir / AUDIT_KEY
    audit_key = read_chain_key(key_path, "the audit key")

    def files() -> list[Path]:  # oldest first
        return [*rotated_files(path)[::-1], *([path] if path.exists() else [])]

    return verify_chain(str(path), files, state_dir / AUDIT_HEAD,
                        chain_key(audit_key) if audit_key is not None else None, key_path)
