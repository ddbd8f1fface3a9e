"""Progress events: what a running ServerApp tells whoever follows the run (`fedcare run`).

The ServerApp's output reaches the coordinator's operator only as text (`flwr log --stream`), so each
event is one line: `PREFIX` and a JSON object. `fedcare run` reads them back into `StageEvent`s for
its progress display and hides them (and Flower's own log lines, unless `--verbose`). Events are
emitted only when the run config asks for them (`progress = 1`); `fedcare simulate` asks too and
follows its in-process ServerApp through the same display.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from fedcare.protocol import Phase

PREFIX = "fedcare:progress "

# SecAgg+ stages as Flower's workflow names them, and how a person reads them.
STAGES = {
    "setup": "setting up SecAgg+",
    "share_keys": "sharing keys",
    "collect_masked_vectors": "training and collecting masked vectors",
    "unmask": "unmasking the sum",
}


@dataclass(frozen=True)
class StageEvent:
    """A SecAgg+ stage of one round started (`done` False) or ended."""

    phase: Phase
    round: int  # training round (the evaluation round carries the last planned round; statistics 0)
    rounds: int  # planned training rounds
    stage: str  # a key of STAGES
    done: bool
    sites: int  # sites taking part in this stage
    answered: int  # of them, sites that replied (when done)
    dropped: int  # failures so far in this round
    seconds: float  # since the round began

    def line(self) -> str:
        return PREFIX + json.dumps({**asdict(self), "phase": self.phase.value}, separators=(",", ":"))

    @classmethod
    def parse(cls, line: str) -> StageEvent | None:
        """The event a line carries, or None if it is not an event line (or a malformed one)."""
        start = line.find(PREFIX)
        if start < 0:
            return None
        try:
            fields = json.loads(line[start + len(PREFIX):])
            return cls(**{**fields, "phase": Phase(fields["phase"])})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        what = {Phase.STATISTICS: "statistics round", Phase.EVALUATE: "final evaluation"}.get(
            self.phase, f"round {self.round}/{self.rounds}")
        stage = STAGES.get(self.stage, self.stage)
        if self.done:
            state = f"{self.answered}/{self.sites or self.answered} sites answered, {self.dropped} dropped"
        else:
            state = f"{self.sites} sites, {self.dropped} dropped" if self.sites else "sampling sites"
        return f"{what}: {stage} ({state})  {self.seconds:.0f} s"
