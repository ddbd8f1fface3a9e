"""The FastAPI app of `fedcare serve`.

    POST /v1/analyze   {patient_id, features: {name: value|null} | feature_vector: [...], model}
                       -> {risk, label, model, model_version, study_hash}       scope "analyze"
    GET  /v1/models    the served models, execution provider, inputs and ranges  scope "models"
    GET  /healthz      liveness (no token)
    GET  /metrics      Prometheus text format (no token; counts and latencies only)
    GET  /openapi.json the OpenAPI document, with this package's features and ranges

Errors are JSON `{"detail": "...", ...}`: 401 missing/invalid token, 403 missing scope, 404 unknown
model or path, 413 body over 64 KiB (Content-Length and the streamed length are both checked),
422 anything wrong with the body (naming the feature). The request path is: bearer token
(constant-time), pydantic (`model_validate_json`, strict), numpy scaling, one ONNX Runtime `run`.
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
from inference.middleware import CONTEXT, MAX_BODY, ServeMiddleware
from inference.model import DEFAULT_MODEL, InputError, sigmoid
from inference.schemas import (
    AnalyzeRequest,
    AnalyzeResponse,
    Answer,
    ApiError,
    ErrorResponse,
    error_answer,
    request_schema,
    shown,
    validation_errors,
)
from inference.service import Service
from inference.tokens import TokenEntry


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)



def _response(answer: Answer) -> Response:
    status, content, headers = answer
    return Response(content, status_code=status, media_type="application/json",
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers} or None)



def create_app(service: Service, *, max_body: int = MAX_BODY) -> FastAPI:
    metrics = Metrics({
        "provider": service.provider,
        "model_version": service.model_version,
        "study": service.study_name,
        "study_hash": service.study_hash,
    })
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

    def run_analyze(header: str | None, raw_body: bytes, ctx: dict[str, Any]) -> Answer:
        """POST /v1/analyze, whichever way the request arrives (fast path or FastAPI route)."""
        try:
            authorize(header, "analyze", ctx)
            try:
                body = AnalyzeRequest.model_validate_json(raw_body)
            except ValidationError as err:
                raise validation_errors(err, service) from None
            ctx["patient"] = audit.pseudonym(body.patient_id)
            model = models.get(body.model)
            if model is None:
                raise ApiError(404, f"unknown model '{shown(body.model)}'; this package serves: {', '.join(models)}",
                               reason="unknown_model")
            ctx["model"] = body.model
            if body.features is not None and body.feature_vector is not None:
                raise ApiError(422, "give either 'features' or 'feature_vector', not both", reason="invalid_body")
            if body.features is not None:
                values = inputs.values_from_features(body.features)
            elif body.feature_vector is not None:
                values = inputs.values_from_vector(body.feature_vector)
            else:
                raise ApiError(422, "no feature values: give 'features' (an object) or 'feature_vector' "
                                    "(an array in the order of inputs.features)", reason="invalid_body")
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
        metrics.predictions[body.model] += 1
        return 200, orjson.dumps({
            "risk": risk,
            "label": service.label,
            "model": body.model,
            "model_version": service.model_version,
            "study_hash": service.study_hash,
        }), []

    error_responses = {
        401: {"model": ErrorResponse, "description": "Missing, malformed, invalid or revoked token"},
        403: {"model": ErrorResponse, "description": "The token lacks the endpoint's scope"},
        413: {"model": ErrorResponse, "description": f"Body larger than {max_body} bytes"},
    }

    @app.post(
        "/v1/analyze",
        summary="Risk for one patient",
        response_model=None,
        responses={
            200: {"model": AnalyzeResponse, "description": "The predicted risk"},
            **error_responses,
            404: {"model": ErrorResponse, "description": "Unknown model"},
            422: {"model": ErrorResponse, "description": "Invalid body; `feature` names the offending feature"},
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(service)}}},
            "security": [{"bearerAuth": []}],
        },
    )
    async def analyze(request: Request) -> Response:
        # Served by ServeMiddleware's fast path in practice; this route is the same function for
        # any other ASGI stack (and declares the endpoint in the OpenAPI document).
        return _response(run_analyze(request.headers.get("authorization"), await request.body(), request.scope[CONTEXT]))

    @app.get("/v1/models", summary="Served models, execution provider and inputs", responses=error_responses,
             openapi_extra={"security": [{"bearerAuth": []}]})
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
            "default": DEFAULT_MODEL,
            "models": [m.describe() for m in models.values()],
            "inputs": {
                "features": list(inputs.features),
                "ranges": {n: {"low": float(inputs.low[i]), "high": float(inputs.high[i]), "missing": inputs.missing[i]}
                           for i, n in enumerate(inputs.features)},
            },
            "metrics": manifest.get("metrics"),
            "created": manifest.get("created"),
        })

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Response:
        return _json({"status": "ok", "model_version": service.model_version, "provider": service.provider})

    @app.get("/metrics", summary="Prometheus metrics (text format 0.0.4)")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http", "scheme": "bearer", "description": "a token from `fedcare serve token add`"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(ServeMiddleware, service=service, metrics=metrics, max_body=max_body, fast_analyze=run_analyze)
    return app
