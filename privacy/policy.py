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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.errors import FedcareError
from fedcare.fields import Fields
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


def _study_hashes(fields: Fields, section: dict[str, Any]) -> tuple[str, ...]:
    value = section["accepted_studies"]
    if not isinstance(value, list):
        raise fields.fail("policy.accepted_studies", f"expected a list of study hashes, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or len(item) < 12 or any(c not in "0123456789abcdef" for c in item):
            raise fields.fail(f"policy.accepted_studies[{i}]", "expected a study hash (>= 12 lowercase hex digits; "
                                                               f"`fedcare study check` prints it), got {item!r}")
    return tuple(value)


def parse_site_policy(section: dict[str, Any], path: Path) -> SitePolicy:
    fields = Fields(str(path), PolicyError)
    fields.no_unknown_keys(section, "policy", tuple(sorted(KNOWN_FIELDS)))
    defaults = SitePolicy()
    values: dict[str, Any] = {
        "max_epsilon_per_study": float(fields.number(section, "policy.max_epsilon_per_study", positive=True,
                                                     default=defaults.max_epsilon_per_study)),
        "max_epsilon_lifetime": float(fields.number(section, "policy.max_epsilon_lifetime", positive=True,
                                                    default=defaults.max_epsilon_lifetime)),
        "max_delta": float(fields.number(section, "policy.max_delta", positive=True, below=1.0, default=defaults.max_delta)),
        "min_cohort": fields.integer(section, "policy.min_cohort", minimum=3, default=defaults.min_cohort),
        "min_threshold": fields.integer(section, "policy.min_threshold", minimum=2, default=defaults.min_threshold),
    }
    if "accepted_studies" in section:
        values["accepted_studies"] = _study_hashes(fields, section)
    policy = SitePolicy(**values)
    if policy.max_epsilon_per_study > policy.max_epsilon_lifetime:
        raise fields.fail("policy.max_epsilon_per_study", f"{policy.max_epsilon_per_study:g} exceeds "
                                                          f"max_epsilon_lifetime ({policy.max_epsilon_lifetime:g})")
    return policy


def load_site_policy(path: str | Path) -> SitePolicy:
    path = Path(path)
    raw = read_toml(path, PolicyError, "site policy file not found")
    return parse_site_policy(Fields(str(path), PolicyError).table(raw, "policy", optional=True), path)


def policy_for_site(policy_file: Path | None) -> SitePolicy:
    """The policy in the site's file, or the defaults when the site has none (simulation)."""
    return load_site_policy(policy_file) if policy_file is not None else SitePolicy()
