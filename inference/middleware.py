"""The outermost layer of every request to `fedcare serve`: body size limit, metrics, audit log,
last-resort 503, and the fast path of POST /v1/analyze."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from inference.metrics import Metrics
from inference.schemas import Answer

if TYPE_CHECKING:
    from inference.service import Service

MAX_BODY = 64 * 1024
CONTEXT = "fedcare.serve"  # per-request scratch dict in the ASGI scope (token name, model, pseudonym, reason)
AUDITED = ("/v1/analyze", "/v1/models")
ENDPOINTS = frozenset(("/v1/analyze", "/v1/models", "/healthz", "/metrics", "/openapi.json"))


class ServeMiddleware:
    """Outermost layer of every HTTP request: body size limit, metrics, audit log, last-resort 503,
    and the fast path of POST /v1/analyze (the route's own function, called without Starlette's
    routing, dependency solving and Request objects: ~40% less CPU per request in-process).

    The audit record is written before the response leaves (no answer without its audit line);
    an audit write that fails turns the answer into a 503."""

    def __init__(self, app: Any, service: Service, metrics: Metrics, max_body: int,
                 fast_analyze: Callable[[str | None, bytes, dict[str, Any]], Answer] | None = None) -> None:
        self.app, self.service, self.metrics, self.max_body = app, service, metrics, max_body
        self.fast_analyze = fast_analyze

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        ctx: dict[str, Any] = {}
        scope[CONTEXT] = ctx
        started = False

        def record(status: int) -> None:
            elapsed = time.perf_counter() - start
            if endpoint in AUDITED:
                client = scope.get("client")
                self.service.audit.write({
                    "token": ctx.get("token"),
                    "endpoint": endpoint,
                    "method": scope["method"],
                    "status": status,
                    "model": ctx.get("model"),
                    "latency_ms": round(elapsed * 1000, 3),
                    "patient": ctx.get("patient"),
                    "reason": ctx.get("reason"),
                    "feature": ctx.get("feature"),
                    "client": client[0] if client else None,
                })
            self.metrics.observe(endpoint, scope["method"], status, elapsed)

        async def send_recorded(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                record(message["status"])
            await send(message)
            if message["type"] == "http.response.start":
                started = True

        async def reply(status: int, detail: str, close: bool = False) -> None:
            headers = [(b"content-type", b"application/json")]
            if close:
                headers.append((b"connection", b"close"))
            await send_recorded({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": orjson.dumps({"detail": detail})})

        try:
            too_large = f"request body is larger than {self.max_body} bytes"
            for name, value in scope["headers"]:
                if name == b"content-length":
                    try:
                        declared = int(value)
                    except ValueError:
                        declared = 0
                    if declared > self.max_body:
                        ctx["reason"] = "too_large"
                        return await reply(413, too_large, close=True)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away before sending its body: nothing to answer
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    ctx["reason"] = "too_large"
                    return await reply(413, too_large, close=True)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            if self.fast_analyze is not None and path == "/v1/analyze" and scope["method"] == "POST":
                auth = None
                for name, value in scope["headers"]:
                    if name == b"authorization":
                        auth = value.decode("latin-1")
                        break
                status, content, extra = self.fast_analyze(auth, body, ctx)
                await send_recorded({"type": "http.response.start", "status": status, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()), *extra]})
                await send({"type": "http.response.body", "body": content})
                return
            replayed = False

            async def receive_body() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, receive_body, send_recorded)
        except Exception as err:  # noqa: BLE001 - last resort: a clear 503, never internals
            self.metrics.unhandled += 1
            print(f"fedcare serve: error: unhandled {type(err).__name__} on {scope['method']} {endpoint}",
                  file=sys.stderr, flush=True)
            if not started:
                ctx["reason"] = "internal"
                try:
                    await reply(503, "the service could not process this request; it was not scored")
                except Exception:  # noqa: BLE001 - e.g. the audit log itself failed: answer without it
                    if not started:
                        self.metrics.observe(endpoint, scope["method"], 503, time.perf_counter() - start)
                        await send({"type": "http.response.start", "status": 503,
                                    "headers": [(b"content-type", b"application/json")]})
                        await send({"type": "http.response.body",
                                    "body": b'{"detail":"the service could not process this request; it was not scored"}'})
