"""What encryption at rest costs: each encrypted path against its plain baseline, in the same run.

    .venv/bin/python -m bench.encryption_at_rest [--repeats 5] [--process-repeats 3]

Over the package `tests/test_serve.py` serves (`build_world`: provisioned kits, a fake finished run):
- serve start-up in-process: verify + `build_service` from the package directory vs from PKG.enc
  (decrypted and verified in memory);
- serve start-up as a process: `python -m cli serve` until /healthz answers, directory vs PKG.enc;
- `fedcare export` with and without `--encrypt-for SITE` (the ONNX export dominates both);
- a checkpoint of the study model written and read back, plain vs sealed under artifact.key;
- opening a kit key, plain vs passphrase-protected (the PKCS8 key derivation is the cost).
Medians of the repeats; ratio = encrypted / plain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(what: str, plain: float, encrypted: float, unit: str = "ms") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    return f"| {what} | {plain * scale:,.2f} {unit} | {encrypted * scale:,.2f} {unit} | {encrypted / plain:.2f}× |"


def _quiet(action):
    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            action()
    return run


def _process_start(package: Path, kit: Path, log: Path) -> float:
    from bench.serve_latency import wait_ready
    from deploy.flower import free_port

    port = free_port()
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--package", str(package), "--kit", str(kit),
                                 "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_ready(port, proc)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--process-repeats", type=int, default=3)
    args = parser.parse_args()

    from cli import main as fedcare
    from export.commands import verify_for_kit
    from fedcare.model import build_model, get_weights
    from fedcare.run_record import RunRecord
    from fedcare.sealing import ArtifactKey
    from fedcare.study import Overrides
    from inference.commands import state_dir
    from inference.service import build_service
    from deploy.kits import load_kit
    from tests.test_serve import build_world

    work = Path(tempfile.mkdtemp(prefix="bench-at-rest-"))
    try:
        world = build_world(work)
        kits = work / "kits"
        run = world.root / "run"
        coordinator, north = kits / "coordinator", kits / "north"
        rows = ["| step | plain | encrypted | ratio |", "|---|---|---|---|"]

        counter = iter(range(10_000))

        def export(encrypt: bool) -> None:
            out = work / f"pkg-{next(counter)}"
            extra = ["--encrypt-for", "north"] if encrypt else []
            assert fedcare(["export", "--run", str(run), "--kit", str(coordinator), "--out", str(out), *extra]) == 0

        export(True)  # warm the exporter; leaves work/pkg-0 and work/pkg-0.enc
        plain_pkg, enc = work / "pkg-0", work / "pkg-0.enc"
        export_plain = _median_seconds(_quiet(lambda: export(False)), args.repeats)
        export_enc = _median_seconds(_quiet(lambda: export(True)), args.repeats)

        kit = load_kit(north)
        state = state_dir(kit)
        service = lambda pkg: build_service(verify_for_kit(pkg, kit)[0], state, default_model="fp32")  # noqa: E731
        service(plain_pkg), service(enc)
        start_plain = _median_seconds(lambda: service(plain_pkg), args.repeats)
        start_enc = _median_seconds(lambda: service(enc), args.repeats)
        proc_plain = statistics.median(_process_start(plain_pkg, north, work / "p.log") for _ in range(args.process_repeats))
        proc_enc = statistics.median(_process_start(enc, north, work / "e.log") for _ in range(args.process_repeats))

        weights = get_weights(build_model(world.study))
        key = ArtifactKey.load(coordinator / "artifact.key")
        records = {"plain": RunRecord(work / "run-plain"), "sealed": RunRecord(work / "run-sealed", key=key)}
        for record in records.values():
            record.start(world.study, Overrides())

        def roundtrip(record: RunRecord) -> None:
            record.save_checkpoint(1, weights, world.study.hash)
            record.final_weights(world.study.hash)

        ckpt_plain = _median_seconds(lambda: roundtrip(records["plain"]), args.repeats * 20)
        ckpt_sealed = _median_seconds(lambda: roundtrip(records["sealed"]), args.repeats * 20)

        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        import fedcare.keys as keys

        protected = Path(shutil.copytree(coordinator, work / "protected"))
        os.environ[keys.PASSPHRASE_ENV] = "a bench passphrase, long enough"
        with contextlib.redirect_stdout(io.StringIO()):
            fedcare(["kit", "protect", "--kit", str(protected)])

        def open_key(path: Path) -> None:
            keys._passphrases.clear()
            keys.load_private_key(path, X25519PrivateKey, "x")

        key_plain = _median_seconds(lambda: open_key(coordinator / "artifact.key"), args.repeats * 4)
        key_protected = _median_seconds(lambda: open_key(protected / "artifact.key"), args.repeats * 4)
        del os.environ[keys.PASSPHRASE_ENV]

        rows += [
            _row("serve start-up in-process (verify + sessions), dir vs PKG.enc", start_plain, start_enc),
            _row("serve start-up as a process, until /healthz answers", proc_plain, proc_enc, unit="s"),
            _row("`fedcare export`, without vs with `--encrypt-for north`", export_plain, export_enc, unit="s"),
            _row("checkpoint written and read back, plain vs sealed", ckpt_plain, ckpt_sealed),
            _row("open a kit key (artifact.key), plain vs passphrase-protected", key_plain, key_protected),
        ]
        size = sum(p.stat().st_size for p in plain_pkg.iterdir() if p.is_file())
        print(f"package: {size:,} bytes in {plain_pkg.name}/, {enc.stat().st_size:,} bytes encrypted; "
              f"medians of {args.repeats} (process start: {args.process_repeats})")
        print("\n".join(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
