"""Read one split of a site's FHIR R4 export (docs/FHIR.md) into a `SiteTable`.

A split is a directory of `*.ndjson` files (bulk-data export, one resource per line) and
`*.json` Bundles, read in sorted name order. NDJSON is streamed line by line (a line longer
than 1 MB is quarantined unread); a Bundle is loaded whole but refused above 256 MB. Memory
grows with the number of patients and the facts kept for them (one small accumulator per
rule and patient), never with the size of a file: resources are reduced to facts as they
are read and dropped. Lines are parsed by orjson; one it refuses is read again by the stdlib
decoder, which accepts what the reader always accepted (NaN, a byte-order mark…) and names the
reason for the rest (`_Reader._parse`).

Each study feature is derived per patient by its `[mapping]` rule (`fedcare/mapping.py`),
then checked exactly like a CSV cell (`client.tables.parse_value`: range, whole numbers,
missing policy). Nothing bad crashes the reader: a bad line or resource is quarantined with
a reason (file name and line, or Bundle entry) and the rest of the file still loads; a
patient whose derived values fail is quarantined at its Patient resource. The report holds
counts and locations only, never a value or a patient id.

Where docs/FHIR.md is silent, this reader decides:

* dates: a partial date (YYYY, YYYY-MM: valid FHIR, common in de-identified exports) is the
  middle of its period, YYYY-07-02 or YYYY-MM-15, for ages and windows alike; a dateTime counts on
  the calendar date as written (no time-zone shift); after `today` is "date in the future";
  a present-but-bad date is quarantined, never replaced by the next fallback field;
* only records that match a rule are validated (an unrelated Observation with a bad date
  is not reported); records with status entered-in-error are skipped everywhere, and
  cancelled Encounters/MedicationRequests and not-taken MedicationStatements too;
* Observation values: valueQuantity (unit = code, else unit, else dimensionless "1") or
  valueInteger (dimensionless); a bad value or unit quarantines the record for every rule
  it matched; common non-UCUM spellings (lb, in, bpm, hours…) are read as their UCUM code;
* ICD-10 codes compare without dots and case-insensitively (F32.1 = F321);
* medication supply is [start, end) in days: expectedSupplyDuration in d or wk (no unit =
  days, fractions round up), a Period's end is inclusive, a MedicationStatement without an
  end is ongoing; `any` over medications means a supply overlapping the window;
* Patient: a birthDate that is not a FHIR date, or an extension value that is not a number,
  quarantines the patient (like an unreadable CSV cell); an absent one is missing; a second
  Patient with the same id is quarantined ("duplicate patient"); records are not
  de-duplicated; within a Bundle, `urn:uuid:` references resolve through entry fullUrls.

This module streams the files and builds the table; the rest lives beside it:
`client/fhir_datatypes.py` (dates, quantities and units, codings, references),
`client/fhir_rules.py` (the mapping compiled for matching, derived-value checks),
`client/fhir_resources.py` (each resource type into per-patient facts),
`client/fhir_aggregates.py` (the accumulators) and `client/fhir_report.py` (the report).
"""

from __future__ import annotations

import datetime
import gc
import gzip
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

try:  # a declared dependency; the stdlib decoder stays the reference and the fallback
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover
    _fast_loads = None

from client.fhir_bulk import ExpectedFile, check_delivery, expected_files, is_manifest, is_ndjson
from client.fhir_datatypes import Reject, bundle_patient_urls
from client.fhir_derived import reading_order
from client.fhir_report import FhirLoadReport, printable_file
from client.fhir_resources import HANDLERS, FactCollector, Location, PatientState
from client.fhir_rules import LABEL, Program, bmi, checked
from client.tables import SiteDataError, SiteTable
from fedcare.mapping import Mapping
from fedcare.study import Study

MAX_LINE_BYTES = 1 << 20  # an NDJSON line longer than this is quarantined without parsing
MAX_BUNDLE_BYTES = 256 << 20  # a Bundle file is parsed whole, so it has a ceiling
_decode = json.JSONDecoder().decode
_SAFE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


def read_site_fhir(study: Study, mapping: Mapping, path: str | Path, *, today: datetime.date | None = None) -> SiteTable:
    """Derive one split's feature table from the FHIR files in directory `path`.

    `today` (default: the current date) bounds record dates: a later one is quarantined.
    Raises `SiteDataError` when the directory is missing, holds no .ndjson/.json file, or
    yields no usable patient.
    """
    path = Path(path)
    if not path.is_dir():
        raise SiteDataError(f"{path}: FHIR split directory not found")
    entries = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: p.name)
    files = reading_order(p for p in entries if is_ndjson(p) or p.suffix.lower() == ".json")
    if not files:
        raise SiteDataError(f"{path}: no .ndjson, .ndjson.gz or .json files in the FHIR split directory")
    report = FhirLoadReport(path=str(path), files=[p.name for p in files])
    report.ignored_files = [p.name for p in entries if p not in files]
    reader = _Reader(Program(study, mapping), report, (today or datetime.date.today()).toordinal())
    # Reading creates no reference cycles, so the cyclic collector would only re-scan the growing
    # per-patient state, each time parsing has allocated a few hundred containers (~15% of the
    # time). It is paused while the files are read, and restored even if reading fails.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for number, file in enumerate(files):
            if is_ndjson(file):
                reader.read_ndjson(file, number)
            else:
                reader.read_bundle(file, number)
    finally:
        if collecting:
            gc.enable()
    for file in files:
        lines, unparsed = reader.resources_per_file.get(file.name, 0), reader.unparsed_per_file.get(file.name, 0)
        if lines >= MIN_LINES_FOR_LOSS_CHECK and unparsed > lines / 2:
            raise SiteDataError(f"{file}: {unparsed} of {lines} lines are not readable JSON (damaged, or not NDJSON); "
                                "a file that lost most of itself is not used")
    for manifest, expected in reader.manifests:
        check_delivery(manifest, expected, reader.resources_per_file)
    return reader.table(path)


MIN_LINES_FOR_LOSS_CHECK = 10  # as for tables (client/data.py): a file of 10+ lines that lost most of them is fatal
_UNPARSED = object()  # `_Reader._parse` failed (the line or file is quarantined)
_NO_ALIASES: dict[str, str] = {}  # NDJSON has no Bundle fullUrls (never written to)


class _Reader:
    """Streams resources into per-patient facts, then derives one row per patient."""

    def __init__(self, program: Program, report: FhirLoadReport, today: int) -> None:
        self.program, self.report = program, report
        self.collector = FactCollector(program, report, today)
        self.bundles: set[int] = set()
        self.manifests: list[tuple[Path, list[ExpectedFile]]] = []  # bulk-data completion manifests read
        self.resources_per_file: dict[str, int] = {}  # non-blank NDJSON lines per file name
        self.unparsed_per_file: dict[str, int] = {}  # of them, lines that are not JSON (or too long)

    # files

    def read_ndjson(self, path: Path, number: int) -> None:
        """One resource per line, streamed (gzip-compressed too: `*.ndjson.gz`); blank lines are skipped."""
        counts = [0, 0, 0]  # lines, blank lines, unparsed lines (kept when a damaged stream stops the read)
        try:
            with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")) as handle:
                self._ndjson_lines(handle, number, counts)
        except (OSError, EOFError) as err:  # a damaged or truncated gzip stream: what follows cannot be read
            self._quarantine((number, counts[0] + 1),
                             f"unreadable from here on ({type(err).__name__}: truncated or damaged file)")
            counts[0] += 1
        self.resources_per_file[path.name] = counts[0] - counts[1]
        self.unparsed_per_file[path.name] = counts[2]
        if counts[0] == counts[1]:
            self._quarantine((number, None), "empty file")

    def _ndjson_lines(self, handle: Any, number: int, counts: list[int]) -> None:
        """Ingest every line of an open NDJSON stream, counting lines and blank lines in `counts`."""
        ingest, fast = self._ingest, _fast_loads
        readline = handle.readline
        while raw := readline(MAX_LINE_BYTES + 1):
            counts[0] += 1
            line = counts[0]
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                _skip_rest_of_line(handle)
                counts[2] += 1
                self._quarantine((number, line), f"line longer than {MAX_LINE_BYTES >> 20} MB (not parsed)")
                continue
            if fast is not None:
                try:
                    obj = fast(raw)
                except ValueError:
                    pass  # the stdlib decoder below classifies the line exactly
                else:
                    ingest(obj, (number, line), _NO_ALIASES)
                    continue
            if not raw.strip():
                counts[1] += 1
                continue
            obj = self._parse((number, line), raw, truncated=not raw.endswith(b"\n"))
            if obj is _UNPARSED:
                counts[2] += 1
            else:
                ingest(obj, (number, line), _NO_ALIASES)

    def read_bundle(self, path: Path, number: int) -> None:
        """A whole Bundle (entries[].resource); refused above MAX_BUNDLE_BYTES."""
        self.bundles.add(number)
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            self._quarantine((number, None), f"Bundle file larger than {MAX_BUNDLE_BYTES >> 20} MB (export it as NDJSON)")
            return
        data = path.read_bytes()
        if not data.strip():
            self._quarantine((number, None), "empty file")
            return
        doc = self._parse((number, None), data, truncated=False)
        if doc is _UNPARSED:
            return
        if is_manifest(doc):  # a bulk-data export's completion manifest: checked once every file is read
            self.manifests.append((path, expected_files(doc, path)))
            return
        entries = doc.get("entry", []) if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle" or not isinstance(entries, list):
            self._quarantine((number, None), "not a Bundle")
            return
        aliases = bundle_patient_urls(entries)
        for i, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                self._ingest(resource, (number, i), aliases)
            else:
                self._quarantine((number, i), "Bundle entry without a resource")

    def _parse(self, where: Location, raw: bytes, truncated: bool) -> Any:
        """The JSON value, or `_UNPARSED` (quarantined with its reason).

        orjson is tried first; what it refuses goes to the stdlib decoder, which decides: it
        accepts a byte-order mark (dropped), NaN/Infinity (checked later, like any value),
        integers beyond 64 bits and lone surrogate escapes, and names the failure. Where both
        accept a document they give the same value, except that orjson reads an integer
        beyond 64 bits as a float, and every number is only ever used as a float.
        """
        if _fast_loads is not None:
            try:
                return _fast_loads(raw)
            except ValueError:
                pass
        try:
            return _decode(raw[3:].decode() if raw.startswith(b"\xef\xbb\xbf") else raw.decode())
        except RecursionError:
            self._quarantine(where, "malformed JSON (nested too deeply)")
        except ValueError:  # JSONDecodeError, bad UTF-8, an integer with too many digits
            self._quarantine(where, "truncated last line" if truncated else "malformed JSON")
        return _UNPARSED

    def _where(self, where: Location) -> str:
        number, n = where
        name = printable_file(self.report.files[number], number)
        if n is None:
            return name
        return f"{name}:entry[{n}]" if number in self.bundles else f"{name}:{n}"

    def _quarantine(self, where: Location, reason: str, count: int = 1) -> None:
        self.report.reject(self._where(where), reason, count)

    # resources

    def _ingest(self, obj: Any, where: Location, aliases: dict[str, str]) -> None:
        if not isinstance(obj, dict):
            self._quarantine(where, "not a JSON object")
            return
        rtype = obj.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            self.report.ignored["missing resourceType"] += 1
            return
        handler = HANDLERS.get(rtype)
        if handler is None:
            name = rtype if _SAFE_NAME.fullmatch(rtype) else "(not a resource type name)"
            self.report.ignored[f"ignored resource type {name}"] += 1
            return
        self.report.resources_read[rtype] += 1
        try:
            used = handler(self.collector, obj, where, aliases)
        except Reject as bad:
            self._quarantine(where, bad.reason if bad.bare else f"{rtype}: {bad.reason}")
            return
        if used:
            self.report.resources_used[rtype] += 1

    # the table

    def table(self, path: Path) -> SiteTable:
        """One row per patient with a Patient resource, sorted by patient id."""
        rows: list[list[float]] = []
        labels: list[int] = []
        report, features = self.report, self.program.features
        patients = self.collector.patients
        order = sorted(patients)
        derived = self.collector.derived
        derived_rows = derived.values(order) if derived is not None else None
        if derived is not None:
            report.derived += derived.stats_lines()
        for n, pid in enumerate(order):
            state = patients[pid]
            if state.where is None:
                self._quarantine(state.first_record or (0, None), "no Patient resource", state.records)
                continue
            values, reason = self._row(state, derived_rows[n] if derived_rows is not None else None)
            if reason:
                self._quarantine(state.where, reason)
                continue
            for feature, value in zip(features, values):
                if math.isnan(value):
                    report.missing_by_feature[feature.name] += 1
            rows.append(values)
            labels.append(1 if LABEL in state.facts else 0)
        report.rows_loaded = len(rows)
        if not rows:
            raise SiteDataError(f"{path}: no usable patients\n{report.summary()}")
        return SiteTable(
            features=np.asarray(rows, dtype=np.float64),
            labels=np.asarray(labels, dtype=np.float32),
            report=report,
        )

    def _row(self, state: PatientState, derived: np.ndarray | None) -> tuple[list[float], str | None]:
        values = []
        facts = state.facts
        for i, feature, source, missing, empty in self.program.row_plan:
            if source == "derived":  # notes, readings, the hashed block (client/fhir_derived.py)
                value = float(derived[i])
                result = missing if math.isnan(value) else checked(feature, value)
            elif source == "acc":  # an accumulator's result; none -> `empty` (0 for count/any/pdc)
                acc = facts.get(i)
                value = None if acc is None else acc.result()
                result = (empty if acc is None else missing) if value is None else checked(feature, value)
            elif source == "direct":
                value = state.direct.get(i)
                result = missing if value is None else checked(feature, value)
            else:
                result = checked(feature, bmi(state.facts.get((i, "weight")), state.facts.get((i, "height")), feature.name))
            if result[1]:
                return [], result[1]
            values.append(result[0])
        return values, None

def _skip_rest_of_line(handle: Any) -> None:
    while chunk := handle.readline(1 << 16):
        if chunk.endswith(b"\n"):
            return
