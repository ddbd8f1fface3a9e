"""Latency and throughput of `fedcare serve` (/v1/analyze): the int8 ONNX Runtime model vs the same
API serving the study model in torch (fp32), measured in the same run.

    .venv/bin/python bench/serve_latency.py [--seconds 5] [--repeats 3] [--rate 1000] [--no-pin]

Builds a signed package (`export.build.build_package`) from a fake finished run record (study model
with perturbed weights, federated scaling; `tests.test_serve.build_world`), then starts two servers on loopback, each its own
process: `python -m cli serve` (the real service; requests ask for model "int8"), and this
script's `--serve-torch` mode: the very same app (`inference.app.create_app`) whose "fp32"
model is `fedcare.model` run by torch (1 thread, `inference_mode`). The load generator is this
process: raw asyncio sockets with HTTP/1.1 keep-alive (lighter than an HTTP client library, so
the client does not dominate), separate from both servers. With pinning (default), servers run
on CPU 0 and the load generator on CPU 1.

Two measurements per server, interleaved, repeated; medians reported (and the best repeat, which
shows what a quiet machine does when other work shares the cores):
- open loop at `--rate` requests/s (16 connections): p50/p99 latency from each request's
  scheduled start (so queueing counts), and the achieved rate;
- closed loop, 8 connections as fast as they go: maximum requests/s and its p50/p99.
Also the model call alone in-process (one row): ORT int8 `run` vs torch forward.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STUDY = ROOT / "studies" / "depression-risk.toml"


# -- the package ---------------------------------------------------------------------------------


def build_fixture(root: Path) -> tuple[Path, Path, Path]:
    """(package dir, hospital kit, run dir): the fake finished run record and the package that
    `tests/test_serve.py` serves (`build_world`)."""
    from tests.test_serve import build_world

    world = build_world(root)
    return world.package, world.hospital, world.root / "run"


# -- the torch baseline server (same app, torch model) ---------------------------------------------


class TorchModel:
    """`fedcare.model` in torch with the run's weights, in place of an ONNX Runtime session."""

    def __init__(self, run_dir: Path) -> None:
        import torch

        from fedcare.model import build_model, set_weights
        from fedcare.run_record import RunRecord

        torch.set_num_threads(1)
        self.torch = torch
        record = RunRecord(run_dir)
        study = record.study()
        self.model = build_model(study)
        set_weights(self.model, record.final_weights(study.hash)[0])
        self.model.eval()
        self.name, self.provider = "fp32", "torch"

    def logit(self, x) -> float:
        with self.torch.inference_mode():
            return float(self.model(self.torch.from_numpy(x))[0])

    def describe(self) -> dict:
        return {"name": self.name, "file": None, "sha256": None, "batch": "dynamic", "provider": "torch"}


def serve_torch(package: Path, kit: Path, run_dir: Path, port: int) -> None:
    import uvicorn

    from inference.app import create_app
    from inference.commands import load_service

    service = load_service(package, kit)
    torch_model = TorchModel(run_dir)
    service.models.models = {"fp32": torch_model}
    service.models.models["int8"] = torch_model  # the default name too, so nothing else changes
    app = create_app(service)
    print(f"torch baseline serving on 127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning")


# -- load generator ------------------------------------------------------------------------------


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def stop_servers(procs: dict[str, subprocess.Popen], logs: dict[str, Any]) -> None:
    """Stop the servers this benchmark started (SIGTERM, then SIGKILL after 15 s) and close their logs."""
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for log in logs.values():
        log.close()


def http_request(port: int, token: str, body: bytes) -> bytes:
    return (f"POST /v1/analyze HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def bodies(model: str, n: int = 64) -> list[bytes]:
    import numpy as np

    from fedcare.study import load_study

    study = load_study(STUDY)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        values = {f.name: round(float(f.low + rng.random() * (f.high - f.low)), 2) for f in study.features}
        if i % 3 == 0:
            values["sleep_hours"] = None
        out.append(json.dumps({"patient_id": f"bench-{i}", "features": values, "model": model}).encode())
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def closed_loop(port: int, requests: list[bytes], seconds: float, connections: int = 8) -> dict:
    conns = [await Connection.open(port) for _ in range(connections)]
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(conn: Connection, offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status = await conn.request(requests[i % len(requests)])
            latencies.append(time.perf_counter() - start)
            errors += status != 200
            i += connections

    begin = time.perf_counter()
    await asyncio.gather(*(worker(c, k) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - begin
    for c in conns:
        c.close()
    return {"rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "n": len(latencies), "errors": errors}


async def open_loop(port: int, requests: list[bytes], seconds: float, rate: float, connections: int = 16) -> dict:
    """Requests scheduled every 1/rate s; latency counts from the scheduled time (no coordinated omission)."""
    conns = [await Connection.open(port) for _ in range(connections)]
    total = int(seconds * rate)
    latencies: list[float] = []
    from_schedule: list[float] = []  # includes the client's timer lateness (event-loop timers have 1 ms resolution)
    errors = 0
    next_index = 0
    t0 = time.perf_counter() + 0.05

    async def worker(conn: Connection) -> None:
        nonlocal next_index, errors
        while True:
            i = next_index
            if i >= total:
                return
            next_index += 1
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            status = await conn.request(requests[i % len(requests)])
            done = time.perf_counter()
            latencies.append(done - sent)
            from_schedule.append(done - scheduled)
            errors += status != 200

    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    return {"rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "sched_p50_ms": percentile(from_schedule, 50) * 1e3,
            "sched_p99_ms": percentile(from_schedule, 99) * 1e3, "n": len(latencies), "errors": errors}


# -- model call alone --------------------------------------------------------------------------------


def model_call_us(package: Path, kit: Path, run_dir: Path, repeats: int = 20000) -> dict:
    from deploy.kits import load_kit
    from export.commands import verify_for_kit
    from inference.model import InputSpec, ModelSet

    verified, _ = verify_for_kit(package, load_kit(kit))
    inputs = InputSpec.from_manifest(verified.manifest)
    models = ModelSet.open(verified, verified.manifest, inputs, "CPUExecutionProvider").models
    torch_model = TorchModel(run_dir)
    raw = [50.0, 1, 10, 0.5, 3, 7, 1, 0, 0, 0, 0, 1, 0.5, None, 6000, 70, 40, 27, 50]
    x = inputs.prepare(raw)
    out = {}
    for name, fn in (("prepare (numpy)", lambda: inputs.prepare(raw)), ("ORT int8 run", lambda: models["int8"].logit(x)),
                     ("ORT fp32 run", lambda: models["fp32"].logit(x)), ("torch fp32 forward", lambda: torch_model.logit(x))):
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats // 5):
                fn()
            samples.append((time.perf_counter() - start) / (repeats // 5) * 1e6)
        out[name] = statistics.median(samples)
    return out


# -- main ------------------------------------------------------------------------------------------


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server on {port} did not start")


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop request rate (default 1000/s)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers to CPU 0 and the client to CPU 1")
    parser.add_argument("--serve-torch", nargs=4, metavar=("PKG", "KIT", "RUN", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_torch:
        package, kit, run, port = args.serve_torch
        serve_torch(Path(package), Path(kit), Path(run), int(port))
        return 0

    from deploy.flower import free_port
    from deploy.kits import load_kit
    from inference.commands import state_dir
    from inference.tokens import add_token

    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    with tempfile.TemporaryDirectory(prefix="fedcare-serve-bench-") as tmp:
        root = Path(tmp)
        print("building the package ...", flush=True)
        package, kit, run = build_fixture(root)
        token, _ = add_token(state_dir(load_kit(kit)), "bench", ["analyze"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        ports = {"int8": free_port(), "torch": free_port()}
        logs = {name: open(root / f"{name}.log", "wb") for name in ports}
        preexec = (lambda: os.sched_setaffinity(0, {0})) if pin else None
        procs = {
            "int8": subprocess.Popen([sys.executable, "-m", "cli", "serve", "--package", str(package), "--kit", str(kit),
                                      "--port", str(ports["int8"])], cwd=ROOT, env=env, stdout=logs["int8"],
                                     stderr=subprocess.STDOUT, preexec_fn=preexec),
            "torch": subprocess.Popen([sys.executable, __file__, "--serve-torch", str(package), str(kit), str(run),
                                       str(ports["torch"])], cwd=ROOT, env=env, stdout=logs["torch"],
                                      stderr=subprocess.STDOUT, preexec_fn=preexec),
        }
        try:
            for name, proc in procs.items():
                wait_ready(ports[name], proc)
            if pin:
                os.sched_setaffinity(0, {1})
            requests = {
                "int8": [http_request(ports["int8"], token, b) for b in bodies("int8")],
                "torch": [http_request(ports["torch"], token, b) for b in bodies("fp32")],
            }
            results: dict[str, dict[str, list[dict]]] = {n: {"open": [], "closed": []} for n in ports}
            for name in ports:  # warm-up
                _run(closed_loop(ports[name], requests[name], 1.0))
            for rep in range(args.repeats):
                for name in ("int8", "torch") if rep % 2 == 0 else ("torch", "int8"):
                    results[name]["open"].append(_run(open_loop(ports[name], requests[name], args.seconds, args.rate)))
                    results[name]["closed"].append(_run(closed_loop(ports[name], requests[name], args.seconds)))
                    print(f"  repeat {rep + 1} {name:5}: open {results[name]['open'][-1]}  closed {results[name]['closed'][-1]}",
                          flush=True)
            if pin:
                os.sched_setaffinity(0, {0, 1})
            calls = model_call_us(package, kit, run)
        finally:
            stop_servers(procs, logs)

    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name][mode])

    def best(name: str, mode: str, key: str) -> float:
        values = [r[key] for r in results[name][mode]]
        return max(values) if key == "rps" else min(values)

    errors = sum(r["errors"] for n in results for m in results[n] for r in results[n][m])
    print()
    print(f"/v1/analyze on loopback, {'server on CPU 0, load generator on CPU 1' if pin else 'unpinned'}; "
          f"medians of {args.repeats} interleaved repeats of {args.seconds:g} s; non-200 answers: {errors}")
    print(f"{'':34} {'int8 (ONNX Runtime)':>20} {'fp32 (torch)':>14} {'ratio':>8}   best repeat: int8, torch")
    rows = [
        (f"open loop {args.rate:g}/s: achieved rps", "open", "rps"),
        (f"open loop {args.rate:g}/s: p50 ms", "open", "p50_ms"),
        (f"open loop {args.rate:g}/s: p99 ms", "open", "p99_ms"),
        ("  from schedule: p50 ms", "open", "sched_p50_ms"),
        ("  from schedule: p99 ms", "open", "sched_p99_ms"),
        ("closed loop (8 conn): rps", "closed", "rps"),
        ("closed loop (8 conn): p50 ms", "closed", "p50_ms"),
        ("closed loop (8 conn): p99 ms", "closed", "p99_ms"),
    ]
    for label, mode, key in rows:
        a, b = med("int8", mode, key), med("torch", mode, key)
        ratio = a / b if key == "rps" else b / a
        print(f"{label:34} {a:>20.2f} {b:>14.2f} {ratio:>7.2f}×   {best('int8', mode, key):.2f}, {best('torch', mode, key):.2f}")
    print("(ratio = int8's advantage: rps int8/torch, latency torch/int8; latency is send -> answer, "
          "'from schedule' also counts the client's timer lateness and queueing)")
    print("model call alone, one row, µs: " + ", ".join(f"{k} {v:.1f}" for k, v in calls.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
