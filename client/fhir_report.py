"""The FHIR reader's load report (`FhirLoadReport`) and how it names a file.

Rows are patients; locations are `file:line` or `file:entry[i]`. A file is named only when its
name is generic (`printable_file`), so a report never carries a patient's name from a file name.
Counts and locations only, never a value or a patient id.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from client.tables import LoadReport

# File names printed as they are: a resource type or another single word, optionally numbered
# (Patient.ndjson, Observation.2.ndjson, 1.Condition.ndjson, export.json). Anything else, e.g.
# a Synthea Bundle named after its patient (First123_Last456_<uuid>.json), prints as `file #k`.
_PRINTABLE_FILE = re.compile(r"(?:[0-9]{1,9}[._-])?[A-Za-z]{1,64}(?:[._-][0-9]{1,9})?\.(?:ndjson|json|NDJSON|JSON)(?:\.gz)?")


@dataclass
class FhirLoadReport(LoadReport):
    """`LoadReport` for FHIR: rows are patients; locations are `file:line` or `file:entry[i]`.

    `quarantined` counts bad lines, resources (records) and patients by reason. Locations name
    a file only when its name is generic (`_PRINTABLE_FILE`: a resource type, optionally
    numbered); any other file is `file #k`, its position (from 1) in `files`, because exports
    of one Bundle per patient name the files after the patient.
    """

    examples: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    resources_read: Counter = field(default_factory=Counter)  # per resourceType
    resources_used: Counter = field(default_factory=Counter)  # matched a rule in its window and passed checks
    ignored: Counter = field(default_factory=Counter)  # unknown or missing resourceType
    excluded: Counter = field(default_factory=Counter)  # status / verificationStatus says it did not happen
    conversions: Counter = field(default_factory=Counter)  # "from→to" unit conversions applied
    unit_mismatches: Counter = field(default_factory=Counter)  # "from→to" conversions refused

    def summary(self) -> str:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{key} {n}" for key, n in sorted(counter.items()))

        lines = [f"{self.path}: {self.rows_loaded}/{self.rows_read} patients loaded from {len(self.files)} files"]
        if self.resources_read:
            lines.append(f"  resources read: {counts(self.resources_read)}")
            lines.append(f"  resources used: {counts(self.resources_used) or 'none'}")
        lines += [f"  ignored {n}: {reason}" for reason, n in sorted(self.ignored.items())]
        lines += [f"  excluded {n}: {reason}" for reason, n in sorted(self.excluded.items())]
        if self.conversions:
            lines.append(f"  unit conversions: {counts(self.conversions)}")
        if self.unit_mismatches:
            lines.append(f"  unit mismatches: {counts(self.unit_mismatches)}")
        for reason, n in sorted(self.quarantined.items()):
            where = ", ".join(self.examples.get(reason, []))
            more = ", ..." if n > len(self.examples.get(reason, [])) else ""
            lines.append(f"  quarantined {n}: {reason} ({where}{more})")
        if self.ignored_files:
            lines.append(f"  ignored files (not .ndjson or .json): {len(self.ignored_files)}")
        lines += ["  " + line for line in self.derived]
        return "\n".join(lines)


def printable_file(name: str, number: int) -> str:
    """A file's name in the report: as is when generic, else `file #k` (k = `number` + 1)."""
    return name if _PRINTABLE_FILE.fullmatch(name) else f"file #{number + 1}"
