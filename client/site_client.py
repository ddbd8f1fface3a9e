"""The site's Flower client (the NumPyClient behind `client.app:app`).

Training messages arrive only through `secaggplus_mod`, in phases (`fedcare.protocol.Phase`):
  statistics  (federated standardization) per-feature count, Σz, Σz² of the training rows;
  train       1. evaluates the global model it received on its test split (histogram, loss),
              2. asks its ledger and policy whether it may train (`privacy.budget.charge_round`,
                 which records the round's ε before anything is trained), trains one round of
                 DP-SGD and computes its model delta;
  evaluate    step 1 only.
Every phase returns one vector for SecAgg+ to mask (`fedcare.contribution`), with a constant in
every plaintext field. A round it will not take part in raises `fedcare.protocol.Refusal` with its
kind; the guard (`privacy.guard`) turns it into the structured error reply the coordinator reads. Features are scaled with the coordinator's federated scaling when the
study asks for it (sent with each round), otherwise with the spec's.
Where the site's files are: `fedcare/site.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.client import Client, NumPyClient
from flwr.common import Context, NDArrays, Scalar

from client.data import SiteData, load_site
from fedcare.site import SitePaths, site_paths
from fedcare.contribution import LOSS_CAP, ContributionFormat, scaling_from_bytes
from fedcare.errors import StudyConfigError
from fedcare.features import model_inputs
from fedcare.metrics import score_histogram
from fedcare.model import build_model, get_weights, predict_proba, set_weights
from fedcare.protocol import Phase, Refusal, RefusalKind, RoundConfig
from fedcare.study import Study, load_study, study_for_run
from privacy.budget import carried_schedule, charge_round
from privacy.ledger import LedgerTampered, PrivacyLedger
from privacy.policy import PolicyError, policy_for_site


# In simulation one process (a Ray actor) trains many sites in turn; their tables stay loaded up to this
# many bytes, least recently used first out (the site in use always stays). Deployed, a process serves one message.
SITE_CACHE_BYTES = 256 << 20
_sites: OrderedDict[tuple[Path, Path], tuple[SiteData, int]] = OrderedDict()


def _load_data(study_path: Path, data_dir: Path) -> SiteData:
    key = (study_path, data_dir)
    if key in _sites:
        _sites.move_to_end(key)
        return _sites[key][0]
    data = load_site(load_study(study_path), data_dir)
    _sites[key] = (data, sum(t.features.nbytes + t.labels.nbytes for t in (data.train, data.test)))
    while len(_sites) > 1 and sum(size for _, size in _sites.values()) > SITE_CACHE_BYTES:
        _sites.popitem(last=False)
    return data


class SiteClient(NumPyClient):
    """One site in one study run."""

    def __init__(self, paths: SitePaths, run_id: int, run_config: dict[str, Scalar] | None = None) -> None:
        self.paths = paths
        self.run_id = run_id
        self.study = study_for_run(paths.study, run_config or {})
        self.data = _load_data(paths.study, paths.data)
        self.ledger = PrivacyLedger(paths.state_dir)
        self.format = ContributionFormat.for_study(self.study)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        raise Refusal(RefusalKind.GUARD, "this site never returns model parameters outside secure aggregation")

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        raise Refusal(RefusalKind.GUARD, "this site reports evaluation only inside secure aggregation")

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if config.get("study_hash") != self.study.hash:
            raise Refusal(
                RefusalKind.STUDY,
                f"study hash mismatch: coordinator {str(config.get('study_hash'))[:12]}…, "
                f"this site {self.study.hash[:12]}… — the site will not train on a different study",
            )
        instructions = RoundConfig.from_config(config)
        for split, rows in (("training", len(self.data.train.labels)), ("test", len(self.data.test.labels))):
            if rows > self.format.max_weight:
                raise Refusal(
                    RefusalKind.DATA,
                    f"site has {rows} {split} rows, more than secure_aggregation.max_weight ({self.format.max_weight:g})",
                    shared=f"site has more {split} rows than secure_aggregation.max_weight ({self.format.max_weight:g})",
                )
        zeros = [np.zeros_like(p) for p in parameters]
        if instructions.phase is Phase.STATISTICS:
            statistics = self.format.statistics(self.data.train.features)
            vector = self.format.encode(zeros, 0, np.zeros((2, self.format.bins)), 0.0, statistics)
        else:
            scaled = self._scaled_study(instructions)
            histogram, loss_sum = self._evaluate(scaled, parameters)
            if instructions.phase is Phase.EVALUATE:
                delta, n = zeros, 0
            else:
                delta, n = self._train(scaled, parameters, instructions.round), len(self.data.train.labels)
            vector = self.format.encode(delta, n, histogram, loss_sum)
        check_within_clipping_range(self.format.largest_value(vector), self.format.clipping_range)
        return vector, self.format.plaintext_weight, {}

    def _scaled_study(self, instructions: RoundConfig) -> Study:
        """The study with the round's federated scaling, when the study asks for one."""
        if self.study.standardization != "federated":
            return self.study
        if instructions.scaling is None:
            raise Refusal(RefusalKind.PROTOCOL, "the study uses federated standardization but the round carries no scaling")
        try:
            return self.study.with_scaling(*scaling_from_bytes(instructions.scaling, len(self.study.features)))
        except (ValueError, StudyConfigError) as err:
            raise Refusal(RefusalKind.PROTOCOL, f"the round's scaling is unusable: {err}") from None

    def _evaluate(self, study: Study, parameters: NDArrays) -> tuple[np.ndarray, float]:
        model = build_model(study)
        set_weights(model, parameters)
        probs = predict_proba(model, model_inputs(study, self.data.test.features))
        labels = self.data.test.labels
        p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
        losses = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        return score_histogram(labels, probs), float(np.minimum(losses, LOSS_CAP).sum())

    def _train(self, study: Study, parameters: NDArrays, server_round: int) -> NDArrays:
        from client.training import train_round  # Opacus loads only for training rounds
        from privacy.accounting import PlanningError, batches_per_epoch, plan_schedule

        x = model_inputs(study, self.data.train.features)
        y = self.data.train.labels
        try:
            schedule = carried_schedule(self.ledger.entries(), self.study, self.run_id) or plan_schedule(self.study, len(y))
            if abs(schedule.sample_rate * batches_per_epoch(len(y), self.study.training.batch_size) - 1) > 1e-9:
                raise Refusal(RefusalKind.DATA, "the site's training data changed size since this run's DP schedule was planned")
            # The round's ε is recorded here, before training: a crash from now on never under-counts.
            # Under the study's budget key: every run of the study, whatever its overrides, shares one budget.
            charge_round(self.ledger, policy_for_site(self.paths.policy), schedule, study_hash=self.study.hash,
                         budget_key=self.study.budget_key, run_id=self.run_id, server_round=server_round)
        except PlanningError as err:
            raise Refusal(RefusalKind.BUDGET, f"privacy budget: {err}; the site trains no round of this study") from None
        except LedgerTampered as err:
            raise Refusal(RefusalKind.LEDGER, str(err)) from None
        except PolicyError as err:
            raise Refusal(RefusalKind.POLICY, str(err)) from None
        model = build_model(study)
        set_weights(model, parameters)
        train_round(study, model, x, y, schedule)
        return [new - old for new, old in zip(get_weights(model), parameters)]


def check_within_clipping_range(peak: float, clipping_range: float) -> None:
    """SecAgg+ clips values beyond ±clipping_range silently; refuse instead."""
    if not np.isfinite(peak) or peak > clipping_range:
        advice = (f"exceeds secure_aggregation.clipping_range ({clipping_range:g}); SecAgg+ would clip it silently. "
                  "Raise clipping_range or lower the learning rate.")
        raise Refusal(RefusalKind.CLIPPING, f"model delta (largest weighted value {peak:.3g}) {advice}",
                      shared=f"model delta {advice}")


def site_client(context: Context) -> Client:
    paths = site_paths(dict(context.node_config), dict(context.run_config))
    return SiteClient(paths, context.run_id, dict(context.run_config)).to_client()
