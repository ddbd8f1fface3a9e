"""A study rendered back as a study file (`Study.to_toml`): every value, none of the comments."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def render_toml(study: Any) -> str:
    """A `fedcare.study.Study` as a TOML file that `load_study` reads back to an equal Study (`Study.to_toml`)."""
    def val(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, float):
            return repr(v)
        return str(v)

    def section(name: str, obj: Any) -> str:
        # None: a field the section does not use (a strategy's unused options), left out as in the file
        lines = [f"[{name}]"] + [f"{k} = {val(v)}" for k, v in dataclasses.asdict(obj).items() if v is not None]
        return "\n".join(lines)

    parts = [
        "[study]\n" f"name = {val(study.name)}\n" f"description = {val(study.description)}",
        section("label", study.label),
    ]
    generated = set(study.hashed_feature_names)  # [notes.hashing] adds them again on reading
    for f in study.features:
        if f.name in generated:
            continue
        d = dataclasses.asdict(f)
        d["range"] = [d.pop("low"), d.pop("high")]
        parts.append("[[features]]\n" + "\n".join(f"{k} = {val(v)}" for k, v in d.items()))
    parts += [
        section("model", study.model),
        section("training", study.training),
        section("privacy", study.privacy),
        section("secure_aggregation", study.secure_aggregation),
        section("strategy", study.strategy),
    ]
    if study.standardization != "spec":
        parts.append(f"[standardization]\nmethod = {val(study.standardization)}")
    if study.notes_source is not None:
        parts += _render_tables("notes", study.notes_source, val)
    if study.mapping_source is not None:
        parts += _render_tables("mapping", study.mapping_source, val)
    if study.omop_source is not None:
        parts += _render_tables("omop", study.omop_source, val)
    return "\n\n".join(parts) + "\n"


def _render_tables(name: str, table: dict[str, Any], val: Any) -> list[str]:
    """A nested TOML table: scalars and arrays (of scalars or inline tables) here, sub-tables after."""
    def inline(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {inline(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(inline(x) for x in v) + "]"
        return val(v)

    here = [f"{k} = {inline(v)}" for k, v in table.items() if not isinstance(v, dict)]
    parts = [f"[{name}]" + ("\n" + "\n".join(here) if here else "")]
    for k, v in table.items():
        if isinstance(v, dict):
            parts += _render_tables(f"{name}.{k}", v, val)
    return parts
