"""`fedcare run`'s view of a running study: one live status line and the lines that matter.

The ServerApp's output arrives line by line (`flwr log --stream`). This display sorts it:
- progress events (`fedcare.events.StageEvent`) update one status line: round k/R, the SecAgg+
  stage, sites answered and dropped, seconds into the round. On a terminal it is a live line (rich);
  otherwise (a log file, CI) each stage's end is one plain line;
- Flower's own log lines (`INFO :`, `WARNING :` …) are shown only with `--verbose`;
- everything else (fedcare's round results, refusals, a ServerApp traceback) is printed as is.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from typing import TextIO

from fedcare.events import StageEvent

FLOWER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s*(\x1b\[0m)?\s*:")


class RunDisplay:
    """Feed it the run's lines (`line`); `close` when the run ends."""

    def __init__(self, *, verbose: bool = False, live: bool | None = None, out: TextIO | None = None) -> None:
        self.verbose = verbose
        self.started = time.monotonic()
        self._out = out or sys.stdout
        self._live = None
        if live if live is not None else self._out.isatty():
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self._out)
            self._live = Live("", console=self._console, refresh_per_second=4, transient=True)
            self._live.start()

    def _print(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self._out, flush=True)

    def line(self, text: str) -> None:
        if not text.strip():
            return
        event = StageEvent.parse(text)
        if event is not None:
            self.event(event)
        elif FLOWER_LINE.match(text):
            if self.verbose:
                self._print(text)
        else:
            self._print(text)

    def event(self, event: StageEvent) -> None:
        status = f"{event.describe()}  · {time.monotonic() - self.started:.0f} s elapsed"
        if self._live is not None:
            self._live.update(status)
        elif event.done:
            self._print(f"  {status}")

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class DisplayedLines(io.TextIOBase):
    """A text stream whose complete lines go to a `RunDisplay` (to follow a ServerApp that runs in this
    process, as in simulation, by standing in for `sys.stdout`)."""

    def __init__(self, display: RunDisplay) -> None:
        super().__init__()
        self.display = display
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self.display.line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self.display.line(self._partial)
                self._partial = ""
