"""Schemathesis, every check over every operation, against a live `fedcare serve` (real HTTP).

    .venv/bin/python bench/serve_schemathesis.py [--max-examples 1000] [--seed N] [--repeats 1]

Builds the signed package and hospital kit of `tests/test_serve.py` (`build_world`), adds a token
with both scopes, starts `python -m cli serve` on loopback, and runs `schemathesis run
<base>/openapi.json --checks all` authenticated with `-H "Authorization: Bearer ..."` (all phases
that apply: examples, coverage, fuzzing; `--max-examples` per operation). Prints, per repeat, the
number of test cases generated and the failures (each with its Schemathesis code, title and
operations), and exits 1 if any repeat found one. `tests/test_serve_contract.py` runs the same with
`--max-examples 40` in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def schemathesis_command() -> list[str]:
    """The `schemathesis` console script next to this interpreter (the dev extra installs it)."""
    script = Path(sys.executable).with_name("schemathesis")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())"]


def run_schemathesis(base_url: str, token: str, report_dir: Path, *, max_examples: int, seed: int | None = None,
                     timeout: float = 600) -> dict:
    """One `schemathesis run --checks all` over the live service; its JSON report, plus the console output."""
    shutil.rmtree(report_dir, ignore_errors=True)
    command = [*schemathesis_command(), "run", f"{base_url}/openapi.json", "--checks", "all",
               "--header", f"Authorization: Bearer {token}", "--max-examples", str(max_examples),
               "--report", "json", "--report-dir", str(report_dir), "--workers", "1",
               "--request-timeout", "10", "--suppress-health-check", "all"]
    if seed is not None:
        command += ["--seed", str(seed)]
    proc = subprocess.run(command, cwd=report_dir.parent, capture_output=True, text=True, timeout=timeout,
                          env={**{k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}, "NO_COLOR": "1"})
    reports = sorted(report_dir.glob("*.json"))
    if not reports:
        raise RuntimeError(f"schemathesis wrote no report (exit {proc.returncode}): {proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    report = json.loads(reports[-1].read_text())
    report["console"] = proc.stdout + proc.stderr
    report["returncode"] = proc.returncode
    return report


def summary(report: dict) -> str:
    cases = report["test_cases"]
    failures = report["failures"]
    phases = ", ".join(f"{name} {phase['status']}" for name, phase in report["phases"].items())
    lines = [f"{cases['generated']} test cases over {report['operations']['tested']} operations ({phases}): "
             f"{cases['with_failures']} with failures, {len(failures)} unique failure kinds, "
             f"{len(report['errors'])} errors, seed {report['seed']}"]
    for f in failures:
        lines.append(f"  {f['code']} {f['title']} x{f['count']}: {', '.join(f['operations'])}")
    for e in report["errors"]:
        lines.append(f"  error: {json.dumps(e)[:300]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=1000, help="test cases per operation (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="schemathesis seed (default: random)")
    parser.add_argument("--repeats", type=int, default=1, help="runs, each with its own seed unless --seed")
    args = parser.parse_args()

    from tests.test_serve import ServerProcess, add_token, build_world

    with tempfile.TemporaryDirectory(prefix="fedcare-schemathesis-") as tmp:
        root = Path(tmp)
        print("building the package ...", flush=True)
        world = build_world(root / "world")
        token = add_token(world.hospital, "schemathesis", "analyze", "models")
        server = ServerProcess(world.package, world.hospital, root / "logs")
        found = 0
        total = 0
        try:
            server.wait_ready()
            for rep in range(args.repeats):
                report = run_schemathesis(server.base_url, token, root / f"report-{rep}",
                                          max_examples=args.max_examples, seed=args.seed, timeout=3600)
                total += report["test_cases"]["generated"]
                found += len(report["failures"]) + len(report["errors"])
                print(f"repeat {rep + 1}: {summary(report)}", flush=True)
                if report["failures"] or report["errors"]:
                    print(report["console"][-20000:])
        finally:
            server.stop()
        # uvicorn notes the malformed HTTP Schemathesis probes with; anything else on stderr is a finding
        stderr = "".join(line for line in server.stderr.splitlines(keepends=True)
                         if line.strip() != "WARNING:  Invalid HTTP request received.")
    print(f"total: {total} test cases, {found} failures" + (f"; server stderr: {stderr[-2000:]}" if stderr else ""))
    return 1 if found or stderr else 0


if __name__ == "__main__":
    sys.exit(main())
