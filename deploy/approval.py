"""Which Apps a site runs: the code it approved, by content hash.

A Flower run ships its App (a FAB: the ServerApp and ClientApp source) to every SuperNode, which
would execute it with the site's data and keys. A fedcare site executes a FAB only if the SHA-256
of its content is approved here:

- by default, the exact fedcare release installed at the site: the FAB that `flwr run` would build
  from the site's own installed source (`fedcare.APP_DIR`; Flower's FAB build is deterministic);
- any further hashes hospital IT lists in `site.toml`, for example a release it reviewed but has not
  installed yet:

      [approval]
      apps = ["9f2c…"]            # SHA-256 of approved FABs (`fedcare node app-hash` prints one)
      installed_release = true    # false: only the listed hashes

The check runs in the site's SuperNode process (`deploy/supernode.py`) before any of the App's code
is run or stored: a refused App trains nothing and charges nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from deploy.kits import HospitalKit, KitError
from fedcare import APP_DIR
from fedcare.fields import Fields
from fedcare.files import read_toml

HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class AppApproval:
    """The FAB content hashes (SHA-256, hex) a site runs, and where each came from."""

    hashes: dict[str, str]  # hash -> why it is approved ("installed release", "site.toml [approval] apps")

    def approves(self, fab_content: bytes) -> bool:
        """True if this FAB's content (hashed here, never taken from the coordinator's word) is approved."""
        return fab_hash(fab_content) in self.hashes

    def describe(self) -> str:
        return "; ".join(f"{h[:12]}… ({why})" for h, why in sorted(self.hashes.items(), key=lambda kv: kv[1]))


def fab_hash(fab_content: bytes) -> str:
    """The hash a FAB is approved by: SHA-256 of its bytes, hex (what `flwr run` names it by)."""
    return hashlib.sha256(fab_content).hexdigest()


def _is_hash(text: str) -> bool:
    return len(text) == 64 and set(text) <= HEX


def app_hash(app_dir: Path = APP_DIR) -> str:
    """SHA-256 of the FAB Flower builds from `app_dir` (what `flwr run APP_DIR` ships)."""
    from flwr.cli.build import build_fab_from_disk

    return fab_hash(build_fab_from_disk(Path(app_dir)))


def site_approval(kit: HospitalKit, *, app_dir: Path = APP_DIR) -> AppApproval:
    """The Apps this hospital's node runs: its installed release and its `site.toml` [approval] list."""
    listed: list[str] = []
    installed = True
    if kit.site_file.exists():
        raw = read_toml(kit.site_file, KitError, "not found")
        fields = Fields(str(kit.site_file), KitError)
        section = fields.table(raw, "[approval]", optional=True)
        listed = fields.string_list(section, "approval.apps", [], non_empty=False)
        installed = fields.boolean(section, "approval.installed_release", True)
        for value in listed:
            if not _is_hash(value):
                raise KitError(f"{kit.site_file}: approval.apps: '{value}' is not a SHA-256 hash "
                               "(64 lowercase hex digits; `fedcare node app-hash` prints one)")
    hashes = {value: "site.toml [approval] apps" for value in listed}
    if installed:
        hashes[app_hash(app_dir)] = "installed release"
    if not hashes:
        raise KitError(f"{kit.site_file}: approval: installed_release = false and no apps listed; "
                       "this node would refuse every run")
    return AppApproval(hashes=hashes)
