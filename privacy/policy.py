"""The site's own privacy policy (owned by hospital IT, in its kit's `site.toml`, not in the study).

    [policy]
    max_epsilon_per_study = 3.0    # ε this site spends on any one study (all its runs together)
    max_epsilon_lifetime = 10.0    # ε across every study this site ever trains (basic composition)
    max_delta = 1e-5               # largest δ a study may ask of this site
    min_cohort = 3                 # fewest sites in a SecAgg+ round this site takes part in
    min_threshold = 2              # lowest SecAgg+ reconstruction threshold it accepts
    accepted_studies = []          # study hashes (or unique prefixes, >= 12 hex digits); empty = any

The secure-aggregation floor is enforced by the masked-only guard (`privacy/guard.py`);
budgets and accepted studies by the site before each round (`privacy/budget.py`), against the
site's privacy ledger (`privacy/ledger.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.errors import FedcareError
from fedcare.files import read_toml


class PolicyError(FedcareError, ValueError):
    """The site policy is invalid; the message names the file and field."""


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon_per_study: float = 10.0
    max_epsilon_lifetime: float = 30.0
    max_delta: float = 1e-5
    min_cohort: int = 3
    min_threshold: int = 2
    accepted_studies: tuple[str, ...] = ()

    def accepts_study(self, study_hash: str) -> bool:
        return not self.accepted_studies or any(study_hash.startswith(h) for h in self.accepted_studies)

    def describe(self) -> str:
        studies = f"{len(self.accepted_studies)} accepted studies" if self.accepted_studies else "any study"
        return (
            f"ε ≤ {self.max_epsilon_per_study:g} per study, ≤ {self.max_epsilon_lifetime:g} lifetime, "
            f"δ ≤ {self.max_delta:g}; SecAgg+ cohort ≥ {self.min_cohort}, threshold ≥ {self.min_threshold}; {studies}"
        )


KNOWN_FIELDS = {
    "max_epsilon_per_study", "max_epsilon_lifetime", "max_delta", "min_cohort", "min_threshold", "accepted_studies",
}


def _positive_number(path: Path, field: str, value: Any, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < upper) or math.isnan(value):
        limit = f" and < {upper:g}" if upper != math.inf else " (finite)"
        raise PolicyError(f"{path}: policy.{field}: expected a number > 0{limit}, got {value!r}")
    return float(value)


def _integer_at_least(path: Path, field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{path}: policy.{field}: expected an integer >= {minimum}, got {value!r}")
    return value


def _study_hashes(path: Path, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{path}: policy.accepted_studies: expected a list of study hashes, got {value!r}")
    hashes = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or len(item) < 12 or any(c not in "0123456789abcdef" for c in item):
            raise PolicyError(
                f"{path}: policy.accepted_studies[{i}]: expected a study hash (>= 12 lowercase hex digits; "
                f"`fedcare study check` prints it), got {item!r}"
            )
        hashes.append(item)
    return tuple(hashes)


def parse_site_policy(section: dict[str, Any], path: Path) -> SitePolicy:
    unknown = sorted(set(section) - KNOWN_FIELDS)
    if unknown:
        raise PolicyError(f"{path}: policy.{unknown[0]}: unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})")
    values: dict[str, Any] = {}
    for field in ("max_epsilon_per_study", "max_epsilon_lifetime"):
        if field in section:
            values[field] = _positive_number(path, field, section[field])
    if "max_delta" in section:
        values["max_delta"] = _positive_number(path, "max_delta", section["max_delta"], upper=1.0)
    for field, minimum in (("min_cohort", 3), ("min_threshold", 2)):
        if field in section:
            values[field] = _integer_at_least(path, field, section[field], minimum)
    if "accepted_studies" in section:
        values["accepted_studies"] = _study_hashes(path, section["accepted_studies"])
    policy = SitePolicy(**values)
    if policy.max_epsilon_per_study > policy.max_epsilon_lifetime:
        raise PolicyError(
            f"{path}: policy.max_epsilon_per_study: {policy.max_epsilon_per_study:g} exceeds "
            f"max_epsilon_lifetime ({policy.max_epsilon_lifetime:g})"
        )
    return policy


def load_site_policy(path: str | Path) -> SitePolicy:
    path = Path(path)
    raw = read_toml(path, PolicyError, "site policy file not found")
    section = raw.get("policy", {})
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: policy: expected a [policy] table")
    return parse_site_policy(section, path)


def policy_for_site(policy_file: Path | None) -> SitePolicy:
    """The policy in the site's file, or the defaults when the site has none (simulation)."""
    return load_site_policy(policy_file) if policy_file is not None else SitePolicy()
