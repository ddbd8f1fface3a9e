"""The FastAPI app of `fedcare serve`.

    POST /v1/analyze   {patient_id, features: {name: value|null} | feature_vector: [...], model}
                       -> {risk, label, model, model_version, study_hash}       scope "analyze"
    GET  /v1/models    the served models, execution provider, inputs and ranges  scope "models"
    GET  /healthz      health (no token): 200 ok, or 503 with the reason (the audit log cannot be written)
    GET  /metrics      Prometheus text format 0.0.4 (no token; counts and latencies only)
    GET  /openapi.json the OpenAPI document, with this package's features and ranges; it documents
                       every status code and content type each operation answers with

Errors are JSON `{"detail": "...", ...}`: 401 missing/invalid token, 403 missing scope, 404 unknown
model or path, 413 body over 64 KiB (Content-Length and the streamed length are both checked),
415 a POST body not declared `application/json` (optionally `charset=utf-8`), 422 anything wrong
with the body (naming the feature, or the key given twice), 503 with Retry-After when the audit
log cannot be written (no answer without its audit line). The request path is: bearer token
(constant-time), media type, pydantic (`model_validate_json`, strict), a duplicate-key check
(`bytes.count` of the colons against the keys pydantic saw; the json module only on a mismatch),
numpy scaling, one ONNX Runtime `run`.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import ValidationError

from inference.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from inference.metrics import Metrics
from inference.middleware import CONTEXT, MAX_BODY, RETRY_AFTER, ServeMiddleware, audit_reason
from inference.model import InputError, sigmoid
from inference.schemas import (
    ACCEPTED_MEDIA_TYPES,
    AnalyzeRequest,
    AnalyzeResponse,
    Answer,
    ApiError,
    ErrorResponse,
    Health,
    ModelsResponse,
    check_media_type,
    duplicate_keys,
    error_answer,
    derived_names,
    request_schema,
    shown,
    validation_errors,
)
from fedcare.derived import calendar_day
from inference.derived_inputs import derive_values
from inference.service import Service
from inference.tokens import TokenEntry


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)



def _response(answer: Answer) -> Response:
    status, content, headers = answer
    return Response(content, status_code=status, media_type="application/json",
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers} or None)



MAX_BODY_WITH_NOTES = 8 << 20  # a package that derives features from notes accepts a patient's notes


def create_app(service: Service, *, max_body: int = MAX_BODY) -> FastAPI:
    if service.derivation is not None and max_body == MAX_BODY:
        max_body = MAX_BODY_WITH_NOTES
    metrics = Metrics({
        "provider": service.provider,
        "model_version": service.model_version,
        "study": service.study_name,
        "study_hash": service.study_hash,
    }, audit=service.audit)
    app = FastAPI(
        title="fedcare prediction service",
        version=service.model_version,
        description=f"Risk of '{service.label}' for study '{service.study_name}' from a signed fedcare model package.",
        docs_url=None, redoc_url=None,  # no CDN-hosted UI assets; the document itself is at /openapi.json
    )
    app.router.redirect_slashes = False  # '/v1/analyze/' is a JSON 404, not a redirect without a body
    app.state.service, app.state.metrics = service, metrics
    inputs, models, tokens, audit = service.inputs, service.models.models, service.tokens, service.audit

    def authorize(header: str | None, scope: str, ctx: dict[str, Any]) -> TokenEntry:
        if not header:
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", reason="no_token")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <token>'", reason="bad_token")
        entry = tokens.authenticate(token)
        if entry is None:
            raise ApiError(401, "invalid or revoked token", reason="bad_token")
        ctx["token"] = entry.name
        if scope not in entry.scopes:
            raise ApiError(403, f"token '{entry.name}' does not have the '{scope}' scope", reason="scope")
        return entry

    def run_analyze(header: str | None, content_type: str | None, raw_body: bytes, ctx: dict[str, Any]) -> Answer:
        """POST /v1/analyze, whichever way the request arrives (fast path or FastAPI route)."""
        try:
            authorize(header, "analyze", ctx)
            check_media_type(content_type)
            try:
                body = AnalyzeRequest.model_validate_json(raw_body)
            except ValidationError as err:
                raise (duplicate_keys(raw_body, service) or validation_errors(err, service)) from None
            # Duplicate keys: every member of a JSON object has one colon outside strings, so with no key
            # twice the colons are the keys pydantic kept plus those inside strings (exact when that is
            # all); anything else is looked at by the json module, which sees every pair.
            colons = raw_body.count(b":")
            features = body.features
            keys = len(body.model_fields_set) + (len(features) if features is not None else 0)
            keys += 2 * len(body.notes or ()) + 5 * len(body.readings or ())
            if colons != keys and (b"\\" in raw_body or colons - body.patient_id.count(":") - body.model.count(":") != keys):
                duplicate = duplicate_keys(raw_body, service)
                if duplicate is not None:
                    raise duplicate
            ctx["patient"] = audit.pseudonym(body.patient_id)
            name = body.model if "model" in body.model_fields_set else service.models.default
            model = models.get(name)
            if model is None:
                raise ApiError(404, f"unknown model '{shown(name)}'; this package serves: {', '.join(models)}",
                               reason="unknown_model")
            ctx["model"] = name
            if body.features is not None and body.feature_vector is not None:
                raise ApiError(422, "give either 'features' or 'feature_vector', not both", reason="invalid_body")
            if body.features is not None:
                values = inputs.values_from_features(body.features)
            elif body.feature_vector is not None:
                values = inputs.values_from_vector(body.feature_vector)
            else:
                raise ApiError(422, "no feature values: give 'features' (an object) or 'feature_vector' "
                                    "(an array in the order of inputs.features)", reason="invalid_body")
            for field in ("notes", "readings"):
                if field in body.model_fields_set and getattr(body, field) is None:
                    raise ApiError(422, f"{field}: null is not allowed; leave '{field}' out or give an array",
                                   reason="invalid_body")
            if body.index_date and (len(body.index_date) != 10 or calendar_day(body.index_date) is None):
                raise ApiError(422, "index_date: expected YYYY-MM-DD", reason="invalid_body")
            if service.derivation is not None:
                values = derive_values(service.derivation, values, body)
            elif body.notes or body.readings:
                raise ApiError(422, "this package's study derives no feature from notes or readings; "
                                    "leave 'notes' and 'readings' out", reason="invalid_body")
            risk = sigmoid(model.logit(inputs.prepare(values)))
            if not math.isfinite(risk):
                raise ApiError(503, "the model produced no valid risk for these inputs", reason="model_output")
        except InputError as err:
            ctx["reason"], ctx["feature"] = err.reason, err.feature
            return error_answer(ApiError(422, str(err), feature=err.feature))
        except ApiError as err:
            ctx["reason"] = err.reason
            if err.feature is not None:
                ctx["feature"] = err.feature
            return error_answer(err)
        metrics.predictions[name] += 1
        return 200, orjson.dumps({
            "risk": risk,
            "label": service.label,
            "model": name,
            "model_version": service.model_version,
            "study_hash": service.study_hash,
        }), []

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        """The documented error responses: each code with its description and the ErrorResponse schema."""
        text = {
            401: "Missing, malformed, invalid or revoked token (with `WWW-Authenticate: Bearer`)",
            403: "The token lacks the endpoint's scope",
            404: "Unknown model",
            413: f"Body larger than {max_body} bytes (any method)",
            415: f"POST body not declared as {ACCEPTED_MEDIA_TYPES}",
            422: "Invalid body: `detail` says what, `feature` names the study feature concerned, `errors` lists "
                 "several problems; a key given twice in one object is refused",
            503: "The audit log cannot be written (`reason` says why; Retry-After), or the model gave no valid risk; "
                 "nothing was answered",
        }
        out: dict[int | str, dict[str, Any]] = {}
        for code in codes:
            entry: dict[str, Any] = {"model": ErrorResponse, "description": text[code]}
            if code == 401:
                entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="fedcare"'}}
            if code == 503:
                entry["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                                    "description": "seconds (when the audit log cannot be written)"}}
            out[code] = entry
        return out

    security = {"security": [{"bearerAuth": []}]}

    @app.post(
        "/v1/analyze",
        summary="Risk for one patient",
        response_model=None,
        responses={
            200: {"model": AnalyzeResponse, "description": "The predicted risk"},
            **errors(401, 403, 404, 413, 415, 422, 503),
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(service)}}},
            **security,
        },
    )
    async def analyze(request: Request) -> Response:
        # Served by ServeMiddleware's fast path in practice; this route is the same function for
        # any other ASGI stack (and declares the endpoint in the OpenAPI document).
        return _response(run_analyze(request.headers.get("authorization"), request.headers.get("content-type"),
                                     await request.body(), request.scope[CONTEXT]))

    @app.get("/v1/models", summary="Served models, execution provider and inputs", response_model=None,
             responses={200: {"model": ModelsResponse, "description": "The package's models and inputs"},
                        **errors(401, 403, 413, 503)},
             openapi_extra=security)
    async def list_models(request: Request) -> Response:
        try:
            authorize(request.headers.get("authorization"), "models", request.scope[CONTEXT])
        except ApiError as err:
            request.scope[CONTEXT]["reason"] = err.reason
            return _response(error_answer(err))
        manifest = service.manifest
        return _json({
            "study": {"name": service.study_name, "hash": service.study_hash},
            "label": manifest.get("label"),
            "model_version": service.model_version,
            "provider": service.provider,
            "default": service.models.default,
            "default_choice": service.default_choice.describe(),
            "models": [m.describe() for m in models.values()],
            "inputs": {
                "features": list(inputs.features),
                "ranges": {n: {"low": float(inputs.low[i]), "high": float(inputs.high[i]), "missing": inputs.missing[i]}
                           for i, n in enumerate(inputs.features)},
                "derived": derived_names(service),
            },
            "metrics": manifest.get("metrics"),
            "created": manifest.get("created"),
        })

    @app.get("/healthz", summary="Health: 200 when requests can be answered, 503 with the reason when not",
             response_model=None,
             responses={200: {"model": Health, "description": "Healthy"},
                        503: {"model": Health, "description": "Unhealthy: `reason` says why (e.g. the audit log "
                                                              "cannot be written); take the instance out of rotation",
                              "headers": {"Retry-After": {"schema": {"type": "string"}}}},
                        **errors(413)})
    async def healthz() -> Response:
        failure = audit.check()  # retries a failed audit log (recovers by itself)
        if failure is not None:
            return _json({"status": "unhealthy", "reason": audit_reason(failure),
                          "model_version": service.model_version, "provider": service.provider},
                         503, headers={"Retry-After": RETRY_AFTER.decode()})
        return _json({"status": "ok", "model_version": service.model_version, "provider": service.provider})

    @app.get("/metrics", summary="Prometheus metrics (text exposition format 0.0.4)", response_model=None,
             responses={200: {"description": "Prometheus text exposition format 0.0.4"}, **errors(413)})
    async def prometheus() -> Response:
        audit.tick()
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http", "scheme": "bearer", "description": "a token from `fedcare serve token add`"}
            # the Prometheus text format, not JSON (the route answers with a plain Response)
            schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {
                METRICS_CONTENT_TYPE.removesuffix("; charset=utf-8"): {"schema": {"type": "string"}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(ServeMiddleware, service=service, metrics=metrics, max_body=max_body, fast_analyze=run_analyze)
    return app
