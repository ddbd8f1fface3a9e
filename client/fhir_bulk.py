"""FHIR Bulk Data delivery: what a `$export` leaves in a split directory, checked before it is trusted.

A bulk-data client (FHIR Bulk Data Access IG, `$export`) downloads one or more NDJSON files per
resource type (`Patient.ndjson`, `Observation.000.ndjson`, `1.Observation.ndjson`, often
gzip-compressed as `*.ndjson.gz`) and the export's completion manifest, a JSON document:

    {"transactionTime": "...", "request": "...", "requiresAccessToken": true,
     "output": [{"type": "Observation", "url": ".../Observation.000.ndjson", "count": 1200}, ...],
     "error":  [{"type": "OperationOutcome", "url": ".../errors.ndjson"}]}

The reader takes the manifest as the list of what the export delivered: every `output` file it
names (by the last segment of its URL, with or without `.gz`) must be in the directory, and where
it states a `count`, the file must hold that many resources: a missing or short file means an
incomplete download, which is fatal (one line naming the file) rather than silently fewer patients.
The manifest is not data; its `error` files' OperationOutcomes are counted and shown like any
other ignored resource type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from client.tables import SiteDataError

NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")


@dataclass(frozen=True)
class ExpectedFile:
    name: str  # the file name the manifest's URL ends with
    type: str  # its resource type
    count: int | None  # resources the server says it holds (optional in the spec)


def is_manifest(doc: Any) -> bool:
    """Whether a parsed `.json` document is a bulk-data completion manifest (not a Bundle)."""
    return isinstance(doc, dict) and "resourceType" not in doc and isinstance(doc.get("output"), list) \
        and "transactionTime" in doc


def expected_files(doc: dict, manifest: Path) -> list[ExpectedFile]:
    """The `output` entries of a manifest; a malformed entry is an error naming it."""
    expected = []
    for i, entry in enumerate(doc["output"]):
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise SiteDataError(f"{manifest}: output[{i}]: expected an object with a \"url\"")
        count = entry.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise SiteDataError(f"{manifest}: output[{i}].count: expected a whole number, got {count!r}")
        name = PurePosixPath(urlsplit(url).path).name
        expected.append(ExpectedFile(name=name, type=str(entry.get("type", "?")), count=count))
    return expected


def check_delivery(manifest: Path, expected: list[ExpectedFile], resources_per_file: dict[str, int]) -> None:
    """Every file the manifest lists was read, with the count it states; otherwise one fatal line."""
    for item in expected:
        read = next((resources_per_file[n] for n in (item.name, f"{item.name}.gz", item.name.removesuffix(".gz"))
                     if n in resources_per_file), None)
        if read is None:
            raise SiteDataError(f"{manifest}: the bulk-data export lists {item.name} ({item.type}), which is not in "
                                f"{manifest.parent}: the download is incomplete")
        if item.count is not None and read != item.count:
            raise SiteDataError(f"{manifest.parent / item.name}: the bulk-data manifest says {item.count} {item.type} "
                                f"resources, the file holds {read} lines: the download is incomplete or damaged")


def is_ndjson(path: Path) -> bool:
    return path.name.lower().endswith(NDJSON_SUFFIXES)
