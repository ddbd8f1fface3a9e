"""The request and response models of `fedcare serve`, and how a refused request is answered.

`AnalyzeRequest` is strict pydantic (`model_validate_json`); `validation_errors` turns pydantic's
errors into one clear line each, naming the study feature concerned; `request_schema` is the
AnalyzeRequest schema published at /openapi.json, with this package's features, ranges and
missing-value policies. An `ApiError` becomes an `Answer` (status, JSON body, extra headers).
`check_media_type` refuses a POST body that is not declared JSON (415); `duplicate_keys` finds a
key given twice in one JSON object (pydantic, like orjson, would keep the last one silently).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError


if TYPE_CHECKING:
    from inference.service import Service

JSON_TYPES = {str: "a string", bool: "a boolean", list: "an array", dict: "an object", type(None): "null", int: "a number", float: "a number"}


MAX_NOTES = 1000
MAX_READINGS = 100_000


class NoteIn(BaseModel):
    """One clinician note: analysed in memory, never stored or logged."""

    model_config = ConfigDict(extra="forbid", strict=True)

    date: str = Field(min_length=10, max_length=40, description="YYYY-MM-DD or a dateTime (its calendar date counts)")
    text: str = Field(max_length=1 << 20, description="The note's plain text")


class ReadingIn(BaseModel):
    """One device reading: aggregated in memory, never stored or logged."""

    model_config = ConfigDict(extra="forbid", strict=True)

    time: str = Field(min_length=10, max_length=40, description="YYYY-MM-DD or a dateTime (its calendar date counts)")
    system: str = Field(min_length=1, max_length=256, description="Code system, e.g. http://loinc.org")
    code: str = Field(min_length=1, max_length=64, description="The reading's code, e.g. 8867-4 (heart rate)")
    value: float
    unit: str = Field(min_length=1, max_length=32, description="UCUM unit (common spellings accepted)")


class AnalyzeRequest(BaseModel):
    """One patient's raw feature values (the study's units; not scaled), and the notes and device
    readings the study derives features from, if it does (derived features are never given as values)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    patient_id: str = Field(min_length=1, max_length=256, description="Pseudonymized in the audit log; never stored raw")
    # Absent = not given (exactly one of the two); `null` is refused, as the published schema says.
    features: dict[str, float | None] = Field(
        None, description="Raw values by feature name; a null value or an absent name = missing")  # type: ignore[assignment]
    feature_vector: list[float | None] = Field(
        None, description="Raw values in the order of inputs.features (GET /v1/models); null = missing")  # type: ignore[assignment]
    model: str = Field("", description="fp32, int8, or a16w8 when the package has it; left out: the service's default "
                                        "(GET /v1/models `default`: the fastest here within the accuracy bound)")
    notes: list[NoteIn] = Field(None, max_length=MAX_NOTES,  # type: ignore[assignment]
                                description="Clinician notes the study derives features from (GET /v1/models `derived`)")
    readings: list[ReadingIn] = Field(None, max_length=MAX_READINGS,  # type: ignore[assignment]
                                      description="Device readings the study derives features from")
    index_date: str = Field("", max_length=10, description="YYYY-MM-DD the notes' and readings' windows end on; "
                                                          "left out: today (UTC)")


class AnalyzeResponse(BaseModel):
    risk: float = Field(description="Predicted probability of the label, sigmoid(risk_logit)")
    label: str
    model: str
    model_version: str = Field(description="First 12 hex digits of the package manifest's SHA-256")
    study_hash: str


class ErrorItem(BaseModel):
    loc: list[str | int]
    detail: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong, in one line")
    feature: str | None = Field(None, description="The study feature concerned, when there is one")
    errors: list[ErrorItem] | None = Field(None, description="Every problem found, when there are several")
    reason: str | None = Field(None, description="503 only: why the service cannot answer now")


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    model_version: str
    provider: str
    reason: str | None = Field(None, description="Why it is unhealthy (e.g. the audit log cannot be written)")


class ModelInfo(BaseModel):
    name: str
    file: str | None
    sha256: str | None
    batch: Any = None
    provider: str


class FeatureRange(BaseModel):
    low: float
    high: float
    missing: str


class Inputs(BaseModel):
    features: list[str]
    ranges: dict[str, FeatureRange]
    derived: list[str] = Field(default_factory=list,
                               description="Features derived from the request's notes and readings (never given as values)")


class StudyRef(BaseModel):
    name: str
    hash: str


class ModelsResponse(BaseModel):
    study: StudyRef
    label: Any = Field(description="The package's label (name and definition)")
    model_version: str
    provider: str
    default: str = Field(description="The model a request that names none is scored by")
    default_choice: str = Field(description="Why: pinned by --model, or the start-up measurement (per-row latency "
                                            "of each model, and which are outside the accuracy bound)")
    models: list[ModelInfo]
    inputs: Inputs
    metrics: Any = Field(description="The package's recorded metrics")
    created: Any = Field(description="When the package was built")


class ApiError(Exception):
    def __init__(self, status: int, detail: str, *, feature: str | None = None, reason: str | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.feature, self.reason, self.errors = status, detail, feature, reason, errors


WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="fedcare"')
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, extra headers


JSON_MEDIA_TYPE = "application/json"
ACCEPTED_MEDIA_TYPES = "application/json (optionally with charset=utf-8)"


def check_media_type(value: str | None) -> None:
    """A POST body must be declared `application/json`, optionally `; charset=utf-8` (415 otherwise)."""
    if value is not None:
        kind, _, params = value.partition(";")
        if kind.strip().lower() == JSON_MEDIA_TYPE:
            ok = True
            for param in params.split(";") if params.strip() else ():
                name, _, val = param.partition("=")
                if name.strip().lower() != "charset" or val.strip().strip('"').lower() not in ("utf-8", "utf8"):
                    ok = False
            if ok:
                return
    got = "no Content-Type" if value is None else f"Content-Type '{shown(value)}'"
    raise ApiError(415, f"unsupported media type: send the body as {ACCEPTED_MEDIA_TYPES}; got {got}",
                   reason="media_type")


class _Seen(dict):
    """A JSON object in which `duplicate` was given more than once."""

    duplicate: str = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            seen = _Seen(pairs)
            seen.duplicate = key
            return seen
        obj[key] = value
    return obj


def _find_duplicate(value: Any, path: tuple[Any, ...]) -> tuple[tuple[Any, ...], str] | None:
    if isinstance(value, _Seen):
        return path, value.duplicate
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, (dict, list)):
            found = _find_duplicate(item, (*path, key))
            if found:
                return found
    return None


def duplicate_keys(raw: bytes, service: Service) -> ApiError | None:
    """The 422 for a key given twice in one object of the body, or None (also for bodies that are not JSON)."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return None
    found = _find_duplicate(doc, ())
    if found is None:
        return None
    path, key = found
    if path == ():
        return ApiError(422, f"duplicate field '{shown(key)}' in the request body; each field may appear only once",
                        reason="duplicate_key")
    if path == ("features",):
        known = key in service.inputs.index
        return ApiError(422, f"duplicate feature '{shown(key)}' in features; each feature may appear only once",
                        feature=key if known else None, reason="duplicate_key")
    where = ".".join(shown(p) for p in path)
    return ApiError(422, f"duplicate key '{shown(key)}' in {where}; each key may appear only once", reason="duplicate_key")


def error_answer(err: ApiError) -> Answer:
    body: dict[str, Any] = {"detail": err.detail}
    if err.feature is not None:
        body["feature"] = err.feature
    if err.errors:
        body["errors"] = err.errors
    return err.status, orjson.dumps(body), [WWW_AUTHENTICATE] if err.status == 401 else []


# -- request validation errors -> one clear line each ------------------------------------------


def shown(name: Any) -> str:
    text = str(name)
    return text if len(text) <= 64 else text[:61] + "..."


def validation_errors(err: ValidationError, service: Service) -> ApiError:
    features = service.inputs.features
    messages: list[dict[str, Any]] = []
    first_feature: str | None = None
    for e in err.errors(include_url=False, include_input=True)[:20]:
        kind, loc = e["type"], e["loc"]
        got = JSON_TYPES.get(type(e.get("input")), "something else")
        feature = None
        if kind == "json_invalid":
            text = f"request body is not valid JSON ({e['msg'].removeprefix('Invalid JSON: ')})"
        elif not loc:
            text = f"request body must be a JSON object, got {got}"
        elif loc[0] in ("features", "feature_vector") and len(loc) == 1 and e.get("input", 0) is None:
            text = (f"{loc[0]}: null is not allowed; leave '{loc[0]}' out (give either 'features', an object, "
                    "or 'feature_vector', an array)")
        elif loc[0] == "features" and len(loc) == 2:
            name = loc[1]
            if name in service.inputs.index:
                feature = str(name)
                text = f"feature '{name}': expected a number or null, got {got}"
            else:
                text = f"unknown feature '{shown(name)}'; this package's features are listed by GET /v1/models"
        elif loc[0] == "features":
            text = f"features: expected an object of feature name -> number or null, got {got}"
        elif loc[0] == "feature_vector" and len(loc) == 2:
            i = loc[1]
            if isinstance(i, int) and 0 <= i < len(features):
                feature = features[i]
                text = f"feature '{feature}' (feature_vector[{i}]): expected a number or null, got {got}"
            else:
                text = f"feature_vector[{i}]: expected a number or null, got {got}"
        elif loc[0] == "feature_vector":
            text = f"feature_vector: expected an array of numbers or null, got {got}"
        elif kind == "extra_forbidden":
            text = (f"unknown field '{shown(loc[0])}'; the fields are patient_id, features or feature_vector, model, "
                    "notes, readings and index_date")
        elif loc[0] == "patient_id":
            if kind == "missing":
                text = "patient_id: required (a string)"
            elif kind in ("string_too_short", "string_too_long"):
                text = "patient_id: must be 1 to 256 characters"
            else:
                text = f"patient_id: expected a string, got {got}"
        elif loc[0] == "model":
            text = f"model: expected a string ({', '.join(service.models.models)}), got {got}"
        else:
            text = f"{'.'.join(map(str, loc))}: {e['msg']}"
        first_feature = first_feature or feature
        messages.append({"loc": [shown(p) for p in loc], "detail": text})
    return ApiError(422, messages[0]["detail"], feature=first_feature, reason="invalid_body",
                    errors=messages if len(messages) > 1 else None)


# -- the published request schema --------------------------------------------------------------


def request_schema(service: Service) -> dict[str, Any]:
    """The AnalyzeRequest schema, with this package's features, ranges and missing-value policies."""
    inputs = service.inputs
    schema = _inline_definitions(AnalyzeRequest.model_json_schema())
    props = schema["properties"]
    feature_props = {}
    derived = set(derived_names(service))
    for i, name in enumerate(inputs.features):
        number = {"type": "number", "minimum": float(inputs.low[i]), "maximum": float(inputs.high[i])}
        if name in derived:
            feature_props[name] = {"type": "null", "description": "derived from notes and readings: null or left out"}
        elif inputs.missing[i] == "reject":
            feature_props[name] = {**number, "description": "required (missing = reject)"}
        else:
            feature_props[name] = {"anyOf": [number, {"type": "null"}], "description": f"missing = {inputs.missing[i]}"}
    props["features"] = {
        "type": "object", "properties": {n: p for n, p in feature_props.items() if n not in derived},
        "additionalProperties": False,
        "required": [inputs.features[i] for i in inputs.reject_cols],
        "description": props["features"].get("description", ""),
    }
    props["feature_vector"] = {
        "type": "array", "minItems": len(inputs.features), "maxItems": len(inputs.features),
        "prefixItems": [feature_props[name] for name in inputs.features],
        "items": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "description": f"{props['feature_vector'].get('description', '')}: {', '.join(inputs.features)}",
    }
    schema["oneOf"] = [{"required": ["features"]}, {"required": ["feature_vector"]}]
    props["model"] = {**props["model"], "enum": list(service.models.models), "default": service.models.default}
    props["index_date"] = {"anyOf": [{"type": "string", "maxLength": 0},
                                     {"type": "string", "format": "date", "pattern": "^[1-9][0-9]{3}-[0-9]{2}-[0-9]{2}$"}],
                           "description": props["index_date"].get("description", "")}
    if not derived:  # this package derives nothing: the fields exist, but only empty
        props["notes"] = {**props["notes"], "maxItems": 0}
        props["readings"] = {**props["readings"], "maxItems": 0}
    return schema


def _inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its `$defs` (NoteIn, ReadingIn) written in place: the OpenAPI document holds
    this schema under paths, where a `#/$defs/...` reference would not resolve."""
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def derived_names(service: Service) -> list[str]:
    """Features the service derives from a request's notes and readings, in spec order."""
    derivation = service.derivation
    if derivation is None:
        return []
    return [derivation.features[i].name for i in sorted(derivation.columns)]
