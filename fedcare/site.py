"""Where one site's files are, from its Flower node config (lean: no torch, no data loading).

Node config keys (set by `fedcare node start`, i.e. by the hospital):
    data       the site's data directory (train.csv, test.csv)
    study      the hospital's copy of the study file (default: the run's `study`)
    state-dir  where the privacy ledger is kept (default: <data>/.fedcare)
    policy     the site's policy file (`site.toml` with a [policy] table)
In simulation, `data` is the n-th site folder of `<run_config sim-sites-dir>` by partition id (in
name order, hidden folders left out), its ledger is in `<run_config sim-state-dir>/<site>` when the
run sets one (`fedcare simulate --sites`: the evaluator's own data folders are only read), and the
policy is that folder's `site.toml` if it has one (the defaults otherwise).
"""

from __future__ import annotations

import functools

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.protocol import Refusal, RefusalKind

@dataclass(frozen=True)
class SitePaths:
    study: Path
    data: Path
    state_dir: Path
    policy: Path | None


def simulated_site_folders(sites_dir: Path) -> list[Path]:
    """The site folders of a simulation, in the order virtual nodes take them (by partition id).
    Listed again only when the folder changes (its mtime): a simulated site asks at every message."""
    stat = sites_dir.stat()
    return list(_site_folders(str(sites_dir), stat.st_ino, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _site_folders(sites_dir: str, _inode: int, _mtime_ns: int) -> tuple[Path, ...]:
    return tuple(sorted(p for p in Path(sites_dir).iterdir() if p.is_dir() and not p.name.startswith(".")))


def site_name(node: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """The site's own name: its node config's `site` (set by `fedcare node start` from its kit), or in
    simulation its folder's name; "" when neither is known."""
    if "site" in node:
        return str(node["site"])
    try:
        return site_paths(node, run).data.name
    except (Refusal, OSError, IndexError, ValueError):
        return ""


def site_paths(node: Mapping[str, Any], run: Mapping[str, Any]) -> SitePaths:
    study = Path(str(node.get("study", run.get("study", ""))))
    if "data" in node:
        data = Path(str(node["data"]))
    elif run.get("sim-sites-dir") and "partition-id" in node:
        data = simulated_site_folders(Path(str(run["sim-sites-dir"])))[int(node["partition-id"])]
    else:
        raise Refusal(RefusalKind.DATA, "node config has no 'data' directory for this site")
    default_state = Path(str(run["sim-state-dir"])) / data.name if run.get("sim-state-dir") else data / ".fedcare"
    state_dir = Path(str(node.get("state-dir", default_state)))
    if "policy" in node:
        policy: Path | None = Path(str(node["policy"]))
    else:
        policy = data / "site.toml" if (data / "site.toml").is_file() else None
    return SitePaths(study=study, data=data, state_dir=state_dir, policy=policy)
