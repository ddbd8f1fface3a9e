"""Start-up time of the light commands, against a baseline revision measured in the same run.

    python bench/startup.py [--baseline REV] [--repeat N]

For each command, a fresh interpreter runs it N times (median wall seconds, and which heavy
libraries it imported). With --baseline, the same commands run from a `git worktree` of REV
(before issue 10 the entry point was `python -m fedcare.cli`; it is `python -m cli` after), and
the ratio baseline / now is printed: > 1 means faster now.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = "studies/depression-risk.toml"
COMMANDS = {
    "fedcare --help": ["--help"],
    "fedcare study check": ["study", "check", STUDY],
    "fedcare verify --help": ["verify", "--help"],
    "fedcare serve --help": ["serve", "--help"],
}


def _entry(tree: Path) -> list[str]:
    return [sys.executable, "-m", "cli"] if (tree / "cli" / "__init__.py").exists() else [sys.executable, "-m", "fedcare.cli"]


def measure(tree: Path, argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(_entry(tree) + argv, cwd=tree, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="a git revision to compare with (e.g. ff36fb0)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = None
        if args.baseline:
            baseline = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            print(f"{'command':<24} {'now (s)':>8} {'baseline (s)':>13} {'ratio':>6}")
            for name, argv in COMMANDS.items():
                now = measure(ROOT, argv, args.repeat)
                if baseline is None:
                    print(f"{name:<24} {now:8.2f}")
                    continue
                before = measure(baseline, argv, args.repeat)
                print(f"{name:<24} {now:8.2f} {before:13.2f} {before / now:5.1f}x")
        finally:
            if baseline is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
