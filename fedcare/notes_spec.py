"""The study's `[notes]` section: linguistic markers and the optional hashed n-gram block.

`parse_notes` validates the table (every mistake a `StudyConfigError` naming the field);
`hashed_features` are the model inputs the block adds after the spec's features. What the
site does with them is `fedcare/derived.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedcare.fields import Fields
from fedcare.notes import Marker

HASH_PREFIX = "note_hash_"
HASH_HIGH = 30.0  # log(1 + count) above this is out of the study range (a count beyond 1e13)
MAX_HASH_DIMENSION = 4096
MAX_NGRAMS = 3
NOTE_AGGREGATES = ("count", "any", "days_since")
MENTION_KINDS = ("negated", "hypothetical", "historical", "family", "uncertain")


@dataclass(frozen=True)
class Hashing:
    """`[notes.hashing]`: the hashed n-gram block of model inputs."""

    dimension: int
    ngrams: int
    window_days: int
    salt: str

    @property
    def feature_names(self) -> tuple[str, ...]:
        width = max(3, len(str(self.dimension - 1)))
        return tuple(f"{HASH_PREFIX}{i:0{width}d}" for i in range(self.dimension))


@dataclass(frozen=True)
class NotesSpec:
    """The study's `[notes]`: linguistic markers, and the hashed block if any."""

    markers: tuple[Marker, ...]
    hashing: Hashing | None


def parse_notes(raw: dict[str, Any], source: str, *, study_name: str = "") -> NotesSpec:
    """Validate a `[notes]` table; every mistake raises `StudyConfigError` naming the field."""
    f = Fields(source)
    f.no_unknown_keys(raw, "notes", ("markers", "hashing"))
    markers_raw = f.table(raw, "notes.markers", optional=True)
    markers = []
    for name, phrases in markers_raw.items():
        at = f"notes.markers.{name}"
        if not name.replace("_", "").isalnum():
            raise f.fail(at, "a marker name is letters, digits and underscores")
        if not isinstance(phrases, list) or not phrases:
            raise f.fail(at, f"expected a non-empty list of phrases, got {phrases!r}")
        for i, phrase in enumerate(phrases):
            if not isinstance(phrase, str) or not any(c.isalnum() for c in phrase):
                raise f.fail(f"{at}[{i}]", f"expected a phrase with at least one letter or digit, got {phrase!r}")
        markers.append(Marker(name=name, phrases=tuple(phrases)))
    hashing = None
    if "hashing" in raw:
        h = f.table(raw, "notes.hashing")
        f.no_unknown_keys(h, "notes.hashing", ("dimension", "ngrams", "window_days", "salt"))
        dimension = f.integer(h, "notes.hashing.dimension", minimum=1)
        if dimension > MAX_HASH_DIMENSION:
            raise f.fail("notes.hashing.dimension", f"must be <= {MAX_HASH_DIMENSION}, got {dimension}")
        ngrams = f.integer(h, "notes.hashing.ngrams", minimum=1, default=1)
        if ngrams > MAX_NGRAMS:
            raise f.fail("notes.hashing.ngrams", f"must be <= {MAX_NGRAMS}, got {ngrams}")
        hashing = Hashing(dimension=dimension, ngrams=ngrams,
                          window_days=f.integer(h, "notes.hashing.window_days", minimum=1),
                          salt=f.string(h, "notes.hashing.salt", default=study_name))
    if not markers and hashing is None:
        raise f.fail("notes", "expected [notes.markers], [notes.hashing] or both")
    return NotesSpec(markers=tuple(markers), hashing=hashing)


def hashed_features(hashing: Hashing) -> tuple[dict[str, Any], ...]:
    """The model inputs of the hashed block (as `fedcare.study.Feature` fields), after the spec's features."""
    return tuple({"name": name, "type": "numeric", "unit": "log(1 + hashed n-gram count)", "low": 0.0,
                  "high": HASH_HIGH, "missing": "impute", "center": 0.0, "scale": 1.0}
                 for name in hashing.feature_names)
