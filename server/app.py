"""The coordinator's Flower ServerApp: SecAgg+ rounds, aggregate-only evaluation, the run record.

Phases (all SecAgg+ rounds, `fedcare.protocol.Phase`): an optional statistics round (federated
standardization), the training rounds, then one evaluation-only round: every training round's
masked vectors carry the sites' evaluation of the model the round started from
(`fedcare.contribution`), so the last one reports the final model.

Run config (from `flwr run --run-config` or `fedcare simulate`):
    study            path of the study TOML on the coordinator
    out-dir          the run folder (`fedcare.run_record`): the study as run, checkpoints, round log
    rounds, epsilon  the run's overrides of the study file (`fedcare.study.Overrides`; 0 = the file's)
    resume           1: take up the interrupted run in out-dir after its last checkpoint (`fedcare run --resume`)
    progress         1: print a progress event line at each SecAgg+ stage (`fedcare.events`; `fedcare run`)

Replies are collected through `server.grid.PromptGrid` (Flower's Grid, polled every 0.2 s instead of 3 s).
"""

from __future__ import annotations

from flwr.common import Context
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedcare.contribution import scaling_bytes
from fedcare.model import build_model, get_weights
from fedcare.run_record import ResumePoint, RunRecord
from fedcare.sealing import ArtifactKey
from fedcare.study import Overrides, Study, load_study
from server.grid import PromptGrid
from server.progress import RoundLog
from server.secure_aggregation import secure_aggregation_workflow
from strategies.catalog import strategy_for_study
from strategies.fedavg import DeltaFedAvg

app = ServerApp()


def build_strategy(study: Study, log: RoundLog, point: ResumePoint | None = None) -> DeltaFedAvg:
    """The study's strategy (`strategies.catalog`); from `point`, it goes on after an interrupted run's last
    checkpoint, with the server optimizer's state (momentum, Adam's m and v, ...) saved beside it."""
    weights = point.weights if point is not None and point.weights is not None else get_weights(build_model(study))
    scaling = point.scaling if point is not None else None
    return strategy_for_study(
        study,
        initial_weights=weights,
        first_round=point.last_round + 1 if point is not None else 1,
        scaling=scaling_bytes(scaling["center"], scaling["scale"]) if scaling else None,
        optimizer_state=point.optimizer_state if point is not None else None,
        on_aggregated=log.aggregated_round,
        on_optimizer_state=lambda round_, state: log.record.save_optimizer_state(round_, state, study.hash),
        on_evaluated=log.evaluated,
        on_standardized=log.standardized,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = Overrides.from_run_config(context.run_config)
    study = load_study(str(context.run_config["study"])).with_overrides(overrides)
    # deployed: checkpoints sealed under the coordinator's artifact.key (handed over by `coordinator start`)
    record = RunRecord(str(context.run_config["out-dir"]), key=ArtifactKey.from_environment())
    point = record.resume(study) if int(context.run_config.get("resume", 0) or 0) else None
    if point is None:
        record.start(study, overrides)
    print(f"study {study.name} ({study.hash[:12]}), {study.training.rounds} rounds, SecAgg+ on", flush=True)
    log = RoundLog(record, study, point.entries if point is not None else [])
    if point is not None and point.last_round >= study.training.rounds:
        log.finish("")  # every round was aggregated before the interruption
        return
    strategy = build_strategy(study, log, point)
    if point is not None:
        print(f"resuming after round {point.last_round}/{study.training.rounds} (its checkpoint); "
              f"{strategy.rounds_to_train} training round(s) to go", flush=True)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=strategy.total_rounds, round_timeout=study.secure_aggregation.timeout_seconds),
        strategy=strategy,
    )
    training = strategy.training_server_rounds

    def round_lost(server_round: int, why: str) -> None:
        if server_round in training:
            log.lost(strategy.phase(server_round)[1], why)

    emit = (lambda event: print(event.line(), flush=True)) if int(context.run_config.get("progress", 0) or 0) else None
    workflow = secure_aggregation_workflow(study, training, on_round_lost=round_lost, on_stage=emit)
    DefaultWorkflow(fit_workflow=workflow)(PromptGrid(grid), legacy)
    log.finish(workflow.stopped)
