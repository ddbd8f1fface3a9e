"""Where one site's files are, from its Flower node config (lean: no torch, no data loading).

Node config keys (set by `fedcare node start`, i.e. by the hospital):
    data       the site's data directory (train.csv, test.csv)
    study      the hospital's copy of the study file (default: the run's `study`)
    state-dir  where the privacy ledger is kept (default: <data>/.fedcare)
    policy     the site's policy file (`site.toml` with a [policy] table)
In simulation, `data` is `<run_config sim-sites-dir>/<n-th site>` by partition id, and the
policy is that directory's `site.toml` if it has one (the defaults otherwise).
"""

from __future__ import annotations

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


def site_paths(node: Mapping[str, Any], run: Mapping[str, Any]) -> SitePaths:
    study = Path(str(node.get("study", run.get("study", ""))))
    if "data" in node:
        data = Path(str(node["data"]))
    elif run.get("sim-sites-dir") and "partition-id" in node:
        sites = sorted(p for p in Path(str(run["sim-sites-dir"])).iterdir() if p.is_dir())
        data = sites[int(node["partition-id"])]
    else:
        raise Refusal(RefusalKind.DATA, "node config has no 'data' directory for this site")
    state_dir = Path(str(node.get("state-dir", data / ".fedcare")))
    if "policy" in node:
        policy: Path | None = Path(str(node["policy"]))
    else:
        policy = data / "site.toml" if (data / "site.toml").is_file() else None
    return SitePaths(study=study, data=data, state_dir=state_dir, policy=policy)
