"""The site's own privacy policy (owned by hospital IT, in its kit's `site.toml`, not in the study).

    [policy]
    min_cohort = 3       # fewest sites in a SecAgg+ round this site takes part in
    min_threshold = 2    # lowest SecAgg+ reconstruction threshold it accepts

So far the policy covers the secure-aggregation floor enforced by the masked-only guard
(`privacy/guard.py`); budgets and the ledger are future work (issue 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.files import read_toml


class PolicyError(ValueError):
    """The site policy is invalid; the message names the file and field."""


@dataclass(frozen=True)
class SitePolicy:
    min_cohort: int = 3
    min_threshold: int = 2


def load_site_policy(path: str | Path) -> SitePolicy:
    path = Path(path)
    raw = read_toml(path, PolicyError, "site policy file not found")
    section: dict[str, Any] = raw.get("policy", {})
    values = {}
    for field, minimum in (("min_cohort", 3), ("min_threshold", 2)):
        if field in section:
            value = section[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PolicyError(f"{path}: policy.{field}: expected an integer >= {minimum}, got {value!r}")
            values[field] = value
    return SitePolicy(**values)


def policy_for_node(node_config: dict[str, Any]) -> SitePolicy:
    """The policy named by the node config's `policy` file, or the defaults."""
    path = node_config.get("policy")
    return load_site_policy(str(path)) if path else SitePolicy()
