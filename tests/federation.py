"""Real processes on loopback for deployment tests: `fedcare` commands in their own sessions,
stopped by process group (only the groups these tests started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import ROOT


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return needle in self.text()
            time.sleep(0.5)
        return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # the group this test started (start_new_session)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@dataclass
class Processes:
    workdir: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Started:
        log = self.workdir / f"{name}.log"
        handle = log.open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        item = Started(name, proc, log)
        self.started.append(item)
        return item

    def stop_all(self) -> None:
        for item in reversed(self.started):
            item.stop()


def fedcare(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def provision_federation(work: Path, study_toml: str, hospitals: list[str], port: int) -> None:
    """Kits for `hospitals` (coordinator on 127.0.0.1:`port`) under work/kits, the study in work/study.toml."""
    (work / "study.toml").write_text(study_toml)
    proc = fedcare("provision", "--study", str(work / "study.toml"), "--coordinator-host", "127.0.0.1,localhost",
                   "--hospitals", ",".join(hospitals), "--out", str(work / "kits"), "--port", str(port))
    assert proc.returncode == 0, proc.stderr


def start_coordinator(procs: Processes, work: Path, hospitals: list[str], name: str = "coordinator") -> Started:
    coordinator = procs.start(name, "coordinator", "start", "--kit", str(work / "kits" / "coordinator"), "--bind", "127.0.0.1")
    assert coordinator.wait_for(f"accepted hospitals: {', '.join(hospitals)}", 120), coordinator.text()
    return coordinator


def start_nodes(procs: Processes, work: Path, hospitals: list[str]) -> dict[str, Started]:
    """One node per hospital on work/sites/hospital-NN, each connected."""
    nodes = {}
    for i, name in enumerate(hospitals, start=1):
        nodes[name] = procs.start(f"node-{name}", "node", "start", "--kit", str(work / "kits" / name),
                                  "--data", str(work / "sites" / f"hospital-{i:02d}"))
    for name, node in nodes.items():
        assert node.wait_for(f"node '{name}' connected", 120), node.text()
    return nodes
