"""The hospital's Flower client (the NumPyClient behind `client.app:app`).

Training messages arrive only through `secaggplus_mod`: the site trains one round of
DP-SGD on the global model, records the privacy spent on disk, and returns its model
delta, which the mod masks before anything leaves the site. Evaluation returns the
loss and a score histogram on the site's test split (summable across sites).

Where the site's files are (node config, set by the hospital):
    data       the site's data directory (train.csv, test.csv)
    study      the hospital's copy of the study file (default: the run's `study`)
    state-dir  where the privacy accountant is kept (default: <data>/.fedcare)
In simulation, `data` is `<run_config sim-sites-dir>/<n-th site>` by partition id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.client import Client, NumPyClient
from flwr.common import Context, NDArrays, Scalar

from client.data import SiteData, load_site
from fedcare.features import model_inputs
from fedcare.metrics import log_loss, score_histogram
from fedcare.model import build_model, get_weights, predict_proba, set_weights
from fedcare.study import load_study, study_for_run
from privacy.accounting import AccountantStore, SiteAccountantState


class SiteRefusal(RuntimeError):
    """The site declines a request; the message says why (it reaches the coordinator as an error)."""


@dataclass(frozen=True)
class SitePaths:
    study: Path
    data: Path
    state_dir: Path


def site_paths(context: Context) -> SitePaths:
    node, run = context.node_config, context.run_config
    study = Path(str(node.get("study", run.get("study", ""))))
    if "data" in node:
        data = Path(str(node["data"]))
    elif run.get("sim-sites-dir") and "partition-id" in node:
        sites = sorted(p for p in Path(str(run["sim-sites-dir"])).iterdir() if p.is_dir())
        data = sites[int(node["partition-id"])]
    else:
        raise SiteRefusal("node config has no 'data' directory for this site")
    state_dir = Path(str(node.get("state-dir", data / ".fedcare")))
    return SitePaths(study=study, data=data, state_dir=state_dir)


@functools.lru_cache(maxsize=4)
def _load_data(study_path: Path, data_dir: Path) -> SiteData:
    return load_site(load_study(study_path), data_dir)


class HospitalClient(NumPyClient):
    """One hospital in one study run."""

    def __init__(self, paths: SitePaths, run_id: int, run_config: dict[str, Scalar] | None = None) -> None:
        self.paths = paths
        self.study = study_for_run(paths.study, run_config or {})
        self.data = _load_data(paths.study, paths.data)
        self.store = AccountantStore(paths.state_dir, self.study.hash, run_id)

    def _check_study(self, config: dict[str, Scalar]) -> None:
        if config.get("study_hash") != self.study.hash:
            raise SiteRefusal(
                f"study hash mismatch: coordinator {str(config.get('study_hash'))[:12]}…, "
                f"this site {self.study.hash[:12]}… — the site will not train on a different study"
            )

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        raise SiteRefusal("this site never returns model parameters outside secure aggregation")

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from client.training import train_round  # Opacus loads only for training messages
        from privacy.accounting import plan_schedule

        self._check_study(config)
        study = self.study
        x = model_inputs(study, self.data.train.features)
        y = self.data.train.labels
        n = len(y)
        sa = study.secure_aggregation
        if n > sa.max_weight:
            raise SiteRefusal(f"site has {n} training rows, more than secure_aggregation.max_weight ({sa.max_weight:g})")
        carried = self.store.load()
        schedule = carried.schedule if carried else plan_schedule(study, n)
        if carried and carried.rounds_trained >= schedule.rounds:
            raise SiteRefusal(f"the study's planned {schedule.rounds} rounds are spent; training more would exceed ε")
        model = build_model(study)
        set_weights(model, parameters)
        result = train_round(study, model, x, y, schedule, carried)
        # Record the spend before the update can leave the site.
        self.store.save(
            SiteAccountantState(
                study_hash=study.hash,
                schedule=schedule,
                accountant_state=result.accountant_state,
                rounds_trained=(carried.rounds_trained if carried else 0) + 1,
                epsilon=result.epsilon,
            )
        )
        delta = [new - old for new, old in zip(get_weights(model), parameters)]
        check_within_clipping_range(delta, n, sa.max_weight, sa.clipping_range)
        return delta, n, {}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        self._check_study(config)
        model = build_model(self.study)
        set_weights(model, parameters)
        probs = predict_proba(model, model_inputs(self.study, self.data.test.features))
        labels = self.data.test.labels
        hist = score_histogram(labels, probs)
        return log_loss(labels, probs), len(labels), {"score_histogram": hist.astype(np.int64).tobytes()}


def check_within_clipping_range(delta: NDArrays, n: int, max_weight: float, clipping_range: float) -> None:
    """SecAgg+ sends delta * n / max_weight clipped to ±clipping_range silently; refuse instead."""
    peak = max(float(np.abs(d).max()) for d in delta) * n / max_weight
    if not np.isfinite(peak) or peak > clipping_range:
        raise SiteRefusal(
            f"model delta (largest weighted value {peak:.3g}) exceeds secure_aggregation.clipping_range "
            f"({clipping_range:g}); SecAgg+ would clip it silently. Raise clipping_range or lower the learning rate."
        )


def hospital_client(context: Context) -> Client:
    return HospitalClient(site_paths(context), context.run_id, dict(context.run_config)).to_client()
