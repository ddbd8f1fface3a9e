"""`fedcare serve`: a real uvicorn server (subprocess, loopback) over a signed package, driven with httpx.

The package is built by `export.build.build_package` from a fake finished run record (a checkpoint
with perturbed weights, a federated `scaling.json` that differs from the study file's, the round
log, report.json),
signed with the coordinator key from `provision`; the server runs with the hospital kit.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from deploy.flower import free_port

from .conftest import DEFAULT_STUDY, ROOT

# -- a package, kits and a server ----------------------------------------------------------------


@dataclass
class World:
    study: object  # the study file's Study
    scaled: object  # the study with the run's federated scaling (what the package serves)
    hospital: Path
    coordinator: Path
    package: Path
    root: Path


_WORLD: dict[str, World] = {}


def build_world(root: Path) -> World:
    """Kits from `provision`, a fake finished run, and the package `build_package` makes from it (cached)."""
    if "world" in _WORLD:
        return _WORLD["world"]
    from deploy.kits import coordinator_signing_key, load_coordinator_kit
    from deploy.provision import provision
    from export.build import build_package
    from fedcare.model import build_model, get_weights
    from fedcare.run_record import RoundEntry, RunRecord
    from fedcare.study import Overrides, load_study

    study = load_study(DEFAULT_STUDY)
    kits = provision(DEFAULT_STUDY, ["127.0.0.1"], ["north", "south", "east"], root / "kits")
    record = RunRecord(root / "run")
    record.start(study, Overrides())
    rng = np.random.default_rng(3)
    weights = [w + rng.normal(0.0, 0.4, w.shape).astype(np.float32) for w in get_weights(build_model(study))]
    record.save_checkpoint(3, weights, study.hash)
    center = [f.center * 1.1 + 0.05 for f in study.features]
    scale = [f.scale * 1.2 for f in study.features]
    record.save_scaling(study, center=np.array(center), scale=np.array(scale),
                        counts=np.full(len(study.features), 1000))
    record.write_rounds([RoundEntry(round=r, aggregated=True, sites_aggregated=3, auc=0.7, loss=0.5,
                                    sites_evaluated=3, seconds=1.0) for r in (1, 2, 3)])
    (record.path / "report.json").write_text(json.dumps({
        "study_hash": study.hash, "rounds": record.rounds(),
        "sites": [{"name": n, "epsilon": None} for n in ("north", "south", "east")]}))
    key = coordinator_signing_key(load_coordinator_kit(kits["coordinator"]))
    package = build_package(record, root / "pkg", key)
    _WORLD["world"] = World(study, study.with_scaling(center, scale), kits["north"], kits["coordinator"], package, root)
    return _WORLD["world"]


def fedcare_main(*args: str) -> tuple[int, str, str]:
    """`fedcare ...` in this process: (exit status, stdout, stderr)."""
    from cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def add_token(kit: Path, name: str, *scopes: str) -> str:
    args = ["serve", "token", "add", "--kit", str(kit), "--name", name]
    for scope in scopes:
        args += ["--scope", scope]
    status, out, err = fedcare_main(*args)
    assert status == 0, err
    return out.strip()


class ServerProcess:
    """`python -m cli serve ...` on a free loopback port; only this process is ever stopped."""

    def __init__(self, package: Path, kit: Path, log_dir: Path, *extra: str, scheme: str = "http") -> None:
        self.port = free_port()
        self.base_url = f"{scheme}://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / f"serve-{self.port}.out", log_dir / f"serve-{self.port}.err"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve", "--package", str(package), "--kit", str(kit),
                 "--port", str(self.port), *extra],
                cwd=ROOT, stdout=out, stderr=err, env=env,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_ready(self, timeout: float = 90.0, **client_args) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fedcare serve exited with {self.proc.returncode}: {self.stderr}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2, **client_args).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"fedcare serve did not answer within {timeout} s: {self.stderr}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@contextlib.contextmanager
def serving(package: Path, kit: Path, log_dir: Path, *extra: str):
    """A ready `fedcare serve` process for the block; stopped after it (only this process)."""
    proc = ServerProcess(package, kit, log_dir, *extra)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def sigmoid64(logit: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "serve-world")


@pytest.fixture(scope="module")
def tokens(world):
    return {
        "clinic": add_token(world.hospital, "clinic", "analyze", "models"),
        "analyze-only": add_token(world.hospital, "analyze-only"),
        "models-only": add_token(world.hospital, "models-only", "models"),
    }


@pytest.fixture(scope="module")
def server(world, tokens):
    with serving(world.package, world.hospital, world.root / "logs") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server, tokens):
    with httpx.Client(base_url=server.base_url, timeout=10,
                      headers={"Authorization": f"Bearer {tokens['clinic']}"}) as c:
        yield c


def valid_features(world, **overrides):
    values = {f.name: round((f.low + f.high) / 2, 3) for f in world.study.features}
    values.update(overrides)
    return values


# -- startup -------------------------------------------------------------------------------------


def test_startup_reports_provider_and_package(server, client, world):
    models = client.get("/v1/models").json()
    assert models["provider"] == "CPUExecutionProvider"  # this machine offers only Azure and CPU
    assert f"execution provider: {models['provider']}" in server.stdout
    manifest_sha = hashlib.sha256((world.package / "manifest.json").read_bytes()).hexdigest()
    assert models["model_version"] == manifest_sha[:12]
    assert f"package {manifest_sha[:12]}" in server.stdout
    assert {m["name"] for m in models["models"]} == {"fp32", "int8", "a16w8"}
    assert models["inputs"]["features"] == [f.name for f in world.study.features]
    assert server.stderr == ""


def test_openapi_document_is_published(client, world):
    doc = client.get("/openapi.json", headers={"Authorization": ""}).json()
    analyze = doc["paths"]["/v1/analyze"]["post"]
    schema = analyze["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"patient_id", "features", "feature_vector", "model", "notes", "readings",
                                         "index_date"}
    assert schema["properties"]["notes"]["maxItems"] == 0  # this package derives nothing from notes
    assert schema["properties"]["features"]["properties"]["age"]["minimum"] == 18.0
    assert set(analyze["responses"]) >= {"200", "401", "403", "404", "413", "422"}
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert {"/v1/models", "/healthz", "/metrics"} <= set(doc["paths"])


# -- the served risk is exactly the model on fedcare.features.model_inputs -----------------------


def _random_rows(world, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = world.study.features
    low = np.array([f.low for f in features])
    high = np.array([f.high for f in features])
    raw = low + rng.random((n, len(features))) * (high - low)
    raw[:, [i for i, f in enumerate(features) if f.type != "numeric"]] //= 1  # counts and binaries are whole
    raw[0], raw[1] = low, high  # the range ends (scaled values beyond ±clip get clipped)
    for i, f in enumerate(features):
        if f.missing != "reject":
            raw[rng.random(n) < 0.25, i] = np.nan
    return raw


@pytest.mark.parametrize("kind", ["int8", "fp32", "a16w8"])
def test_risk_equals_model_on_model_inputs(client, world, kind):
    from export.onnx_export import run_onnx
    from fedcare.features import model_inputs

    raw = _random_rows(world, 40, seed={"int8": 1, "fp32": 2, "a16w8": 3}[kind])
    x = model_inputs(world.scaled, raw)
    assert not np.array_equal(x, model_inputs(world.study, raw))  # the package's scaling, not the file's
    assert np.abs(x[:, : len(world.study.features)]).max() == 5.0  # some values are clipped
    path = world.package / json.loads((world.package / "manifest.json").read_text())["models"][kind]["file"]
    names = [f.name for f in world.study.features]
    for i, row in enumerate(raw):
        expected = sigmoid64(run_onnx(path, x[i : i + 1]))[0]
        by_name = {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, row) if not (math.isnan(v) and i % 2)}
        vector = [None if math.isnan(v) else float(v) for v in row]
        for body in ({"features": by_name}, {"feature_vector": vector}):
            r = client.post("/v1/analyze", json={"patient_id": f"row-{i}", "model": kind, **body})
            assert r.status_code == 200, r.text
            result = r.json()
            np.testing.assert_allclose(result["risk"], expected, rtol=1e-12, atol=0)
            assert result["model"] == kind
            assert result["label"] == "episode_12m"
            assert result["study_hash"] == world.study.hash


def test_prepare_is_bit_identical_to_model_inputs(world):
    """The service's one-row numpy path equals `fedcare.features.model_inputs` to the bit (hypothesis)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fedcare.features import model_inputs
    from inference.model import InputSpec

    spec = InputSpec.from_manifest(json.loads((world.package / "manifest.json").read_text()))
    columns = [
        st.floats(f.low, f.high) if f.missing == "reject" else st.none() | st.floats(f.low, f.high) | st.sampled_from([f.low, f.high])
        for f in world.study.features
    ]

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.tuples(*columns))
    def check(values):
        raw = np.array([[np.nan if v is None else v for v in values]], dtype=np.float64)
        expected = model_inputs(world.scaled, raw)
        got = spec.prepare(list(values))
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()
        assert spec.scale_rows(raw).tobytes() == expected.tobytes()

    check()


def test_the_default_model_is_measured_at_start_and_named_everywhere(client, world, server):
    """A request that names no model is scored by the service's default, chosen at start: the fastest
    here within |Δ risk| <= 0.01 of fp32 (`inference.default_model`); /v1/models and the start-up line say which."""
    described = client.get("/v1/models").json()
    default = described["default"]
    assert default in {m["name"] for m in described["models"]}
    assert "fastest here within |Δ risk| ≤ 0.01 of fp32: fp32 " in described["default_choice"]
    assert f"({described['default_choice']})" in server.stdout
    r = client.post("/v1/analyze", json={"patient_id": "p", "features": valid_features(world)})
    assert r.status_code == 200 and r.json()["model"] == default
    assert set(r.json()) == {"risk", "label", "model", "model_version", "study_hash"}
    named = client.post("/v1/analyze", json={"patient_id": "p", "features": valid_features(world), "model": default})
    assert named.json()["risk"] == r.json()["risk"]


def test_the_default_choice_keeps_to_the_accuracy_bound_and_can_be_pinned(world):
    from inference.commands import load_service
    from inference.default_model import choose_default
    from inference.model import ServeError

    service = load_service(world.package, world.hospital, default_model="int8")
    assert service.models.default == "int8" and service.default_choice.describe() == "default int8 (--model)"
    sessions = {name: m.session for name, m in service.models.models.items()}
    # real sessions: with no room for any difference fp32 (the reference) is chosen; with any speed counted
    # as a win and a loose bound, a quantized one is
    assert choose_default(sessions, service.inputs, bound=0.0).model == "fp32"
    loose = choose_default(sessions, service.inputs, bound=1.0, min_speedup=0.0)
    assert loose.model != "fp32" and set(loose.per_row_us) == set(sessions)
    assert all(0 < delta < 0.05 for delta in loose.max_delta_risk.values())
    with pytest.raises(ServeError, match=r"^--model: the package serves fp32, int8, a16w8; no model 'int16'$"):
        load_service(world.package, world.hospital, default_model="int16")


# -- every refusal, with its exact text -----------------------------------------------------------


def _post(client, body=None, *, content=None, headers=None):
    if content is None:
        return client.post("/v1/analyze", json=body, headers=headers)
    return client.post("/v1/analyze", content=content, headers={"Content-Type": "application/json", **(headers or {})})


def test_401_missing_malformed_wrong_token(client, world):
    body = {"patient_id": "p", "features": valid_features(world)}
    r = _post(client, body, headers={"Authorization": ""})
    assert (r.status_code, r.json()) == (401, {"detail": "missing bearer token: send 'Authorization: Bearer <token>'"})
    assert r.headers["www-authenticate"] == 'Bearer realm="fedcare"'
    r = _post(client, body, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert (r.status_code, r.json()) == (401, {"detail": "malformed Authorization header: expected 'Bearer <token>'"})
    r = _post(client, body, headers={"Authorization": "Bearer not-a-token"})
    assert (r.status_code, r.json()) == (401, {"detail": "invalid or revoked token"})
    r = client.get("/v1/models", headers={"Authorization": "Bearer not-a-token"})
    assert (r.status_code, r.json()) == (401, {"detail": "invalid or revoked token"})


def test_401_comes_before_body_errors(client):
    r = _post(client, content=b"{not json", headers={"Authorization": ""})
    assert r.status_code == 401


def test_403_token_without_scope(client, world, tokens):
    r = _post(client, {"patient_id": "p", "features": valid_features(world)},
              headers={"Authorization": f"Bearer {tokens['models-only']}"})
    assert (r.status_code, r.json()) == (403, {"detail": "token 'models-only' does not have the 'analyze' scope"})
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {tokens['analyze-only']}"})
    assert (r.status_code, r.json()) == (403, {"detail": "token 'analyze-only' does not have the 'models' scope"})
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {tokens['models-only']}"}).status_code == 200
    r = _post(client, {"patient_id": "p", "features": valid_features(world)},
              headers={"Authorization": f"Bearer {tokens['analyze-only']}"})
    assert r.status_code == 200


def test_404_unknown_model_and_path(client, world):
    r = _post(client, {"patient_id": "p", "features": valid_features(world), "model": "fp16"})
    assert (r.status_code, r.json()) == (404, {"detail": "unknown model 'fp16'; this package serves: fp32, int8, a16w8"})
    r = client.get("/v1/nothing")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = client.get("/v1/analyze")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})


FEATURE_ERRORS = [
    ({"bmi": 95.0}, "feature 'bmi': 95 is outside the study range [10, 80]", "bmi"),
    ({"age": 17.5}, "feature 'age': 17.5 is outside the study range [18, 100]", "age"),
    ({"steps_per_day": 1e300}, "feature 'steps_per_day': 1e+300 is outside the study range [0, 60000]", "steps_per_day"),
    ({"age": None}, "feature 'age': missing, and the study rejects rows without it (missing = \"reject\")", "age"),
    ({"sex_female": "1"}, "feature 'sex_female': expected a number or null, got a string", "sex_female"),
    ({"sex_female": True}, "feature 'sex_female': expected a number or null, got a boolean", "sex_female"),
    ({"sex_female": [1]}, "feature 'sex_female': expected a number or null, got an array", "sex_female"),
]


@pytest.mark.parametrize("override,detail,feature", FEATURE_ERRORS)
def test_422_names_the_feature(client, world, override, detail, feature):
    r = _post(client, {"patient_id": "p", "features": valid_features(world, **override)})
    assert (r.status_code, r.json()) == (422, {"detail": detail, "feature": feature})


def test_422_missing_reject_feature_left_out(client, world):
    values = valid_features(world)
    del values["age"]
    r = _post(client, {"patient_id": "p", "features": values})
    assert r.status_code == 422
    assert r.json() == {"detail": "feature 'age': missing, and the study rejects rows without it (missing = \"reject\")",
                        "feature": "age"}


@pytest.mark.parametrize("literal,shown", [(b"NaN", "nan"), (b"Infinity", "inf"), (b"-Infinity", "-inf"), (b"1e999", "inf")])
def test_422_non_finite_values(client, world, literal, shown):
    values = json.dumps(valid_features(world, bmi=12345.0)).encode().replace(b"12345.0", literal)
    r = _post(client, content=b'{"patient_id": "p", "features": ' + values + b"}")
    assert r.status_code == 422
    assert r.json() == {"detail": f"feature 'bmi': {shown} is not a finite number (send null or leave the feature out "
                                  "for a missing value)", "feature": "bmi"}
    vector = json.dumps([40.0] + [None] * 16 + [12345.0, None]).encode().replace(b"12345.0", literal)
    r = _post(client, content=b'{"patient_id": "p", "feature_vector": ' + vector + b"}")
    assert r.status_code == 422 and r.json()["feature"] == "bmi"


def test_422_vector_errors(client, world):
    r = _post(client, {"patient_id": "p", "feature_vector": [40.0, 1.0]})
    assert (r.status_code, r.json()) == (422, {"detail": "feature_vector: expected 19 values (in the order of inputs.features), got 2"})
    vector = list(valid_features(world).values())
    vector[2] = "high"
    r = _post(client, {"patient_id": "p", "feature_vector": vector})
    assert (r.status_code, r.json()) == (422, {
        "detail": "feature 'phq9_latest' (feature_vector[2]): expected a number or null, got a string",
        "feature": "phq9_latest"})
    vector[2] = 30.0
    r = _post(client, {"patient_id": "p", "feature_vector": vector})
    assert (r.status_code, r.json()) == (422, {"detail": "feature 'phq9_latest': 30 is outside the study range [0, 27]",
                                               "feature": "phq9_latest"})


def test_422_body_errors(client, world):
    cases = [
        ({"patient_id": "p", "features": {**valid_features(world), "shoe_size": 44}},
         "unknown feature 'shoe_size'; this package's features are listed by GET /v1/models"),
        ({"features": valid_features(world)}, "patient_id: required (a string)"),
        ({"patient_id": 1234, "features": valid_features(world)}, "patient_id: expected a string, got a number"),
        ({"patient_id": "", "features": valid_features(world)}, "patient_id: must be 1 to 256 characters"),
        ({"patient_id": "p"}, "no feature values: give 'features' (an object) or 'feature_vector' (an array in the order "
                              "of inputs.features)"),
        ({"patient_id": "p", "features": valid_features(world), "feature_vector": list(valid_features(world).values())},
         "give either 'features' or 'feature_vector', not both"),
        ({"patient_id": "p", "features": [1, 2]}, "features: expected an object of feature name -> number or null, got an array"),
        ({"patient_id": "p", "features": valid_features(world), "extra": 1},
         "unknown field 'extra'; the fields are patient_id, features or feature_vector, model, notes, "
         "readings and index_date"),
        ({"patient_id": "p", "features": valid_features(world), "model": 8}, "model: expected a string (fp32, int8, a16w8), got a number"),
        ([1, 2, 3], "request body must be a JSON object, got an array"),
    ]
    for body, detail in cases:
        r = _post(client, body)
        assert r.status_code == 422, body
        assert r.json()["detail"] == detail


def test_422_malformed_json(client):
    r = _post(client, content=b'{"patient_id": "p", "features": {')
    assert r.status_code == 422
    assert r.json() == {"detail": "request body is not valid JSON (EOF while parsing an object at line 1 column 33)"}
    r = _post(client, content=b"")
    assert r.status_code == 422
    assert r.json()["detail"].startswith("request body is not valid JSON")
    r = _post(client, content=b"\xff\xfe garbage")
    assert r.status_code == 422
    assert r.json()["detail"].startswith("request body is not valid JSON")


def test_413_by_content_length_and_by_stream(client, world):
    big = json.dumps({"patient_id": "p", "features": valid_features(world), "pad": "x" * 70_000}).encode()
    r = _post(client, content=big)
    assert (r.status_code, r.json()) == (413, {"detail": "request body is larger than 65536 bytes"})

    def chunks():  # chunked transfer: no Content-Length, the server counts the bytes as they arrive
        for _ in range(12):
            yield b" " * 8192

    with httpx.Client(base_url=str(client.base_url), headers=dict(client.headers), timeout=10) as fresh:
        r = fresh.post("/v1/analyze", content=chunks(), headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()) == (413, {"detail": "request body is larger than 65536 bytes"})
    exactly = b" " * (65536 - 2) + b"{}"  # at the limit: accepted, then judged as JSON
    r = _post(client, content=exactly)
    assert r.status_code == 422 and r.json()["detail"] == "patient_id: required (a string)"


# -- tokens ---------------------------------------------------------------------------------------


def test_revocation_is_immediate(client, world):
    token = add_token(world.hospital, "temporary")
    body = {"patient_id": "p", "features": valid_features(world)}
    assert _post(client, body, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert fedcare_main("serve", "token", "revoke", "--kit", str(world.hospital), "--name", "temporary")[0] == 0
    r = _post(client, body, headers={"Authorization": f"Bearer {token}"})
    assert (r.status_code, r.json()) == (401, {"detail": "invalid or revoked token"})


def test_token_commands(world, tokens):
    status, out, err = fedcare_main("serve", "token", "list", "--kit", str(world.hospital))
    assert status == 0
    assert "clinic" in out and "analyze,models" in out and "models-only" in out
    for token in tokens.values():
        assert token not in out and token not in err
    status, _, err = fedcare_main("serve", "token", "add", "--kit", str(world.hospital), "--name", "clinic")
    assert (status, err) == (2, "fedcare: error: --name: a token named 'clinic' exists; revoke it first "
                                "(`fedcare serve token revoke --name clinic`)\n")
    status, _, err = fedcare_main("serve", "token", "revoke", "--kit", str(world.hospital), "--name", "nobody")
    assert (status, err) == (2, "fedcare: error: --name: no token named 'nobody' (see `fedcare serve token list`)\n")


def test_tokens_file_holds_only_hashes(world, tokens):
    path = world.hospital / "state" / "serve-tokens.json"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    stored = json.loads(text)["tokens"]
    for name, token in tokens.items():
        assert token not in text
        entry = next(t for t in stored if t["name"] == name)
        assert entry["hash"] == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert len(tokens["clinic"]) >= 43  # secrets.token_urlsafe(32)


# -- audit log and metrics ------------------------------------------------------------------------


def test_audit_log_pseudonymizes_and_keeps_no_values(client, world):
    patient = "MRN-0042-ZEBRA-7781"
    values = valid_features(world, bmi=31.4159, steps_per_day=12345.678)
    r = _post(client, {"patient_id": patient, "features": values})
    assert r.status_code == 200
    _post(client, {"patient_id": patient, "features": {**values, "bmi": 99.9876}})  # a 422 is audited too
    state = world.hospital / "state"
    audit, key = state / "serve-audit.jsonl", state / "audit.key"
    assert audit.stat().st_mode & 0o777 == 0o600 and key.stat().st_mode & 0o777 == 0o600
    text = audit.read_text()
    assert patient not in text and "ZEBRA" not in text
    for value in ("31.4159", "12345.678", "99.9876"):
        assert value not in text
    lines = [json.loads(line) for line in text.splitlines()]
    pseudonym = hmac.new(key.read_bytes(), patient.encode(), hashlib.sha256).hexdigest()
    mine = [rec for rec in lines if rec.get("patient") == pseudonym]  # summary lines (401s) have no patient
    assert [rec["status"] for rec in mine[-2:]] == [200, 422]
    ok, refused = mine[-2:]
    default = client.get("/v1/models").json()["default"]
    assert ok["token"] == "clinic" and ok["endpoint"] == "/v1/analyze" and ok["model"] == default
    assert ok["latency_ms"] > 0 and ok["time"].endswith("Z")
    assert (refused["reason"], refused["feature"]) == ("out_of_range", "bmi")
    assert set(ok) == {"time", "token", "endpoint", "method", "status", "model", "latency_ms", "patient", "reason",
                       "feature", "client", "chain"}
    assert set(ok["chain"]) == {"seq", "prev", "mac"}  # the hash chain (fedcare.audit_chain): no request data
    # every patient id any test sent is absent; unknown feature names are never logged
    assert "row-1" not in text and "shoe_size" not in text


def test_service_writes_only_its_state_files(world, server):
    assert sorted(p.name for p in (world.hospital / "state").iterdir()) == [
        ".serve-tokens.lock", "audit.key", "serve-audit.head", "serve-audit.jsonl", "serve-tokens.json"]
    assert sorted(p.name for p in world.package.iterdir()) == [
        "manifest.json", "manifest.sig", "model.a16w8.onnx", "model.int8.onnx", "model.onnx"]


def test_metrics_count_requests(client, world):
    def read():
        r = client.get("/metrics", headers={"Authorization": ""})
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return metric_values(r.text)

    key = 'fedcare_serve_requests_total{endpoint="/v1/analyze",method="POST",code="%d"}'
    count = 'fedcare_serve_request_duration_seconds_count{endpoint="/v1/analyze"}'
    before = read()
    for _ in range(3):
        assert _post(client, {"patient_id": "p", "features": valid_features(world)}).status_code == 200
    assert _post(client, {"patient_id": "p"}, headers={"Authorization": ""}).status_code == 401
    assert _post(client, {"patient_id": "p", "features": valid_features(world, bmi=1.0)}).status_code == 422
    after = read()
    assert after[key % 200] - before.get(key % 200, 0) == 3
    assert after[key % 401] - before.get(key % 401, 0) == 1
    assert after[key % 422] - before.get(key % 422, 0) == 1
    assert after[count] - before.get(count, 0) == 5
    predictions = 'fedcare_serve_predictions_total{model="%s"}' % client.get("/v1/models").json()["default"]
    assert after[predictions] - before.get(predictions, 0) == 3
    le = 'fedcare_serve_request_duration_seconds_bucket{endpoint="/v1/analyze",le="+Inf"}'
    assert after[le] == after[count]


# -- startup refusals -----------------------------------------------------------------------------


def _copy_package(world, name: str) -> Path:
    target = world.root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(world.package, target)
    return target


def test_refuses_tampered_package_and_other_signer(world):
    """Both at once, as real `fedcare serve` processes: exit 2, one line, nothing served."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from export.package import write_signed_manifest
    from export.signing import load_signing_public_key, signing_fingerprint

    tampered = _copy_package(world, "pkg-tampered")
    data = bytearray((tampered / "model.int8.onnx").read_bytes())
    data[-5] ^= 0x01
    (tampered / "model.int8.onnx").write_bytes(bytes(data))
    other = _copy_package(world, "pkg-other-signer")
    other_key = Ed25519PrivateKey.generate()
    write_signed_manifest(other, json.loads((other / "manifest.json").read_text()), other_key)
    rescaled = _copy_package(world, "pkg-manifest-edited")
    text = (rescaled / "manifest.json").read_text()
    (rescaled / "manifest.json").write_text(text.replace('"clip": 5.0', '"clip": 50.0'))

    # two as real `fedcare serve` processes (`python -m cli`, the one serving entry point); one case in-process
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "cli", "serve", "--package", str(pkg), "--kit",
                                str(world.hospital), "--port", str(free_port())],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, pkg in (("tampered", tampered), ("other", other))
    }
    results = {name: (p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    results["edited"] = fedcare_main("serve", "--package", str(rescaled), "--kit", str(world.hospital),
                                     "--port", str(free_port()))
    expected_fp = signing_fingerprint(load_signing_public_key(world.hospital / "coordinator-signing.pub"))
    assert results["tampered"] == (2, "", "fedcare: error: model.int8.onnx: sha256 does not match the signed "
                                          "manifest (modified after signing)\n")
    assert results["other"] == (2, "", f"fedcare: error: signed by another key ({signing_fingerprint(other_key.public_key())}); "
                                       f"expected the coordinator key {expected_fp}\n")
    assert results["edited"] == (2, "", f"fedcare: error: bad signature: manifest.json or manifest.sig was changed after "
                                        f"signing (expected signer {expected_fp})\n")


def test_refuses_unlisted_file_and_wrong_study(world, tmp_path):
    extra = _copy_package(world, "pkg-extra-file")
    (extra / "notes.txt").write_text("hello")
    status, out, err = fedcare_main("serve", "--package", str(extra), "--kit", str(world.hospital), "--port", str(free_port()))
    assert (status, out) == (2, "")
    assert err == ("fedcare: error: unlisted file notes.txt: not in the signed manifest; refusing the package "
                   "(only site/ may hold site-side artifacts)\n")

    from deploy.provision import provision

    other_study = tmp_path / "other-study.toml"
    other_study.write_text(DEFAULT_STUDY.read_text().replace('name = "depression-risk"', 'name = "other-risk"'))
    other_kits = provision(other_study, ["127.0.0.1"], ["a", "b", "c"], tmp_path / "kits")
    shutil.copyfile(world.hospital / "coordinator-signing.pub", other_kits["a"] / "coordinator-signing.pub")
    status, _, err = fedcare_main("serve", "--package", str(world.package), "--kit", str(other_kits["a"]),
                                  "--port", str(free_port()))
    assert status == 2
    assert err.startswith("fedcare: error: the package is for study depression-risk (") and err.count("\n") == 1
    # `fedcare verify` refuses it for that kit too, in the same words
    assert fedcare_main("verify", str(world.package), "--kit", str(other_kits["a"])) == (2, "", err)
    assert fedcare_main("verify", str(world.package), "--kit", str(world.hospital))[0] == 0


def test_verify_and_serve_load_no_training_stack(world):
    """`fedcare verify` and the whole start of `fedcare serve` (kit, verification, sessions, app) in a fresh
    interpreter: no torch, Opacus or Flower."""
    code = (
        "import sys\n"
        "from cli import main\n"
        f"assert main(['verify', {str(world.package)!r}, '--kit', {str(world.hospital)!r}]) == 0\n"
        "from inference.commands import load_service\n"
        "from inference.app import create_app\n"
        f"create_app(load_service({str(world.package)!r}, {str(world.hospital)!r}))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'opacus', 'flwr', 'ray'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_refuses_plain_http_off_loopback_and_busy_port(world):
    status, _, err = fedcare_main("serve", "--package", str(world.package), "--kit", str(world.hospital), "--host", "0.0.0.0")
    assert status == 2
    assert err == ("fedcare: error: --host 0.0.0.0: refusing to serve patient data over plain HTTP on a network "
                   "interface; give --tls-cert and --tls-key, or bind 127.0.0.1 behind a TLS proxy\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, _, err = fedcare_main("serve", "--package", str(world.package), "--kit", str(world.hospital), "--port", str(port))
    assert status == 2
    assert err == f"fedcare: error: --host/--port: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
    status, _, err = fedcare_main("serve", "--kit", str(world.hospital))
    assert (status, err) == (2, "fedcare: error: serve: --package and --kit are required (or use `fedcare serve token ...`)\n")


def test_tls(world, tokens):
    from deploy.pki import CertificateAuthority
    from fedcare.files import write_public, write_secret

    tls = world.root / "tls"
    ca = CertificateAuthority.create("serve-test")
    cert, key = ca.issue_server(["127.0.0.1"])
    write_public(tls / "serve.crt", cert)
    write_secret(tls / "serve.key", key)
    ca.save(tls / "ca.key", tls / "ca.crt")
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    proc = ServerProcess(world.package, world.hospital, world.root / "logs", "--tls-cert", str(tls / "serve.crt"),
                         "--tls-key", str(tls / "serve.key"), scheme="https")
    try:
        proc.wait_ready(verify=context)
        assert f"listening on https://127.0.0.1:{proc.port}" in proc.stdout
        r = httpx.post(f"{proc.base_url}/v1/analyze", verify=context, timeout=10,
                       headers={"Authorization": f"Bearer {tokens['clinic']}"},
                       json={"patient_id": "p", "features": valid_features(world)})
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{proc.port}/healthz", timeout=5)  # no plain HTTP on the TLS port
    finally:
        proc.stop()


def test_the_kits_own_serving_certificate_is_used_by_default(world, tmp_path):
    """`fedcare serve cert` issues the hospital's serving certificate from a CA local to its kit (never the
    study CA); `fedcare serve --kit` then speaks TLS with it without any --tls flag."""
    import shutil

    kit = tmp_path / "kit"
    shutil.copytree(world.hospital, kit, ignore=shutil.ignore_patterns("serve-audit*"))
    token = add_token(kit, "gateway", "analyze")
    status, out, err = fedcare_main("serve", "cert", "--kit", str(kit), "--host", "127.0.0.1,ml.example.internal")
    assert status == 0, err
    assert out.startswith(f"created this kit's serving CA: {kit / 'serve-ca.crt'}")
    assert (kit / "serve.key").stat().st_mode & 0o777 == 0o600 and (kit / "serve-ca.key").stat().st_mode & 0o777 == 0o600
    ca_before = (kit / "serve-ca.crt").read_bytes()
    status, out, _ = fedcare_main("serve", "cert", "--kit", str(kit), "--host", "127.0.0.1")  # a reissue keeps the CA
    assert status == 0 and "created" not in out and (kit / "serve-ca.crt").read_bytes() == ca_before
    from cryptography import x509

    issued = x509.load_pem_x509_certificate((kit / "serve.crt").read_bytes())
    assert issued.issuer != x509.load_pem_x509_certificate((kit / "ca.crt").read_bytes()).subject  # not the study CA
    context = ssl.create_default_context(cafile=str(kit / "serve-ca.crt"))
    proc = ServerProcess(world.package, kit, tmp_path / "logs", scheme="https")
    try:
        proc.wait_ready(verify=context)
        r = httpx.post(f"{proc.base_url}/v1/analyze", verify=context, timeout=10,
                       headers={"Authorization": f"Bearer {token}"}, json={"patient_id": "p", "features": valid_features(world)})
        assert r.status_code == 200
    finally:
        proc.stop()
    assert fedcare_main("serve", "cert", "--kit", str(kit), "--host", " ,") == (
        2, "", "fedcare: error: --host: give at least one host name or IP address the EHR gateway uses\n")


# -- execution providers --------------------------------------------------------------------------


def test_provider_order_and_cpu_fallback(world):
    from inference.model import CPU, choose_provider, open_session

    assert choose_provider(["AzureExecutionProvider", CPU]) == CPU
    assert choose_provider([CPU, "DmlExecutionProvider", "CoreMLExecutionProvider"]) == "CoreMLExecutionProvider"
    assert choose_provider([CPU, "DmlExecutionProvider", "OpenVINOExecutionProvider", "QNNExecutionProvider"]) == "QNNExecutionProvider"
    assert choose_provider([CPU, "DmlExecutionProvider"]) == "DmlExecutionProvider"
    session, used, reason = open_session((world.package / "model.int8.onnx").read_bytes(), "OpenVINOExecutionProvider")
    assert used == CPU and session.get_providers() == [CPU]
    assert reason.startswith("OpenVINOExecutionProvider")


# -- last: nothing above reached the last-resort handler -------------------------------------------


def test_no_5xx_and_no_unhandled_errors(client, server):
    values = metric_values(client.get("/metrics").text)
    assert values["fedcare_serve_unhandled_errors_total"] == 0
    codes = [name for name in values if name.startswith("fedcare_serve_requests_total")]
    assert codes and not [name for name in codes if 'code="5' in name]
    assert "unhandled" not in server.stderr and server.stderr == ""
