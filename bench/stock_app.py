"""Baseline for bench/round_time.py: stock Flower FedAvg, no privacy, no SecAgg+.

Same sites (the run config's `sim-sites-dir`), same study model, features and local
epochs as fedcare; plain SGD; the client returns its full weights; Flower's FedAvg.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow

from client.data import load_site
from client.training import train_plain
from fedcare.features import model_inputs
from fedcare.model import build_model, get_weights, set_weights
from fedcare.study import load_study


class PlainClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.study = load_study(str(context.run_config["study"]))
        if "data" in context.node_config:  # deployed: the hospital's node config
            site = Path(str(context.node_config["data"]))
        else:  # simulation: n-th site folder by partition id
            sites = sorted(p for p in Path(str(context.run_config["sim-sites-dir"])).iterdir() if p.is_dir())
            site = sites[int(context.node_config["partition-id"])]
        data = load_site(self.study, site)
        self.x, self.y = model_inputs(self.study, data.train.features), data.train.labels

    def fit(self, parameters, config):
        model = build_model(self.study)
        set_weights(model, parameters)
        train_plain(self.study, model, self.x, self.y, self.study.training.local_epochs)
        return get_weights(model), len(self.y), {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def client_fn(context: Context) -> Client:
    return PlainClient(context).to_client()


client_app = ClientApp(client_fn=client_fn)


class TimedFedAvg(FedAvg):
    """FedAvg that appends each round's finishing time to `<out-dir>/stock_rounds.txt`."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log = Path(out_dir) / "stock_rounds.txt"
        self.log.parent.mkdir(parents=True, exist_ok=True)

    def aggregate_evaluate(self, server_round, results, failures):
        with self.log.open("a") as out:
            out.write(f"{server_round} {time.monotonic()}\n")
        return None, {}


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    study = load_study(str(context.run_config["study"]))
    n = study.strategy.min_sites
    strategy = TimedFedAvg(
        str(context.run_config["out-dir"]),
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(get_weights(build_model(study))),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=study.training.rounds), strategy=strategy)
    DefaultWorkflow()(grid, legacy)
