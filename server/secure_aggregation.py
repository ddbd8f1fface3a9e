"""The coordinator's SecAgg+ workflow: Flower's, with the study's parameters, and loud failures.

Flower's `SecAggPlusWorkflow` counts a site's error reply as a dropout and, past the
reconstruction threshold, halts the round with one INFO line. The coordinator of a study
must see why: `ReportingSecAggPlusWorkflow` prints each site's refusal (e.g. a delta that
would exceed `clipping_range`) and every halted round.

A site's refusal arrives as a structured error reply (`fedcare.protocol.Refusal`: kind and
message). A site that refuses because its privacy budget is spent (`RefusalKind.BUDGET`) will
refuse every later round too.
When such refusals leave too few sites for a round to be unmasked, the study's remaining
training rounds are skipped (said so once); the evaluation-only round still reports the model.

It also fixes one dropout case of Flower 1.42's workflow: a site that is sampled but drops
out before it has shared its key shares (typically a node that went offline between rounds)
is later treated as "dead", and the unmask stage tries to reconstruct its secret from shares
that never existed, which halts the round. No other site ever masked with such a site, so
after key sharing the sampled set is narrowed to the sites that completed it; sites that
drop out later are still reconstructed exactly as Flower does.

Secrets are reconstructed with `privacy.shamir` (Flower's scheme and share bytes, without
pycryptodome's bit-by-bit field arithmetic, which dominated rounds at 100 sites), and keys are
agreed on X25519 (`privacy.key_agreement`), as at the sites (`privacy.secagg`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.common import Context
from flwr.server import Grid
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from fedcare.events import StageEvent
from fedcare.protocol import PERMANENT_REFUSALS, Phase, Refusal, RefusalKind
from fedcare.study import Study
from privacy.secagg import install_for_coordinator

install_for_coordinator()  # secrets reconstructed by privacy/shamir.py, keys agreed on X25519 (privacy/key_agreement.py)


@dataclass(frozen=True)
class FailedReply:
    """One failed site reply as the coordinator reads it."""

    kind: RefusalKind | None  # a refusal's kind; None for any other error (a crash, a timeout)
    what: str  # "refused (kind): message", or the error's last line
    site: str = ""  # the refusing site's own name, when it gave one

    @property
    def permanent(self) -> bool:
        return self.kind in PERMANENT_REFUSALS


def _failure(failure: BaseException) -> FailedReply:
    """A failed site reply: a site's refusal is read from its structured fields; any other error
    (a crash, a timeout) is shown as Flower reports it."""
    error = failure.args[0] if failure.args else None
    code, reason = getattr(error, "code", None), getattr(error, "reason", None)
    if isinstance(code, int) and isinstance(reason, str):
        refusal = Refusal.from_reply(code, reason)
        if refusal is not None:
            return FailedReply(refusal.kind, f"refused ({refusal.kind.value}): {refusal.line}"[:400], refusal.site)
        return FailedReply(None, _last_line(reason))
    return FailedReply(None, _last_line(str(failure)))


def failure_lines(failed: list[FailedReply]) -> list[str]:
    """One line per distinct failure, naming the sites that gave it (or how many, when unnamed)."""
    groups: dict[tuple[RefusalKind | None, str], list[str]] = {}
    for reply in failed:
        groups.setdefault((reply.kind, reply.what), []).append(reply.site)
    lines = []
    for (_, what), sites in groups.items():
        named = sorted(s for s in sites if s)
        unnamed = len(sites) - len(named)
        if named:
            verb = what if what.startswith("refused") else f"failed: {what}"
            lines.append(f"{'site' if len(named) == 1 else 'sites'} {', '.join(named)} {verb}")
        if unnamed:
            lines.append(f"{'a site' if unnamed == 1 else f'{unnamed} sites'} failed: {what}")
    return lines


def _last_line(text: str) -> str:
    """The end of an error's text, where the exception's own message is (display only, never decided on)."""
    lines = [line.strip() for line in text.strip().rstrip("'>").splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[-400:]


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAgg+ that reports each failed site reply and each halted round, and stops training
    once sites that have spent their privacy budget leave too few to aggregate."""

    def __init__(self, *, training_rounds: range, on_round_lost: Callable[[int, str], None] | None = None,
                 on_stage: Callable[[StageEvent], None] | None = None, **secaggplus: object) -> None:
        super().__init__(**secaggplus)
        self.on_stage = on_stage  # progress: each stage's start and end
        self.training_rounds = training_rounds  # server rounds that train (any before them: the statistics round)
        self._no_model = False  # the statistics round failed: no later round can run
        self.on_round_lost = on_round_lost  # (server round, why) of a round without an aggregate
        self.stopped = ""
        self._refusals: list[FailedReply] = []  # this round's permanent refusals
        self._shown: set[tuple[str, str]] = set()  # (site, failure) already shown in this run
        self._graph: tuple[int, int, int, int] | None = None  # the masking graph last shown
        self._current = 0

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        self._current = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if self.stopped and (self._current in self.training_rounds or self._no_model):
            self._lost(f"skipped: {self.stopped}")
            return
        self._refusals = []
        phase = getattr(context.strategy, "phase", None)
        self._phase = phase(self._current) if phase is not None else (Phase.TRAIN, self._current)
        self._rounds = getattr(context.strategy, "training_rounds", 0)
        self._round_started = time.monotonic()
        self._dropped = 0
        self._sampled = 0
        super().__call__(grid, context)

    def _lost(self, why: str) -> None:
        if self.on_round_lost is not None:
            self.on_round_lost(self._current, why)

    def _event(self, name: str, *, done: bool, sites: int, answered: int = 0) -> None:
        if self.on_stage is not None:
            phase, training_round = self._phase
            self.on_stage(StageEvent(phase=phase, round=training_round, rounds=self._rounds, stage=name, done=done,
                                     sites=sites, answered=answered, dropped=self._dropped,
                                     seconds=round(time.monotonic() - self._round_started, 1)))

    def _stage(self, name: str, grid: Grid, context: Context, state) -> bool:
        before = len(state.failures)
        sites = len(state.active_node_ids) if name != "setup" else len(state.sampled_node_ids)
        self._event(name, done=False, sites=sites)
        ok = getattr(super(), f"{name}_stage")(grid, context, state)
        # sites sampled for the round that no longer take part (one lost site may fail two of Flower's checks)
        if name == "setup":
            self._sampled = len(state.sampled_node_ids)
            if ok:
                self._show_graph(state)
        self._dropped = max(0, self._sampled - len(state.active_node_ids))
        self._event(name, done=True, sites=sites or len(state.sampled_node_ids), answered=len(state.active_node_ids))
        # Flower may record one error reply twice (as a failure of two checks): report it once.
        seen: set[int] = set()
        failed = []
        for failure in state.failures[before:]:
            key = id(failure.args[0]) if failure.args else id(failure)
            if key not in seen:
                seen.add(key)
                failed.append(_failure(failure))
        self._refusals += [f for f in failed if f.permanent]
        # A named site's repeated failure is shown once per run (it refuses every round for one reason).
        fresh = [f for f in failed if not f.site or (f.site, f.what) not in self._shown]
        self._shown |= {(f.site, f.what) for f in failed if f.site}
        for line in failure_lines(fresh):
            print(f"  secure aggregation ({name}): {line}", flush=True)
        if not ok:
            print(f"  secure aggregation halted at stage '{name}': this round has no aggregate", flush=True)
            self._lost(f"secure aggregation halted at stage '{name}'")
            if self._current < self.training_rounds.start:
                self._no_model = True
                self.stopped = self.stopped or "the statistics round (federated standardization) has no aggregate"
            self.stopped = self._permanent_stop() or self.stopped
            if self.stopped:
                then = "every later round skipped" if self._no_model else \
                    "remaining training rounds skipped, the model is evaluated"
                print(f"study stopped: {self.stopped}; {then}", flush=True)
        return ok

    def _show_graph(self, state) -> None:
        """One line, when it first holds or changes: how many other sites each site masks with (its
        SecAgg+ neighbours, who also hold its key shares) and how many shares reconstruct its secrets."""
        others = sorted({len(neighbours - {node}) for node, neighbours in state.nid_to_neighbours.items()})
        if not others:
            return
        graph = (len(state.nid_to_neighbours), others[0], others[-1], state.threshold)
        if graph == self._graph:
            return
        self._graph = graph
        sites, low, high, threshold = graph
        each = f"{low}" if low == high else f"{low}-{high}"
        print(f"  secure aggregation: {sites} sites, each masking with {each} other sites (its neighbours); "
              f"{threshold} of a site's shares reconstruct its secrets", flush=True)

    def _permanent_stop(self) -> str:
        """Why the study stops when this round's permanent refusals left too few sites ("" if none did)."""
        kinds = {f.kind for f in self._refusals}
        if not kinds:
            return ""
        if RefusalKind.APP in kinds:
            return ("sites refused this run's App: its code is not a release they approved, and too few "
                    "remain to aggregate")
        if kinds == {RefusalKind.BUDGET}:
            return "sites have spent their privacy budget and too few remain to aggregate"
        first = self._refusals[0]
        named = sorted({f.site for f in self._refusals if f.site})
        who = f"{'site' if len(named) == 1 else 'sites'} {', '.join(named)}" if named else f"{len(self._refusals)} site(s)"
        return f"{who} {first.what}; too few sites remain to aggregate"

    def _check_threshold(self, state) -> bool:
        """Flower's check, without its bare ERROR line: the halted stage is reported with its reasons."""
        return all(len(state.nid_to_neighbours[node] & state.active_node_ids) >= state.threshold
                   for node in state.sampled_node_ids)

    def setup_stage(self, grid: Grid, context: Context, state) -> bool:
        return self._stage("setup", grid, context, state)

    def share_keys_stage(self, grid: Grid, context: Context, state) -> bool:
        ok = self._stage("share_keys", grid, context, state)
        # Only sites whose shares were forwarded take part in masking; see the module docstring.
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: Context, state) -> bool:
        return self._stage("collect_masked_vectors", grid, context, state)

    def unmask_stage(self, grid: Grid, context: Context, state) -> bool:
        return self._stage("unmask", grid, context, state)


def secure_aggregation_workflow(study: Study, training_rounds: range, *,
                                on_round_lost: Callable[[int, str], None] | None = None,
                                on_stage: Callable[[StageEvent], None] | None = None) -> ReportingSecAggPlusWorkflow:
    """SecAgg+ with the study's parameters (the timeout is always set)."""
    sa = study.secure_aggregation
    return ReportingSecAggPlusWorkflow(
        training_rounds=training_rounds,
        on_round_lost=on_round_lost,
        on_stage=on_stage,
        num_shares=sa.num_shares,
        reconstruction_threshold=sa.reconstruction_threshold,
        max_weight=sa.max_weight,
        clipping_range=sa.clipping_range,
        quantization_range=sa.quantization_range,
        timeout=sa.timeout_seconds,
    )
