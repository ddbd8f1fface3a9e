"""A site's sensor readings beside its feature table, `<split>.readings.csv` or `.parquet`: one
reading a row, columns `patient_id, time, system, code, value, unit` (others ignored, listed),
reduced to the study's windowed features by `fedcare.streams.StreamAggregator`, the kernel the
inference service runs too.

* time: `YYYY-MM-DD` or `YYYY-MM-DDThh:mm[:ss[.f]][Z|±hh:mm]`, counted on the calendar date as
  written, no time-zone shift (the FHIR reader's rule, `client.fhir_datatypes.parse_day`); a
  Parquet date or timestamp column by its date (a zoned timestamp in its own zone).
* codes match exactly or by prefix (ICD-10 without dots); units convert by `CONVERSIONS`, common
  non-UCUM spellings (bpm, hours, sec) as their UCUM code (`UNIT_ALIASES`); cells are trimmed of
  white space and of enclosing double quotes.
* a reading is quarantined (line number and reason) for, first failing first: wrong number of
  columns, not UTF-8, a line over 1 MiB; no patient id; time not a date; date after `today`;
  value missing, not a number, not finite (also after conversion); a unit some rule it matched
  cannot convert. Only readings whose code matches a rule and whose patient is in the feature
  table are checked; the others are counted (`ignored`, `unknown_patients`), as are readings
  outside a rule's window. A missing file, header or column is a `SiteDataError` naming them.
* CSV is line-oriented: one line, one reading; a field may be quoted but holds no comma or line
  break, so a stray quote never swallows the rest of the file and line numbers are exact.

Files stream in chunks (CSV: blocks cut at line ends, parsed by pyarrow; Parquet: row batches),
each checked with numpy / pyarrow compute; only malformed rows take a per-row path. The report
holds counts and line numbers, never a value or a patient id (invariant 7).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from client.fhir_datatypes import parse_day
from client.tables import MAX_EXAMPLES_PER_REASON, MISSING_TOKENS, SiteDataError
from fedcare.mapping import UNIT_ALIASES
from fedcare.streams import UCUM_UNITS, RuleIndex, SensorRule, StreamAggregator

log = logging.getLogger(__name__)

COLUMNS = ("patient_id", "time", "system", "code", "value", "unit")
MAX_LINE_BYTES = 1 << 20
KNOWN_UNITS = frozenset(UCUM_UNITS) | frozenset(UNIT_ALIASES) | frozenset(UNIT_ALIASES.values())
_TIME = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?:T(?:[01][0-9]|2[0-3]):[0-5][0-9](?::(?:[0-5][0-9]|60)(?:\.[0-9]+)?)?"
         r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?)?$")  # fhir_datatypes' _DATE, ASCII digits only
_NUMBER = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_EPOCH = 719163  # date(1970, 1, 1).toordinal()
TIME_BAD, FUTURE, MISSING, NOT_NUMBER, NOT_FINITE = (
    "time: not a date (YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss][Z|±hh:mm])", "time: date in the future",
    "value: missing", "value: not a number", "value: not finite (NaN/Inf)")


@dataclass
class ReadingsReport:
    """What happened to each reading of a readings file; counts and line numbers only."""

    path: str = ""
    where: str = "lines"  # what the numbers in `examples` count: CSV lines, Parquet rows (from 1)
    readings_read: int = 0  # rows, blank lines excluded
    readings_used: int = 0  # counted by at least one rule
    used: Counter = field(default_factory=Counter)  # feature -> readings counted
    outside_window: Counter = field(default_factory=Counter)  # feature -> readings of its codes outside its window
    ignored: int = 0  # code matches no rule
    unknown_patients: int = 0  # patient id not in the feature table
    quarantined: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    conversions: Counter = field(default_factory=Counter)  # "min→h" -> (reading, rule) values converted
    unit_mismatches: Counter = field(default_factory=Counter)  # "s→/min" -> readings refused
    ignored_columns: list[str] = field(default_factory=list)

    def quarantine(self, reason: str, lines: Sequence[int] | np.ndarray) -> None:
        """Count `len(lines)` quarantined readings for `reason`, keeping the first line numbers."""
        if not len(lines):
            return
        self.quarantined[reason] += len(lines)
        kept = self.examples.setdefault(reason, [])
        kept += [int(n) for n in lines[:MAX_EXAMPLES_PER_REASON - len(kept)]]

    def summary(self) -> str:
        """Counts, reasons and line numbers, one item a line; never a value or a patient id."""
        def counts(counter: Counter) -> str:
            return ", ".join(f"{key} {n}" for key, n in sorted(counter.items()))

        lines = [f"{self.path}: {self.readings_used}/{self.readings_read} readings used",
                 f"  used per feature: {counts(self.used) or 'none'}"]
        if self.outside_window:
            lines.append(f"  outside the window: {counts(self.outside_window)}")
        lines += [f"  ignored {self.ignored}: code matches no rule"] if self.ignored else []
        lines += [f"  ignored {self.unknown_patients}: patient not in the feature table"] if self.unknown_patients else []
        lines += [f"  unit conversions: {counts(self.conversions)}"] if self.conversions else []
        lines += [f"  unit mismatches: {counts(self.unit_mismatches)}"] if self.unit_mismatches else []
        for reason, n in sorted(self.quarantined.items()):
            where = ", ".join(str(k) for k in self.examples[reason])
            more = ", ..." if n > len(self.examples[reason]) else ""
            lines.append(f"  quarantined {n}: {reason} ({self.where} {where}{more})")
        if self.ignored_columns:
            lines.append(f"  ignored columns: {', '.join(self.ignored_columns)}")
        return "\n".join(lines)


def read_readings(path: Path, *, rules: Sequence[SensorRule], patients: Mapping[str, int], index_day: int,
                  today: int, report: ReadingsReport, block_bytes: int = 1 << 20, batch_rows: int = 65536) -> np.ndarray:
    """The rules' features of each patient (float64, len(patients) × len(rules), NaN = missing).

    `patients` maps the feature table's patient ids to its row indices; `index_day` and `today`
    are date ordinals. CSV is read `block_bytes` at a time, Parquet `batch_rows` rows at a time
    (chunking never changes a result). Raises `SiteDataError` only when the file cannot be read
    at all (missing, not CSV/Parquet, bad header or schema, missing column).
    """
    path = Path(path)
    report.path = report.path or str(path)
    ingest = _Ingest(rules, patients, index_day=index_day, today=today, report=report)
    if path.suffix.lower() == ".parquet":
        report.where = "rows"
        _read_parquet(path, ingest, batch_rows)
    else:
        _read_csv(path, ingest, max(64, block_bytes))
    for i, rule in enumerate(ingest.aggregator.rules):
        report.used[rule.feature] += int(ingest.aggregator.used[i])
        if ingest.aggregator.outside[i]:
            report.outside_window[rule.feature] += int(ingest.aggregator.outside[i])
    log.debug("%s", report.summary())
    return ingest.aggregator.results()


class _Ingest:
    """Checks one chunk of readings at a time (columns as arrow arrays) and feeds the aggregator."""

    def __init__(self, rules: Sequence[SensorRule], patients: Mapping[str, int], *, index_day: int, today: int,
                 report: ReadingsReport) -> None:
        rows = np.fromiter(patients.values(), np.int64, len(patients))
        if len(rows) and (rows.min() < 0 or rows.max() >= len(rows)):
            raise ValueError("patients: row indices must lie in 0..len(patients)-1")
        self.index = RuleIndex(rules)
        self.aggregator = StreamAggregator(self.index.rules, index_day=index_day, patients=len(rows))
        self.patients, self.today, self.report = patients, today, report
        self.dates: dict[str, int] = {}  # 'YYYY-MM-DD' -> ordinal (-1: not a date), bounded
        targets = sorted({r.unit for r in self.index.rules})
        self.names = ["", TIME_BAD, FUTURE, MISSING, NOT_NUMBER, NOT_FINITE] + [f"unit: not convertible to {u}" for u in targets]
        self.unit_reason = np.array([6 + targets.index(r.unit) for r in self.index.rules], np.int64)

    def chunk(self, pid: pa.Array, time: pa.Array, system: pa.Array, code: pa.Array, value: pa.Array,
              unit: pa.Array, lines: np.ndarray) -> None:
        """One chunk: string columns (time may be date32, value float64), `lines` their line numbers."""
        encoded = pid.dictionary_encode()
        if "" in (pids := encoded.dictionary.to_pylist()):  # an empty line, or a row of empty cells: no reading
            blank = encoded.indices.to_numpy() == pids.index("")
            for column in (time, system, code, value, unit):
                blank &= _empty(column)
            if blank.any():
                keep = pa.array(np.flatnonzero(~blank))
                pid, time, system, code, value, unit = (a.take(keep) for a in (pid, time, system, code, value, unit))
                lines, encoded = lines[~blank], pid.dictionary_encode()
        report, n = self.report, len(lines)
        report.readings_read += n
        if not n:
            return
        s, c = system.dictionary_encode(), code.dictionary_encode()
        reading, rule = self.index.pairs([_cell(x) for x in s.dictionary.to_pylist()],
                                         [_cell(x) for x in c.dictionary.to_pylist()],
                                         s.indices.to_numpy(), c.indices.to_numpy())
        matched, row = np.bincount(reading, minlength=n) > 0, _lookup(encoded, self.patients)
        report.ignored += n - int(np.count_nonzero(matched))
        report.quarantine("patient_id: missing", lines[matched & (row == -2)])
        report.unknown_patients += int(np.count_nonzero(matched & (row == -1)))
        take = np.flatnonzero(matched & (row >= 0))
        if not len(take):
            return
        if len(take) < n:
            position = np.full(n, -1)
            position[take] = np.arange(len(take))
            kept = position[reading] >= 0
            reading, rule = position[reading[kept]], rule[kept]
            time, value, unit = (a.take(pa.array(take)) for a in (time, value, unit))
            lines, row = lines[take], row[take]
        reason = np.zeros(len(take), np.int64)  # index into `self.names`; 0 = good; the first check failed wins
        day = self._days(time)
        _mark(reason, day < 0, 1)
        _mark(reason, day > self.today, 2)
        number, status = _numbers(value)
        _mark(reason, status == 1, 3)
        _mark(reason, status == 0, 4)
        _mark(reason, ~np.isfinite(number), 5)
        encoded = unit.dictionary_encode()
        units, unit_of = [_cell(u) for u in encoded.dictionary.to_pylist()], encoded.indices.to_numpy()[reading]
        converted, refused = self.index.convert(rule, number[reading], units, unit_of)
        self._refuse_units(reason, reading, rule, refused, units, unit_of)
        _mark(reason, np.bincount(reading[~np.isfinite(converted)], minlength=len(take)) > 0, 5)
        for code_id in np.unique(reason[reason > 0]).tolist():
            report.quarantine(self.names[code_id], lines[reason == code_id])
        good = reason[reading] == 0
        reading, rule, converted, unit_of = reading[good], rule[good], converted[good], unit_of[good]
        self._count_conversions(rule, units, unit_of)
        self.aggregator.add(patient=row[reading], rule=rule, day=day[reading], value=converted)
        inside = self.aggregator.in_window(rule, day[reading])
        report.readings_used += int(np.count_nonzero(np.bincount(reading[inside], minlength=len(take))))

    def _days(self, time: pa.Array) -> np.ndarray:
        """Date ordinals, -1 where the time is not a date."""
        if pa.types.is_date32(time.type):
            return time.cast(pa.int32()).fill_null(-1 - _EPOCH).to_numpy().astype(np.int64) + _EPOCH
        valid = pc.match_substring_regex(time, _TIME).to_numpy(zero_copy_only=False)
        if not valid.all():  # quoted or padded cells (rare): the whole chunk's cells cleaned, then checked again
            time = _clean(time)
            valid = pc.match_substring_regex(time, _TIME).to_numpy(zero_copy_only=False)
        encoded = pc.utf8_slice_codeunits(time, 0, 10).dictionary_encode()
        table = np.array([self._ordinal(s) for s in encoded.dictionary.to_pylist()] or [-1], np.int64)
        return np.where(valid, table[encoded.indices.to_numpy()], -1)

    def _ordinal(self, date: str) -> int:
        """The ordinal of a 'YYYY-MM-DD' date part, -1 if it is no date (memoized)."""
        day = self.dates.get(date)
        if day is None:
            if len(self.dates) >= 1 << 16:
                self.dates.clear()
            day = self.dates[date] = (parse_day(date) or -1) if len(date) == 10 else -1
        return day

    def _refuse_units(self, reason: np.ndarray, reading: np.ndarray, rule: np.ndarray, refused: np.ndarray,
                      units: list[str], unit_of: np.ndarray) -> None:
        """Mark the readings with a unit one of their rules cannot take (reason: the first such rule's unit)."""
        bad = refused & (reason[reading] == 0)
        if bad.any():
            readings, first = np.unique(reading[bad], return_index=True)
            target, written = rule[bad][first], unit_of[bad][first]
            reason[readings] = self.unit_reason[target]
            for u, r in zip(written.tolist(), target.tolist()):
                shown = units[u] if units[u] in KNOWN_UNITS else "(other unit)"  # a unit cell may hold anything
                self.report.unit_mismatches[f"{shown}→{self.index.rules[r].unit}"] += 1

    def _count_conversions(self, rule: np.ndarray, units: list[str], unit_of: np.ndarray) -> None:
        width = len(self.index.rules)
        counts = np.bincount(unit_of.astype(np.int64) * width + rule, minlength=len(units) * width)
        for key in np.flatnonzero(counts).tolist():
            source, target = self.index.source_unit(units[key // width]), self.index.rules[key % width].unit
            if source != target:
                self.report.conversions[f"{source}→{target}"] += int(counts[key])


def _mark(reason: np.ndarray, mask: np.ndarray, code: int) -> None:
    """Give `code` to the readings in `mask` that have no reason yet (the first check wins)."""
    reason[(reason == 0) & np.asarray(mask, bool)] = code


def _empty(column: pa.Array) -> np.ndarray:
    if pa.types.is_string(column.type):
        return pc.equal(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
    return column.is_null().to_numpy(zero_copy_only=False)


def _lookup(encoded: pa.DictionaryArray, patients: Mapping[str, int]) -> np.ndarray:
    """Row index of each reading's patient; -1 not in the table, -2 no id."""
    ids = [_cell(s) for s in encoded.dictionary.to_pylist()]
    table = np.array([patients.get(s, -1) if s else -2 for s in ids] or [-1], np.int64)
    return table[encoded.indices.to_numpy()]


def _numbers(value: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, status): status 2 a number, 1 missing, 0 not a number."""
    if pa.types.is_floating(value.type):
        status = np.where(value.is_null().to_numpy(zero_copy_only=False), 1, 2)
        return value.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64), status
    try:
        return value.cast(pa.float64()).to_numpy(zero_copy_only=False), np.full(len(value), 2)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fast = pc.match_substring_regex(value, _NUMBER)
    if pc.sum(pc.invert(fast)).as_py() * 16 > len(value):  # many refused: quoted or padded cells, cleaned at once
        value = _clean(value)
        fast = pc.match_substring_regex(value, _NUMBER)
    number = pc.if_else(fast, value, "0").cast(pa.float64()).to_numpy(zero_copy_only=False).copy()
    status = np.where(fast.to_numpy(zero_copy_only=False), 2, 0)
    for i in np.flatnonzero(status == 0).tolist():  # the per-cell path: only cells the fast one refused
        text = _cell(value[i].as_py())
        if text.lower() in MISSING_TOKENS:
            status[i] = 1
            continue
        try:
            number[i], status[i] = float(text), 2
        except ValueError:
            pass
    return number, status


def _cell(text: str) -> str:
    """A cell as read: trimmed of white space and of one pair of enclosing double quotes ("" inside is ")."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('""', '"').strip()
    return text


def _clean(column: pa.Array) -> pa.Array:
    """`_cell` of every cell of a string column."""
    column = pc.utf8_trim_whitespace(column)
    quoted = pc.and_(pc.starts_with(column, '"'), pc.ends_with(column, '"'))
    quoted = pc.and_(quoted, pc.greater_equal(pc.utf8_length(column), 2))
    if pc.any(quoted).as_py():
        inner = pc.utf8_trim_whitespace(pc.replace_substring(pc.utf8_slice_codeunits(column, 1, -1), '""', '"'))
        column = pc.if_else(quoted, inner, column)
    return column


# --- CSV ------------------------------------------------------------------------------------------


def _check_columns(path: Path, names: Sequence[str], where: str) -> list[str]:
    """The required columns, present once each; returns the ignored other columns."""
    if absent := [c for c in COLUMNS if c not in names]:
        raise SiteDataError(f"{path}: {where}: missing column{'s' if len(absent) > 1 else ''} {', '.join(absent)} "
                            f"(a readings file has the columns {', '.join(COLUMNS)})")
    if twice := [c for c in COLUMNS if list(names).count(c) > 1]:
        raise SiteDataError(f"{path}: {where}: duplicated column{'s' if len(twice) > 1 else ''} {', '.join(twice)}")
    return [n for n in names if n not in COLUMNS]


def _read_csv(path: Path, ingest: _Ingest, block_bytes: int) -> None:
    """Stream the file in blocks cut after their last line end; a line over 1 MiB is quarantined unread."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SiteDataError(f"{path}: is a directory, expected a CSV file") from None
    with handle:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise SiteDataError(f"{path}: empty file (expected a header row: {', '.join(COLUMNS)})")
        try:
            header = [c.strip().strip('"').strip() for c in raw.decode("utf-8-sig").rstrip("\r\n").split(",")]
        except UnicodeDecodeError:
            raise SiteDataError(f"{path}: line 1: unreadable header (not UTF-8)") from None
        ingest.report.ignored_columns = _check_columns(path, header, "line 1")
        parse = _CsvChunk(header, ingest, block_bytes)
        line, pending, skipping = 2, bytearray(), not raw.endswith(b"\n")  # a header over 1 MiB was refused above
        while data := handle.read(block_bytes):
            if skipping:  # the rest of a line too long to read
                cut = data.find(b"\n")
                if cut < 0:
                    continue
                data, skipping = data[cut + 1:], False
            cut = data.rfind(b"\n")
            if cut < 0:
                pending += data
                if len(pending) > MAX_LINE_BYTES:
                    ingest.report.readings_read += 1
                    ingest.report.quarantine(f"line longer than {MAX_LINE_BYTES} bytes", [line])
                    line, pending, skipping = line + 1, bytearray(), True
                continue
            chunk = bytes(pending) + data[:cut + 1] if pending else data[:cut + 1]
            pending = bytearray(data[cut + 1:])
            line += parse(chunk, line)
        if pending and not skipping:
            parse(bytes(pending), line)  # a last line without its line end (a truncated file)


class _CsvChunk:
    """Parses one block of whole lines with pyarrow (no quoting: one line, one row), or line by line."""

    def __init__(self, header: list[str], ingest: _Ingest, block_bytes: int) -> None:
        self.ingest, self.width = ingest, len(header)
        self.positions = [header.index(c) for c in COLUMNS]
        names = [n if n in COLUMNS else f"_extra{i}" for i, n in enumerate(header)]
        self.read = pacsv.ReadOptions(use_threads=False, column_names=names, block_size=block_bytes + MAX_LINE_BYTES + 64)
        self.parse = pacsv.ParseOptions(quote_char=False, ignore_empty_lines=False, invalid_row_handler=self._invalid)
        self.convert = pacsv.ConvertOptions(include_columns=list(COLUMNS), column_types={c: pa.string() for c in COLUMNS},
                                            strings_can_be_null=False, null_values=[], quoted_strings_can_be_null=False)
        self.invalid: list[tuple[int, int]] = []

    def _invalid(self, row: pacsv.InvalidRow) -> str:
        self.invalid.append((row.number, row.actual_columns))
        return "skip"

    def __call__(self, chunk: bytes, first: int) -> int:
        """Parse the lines of `chunk`, the first being line `first`; returns how many lines it held."""
        if (b"\r" in chunk and chunk.count(b"\r") != chunk.count(b"\r\n")) or not _utf8(chunk):
            chunk = self._blank_bad_lines(chunk, first)
        self.invalid = []
        try:
            table = pacsv.read_csv(pa.py_buffer(chunk), read_options=self.read, parse_options=self.parse,
                                   convert_options=self.convert)
        except pa.ArrowInvalid as err:  # not seen in tests; the chunk is lost, not the file
            for line in range(first, first + chunk.count(b"\n") + (not chunk.endswith(b"\n"))):
                self._refuse(line, f"unreadable block of lines ({type(err).__name__})")
            return chunk.count(b"\n")
        for number, got in self.invalid:
            self._refuse(first + number - 1, f"expected {self.width} columns, got {got}")
        numbers = np.arange(1, table.num_rows + len(self.invalid) + 1)
        if self.invalid:
            numbers = numbers[~np.isin(numbers, [n for n, _ in self.invalid])]
        self.ingest.chunk(*(table.column(c).combine_chunks() for c in COLUMNS), lines=first + numbers - 1)
        return table.num_rows + len(self.invalid)

    def _refuse(self, line: int, reason: str) -> None:
        self.ingest.report.readings_read += 1
        self.ingest.report.quarantine(reason, [line])

    def _blank_bad_lines(self, chunk: bytes, first: int) -> bytes:
        """The chunk with each line that is not UTF-8 or holds a lone carriage return quarantined and emptied."""
        lines = chunk.split(b"\n")
        for k, raw in enumerate(lines):
            body = raw[:-1] if raw.endswith(b"\r") else raw
            if not _utf8(body) or b"\r" in body:
                self._refuse(first + k, "line is not UTF-8 text" if not _utf8(body) else "a carriage return inside a line")
                lines[k] = b""
        return b"\n".join(lines)


def _utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- Parquet --------------------------------------------------------------------------------------


def _kind(name: str, dtype: pa.DataType) -> str | None:
    """How a Parquet column is read: "text", "date", "timestamp", "number", "null"; None: refused."""
    dtype = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
    if pa.types.is_null(dtype) or pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "null" if pa.types.is_null(dtype) else "text"
    if name == "time" and (pa.types.is_date(dtype) or pa.types.is_timestamp(dtype)):
        return "timestamp" if pa.types.is_timestamp(dtype) else "date"
    numeric = pa.types.is_integer(dtype) or (name == "value" and (pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)))
    return "number" if numeric and name in ("value", "patient_id") else None


def _parquet_column(column: pa.Array, name: str, kind: str) -> pa.Array:
    """A batch's column as `_Ingest.chunk` takes it: strings ("" for null), date32, or float64 values."""
    if kind == "timestamp" and column.type.tz is not None:
        column = pc.local_timestamp(column)  # the calendar date in the timestamp's own zone
    if kind in ("timestamp", "date"):
        return column.cast(pa.date32())
    if name == "value" and kind in ("number", "null"):
        return column.cast(pa.float64())
    return column.cast(pa.string()).fill_null("")


def _read_parquet(path: Path, ingest: _Ingest, batch_rows: int) -> None:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise SiteDataError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    schema = parquet.schema_arrow
    ingest.report.ignored_columns = _check_columns(path, schema.names, "schema")
    kinds = {c: _kind(c, schema.field(c).type) for c in COLUMNS}
    for name, kind in kinds.items():
        if kind is None:
            raise SiteDataError(f"{path}: schema: column {name}: type {schema.field(name).type} is not supported")
    batches, row = parquet.iter_batches(batch_size=max(1, batch_rows), columns=list(COLUMNS)), 0
    while True:
        try:
            batch = next(batches)
            columns = [_parquet_column(batch.column(c), c, kinds[c]) for c in COLUMNS]
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as err:
            ingest.report.quarantine(f"unreadable from here on ({type(err).__name__}: truncated or damaged file)", [row + 1])
            return
        ingest.chunk(*columns, lines=np.arange(row + 1, row + batch.num_rows + 1))
        row += batch.num_rows
