"""The request and response models of `fedcare serve`, and how a refused request is answered.

`AnalyzeRequest` is strict pydantic (`model_validate_json`); `validation_errors` turns pydantic's
errors into one clear line each, naming the study feature concerned; `request_schema` is the
AnalyzeRequest schema published at /openapi.json, with this package's features, ranges and
missing-value policies. An `ApiError` becomes an `Answer` (status, JSON body, extra headers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.model import DEFAULT_MODEL

if TYPE_CHECKING:
    from inference.service import Service

JSON_TYPES = {str: "a string", bool: "a boolean", list: "an array", dict: "an object", type(None): "null", int: "a number", float: "a number"}


class AnalyzeRequest(BaseModel):
    """One patient's raw feature values (the study's units; not scaled)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    patient_id: str = Field(min_length=1, max_length=256, description="Pseudonymized in the audit log; never stored raw")
    features: dict[str, float | None] | None = Field(
        None, description="Raw values by feature name; null or absent = missing")
    feature_vector: list[float | None] | None = Field(
        None, description="Raw values in the order of inputs.features (GET /v1/models); null = missing")
    model: str = Field(DEFAULT_MODEL, description="int8 (default), fp32, or a16w8 when the package has it")


class AnalyzeResponse(BaseModel):
    risk: float = Field(description="Predicted probability of the label, sigmoid(risk_logit)")
    label: str
    model: str
    model_version: str = Field(description="First 12 hex digits of the package manifest's SHA-256")
    study_hash: str


class ErrorResponse(BaseModel):
    detail: str
    feature: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, detail: str, *, feature: str | None = None, reason: str | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.feature, self.reason, self.errors = status, detail, feature, reason, errors


WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="fedcare"')
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, extra headers


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
            text = f"unknown field '{shown(loc[0])}'; the fields are patient_id, features or feature_vector, and model"
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
    schema = AnalyzeRequest.model_json_schema()
    props = schema["properties"]
    feature_props = {}
    for i, name in enumerate(inputs.features):
        number = {"type": "number", "minimum": float(inputs.low[i]), "maximum": float(inputs.high[i])}
        if inputs.missing[i] == "reject":
            feature_props[name] = {**number, "description": "required (missing = reject)"}
        else:
            feature_props[name] = {"anyOf": [number, {"type": "null"}], "description": f"missing = {inputs.missing[i]}"}
    props["features"] = {
        "type": "object", "properties": feature_props, "additionalProperties": False,
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
    props["model"] = {**props["model"], "enum": list(service.models.models)}
    return schema
