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
then checked exactly like a CSV cell (`client.data._parse_value`: range, whole numbers,
missing policy). Nothing bad crashes the reader: a bad line or resource is quarantined with
a reason (file name and line, or Bundle entry) and the rest of the file still loads; a
patient whose derived values fail is quarantined at its Patient resource. The report holds
counts and locations only, never a value or a patient id.

Where docs/FHIR.md is silent, this reader decides:

* dates: at least YYYY-MM-DD (a year or year-month is "unparseable"); a dateTime counts on
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
* Patient: a birthDate that is not YYYY-MM-DD, or an extension value that is not a number,
  quarantines the patient (like an unreadable CSV cell); an absent one is missing; a second
  Patient with the same id is quarantined ("duplicate patient"); records are not
  de-duplicated; within a Bundle, `urn:uuid:` references resolve through entry fullUrls.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # a declared dependency; the stdlib decoder stays the reference and the fallback
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover
    _fast_loads = None

from client.data import MAX_EXAMPLES_PER_REASON, LoadReport, SiteDataError, SiteTable, _parse_value
from client.fhir_aggregates import Exists, Latest, accumulator
from fedcare.mapping import CONVERSIONS, Code, FeatureRule, Mapping, normalize_code
from fedcare.study import Feature, Study, StudyConfigError

MAX_LINE_BYTES = 1 << 20  # an NDJSON line longer than this is quarantined without parsing
MAX_BUNDLE_BYTES = 256 << 20  # a Bundle file is parsed whole, so it has a ceiling
# Records that did not happen (or were recorded in error) are skipped and counted, not derived from.
EXCLUDED_STATUSES: dict[str, frozenset[str]] = {
    "Observation": frozenset({"entered-in-error", "cancelled"}),
    "Encounter": frozenset({"entered-in-error", "cancelled"}),
    "MedicationRequest": frozenset({"entered-in-error", "cancelled"}),
    "MedicationStatement": frozenset({"entered-in-error", "not-taken"}),
}
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})  # Condition.verificationStatus
# Unit spellings seen in exports that are not UCUM codes -> the UCUM code (looked up in lower case).
UNIT_ALIASES = {
    "lb": "[lb_av]", "lbs": "[lb_av]", "pound": "[lb_av]", "pounds": "[lb_av]",
    "in": "[in_i]", "inch": "[in_i]", "inches": "[in_i]",
    "kilogram": "kg", "kilograms": "kg", "gram": "g", "grams": "g",
    "centimeter": "cm", "centimeters": "cm", "meter": "m", "meters": "m", "metre": "m", "metres": "m",
    "hr": "h", "hrs": "h", "hour": "h", "hours": "h", "minute": "min", "minutes": "min",
    "sec": "s", "second": "s", "seconds": "s", "msec": "ms", "millisecond": "ms", "milliseconds": "ms",
    "bpm": "/min", "beats/min": "/min", "beats/minute": "/min", "{beat}/min": "/min", "1/min": "/min",
    "score": "{score}", "steps/day": "{steps}/d", "{steps}/day": "{steps}/d", "/day": "/d", "1/d": "/d",
    "degf": "[degF]", "°f": "[degF]", "degc": "Cel", "°c": "Cel",
}
UCUM_UNITS = frozenset(unit for table in CONVERSIONS.values() for unit in table)
SUPPLY_DAY_UNITS = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7}
_BIG_INT = 1 << 512  # smaller integers convert to float without overflow
OPEN_END = datetime.date.max.toordinal() + 1  # an ongoing MedicationStatement (no effectivePeriod.end)
LABEL = "label"  # accumulator key shared by every label rule

_DATE_PART = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_TIME_PART = re.compile(r"T([01]\d|2[0-3]):[0-5]\d(?::(?:[0-5]\d|60)(?:\.\d+)?)?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?")
_DATE = re.compile(f"{_DATE_PART.pattern}(?:{_TIME_PART.pattern})?")
_DATE_PARTS: dict[str, int] = {}  # 'YYYY-MM-DD' seen valid -> day ordinal (bounded cache)
_TIME_PARTS: set[str] = set()  # 'Thh:mm…' suffixes seen valid (bounded cache)
_BIRTH_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_decode = json.JSONDecoder().decode
_SAFE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_SAFE_UNIT = re.compile(r"[\x21-\x7e]{1,24}")
# File names printed as they are: a resource type or another single word, optionally numbered
# (Patient.ndjson, Observation.2.ndjson, 1.Condition.ndjson, export.json). Anything else, e.g.
# a Synthea Bundle named after its patient (First123_Last456_<uuid>.json), prints as `file #k`.
_PRINTABLE_FILE = re.compile(r"(?:[0-9]{1,9}[._-])?[A-Za-z]{1,64}(?:[._-][0-9]{1,9})?\.(?:ndjson|json|NDJSON|JSON)")


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

    def reject(self, where: str, reason: str, count: int = 1) -> None:
        """Count `count` quarantined items for `reason`, keeping a few locations as examples."""
        self.quarantined[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(where)

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
        return "\n".join(lines)


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
    files = [p for p in entries if p.suffix.lower() in (".ndjson", ".json")]
    if not files:
        raise SiteDataError(f"{path}: no .ndjson or .json files in the FHIR split directory")
    report = FhirLoadReport(path=str(path), files=[p.name for p in files])
    report.ignored_files = [p.name for p in entries if p not in files]
    reader = _Reader(_Program(study, mapping), report, (today or datetime.date.today()).toordinal())
    # Reading creates no reference cycles, so the cyclic collector would only re-scan the growing
    # per-patient state, each time parsing has allocated a few hundred containers (~15% of the
    # time). It is paused while the files are read, and restored even if reading fails.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for number, file in enumerate(files):
            if file.suffix.lower() == ".ndjson":
                reader.read_ndjson(file, number)
            else:
                reader.read_bundle(file, number)
    finally:
        if collecting:
            gc.enable()
    return reader.table(path)


# --- the mapping compiled for fast matching ------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Target:
    """One rule as the reader applies it: where its facts go and which window they need."""

    key: Hashable  # accumulator slot in a patient's facts
    lo: int  # window (lo, hi] as date ordinals
    hi: int
    make: Callable[[], Any]  # new accumulator
    unit: str | None = None  # observations: convert values to this unit (None: no value needed)
    reasons: _CodeIndex | None = None  # encounters: one reasonCode must match


class _CodeIndex:
    """Targets by exact (system, code) and by (system, prefix), ICD-10 codes normalized."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, str], list[Any]] = {}
        self.prefixes: dict[str, dict[int, dict[str, list[Any]]]] = {}
        self.cache: dict[tuple[str, str], tuple[Any, ...]] = {}  # (system, code as written) -> targets

    @classmethod
    def of(cls, codes: Iterable[Code], target: Any = True) -> _CodeIndex:
        index = cls()
        for code in codes:
            index.add(code, target)
        return index

    def add(self, code: Code, target: Any) -> None:
        text = normalize_code(code.system, code.code)
        if code.is_prefix:
            by_length = self.prefixes.setdefault(code.system, {}).setdefault(len(text), {})
            by_length.setdefault(text, []).append(target)
        else:
            self.exact.setdefault((code.system, text), []).append(target)
        self.cache.clear()

    def lookup(self, system: str, code: str) -> tuple[Any, ...]:
        """Targets one coding matches, each once (memoized: exports repeat a few codes)."""
        key = (system, code)
        found = self.cache.get(key)
        if found is None:
            text = normalize_code(system, code)
            hits = list(self.exact.get((system, text), ()))
            for length, table in self.prefixes.get(system, {}).items():
                hits += table.get(text[:length], ())
            found = tuple(dict.fromkeys(hits))
            if len(self.cache) >= 1 << 16:  # bounded: codes come from the data
                self.cache.clear()
            self.cache[key] = found
        return found

    def match(self, codings: Iterable[tuple[str, str]]) -> list[Any]:
        """Targets any coding matches, each once, in a stable order."""
        found: list[Any] = []
        for system, code in codings:
            found += self.lookup(system, code)
        return list(dict.fromkeys(found)) if len(found) > 1 else found

    def match_concept(self, concept: Any) -> tuple[Any, ...] | list[Any]:
        """`match(_codings(concept))` without the generator: the hot path of every record."""
        if not isinstance(concept, dict):
            return ()
        codings = concept.get("coding")
        if not isinstance(codings, list):
            return ()
        found: tuple[Any, ...] | list[Any] = ()
        several = False
        for coding in codings:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    hits = self.cache.get((system, code))
                    if hits is None:
                        hits = self.lookup(system, code)
                    if hits:
                        if found:
                            found, several = found + hits, True
                        else:
                            found = hits
        return list(dict.fromkeys(found)) if several else found


class _Program:
    """The study's features and label as targets indexed by resource type and code."""

    def __init__(self, study: Study, mapping: Mapping) -> None:
        self.features = study.features
        self.index_date = mapping.index_date
        self.rules: list[FeatureRule] = []
        self.observations, self.conditions, self.medications = _CodeIndex(), _CodeIndex(), _CodeIndex()
        self.encounters: dict[str, list[_Target]] = {}
        self.encounters_with_reasons: frozenset[str] = frozenset()
        self.patient_rules: list[tuple[int, Feature, FeatureRule]] = []
        index = mapping.index_date.toordinal()
        for i, feature in enumerate(study.features):
            rule = mapping.features.get(feature.name)
            if rule is None:
                raise StudyConfigError(f"mapping: no rule for study feature '{feature.name}'")
            self.rules.append(rule)
            if rule.source.startswith("patient_"):
                self.patient_rules.append((i, feature, rule))
                continue
            lo, hi = index - (rule.window_days or 0), index
            if rule.source == "bmi":
                for role, codes, unit in (("weight", rule.weight_codes, "kg"), ("height", rule.height_codes, "m")):
                    target = _Target((i, role), lo, hi, Latest, unit=unit)
                    for code in codes:
                        self.observations.add(code, target)
            else:
                self._add(rule, _Target(i, lo, hi, accumulator(rule, lo, hi), unit=rule.unit))
        for rule in mapping.label.any_of:
            self._add(rule, _Target(LABEL, index, index + (rule.window_days_after or 0), Exists))
        self.encounters_with_reasons = frozenset(
            cls for cls, targets in self.encounters.items() if any(t.reasons for t in targets))
        # How each row cell derives: (index, feature, "acc" | "direct" | "bmi", the checked result
        # for a missing value, the checked result when no record matched: 0 for count/any/pdc).
        self.row_plan: list[tuple[int, Feature, str, tuple[float, str | None], tuple[float, str | None]]] = []
        for i, (feature, rule) in enumerate(zip(self.features, self.rules)):
            source = "direct" if rule.source.startswith("patient_") else "bmi" if rule.source == "bmi" else "acc"
            empty = 0.0 if source == "acc" and rule.aggregate in ("count", "any", "pdc") else None
            self.row_plan.append((i, feature, source, _checked(feature, None), _checked(feature, empty)))

    def _add(self, rule: FeatureRule, target: _Target) -> None:
        """Index one observation/condition/encounter/medication rule by its codes (or classes)."""
        if rule.source == "encounter":
            if rule.reason_codes:
                target = dataclasses.replace(target, reasons=_CodeIndex.of(rule.reason_codes))
            for cls in rule.classes:
                self.encounters.setdefault(cls, []).append(target)
            return
        index = {"observation": self.observations, "condition": self.conditions, "medication": self.medications}
        for code in rule.codes:
            index[rule.source].add(code, target)


# --- reading ---------------------------------------------------------------------------------


class _Reject(Exception):
    """A resource is quarantined; `bare` reasons are not prefixed with the resource type."""

    def __init__(self, reason: str, bare: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.bare = reason, bare


class _Invalid:
    """A patient-level value that is present but unusable (the reason quarantines the patient)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Location = tuple[int, int | None]  # (file number, line or Bundle entry; None = the whole file)
_UNPARSED = object()  # `_Reader._parse` failed (the line or file is quarantined)
_NO_ALIASES: dict[str, str] = {}  # NDJSON has no Bundle fullUrls (never written to)
_NO_VALUES: dict[str, float] = {}  # an Observation that only feeds rules without a unit (never written to)


class _Patient:
    """What is kept per patient id: accumulators, patient-level values, where it was seen."""

    __slots__ = ("where", "facts", "direct", "records", "first_record")

    def __init__(self) -> None:
        self.where: Location | None = None  # the Patient resource's location
        self.facts: dict[Hashable, Any] = {}
        self.direct: dict[int, float | None | _Invalid] = {}
        self.records = 0  # accepted records referring to this id
        self.first_record: Location | None = None


class _Reader:
    """Streams resources into per-patient facts, then derives one row per patient."""

    def __init__(self, program: _Program, report: FhirLoadReport, today: int) -> None:
        self.program, self.report, self.today = program, report, today
        self.patients: dict[str, _Patient] = {}
        self.bundles: set[int] = set()
        self.references: dict[str, str] = {}  # NDJSON reference text -> patient id (bounded cache)

    # files

    def read_ndjson(self, path: Path, number: int) -> None:
        """One resource per line, streamed; blank lines are skipped."""
        content = False
        ingest, fast = self._ingest, _fast_loads
        with path.open("rb") as handle:
            readline = handle.readline
            line = 0
            while raw := readline(MAX_LINE_BYTES + 1):
                line += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    _skip_rest_of_line(handle)
                    content = True
                    self._quarantine((number, line), f"line longer than {MAX_LINE_BYTES >> 20} MB (not parsed)")
                    continue
                if fast is not None:
                    try:
                        obj = fast(raw)
                    except ValueError:
                        pass  # the stdlib decoder below classifies the line exactly
                    else:
                        content = True
                        ingest(obj, (number, line), _NO_ALIASES)
                        continue
                if not raw.strip():
                    continue
                content = True
                obj = self._parse((number, line), raw, truncated=not raw.endswith(b"\n"))
                if obj is not _UNPARSED:
                    ingest(obj, (number, line), _NO_ALIASES)
        if not content:
            self._quarantine((number, None), "empty file")

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
        entries = doc.get("entry", []) if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle" or not isinstance(entries, list):
            self._quarantine((number, None), "not a Bundle")
            return
        aliases = _bundle_patient_urls(entries)
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
        name = _printable_file(self.report.files[number], number)
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
        handler = _HANDLERS.get(rtype)
        if handler is None:
            name = rtype if _SAFE_NAME.fullmatch(rtype) else "(not a resource type name)"
            self.report.ignored[f"ignored resource type {name}"] += 1
            return
        self.report.resources_read[rtype] += 1
        try:
            used = handler(self, obj, where, aliases)
        except _Reject as bad:
            self._quarantine(where, bad.reason if bad.bare else f"{rtype}: {bad.reason}")
            return
        if used:
            self.report.resources_used[rtype] += 1

    def _patient(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        self.report.rows_read += 1
        pid = obj.get("id")
        if not isinstance(pid, str) or not pid.strip():
            raise _Reject("missing id")
        state = self.patients.get(pid)
        if state is not None and state.where is not None:
            raise _Reject("duplicate patient", bare=True)
        if state is None:
            state = self.patients[pid] = _Patient()
        state.where = where
        state.direct = {i: _patient_value(feature, rule, obj, self.program) for i, feature, rule in self.program.patient_rules}
        return True

    def _observation(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        targets = self.program.observations.match_concept(obj.get("code"))
        if not targets or self._excluded(obj, "Observation"):
            return False
        pid = self._pid(obj, aliases, False)
        when = obj["effectiveDateTime"] if "effectiveDateTime" in obj else _first_present(
            obj, "effectiveInstant", ("effectivePeriod", "start"), "issued")
        day = self._day(when)
        if len(targets) == 1:  # most codes feed one rule
            hits = targets
            if not hits[0].lo < day <= hits[0].hi:
                return False
            units: Iterable[str] = (hits[0].unit,) if hits[0].unit else ()
        else:
            hits = [t for t in targets if t.lo < day <= t.hi]
            if not hits:
                return False
            units = {t.unit for t in hits if t.unit}  # label rules need no value
        values = self._values(obj, units) if units else _NO_VALUES
        facts = self._record(pid, where).facts
        for t in hits:
            acc = facts.get(t.key)
            if acc is None:
                acc = facts[t.key] = t.make()
            acc.add(day, values.get(t.unit))
        return True

    def _condition(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        targets = self.program.conditions.match_concept(obj.get("code"))
        if not targets:
            return False
        verification = _status_codes(obj.get("verificationStatus")) & EXCLUDED_VERIFICATION
        if verification:
            self.report.excluded[f"Condition: verificationStatus {sorted(verification)[0]}"] += 1
            return False
        pid = self._pid(obj, aliases, False)
        onset = obj.get("onsetDateTime")
        day = self._day(onset if onset is not None else obj.get("recordedDate"))
        return self._facts(pid, where, targets, day)

    def _encounter(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        cls = obj.get("class")
        code = cls.get("code") if isinstance(cls, dict) else None
        targets = self.program.encounters.get(code, ()) if isinstance(code, str) else ()
        if targets and code in self.program.encounters_with_reasons:
            reasons = list(_concept_list_codings(obj.get("reasonCode")))
            targets = [t for t in targets if t.reasons is None or t.reasons.match(reasons)]
        if not targets or self._excluded(obj, "Encounter"):
            return False
        pid = self._pid(obj, aliases, False)
        day = self._day(_first_present(obj, ("period", "start")))
        return self._facts(pid, where, targets, day)

    def _medication(self, obj: dict, where: Location, aliases: dict[str, str]) -> bool:
        rtype = obj["resourceType"]
        targets = self.program.medications.match_concept(obj.get("medicationCodeableConcept"))
        if not targets or self._excluded(obj, rtype):
            return False
        pid = self._pid(obj, aliases, True)
        start, end = self._supply(obj) if rtype == "MedicationRequest" else self._period(obj.get("effectivePeriod"), True)
        hits = [t for t in targets if start <= t.hi and end > t.lo + 1]
        if not hits:
            return False
        self._add_facts(pid, where, hits, start, end)
        return True

    # pieces of a resource

    def _facts(self, pid: str, where: Location, targets: list[_Target], day: int) -> bool:
        hits = [t for t in targets if t.lo < day <= t.hi]
        if not hits:
            return False
        self._add_facts(pid, where, hits, day, None)
        return True

    def _add_facts(self, pid: str, where: Location, hits: list[_Target], first: int, second: Any) -> None:
        """Give (first, second) to each hit target's accumulator for this patient, creating it on first use."""
        facts = self._record(pid, where).facts
        for t in hits:
            acc = facts.get(t.key)
            if acc is None:
                acc = facts[t.key] = t.make()
            acc.add(first, second)

    def _record(self, pid: str, where: Location) -> _Patient:
        state = self.patients.get(pid)
        if state is None:
            state = self.patients[pid] = _Patient()
        state.records += 1
        if state.first_record is None:
            state.first_record = where
        return state

    def _excluded(self, obj: dict, rtype: str) -> bool:
        status = obj.get("status")
        if isinstance(status, str) and status in EXCLUDED_STATUSES.get(rtype, ()):
            self.report.excluded[f"{rtype}: status {status}"] += 1
            return True
        return False

    def _pid(self, obj: dict, aliases: dict[str, str], allow_patient: bool) -> str:
        """`_subject`, memoized by reference text outside Bundles (where aliases decide)."""
        ref = obj.get("subject")
        if ref is None and allow_patient:
            ref = obj.get("patient")
        if not aliases and isinstance(ref, dict):
            text = ref.get("reference")
            if isinstance(text, str):
                pid = self.references.get(text)
                if pid is None:
                    pid = _reference_pid(text, aliases)  # raises _Reject for a bad one
                    if len(self.references) >= 1 << 17:
                        self.references.clear()
                    self.references[text] = pid
                return pid
        return _subject(obj, aliases, allow_patient)

    def _day(self, value: Any, future_ok: bool = False) -> int:
        """A FHIR date or dateTime as a day ordinal (the calendar date as written)."""
        if isinstance(value, str):  # the fast path of `_parse_day`, inlined
            day = _DATE_PARTS.get(value[:10])
            if day is not None and (len(value) == 10 or value[10:] in _TIME_PARTS) and (day <= self.today or future_ok):
                return day
        if value is None:
            raise _Reject("missing date")
        day = _parse_day(value)
        if day is None:
            raise _Reject("unparseable date")
        if day > self.today and not future_ok:
            raise _Reject("date in the future")
        return day

    def _period(self, period: Any, open_end: bool) -> tuple[int, int]:
        """[start, end + 1) of a Period (end inclusive); no end is ongoing when `open_end`."""
        if not isinstance(period, dict):
            raise _Reject("missing date")
        start = self._day(period.get("start"))
        if period.get("end") is None:
            if open_end:
                return start, OPEN_END
            raise _Reject("period without an end")
        end = self._day(period.get("end"), future_ok=True) + 1
        if end <= start:
            raise _Reject("period ends before it starts")
        return start, end

    def _supply(self, obj: dict) -> tuple[int, int]:
        """MedicationRequest: authoredOn + expectedSupplyDuration days, else the validityPeriod."""
        dispense = obj.get("dispenseRequest")
        dispense = dispense if isinstance(dispense, dict) else {}
        duration = dispense.get("expectedSupplyDuration")
        if duration is None:
            if dispense.get("validityPeriod") is None:
                raise _Reject("no supply interval (expectedSupplyDuration or validityPeriod)")
            return self._period(dispense.get("validityPeriod"), False)
        start = self._day(obj.get("authoredOn"))
        if not isinstance(duration, dict):
            raise _Reject("supply duration is not a number")
        value = _number(duration.get("value"), "supply duration")
        unit = _unit_text(duration, default="d")
        factor = SUPPLY_DAY_UNITS.get(unit) or SUPPLY_DAY_UNITS.get(unit.lower())
        if factor is None:
            self.report.unit_mismatches[f"{_safe_unit(unit)}→d"] += 1
            raise _Reject("unit mismatch")
        if value <= 0:
            raise _Reject("supply duration is not positive")
        if factor != 1:
            self.report.conversions["wk→d"] += 1
        return start, start + math.ceil(min(value * factor, OPEN_END))

    def _values(self, obj: dict, targets: Iterable[str]) -> dict[str, float]:
        """An Observation's value in each target unit; conversions are counted once per record."""
        quantity = obj.get("valueQuantity")
        value = unit = None
        if quantity.__class__ is dict:  # fast path: a finite number with a UCUM code, as `_quantity` reads it
            value, unit = quantity.get("value"), quantity.get("code")
            if value.__class__ is int and -_BIG_INT < value < _BIG_INT:
                value = float(value)
            if not (value.__class__ is float and value - value == 0.0 and unit.__class__ is str and (unit := unit.strip())):
                value = None
        if value is None:
            value, unit = _quantity(obj)
        source = unit if unit in UCUM_UNITS else UNIT_ALIASES.get(unit.lower(), unit)
        values = {}
        for target in sorted(targets) if len(targets) > 1 else targets:
            convert = CONVERSIONS[target].get(source)
            if convert is None:
                self.report.unit_mismatches[f"{_safe_unit(unit)}→{target}"] += 1
                raise _Reject("unit mismatch")
            converted = values[target] = convert(value)
            if not math.isfinite(converted):
                raise _Reject("value not finite (NaN/Inf)")
        for target in targets:
            if target != source:
                self.report.conversions[f"{source}→{target}"] += 1
        return values

    # the table

    def table(self, path: Path) -> SiteTable:
        """One row per patient with a Patient resource, sorted by patient id."""
        rows: list[list[float]] = []
        labels: list[int] = []
        report, features = self.report, self.program.features
        for pid in sorted(self.patients):
            state = self.patients[pid]
            if state.where is None:
                self._quarantine(state.first_record or (0, None), "no Patient resource", state.records)
                continue
            values, reason = self._row(state)
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

    def _row(self, state: _Patient) -> tuple[list[float], str | None]:
        values = []
        facts = state.facts
        for i, feature, source, missing, empty in self.program.row_plan:
            if source == "acc":  # an accumulator's result; none -> `empty` (0 for count/any/pdc)
                acc = facts.get(i)
                value = None if acc is None else acc.result()
                result = (empty if acc is None else missing) if value is None else _checked(feature, value)
            elif source == "direct":
                value = state.direct.get(i)
                result = missing if value is None else _checked(feature, value)
            else:
                result = _checked(feature, self._bmi(state, i, feature))
            if result[1]:
                return [], result[1]
            values.append(result[0])
        return values, None

    @staticmethod
    def _bmi(state: _Patient, i: int, feature: Feature) -> float | None | _Invalid:
        weight, height = state.facts.get((i, "weight")), state.facts.get((i, "height"))
        if weight is None or height is None:
            return None
        if height.value <= 0:
            return _Invalid(f"{feature.name}: height must be positive")
        return weight.value / (height.value * height.value)  # float products overflow to inf, not raise


# Plain functions, not bound methods kept on the reader: a reader that referred to itself
# would be freed (with every patient's facts) only by a full garbage collection.
_HANDLERS: dict[str, Callable[[_Reader, dict, Location, dict[str, str]], bool]] = {
    "Patient": _Reader._patient,
    "Observation": _Reader._observation,
    "Condition": _Reader._condition,
    "Encounter": _Reader._encounter,
    "MedicationRequest": _Reader._medication,
    "MedicationStatement": _Reader._medication,
}


# --- helpers ----------------------------------------------------------------------------------


def _checked(feature: Feature, value: float | None | _Invalid) -> tuple[float, str | None]:
    """The CSV cell checks (`client.data._parse_value`) on a derived value; None is missing."""
    if isinstance(value, _Invalid):
        return math.nan, value.reason
    if value is None:
        return _parse_value(feature, "")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        finite = False
    # repr round-trips a float exactly; "nan" would read as a missing token, so non-finite is "inf".
    return _parse_value(feature, repr(value) if finite else "inf")


def _patient_value(feature: Feature, rule: FeatureRule, obj: dict, program: _Program) -> float | None | _Invalid:
    """Age, sex or an extension value from a Patient resource (None = missing)."""
    if rule.source == "patient_female":
        return {"female": 1.0, "male": 0.0}.get(obj.get("gender")) if isinstance(obj.get("gender"), str) else None
    if rule.source == "patient_age":
        birth = obj.get("birthDate")
        if birth is None:
            return None
        if not isinstance(birth, str) or not _BIRTH_DATE.fullmatch(birth):
            return _Invalid(f"{feature.name}: unparseable birthDate")
        try:
            born = datetime.date.fromisoformat(birth)
        except ValueError:
            return _Invalid(f"{feature.name}: unparseable birthDate")
        return float(_whole_years(born, program.index_date))
    extensions = obj.get("extension")
    for ext in extensions if isinstance(extensions, list) else []:
        if isinstance(ext, dict) and ext.get("url") == rule.url:
            for key in ("valueDecimal", "valueInteger"):
                if key in ext:
                    value = ext[key]
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        return _Invalid(f"{feature.name}: not a number")
                    return value
            if any(key.startswith("value") for key in ext):
                return _Invalid(f"{feature.name}: not a number")
            return None
    return None


def _printable_file(name: str, number: int) -> str:
    """A file's name in the report: as is when generic, else `file #k` (k = `number` + 1)."""
    return name if _PRINTABLE_FILE.fullmatch(name) else f"file #{number + 1}"


def _whole_years(born: datetime.date, on: datetime.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _parse_day(value: Any) -> int | None:
    """The day ordinal of a FHIR date/dateTime (YYYY-MM-DD at least), or None.

    Fast path: the date part (first 10 characters) and the time part (the rest) are looked
    up separately among the ones already seen valid, so a new timestamp on a known day costs
    two lookups; anything else takes `_day_ordinal`, the reference.
    """
    if not isinstance(value, str):
        return None
    day = _DATE_PARTS.get(value[:10])
    if day is not None and (len(value) == 10 or value[10:] in _TIME_PARTS):
        return day
    day = _day_ordinal(value)
    if day is not None and _DATE_PART.fullmatch(value[:10]) and (len(value) == 10 or _TIME_PART.fullmatch(value[10:])):
        # value is exactly date part + time part, so either part with any valid other one gives this answer
        if len(_DATE_PARTS) >= 1 << 16:
            _DATE_PARTS.clear()
        _DATE_PARTS[value[:10]] = day
        if len(value) > 10:
            if len(_TIME_PARTS) >= 1 << 16:
                _TIME_PARTS.clear()
            _TIME_PARTS.add(value[10:])
    return day


@functools.lru_cache(maxsize=1 << 16)  # exports repeat the same timestamps many times
def _day_ordinal(value: str) -> int | None:
    match = _DATE.fullmatch(value.strip())
    if match is None:
        return None
    try:
        return datetime.date(int(match[1]), int(match[2]), int(match[3])).toordinal()
    except ValueError:
        return None


def _first_present(obj: dict, *paths: str | tuple[str, str]) -> Any:
    """The first of these fields that is present (a present-but-bad one is not skipped)."""
    for path in paths:
        if isinstance(path, str):
            if path in obj:
                return obj[path]
        else:
            parent = obj.get(path[0])
            if isinstance(parent, dict) and path[1] in parent:
                return parent[path[1]]
    return None


def _codings(concept: Any) -> Iterator[tuple[str, str]]:
    """(system, code) of a CodeableConcept's codings; malformed parts are skipped."""
    if isinstance(concept, dict):
        codings = concept.get("coding")
        for coding in codings if isinstance(codings, list) else []:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    yield system, code


def _status_codes(concept: Any) -> set[str]:
    """The codes of a status CodeableConcept, whatever their system."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return set()
    return {c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)}


def _concept_list_codings(concepts: Any) -> Iterator[tuple[str, str]]:
    for concept in concepts if isinstance(concepts, list) else []:
        yield from _codings(concept)


def _subject(obj: dict, aliases: dict[str, str], allow_patient: bool) -> str:
    """The patient id a resource refers to (`subject`, or `patient` for medications)."""
    ref = obj.get("subject")
    if ref is None and allow_patient:
        ref = obj.get("patient")
    return _reference_pid(ref.get("reference") if isinstance(ref, dict) else None, aliases)


def _reference_pid(text: Any, aliases: dict[str, str]) -> str:
    """The patient id of a reference's text (Bundle `aliases` first)."""
    if not isinstance(text, str) or not (text := text.strip()):
        raise _Reject("no subject/patient reference")
    if aliases and text in aliases:
        return aliases[text]
    if text.startswith("urn:"):
        raise _Reject("unresolved urn: patient reference")
    pid = _patient_id(text)
    if pid is None:
        raise _Reject("subject is not a Patient reference")
    return pid


@functools.lru_cache(maxsize=1 << 16)
def _patient_id(reference: str) -> str | None:
    """`Patient/<id>` (relative, absolute or versioned) -> id; None for any other reference."""
    head, _, pid = reference.split("/_history/", 1)[0].rpartition("/")
    return pid if head.rpartition("/")[2] == "Patient" and pid else None


def _bundle_patient_urls(entries: list) -> dict[str, str]:
    """fullUrl -> Patient id in one Bundle, so `urn:uuid:` references resolve."""
    aliases = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("fullUrl"), str):
            resource = entry.get("resource")
            if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
                if isinstance(resource.get("id"), str):
                    aliases[entry["fullUrl"]] = resource["id"]
    return aliases


def _number(value: Any, what: str) -> float:
    if value is None:
        raise _Reject(f"no {what}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Reject(f"{what} is not a number")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise _Reject(f"{what} not finite (NaN/Inf)")
    return value


def _unit_text(quantity: dict, default: str) -> str:
    """UCUM `code`, else `unit`, else `default`."""
    for key in ("code", "unit"):
        text = quantity.get(key)
        if isinstance(text, str) and text.strip():
            return text.strip()
    return default


def _quantity(obj: dict) -> tuple[float, str]:
    """An Observation's (value, unit): valueQuantity, or valueInteger (dimensionless, unit "1")."""
    if "valueQuantity" in obj:
        quantity = obj["valueQuantity"]
        if not isinstance(quantity, dict):
            raise _Reject("value is not a number")
        return _number(quantity.get("value"), "value"), _unit_text(quantity, default="1")
    if "valueInteger" in obj:
        return _number(obj["valueInteger"], "value"), "1"
    if any(key.startswith("value") for key in obj):
        raise _Reject("value is not a number")
    raise _Reject("no value")


def _safe_unit(unit: str) -> str:
    return unit if _SAFE_UNIT.fullmatch(unit) else "(unprintable unit)"


def _skip_rest_of_line(handle: Any) -> None:
    while chunk := handle.readline(1 << 16):
        if chunk.endswith(b"\n"):
            return
