"""The one typed reader of parsed TOML documents: study, mapping, kit and policy files.

`Fields(source, error)` reads values out of the dicts `tomllib` returns. A field is named by
its dotted path (`training.rounds`, `mapping.features.bmi.unit`, `[privacy]`); the key looked up
is its last part. Every failure is `error(f"{source}: {field}: {why}")` with one wording for one
kind of mistake, whichever file it is in:

    missing field / missing table / expected a table
    expected a string, got 'x'            expected a non-empty string, got ''
    unknown value 'x' (expected one of: a, b)
    expected a number, got 'x'            must be finite / > 0 / >= m / < b, got v
    expected an integer, got 'x'          unknown key (expected: a, b)
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any

from fedcare.errors import FedcareError, StudyConfigError

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MISSING = object()


def _key(field: str) -> str:
    return field.rsplit(".", 1)[-1].strip("[]")


class Fields:
    """Typed access that names the file and the field on every failure (see the module docstring)."""

    def __init__(self, source: str, error: type[FedcareError] = StudyConfigError) -> None:
        self.source = source
        self.error = error

    def fail(self, field: str, why: str) -> FedcareError:
        return self.error(f"{self.source}: {field}: {why}")

    def _get(self, raw: dict[str, Any], field: str, default: Any = _MISSING) -> Any:
        key = _key(field)
        if key in raw:
            return raw[key]
        if default is not _MISSING:
            return default
        raise self.fail(field, "missing field")

    def table(self, raw: dict[str, Any], field: str, *, optional: bool = False) -> dict[str, Any]:
        value = raw.get(_key(field))
        if value is None:
            if optional:
                return {}
            raise self.fail(field, "missing table")
        if not isinstance(value, dict):
            raise self.fail(field, "expected a table")
        return value

    def array_of_tables(self, raw: dict[str, Any], field: str) -> list[dict[str, Any]]:
        value = raw.get(_key(field))
        if value is None:
            raise self.fail(field, "missing table")
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            raise self.fail(field, "expected a non-empty array of tables")
        return value

    def no_unknown_keys(self, raw: dict[str, Any], field: str, known: tuple[str, ...], *, context: str = "") -> None:
        for key in raw:
            if key not in known:
                why = f"unknown key{' ' + context if context else ''}"
                raise self.fail(f"{field}.{key}", f"{why} (expected: {', '.join(known)})")

    def string(self, raw: dict[str, Any], field: str, default: Any = _MISSING, *, non_empty: bool = False) -> str:
        value = self._get(raw, field, default)
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {value!r}")
        if non_empty and not value.strip():
            raise self.fail(field, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, raw: dict[str, Any], field: str, options: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.string(raw, field, default)
        if value not in options:
            raise self.fail(field, f"unknown value '{value}' (expected one of: {', '.join(options)})")
        return value

    def number(self, raw: dict[str, Any], field: str, *, positive: bool = False, minimum: float | None = None,
               below: float | None = None, default: Any = _MISSING) -> float | int:
        value = self._get(raw, field, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(field, f"must be finite, got {value}")
        if positive and value <= 0:
            raise self.fail(field, f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            raise self.fail(field, f"must be >= {minimum}, got {value}")
        if below is not None and value >= below:
            raise self.fail(field, f"must be < {below}, got {value}")
        return value

    def integer(self, raw: dict[str, Any], field: str, *, minimum: int, default: Any = _MISSING) -> int:
        value = self._get(raw, field, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.fail(field, f"must be >= {minimum}, got {value}")
        return value

    def boolean(self, raw: dict[str, Any], field: str, default: Any = _MISSING) -> bool:
        value = self._get(raw, field, default)
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true or false, got {value!r}")
        return value

    def number_list(self, raw: dict[str, Any], field: str) -> list[float]:
        value = self._get(raw, field)
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise self.fail(field, f"expected a list of numbers, got {value!r}")
        return [float(v) for v in value]

    def int_list(self, raw: dict[str, Any], field: str, *, minimum: int) -> list[int]:
        value = self._get(raw, field)
        if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
        ):
            raise self.fail(field, f"expected a non-empty list of integers >= {minimum}, got {value!r}")
        return value

    def string_list(self, raw: dict[str, Any], field: str, default: Any = _MISSING, *, non_empty: bool = True) -> list[str]:
        value = self._get(raw, field, default)
        if not isinstance(value, list) or (non_empty and not value) or not all(isinstance(v, str) and v.strip() for v in value):
            what = "a non-empty list of strings" if non_empty else "a list of strings"
            raise self.fail(field, f"expected {what}, got {value!r}")
        return value

    def iso_date(self, raw: dict[str, Any], field: str) -> datetime.date:
        value = self._get(raw, field)
        if isinstance(value, str) and _ISO_DATE.fullmatch(value):
            try:
                return datetime.date.fromisoformat(value)
            except ValueError:
                pass
        raise self.fail(field, f"expected an ISO date string \"YYYY-MM-DD\", got {value!r}")
