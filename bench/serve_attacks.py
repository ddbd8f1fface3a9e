"""Latency of /v1/analyze while a client attacks `fedcare serve`, against the same with no attack, in the same run.

    .venv/bin/python bench/serve_attacks.py [--seconds 4] [--rate 200] [--idle 2000] [--no-unbounded] [--no-pin]

Attacks (issue 13), each during one measurement window, from a separate process:
- header: 64 MiB request heads, one connection after another, as fast as the server takes them;
- idle: `--idle` connections opened at the start of the window that send nothing.
The probe is an open loop of authenticated POST /v1/analyze at `--rate` over 4 keep-alive connections
opened before the attack (latency from each request's scheduled time, so a stall counts in full).

Two servers, each its own process on loopback: `python -m cli serve` (bounded: inference/server.py),
and, unless --no-unbounded, this script's `--serve-unbounded` mode: the same app on plain
`uvicorn.Server` with httptools, as `fedcare serve` ran before issue 13 (no head limit, no
header timeout, no connection limit). With pinning (default) the servers run on CPU 0 and the probe
and the attacker on CPU 1. Goal: p99 under attack below 50 ms for the bounded server.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_latency import _run, bodies, build_fixture, closed_loop, http_request, open_loop, stop_servers, wait_ready  # noqa: E402

HEADER_BYTES = 64 << 20


# -- the unbounded baseline server -------------------------------------------------------------------


def serve_unbounded(package: Path, kit: Path, port: int) -> None:
    import uvicorn

    from inference.app import create_app
    from inference.commands import load_service

    app = create_app(load_service(package, kit))
    print(f"unbounded uvicorn serving on 127.0.0.1:{port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning", server_header=False, timeout_keep_alive=30)


# -- attackers (a separate process) --------------------------------------------------------------------


def attack(kind: str, port: int, seconds: float, idle: int, pin: bool, report) -> None:
    if pin:
        os.sched_setaffinity(0, {1})
    stop = time.monotonic() + seconds
    done = {"kind": kind, "attempts": 0, "bytes_sent": 0, "refused": 0, "unfinished": 0, "closed_by_server": 0, "open_failed": 0}
    if kind == "header":
        chunk = b"a" * (1 << 20)
        while time.monotonic() < stop:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=max(0.5, stop - time.monotonic()))
            except OSError:
                done["open_failed"] += 1
                time.sleep(0.01)
                continue
            done["attempts"] += 1
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(HEADER_BYTES // len(chunk)):
                    if time.monotonic() > stop:
                        break
                    sock.sendall(chunk)
                    done["bytes_sent"] += len(chunk)
            except TimeoutError:
                done["unfinished"] += 1  # still being read when the window ended
            except OSError:
                done["refused"] += 1
            sock.close()
    else:
        socks = []
        for _ in range(idle):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                done["open_failed"] += 1
        done["attempts"] = len(socks)
        time.sleep(max(0.0, stop - time.monotonic()))
        for sock in socks:
            sock.setblocking(False)
            try:
                done["closed_by_server"] += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                done["closed_by_server"] += 1
            sock.close()
    report.put(done)


def measure(port: int, requests: list[bytes], kind: str | None, args: argparse.Namespace, pin: bool) -> dict:
    proc = report = None
    if kind is not None:
        report = multiprocessing.Queue()
        proc = multiprocessing.Process(target=attack, args=(kind, port, args.seconds + 0.5, args.idle, pin, report))
        proc.start()
        time.sleep(0.5 if kind == "idle" else 0.2)  # the idle connections are open, the first header is on its way
    result = _run(open_loop(port, requests, args.seconds, args.rate, connections=4))
    if proc is not None:
        result["attack"] = report.get(timeout=120)
        proc.join(timeout=30)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measurement window (default 4)")
    parser.add_argument("--rate", type=float, default=200.0, help="probe requests per second (default 200)")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections in the idle attack (default 2000)")
    parser.add_argument("--no-unbounded", action="store_true", help="skip the unbounded uvicorn baseline")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers to CPU 0 and the clients to CPU 1")
    parser.add_argument("--serve-unbounded", nargs=3, metavar=("PKG", "KIT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_unbounded:
        package, kit, port = args.serve_unbounded
        serve_unbounded(Path(package), Path(kit), int(port))
        return 0

    import resource

    from deploy.flower import free_port
    from deploy.kits import load_kit
    from inference.commands import state_dir
    from inference.tokens import add_token

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.idle + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.idle + 256), hard))
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    names = ["bounded"] + ([] if args.no_unbounded else ["unbounded"])
    results: dict[str, dict[str, dict]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory(prefix="fedcare-serve-attacks-") as tmp:
        root = Path(tmp)
        print("building the package ...", flush=True)
        package, kit, _ = build_fixture(root)
        token, _ = add_token(state_dir(load_kit(kit)), "bench", ["analyze"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        ports = {n: free_port() for n in names}
        logs = {n: open(root / f"{n}.log", "wb") for n in names}
        preexec = (lambda: os.sched_setaffinity(0, {0})) if pin else None
        commands = {
            "bounded": [sys.executable, "-m", "cli", "serve", "--package", str(package), "--kit", str(kit),
                        "--port", str(ports["bounded"])],
            "unbounded": [sys.executable, __file__, "--serve-unbounded", str(package), str(kit), str(ports.get("unbounded"))],
        }
        procs = {n: subprocess.Popen(commands[n], cwd=ROOT, env=env, stdout=logs[n], stderr=subprocess.STDOUT,
                                     preexec_fn=preexec) for n in names}
        try:
            for n in names:
                wait_ready(ports[n], procs[n])
            if pin:
                os.sched_setaffinity(0, {1})
            for n in names:
                requests = [http_request(ports[n], token, b) for b in bodies("int8")]
                _run(open_loop(ports[n], requests, 1.0, args.rate, connections=4))  # warm-up
                for kind in (None, "header", None, "idle"):
                    label = kind or "none"
                    r = measure(ports[n], requests, kind, args, pin)
                    results[n].setdefault(label, []).append(r)
                    print(f"  {n:9} {label:6}: {r}", flush=True)
                    wait_ready(ports[n], procs[n])  # the server is answering again before the next window
            hot: dict[str, list[dict]] = {n: [] for n in names}  # the hot path, no attack: max rate, interleaved
            for rep in range(2):
                for n in names if rep % 2 == 0 else names[::-1]:
                    requests = [http_request(ports[n], token, b) for b in bodies("int8")]
                    hot[n].append(_run(closed_loop(ports[n], requests, args.seconds)))
                    print(f"  {n:9} closed loop: {hot[n][-1]}", flush=True)
        finally:
            stop_servers(procs, logs)

    def pick(name: str, label: str, key: str) -> float:
        values = [r[key] for r in results[name][label]]
        return sorted(values)[len(values) // 2]

    print()
    print(f"/v1/analyze at {args.rate:g}/s over 4 keep-alive connections, {args.seconds:g} s windows, "
          f"{'servers on CPU 0, probe and attacker on CPU 1' if pin else 'unpinned'}; latency from schedule (ms)")
    print(f"{'server':10} {'attack':34} {'p50':>8} {'p99':>9} {'p99 ratio':>10} {'errors':>7}   attack outcome")
    for n in names:
        base_p99 = pick(n, "none", "sched_p99_ms")
        rows = [("none", "none (median of 2 windows)"), ("header", "64 MiB request heads, back to back"),
                ("idle", f"{args.idle} idle connections")]
        for label, text in rows:
            p50, p99 = pick(n, label, "sched_p50_ms"), pick(n, label, "sched_p99_ms")
            errors = sum(r["errors"] for r in results[n][label])
            outcome = ""
            if label != "none":
                a = results[n][label][0]["attack"]
                outcome = (f"{a['attempts']} heads, {a['bytes_sent'] / 2**20:.1f} MiB sent, {a['refused']} cut off by the server, "
                           f"{a['unfinished']} unfinished"
                           if label == "header" else
                           f"{a['attempts']} opened, {a['open_failed']} failed to open, {a['closed_by_server']} closed by the server")
            ratio = "" if label == "none" else f"{p99 / base_p99:.2f}×"
            print(f"{n:10} {text:34} {p50:>8.2f} {p99:>9.2f} {ratio:>10} {errors:>7}   {outcome}")
    print()
    print(f"hot path, no attack, closed loop (8 connections, as fast as they go), best of 2 interleaved {args.seconds:g} s runs:")
    for n in names:
        best = max(hot[n], key=lambda r: r["rps"])
        print(f"  {n:10} {best['rps']:8.0f} req/s   p50 {best['p50_ms']:.2f} ms   p99 {best['p99_ms']:.2f} ms")
    if "unbounded" in hot:
        a, b = (max(r["rps"] for r in hot[n]) for n in ("bounded", "unbounded"))
        print(f"  bounded/unbounded throughput: {a / b:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
