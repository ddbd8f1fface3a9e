"""The coordinator's Flower ServerApp: SecAgg+ rounds, aggregate-only evaluation, checkpoints.

Phases (all SecAgg+ rounds, `strategies/fedavg.py`): an optional statistics round (federated
standardization), the training rounds, then one evaluation-only round: every training round's
masked vectors carry the sites' evaluation of the model the round started from
(`fedcare.contribution`), so the last one reports the final model.

Run config (from `flwr run --run-config` or `fedcare simulate`):
    study    path of the study TOML on the coordinator
    out-dir  where checkpoints and the round log are written
"""

from __future__ import annotations

from flwr.common import Context
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedcare.contribution import ContributionFormat
from fedcare.model import build_model, get_weights
from fedcare.study import Study, study_for_run
from server.progress import RoundLog, save_checkpoint, save_scaling
from server.secure_aggregation import secure_aggregation_workflow
from strategies.fedavg import DeltaFedAvg

app = ServerApp()


def build_strategy(study: Study, out_dir: str) -> DeltaFedAvg:
    log = RoundLog(out_dir, study.training.rounds)

    def on_aggregated(server_round: int, weights: list) -> None:
        save_checkpoint(out_dir, server_round, weights, study.hash)
        log.mark_aggregated(server_round)

    return DeltaFedAvg(
        initial_weights=get_weights(build_model(study)),
        server_learning_rate=study.strategy.server_learning_rate,
        min_sites=study.strategy.min_sites,
        training_rounds=study.training.rounds,
        contribution=ContributionFormat.for_study(study),
        fit_config={"study_hash": study.hash},
        federated_standardization=study.standardization == "federated",
        on_aggregated=on_aggregated,
        on_evaluated=log.record,
        on_standardized=lambda result: save_scaling(out_dir, study, result),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    study = study_for_run(str(context.run_config["study"]), context.run_config)
    out_dir = str(context.run_config["out-dir"])
    print(f"study {study.name} ({study.hash[:12]}), {study.training.rounds} rounds, SecAgg+ on", flush=True)
    strategy = build_strategy(study, out_dir)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=strategy.total_rounds, round_timeout=study.secure_aggregation.timeout_seconds),
        strategy=strategy,
    )
    training = range(strategy.offset + 1, strategy.offset + study.training.rounds + 1)
    DefaultWorkflow(fit_workflow=secure_aggregation_workflow(study, training))(grid, legacy)
