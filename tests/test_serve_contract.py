"""The contract of `fedcare serve` is exact: /openapi.json documents every response (status codes,
content types, headers) and every accepted request satisfies the published schema.

Over real HTTP against a `fedcare serve` subprocess: `features: null` (or `feature_vector: null`)
refused with 422 naming the field; a key given twice in one JSON object refused with 422 naming
the key (pydantic and orjson would keep the last one, a proxy reading the first would disagree);
a POST body not declared `application/json` (optionally `charset=utf-8`) refused with 415; then
Schemathesis with every check over every operation (`bench/serve_schemathesis.py`, 40 examples
per operation) finds nothing. In-process (hypothesis): the fast duplicate-key gate agrees with the
json module on bodies with and without duplicates, escapes and colons in strings.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .test_serve import add_token, build_world, serving, valid_features


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "serve-world")


@pytest.fixture(scope="module")
def token(world):
    return add_token(world.hospital, "contract", "analyze", "models")


@pytest.fixture(scope="module")
def server(world, token):
    with serving(world.package, world.hospital, world.root / "logs-contract") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server, token):
    with httpx.Client(base_url=server.base_url, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def raw_post(client, content: bytes, content_type: str | None = "application/json", **headers):
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.post("/v1/analyze", content=content, headers=headers)


def body_text(world, **extra) -> str:
    return json.dumps({"patient_id": "p", "features": valid_features(world), **extra})


# -- the document ------------------------------------------------------------------------------


def test_openapi_documents_every_status_and_content_type(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths) == {"/v1/analyze", "/v1/models", "/healthz", "/metrics"}
    codes = {(path, method): set(op["responses"]) for path, ops in paths.items() for method, op in ops.items()}
    assert codes == {
        ("/v1/analyze", "post"): {"200", "401", "403", "404", "413", "415", "422", "503"},
        ("/v1/models", "get"): {"200", "401", "403", "413", "503"},
        ("/healthz", "get"): {"200", "413", "503"},
        ("/metrics", "get"): {"200", "413"},
    }
    for path, ops in paths.items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                expected = ["text/plain; version=0.0.4"] if (path, code) == ("/metrics", "200") else ["application/json"]
                assert list(response["content"]) == expected, (path, method, code)
    analyze = paths["/v1/analyze"]["post"]
    assert "WWW-Authenticate" in analyze["responses"]["401"]["headers"]
    assert "Retry-After" in analyze["responses"]["503"]["headers"]
    assert list(analyze["requestBody"]["content"]) == ["application/json"]
    schema = analyze["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["features"]["type"] == "object"  # null is not an object: refused
    assert schema["properties"]["feature_vector"]["type"] == "array"
    assert schema["oneOf"] == [{"required": ["features"]}, {"required": ["feature_vector"]}]
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert set(error["properties"]) == {"detail", "feature", "errors", "reason"}


def test_metrics_is_prometheus_text(client):
    r = client.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


# -- what the schema forbids is refused -----------------------------------------------------------


def test_null_features_or_vector_refused_naming_the_field(client, world):
    vector = list(valid_features(world).values())
    for body, field in (({"features": None, "feature_vector": vector}, "features"),
                        ({"features": valid_features(world), "feature_vector": None}, "feature_vector"),
                        ({"features": None}, "features")):
        r = client.post("/v1/analyze", json={"patient_id": "p", **body})
        assert r.status_code == 422, body
        assert r.json() == {"detail": f"{field}: null is not allowed; leave '{field}' out (give either 'features', "
                                      "an object, or 'feature_vector', an array)"}
    assert client.post("/v1/analyze", json={"patient_id": "p", "feature_vector": vector}).status_code == 200


def test_duplicate_keys_refused_naming_the_key(client, world):
    features = json.dumps(valid_features(world))
    cases = [
        (b'{"patient_id": "p", "model": "int8", "features": %s, "model": "fp32"}' % features.encode(),
         "duplicate field 'model' in the request body; each field may appear only once", None),
        (b'{"patient_id": "a:b:c", "patient_id": "p", "features": %s}' % features.encode(),
         "duplicate field 'patient_id' in the request body; each field may appear only once", None),
        (b'{"patient_id": "p", "mo\\u0064el": "fp32", "features": %s, "model": "int8"}' % features.encode(),
         "duplicate field 'model' in the request body; each field may appear only once", None),
        (b'{"patient_id": "p", "features": %s}' % features.replace('"age": ', '"age": 90, "age": ', 1).encode(),
         "duplicate feature 'age' in features; each feature may appear only once", "age"),
        # an escaped colon decodes to one more colon than the raw text holds: the json module decides
        (b'{"patient_id": "\\u003a", "patient_id": "\\u003a", "features": %s}' % features.encode(),
         "duplicate field 'patient_id' in the request body; each field may appear only once", None),
        # invalid in another way too: the duplicate is what is reported
        (b'{"patient_id": "p", "features": %s, "features": null}' % features.encode(),
         "duplicate field 'features' in the request body; each field may appear only once", None),
    ]
    for content, detail, feature in cases:
        r = raw_post(client, content)
        assert r.status_code == 422, content
        assert r.json() == ({"detail": detail, "feature": feature} if feature else {"detail": detail})
    # colons and escapes in strings are not duplicates
    for pid in ("MRN:0042:x", "MRN\\u003a7", 'a\\"b:', "::"):
        content = b'{"patient_id": "%s", "features": %s}' % (pid.encode(), features.encode())
        assert raw_post(client, content).status_code == 200, pid


def test_content_type_must_be_json(client, world):
    content = body_text(world).encode()
    accepted = "send the body as application/json (optionally with charset=utf-8)"
    for media_type, shown in (("text/plain", "Content-Type 'text/plain'"), (None, "no Content-Type"),
                              ("application/x-www-form-urlencoded", "Content-Type 'application/x-www-form-urlencoded'"),
                              ("application/json; charset=latin-1", "Content-Type 'application/json; charset=latin-1'"),
                              ("application/jsonx", "Content-Type 'application/jsonx'")):
        r = raw_post(client, content, media_type)
        assert (r.status_code, r.json()) == (415, {"detail": f"unsupported media type: {accepted}; got {shown}"}), media_type
    for media_type in ("application/json", "Application/JSON", "application/json; charset=utf-8",
                       'application/json;charset="UTF-8"'):
        assert raw_post(client, content, media_type).status_code == 200, media_type
    # the token is checked first: without one, a 401 says nothing about the body
    assert raw_post(client, content, "text/plain", Authorization="").status_code == 401


# -- Schemathesis: every check, every operation -------------------------------------------------------


def test_schemathesis_all_checks_find_nothing(server, token, world):
    from bench.serve_schemathesis import run_schemathesis, summary

    report = run_schemathesis(server.base_url, token, world.root / "schemathesis-report", max_examples=40, timeout=300)
    assert report["operations"]["tested"] == 4
    assert report["test_cases"]["generated"] >= 100
    assert not report["failures"] and not report["errors"], summary(report) + "\n" + report["console"][-8000:]
    assert report["returncode"] == 0
    # uvicorn notes the malformed HTTP Schemathesis probes with ("Invalid HTTP request received"); nothing else
    assert "Traceback" not in server.stderr and "unhandled" not in server.stderr


# -- in-process: the fast duplicate-key gate agrees with the json module ------------------------------


@pytest.fixture(scope="module")
def app_client(world):
    from inference.app import create_app
    from inference.commands import load_service

    token = add_token(world.hospital, "contract-inprocess", "analyze")
    service = load_service(world.package, world.hospital)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)), base_url="http://test")

    def post(content: bytes) -> httpx.Response:
        return loop.run_until_complete(client.post("/v1/analyze", content=content, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}))

    yield post
    loop.run_until_complete(client.aclose())
    loop.close()
    service.audit.close()

STRING = st.lists(st.sampled_from(["a", ":", ",", "{", '\\"', "\\u003a", "\\n", '"', "\\"]), max_size=6).map("".join)


@st.composite
def bodies(draw, required: dict[str, float], optional: list[str]):
    """Raw JSON text of an analyze body, maybe with keys repeated (top level or in features), with
    colons, quotes and escapes in strings."""
    def string(text: str) -> str:
        return json.dumps(json.loads('"' + text + '"')) if draw(st.booleans()) else '"' + text + '"'

    def safe(text: str) -> str:
        try:
            return string(text)
        except ValueError:
            return json.dumps(text)

    names = draw(st.lists(st.sampled_from(optional), min_size=0, max_size=5))
    members = [f'"{n}": {v}' for n, v in required.items()]
    members += [f'"{n}": {draw(st.sampled_from(["1", "null"]))}' for n in names]
    top = [f'"patient_id": {safe(draw(STRING)) if draw(st.booleans()) else json.dumps("p")}',
           f'"features": {{{", ".join(members)}}}']
    if draw(st.booleans()):
        top.append(f'"model": {draw(st.sampled_from([chr(34) + "int8" + chr(34), chr(34) + "fp32" + chr(34), chr(34) + "i:8" + chr(34)]))}')
    for _ in range(draw(st.integers(0, 2))):
        top.insert(draw(st.integers(0, len(top))), draw(st.sampled_from(top)))  # a repeated member
    return "{" + ", ".join(top) + "}"


def has_duplicates(text: str) -> bool:
    found = []

    def hook(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            found.append(keys)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return bool(found)


def test_duplicate_gate_agrees_with_the_json_module(app_client, world):
    post = app_client
    required = {f.name: (f.low + f.high) / 2 for f in world.study.features if f.missing == "reject"}
    optional = [f.name for f in world.study.features if f.missing != "reject" and f.low <= 1 <= f.high][:5]

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @example(text='{"patient_id": "\\u003a", "features": {"age": 50}, "patient_id": "\\u003a"}')
    @given(text=bodies(required, optional))
    def check(text: str) -> None:
        try:
            expected = has_duplicates(text)
        except ValueError:
            return  # not JSON: not this test's business
        r = post(text.encode())
        duplicate = r.status_code == 422 and r.json()["detail"].startswith("duplicate ")
        assert duplicate == expected, (text, r.status_code, r.text)
        seen[(expected, r.status_code)] = seen.get((expected, r.status_code), 0) + 1

    seen: dict[tuple[bool, int], int] = {}
    check()
    assert seen.get((True, 422), 0) > 30 and seen.get((False, 200), 0) > 10, seen
