"""The on-site prediction service over a verified model package (ONNX Runtime). Never imports Flower.

`fedcare serve --package PKG --kit DIR` verifies the package against the kit's
`coordinator-signing.pub` (signature, then every file's size and SHA-256, then that it was built
for the kit's study; it refuses to start otherwise), opens the models in ONNX Runtime on the best available execution provider, and
serves `POST /v1/analyze` (see `inference.app`).

What the service keeps, and where (the kit's state directory, `<kit>/state` by default):

- `serve-tokens.json` (0600): SHA-256 hashes of API tokens with their names and scopes; the
  tokens themselves are printed once by `fedcare serve token add` and never stored.
- `audit.key` (0600): the per-kit HMAC key that pseudonymizes patient ids in the audit log.
- `serve-audit.jsonl` (0600, rotated by size and age to `.1` … `.N` under a disk cap): one line per
  authenticated API request: time, token name, endpoint, status, model, latency, client address,
  refusal reason and the study feature it concerns, and HMAC-SHA256(audit.key, patient_id); requests
  without a valid token are counted and summarised (at most one line a second). Never the raw
  patient id, never a feature value. When it cannot be written the service fails closed (503, and
  `/healthz` unhealthy with the reason) until it can. Every line is hash-chained under a key derived
  from `audit.key`; `serve-audit.head` (0600) holds the chain's last seq and MAC and is the writers'
  lock; `fedcare audit verify --kit KIT` checks the whole log (`audit_verify`, `fedcare.audit_chain`).
- with `fedcare serve cert`: the kit's serving CA and `serve.crt` / `serve.key` (0600), the API's TLS
  identity (the hospital's, never the study CA's; `deploy/serving_cert.py`).

Request bodies are held in memory for the duration of one request and never written to disk
(no access log with bodies, no request cache; uvicorn's access log is off). Nothing the service
sees is written anywhere training reads: training reads only the site's data export (`site.toml`
`data`) and its privacy ledger; the service writes only the files above, which no training
code opens. Served predictions therefore never flow back into the federation.

Modules: `model` (input scaling in numpy, exactly `fedcare.features.model_inputs`; ONNX Runtime
sessions and execution-provider choice), `default_model` (the model a request that names none gets:
the fastest here within the accuracy bound, measured at start), `server` (the HTTP server with every
transport bound: head size, timeouts, connection limit), `service` (what the running service holds, over a
verified package), `app` (the FastAPI app and its routes), `schemas` (request and response
models, validation errors as one line each, the published request schema), `middleware` (body
limit, audit log, metrics, the fast path of POST /v1/analyze), `tokens`, `audit`, `metrics`
(Prometheus text), `commands` (the CLI: kits, package verification, `fedcare serve`). The one
entry point is `fedcare serve`; it imports no torch, Opacus or Flower.
"""
