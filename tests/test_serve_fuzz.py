"""Fuzzing the live service from its own OpenAPI document (hypothesis, real uvicorn subprocess).

Requests are drawn from the AnalyzeRequest schema published at /openapi.json (valid-looking
bodies), then mutated: random feature names and values (NaN, infinities, huge numbers, strings,
booleans, nesting), wrong types, missing and extra fields, truncated and garbage JSON, deep
nesting, bodies around and over the 64 KiB limit, random headers and tokens, and other methods
and paths. Oracles: never a 5xx, every answer is JSON, a body that satisfies the package's
rules is scored (200, risk in [0, 1]) and every other one is refused with a 4xx; afterwards the
last-resort error handler was never reached.
"""

from __future__ import annotations

import datetime
import json
import math
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_serve import add_token, build_world, metric_values, serving

SETTINGS = settings(max_examples=300, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))
SKIP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "authorization", "content-type",
                "expect", "upgrade", "te", "trailer", "keep-alive", "proxy-connection"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "serve-world")


@pytest.fixture(scope="module")
def token(world):
    return add_token(world.hospital, "fuzz", "analyze", "models")


@pytest.fixture(scope="module")
def server(world, token):
    with serving(world.package, world.hospital, world.root / "logs-fuzz") as proc:
        yield proc


@pytest.fixture(scope="module")
def live(server, token):
    with httpx.Client(base_url=server.base_url, timeout=20) as client:
        doc = client.get("/openapi.json").json()
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).json()
        yield client, doc, models


# -- JSON schema -> strategy (the subset FastAPI and pydantic emit) -----------------------------


def from_schema(schema: dict) -> st.SearchStrategy:
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "number":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        return st.one_of(st.floats(lo, hi, allow_nan=False, allow_infinity=False),
                         st.integers(math.ceil(lo) if lo is not None else -10**6, math.floor(hi) if hi is not None else 10**6))
    if kind == "integer":
        return st.integers(schema.get("minimum", -10**6), schema.get("maximum", 10**6))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array" and "prefixItems" in schema:
        return st.tuples(*[from_schema(s) for s in schema["prefixItems"]]).map(list)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", 30))
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    return st.from_type(object).filter(lambda v: isinstance(v, (int, float, str, bool, type(None))))


JUNK_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**400), 10**400),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def analyze_bodies(draw, schema: dict, features: list[str]):
    """A schema-drawn body, maybe mutated; returned as a Python value (JSON-encoded with NaN allowed)."""
    body = draw(from_schema(schema))
    form = draw(st.sampled_from(["features", "features", "feature_vector", "as drawn"]))
    if form != "as drawn":  # the schema's oneOf: exactly one of the two
        body.pop("feature_vector" if form == "features" else "features", None)
        if form not in body:
            body[form] = draw(from_schema(schema["properties"][form]))
    mutation = draw(st.sampled_from(["none", "none", "value", "name", "drop", "type", "extra", "vector"]))
    if mutation == "value" and isinstance(body.get("features"), dict):
        name = draw(st.sampled_from(features))
        body["features"][name] = draw(JUNK_VALUES)
    elif mutation == "name":
        feats = body.setdefault("features", {}) if isinstance(body.get("features"), dict) else {}
        feats[draw(st.text(min_size=1, max_size=30))] = draw(JUNK_VALUES)
        body["features"] = feats
    elif mutation == "drop" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    elif mutation == "type":
        key = draw(st.sampled_from(["patient_id", "features", "feature_vector", "model"]))
        body[key] = draw(JUNK_VALUES)
    elif mutation == "extra":
        body[draw(st.text(min_size=1, max_size=20))] = draw(JUNK_VALUES)
    elif mutation == "vector":
        vector = draw(st.lists(JUNK_VALUES | st.floats(0, 100), min_size=0, max_size=25))
        body["feature_vector"] = vector
    return body


def encode(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8")


@st.composite
def raw_bodies(draw, schema: dict, features: list[str]):
    """Bytes: valid JSON of a drawn body, truncated JSON, garbage, deep nesting, or a body near/over 64 KiB."""
    kind = draw(st.sampled_from(["json", "json", "json", "truncated", "garbage", "nested", "large", "scalar"]))
    if kind == "truncated":
        data = encode(draw(analyze_bodies(schema, features)))
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind == "nested":
        depth = draw(st.integers(50, 5000))
        return b'{"patient_id": "p", "features": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "large":
        size = draw(st.integers(60_000, 140_000))
        return encode({"patient_id": "p", "features": {}, "padding": "x" * size})
    if kind == "scalar":
        return encode(draw(JUNK_VALUES))
    return encode(draw(analyze_bodies(schema, features)))


def _iso_date(text: str) -> bool:
    try:
        return len(text) == 10 and bool(datetime.date.fromisoformat(text))
    except ValueError:
        return False


def should_score(data: bytes, models: dict) -> bool:
    """The oracle: does this body satisfy every rule the service enforces?"""
    if len(data) > 65536:
        return False
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict) or set(body) - {"patient_id", "features", "feature_vector", "model", "notes",
                                                  "readings", "index_date"}:
        return False
    # this package derives nothing from notes or readings: they may only be empty arrays
    if any(key in body and body[key] != [] for key in ("notes", "readings")):
        return False
    index_date = body.get("index_date", "")
    if not isinstance(index_date, str) or (index_date and not _iso_date(index_date)):
        return False
    pid = body.get("patient_id")
    if not isinstance(pid, str) or not 1 <= len(pid) <= 256 or any(0xD800 <= ord(c) <= 0xDFFF for c in pid):
        return False
    model = body.get("model", models["default"])  # left out: the service's default (GET /v1/models)
    if not isinstance(model, str) or model not in {m["name"] for m in models["models"]}:
        return False
    names, ranges = models["inputs"]["features"], models["inputs"]["ranges"]
    feats, vector = body.get("features"), body.get("feature_vector")
    if (feats is None) == (vector is None):
        return False
    if ("features" in body and feats is None) or ("feature_vector" in body and vector is None):
        return False  # null is not an object or an array: the schema refuses it (leave the field out)
    if feats is not None:
        if not isinstance(feats, dict) or set(feats) - set(names):
            return False
        values = [feats.get(n) for n in names]
    else:
        if not isinstance(vector, list) or len(vector) != len(names):
            return False
        values = vector
    for name, value in zip(names, values):
        if value is None:
            if ranges[name]["missing"] == "reject":
                return False
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            number = float(value)
        except OverflowError:
            return False
        if not math.isfinite(number) or not ranges[name]["low"] <= number <= ranges[name]["high"]:
            return False
    return True


def check_answer(response: httpx.Response):
    assert response.status_code < 500, (response.status_code, response.text)
    if response.request.url.path == "/metrics" and response.status_code == 200:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.json()  # raises if not JSON


# -- the fuzz tests -----------------------------------------------------------------------------


def test_fuzz_analyze_from_openapi(live, token):
    client, doc, models = live
    schema = doc["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    features = list(schema["properties"]["features"]["properties"])
    seen: dict[int, int] = {}

    @SETTINGS
    @given(data=raw_bodies(schema, features))
    def run(data: bytes) -> None:
        r = client.post("/v1/analyze", content=data,
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        answer = check_answer(r)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        if should_score(data, models):
            assert r.status_code == 200, (data[:300], answer)
            assert 0.0 <= answer["risk"] <= 1.0
        else:
            assert 400 <= r.status_code < 500, (data[:300], answer)
            assert isinstance(answer["detail"], str) and answer["detail"]

    run()
    assert seen.get(200, 0) > 10 and seen.get(422, 0) > 10 and seen.get(413, 0) > 0, seen


HEADER_NAMES = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=20).filter(
    lambda n: n.lower() not in SKIP_HEADERS and not n.startswith("-"))
HEADER_VALUES = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "").replace("\x0c", ""),
                        max_size=60).map(str.strip)


@st.composite
def requests(draw, paths: list[str], good_token: str, body_strategy):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    path = draw(st.sampled_from(paths) | st.builds(lambda s: "/" + s, st.text(
        alphabet=string.ascii_letters + string.digits + "/-_.~%", max_size=30)))
    headers = draw(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6))
    auth = draw(st.sampled_from(["good", "none", "random", "bearer-random", "scheme"]))
    if auth == "good":
        headers["Authorization"] = f"Bearer {good_token}"
    elif auth == "random":
        headers["Authorization"] = draw(HEADER_VALUES)
    elif auth == "bearer-random":
        headers["Authorization"] = ("Bearer " + draw(HEADER_VALUES)).strip()
    elif auth == "scheme":
        headers["Authorization"] = draw(st.sampled_from(["Bearer", "bearer  x", "Token x", "Bearer " + "A" * 600]))
    headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                                    "multipart/form-data; boundary=x", ""]))
    content = draw(body_strategy) if method in ("POST", "PUT", "PATCH", "DELETE") else b""
    return method, path, headers, content


def test_fuzz_methods_paths_headers(live, token):
    client, doc, models = live
    schema = doc["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    features = list(schema["properties"]["features"]["properties"])
    paths = sorted(doc["paths"]) + ["/openapi.json", "/docs", "/v1", "/v1/analyze/", "/v1/models?x=1"]

    @settings(SETTINGS, max_examples=150)
    @given(req=requests(paths, token, raw_bodies(schema, features)))
    def run(req) -> None:
        method, path, headers, content = req
        r = client.request(method, path, headers=headers, content=content)
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        if method != "HEAD":
            check_answer(r)

    run()


def test_fuzz_left_no_trace_of_errors(live, server):
    client, _, _ = live
    values = metric_values(client.get("/metrics").text)
    assert values["fedcare_serve_unhandled_errors_total"] == 0
    assert not [name for name in values if name.startswith("fedcare_serve_requests_total") and 'code="5' in name]
    assert server.stderr == ""
