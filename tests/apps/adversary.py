"""A coordinator that tries every path to a site's update outside SecAgg+ and records what comes back
in `<out-dir>/adversary.json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import EvaluateIns, FitIns, GetParametersIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, ServerApp

from fedcare.model import build_model, get_weights
from fedcare.study import study_for_run
from tests.apps.recording import summarize

app = ServerApp()


def _setup(cohort: int, threshold: int) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: cohort, Key.SHARE_NUMBER: cohort, Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 20000.0,
    })})


@app.main()
def main(grid: Grid, context: Context) -> None:
    study = study_for_run(str(context.run_config["study"]), context.run_config)
    weights = ndarrays_to_parameters(get_weights(build_model(study)))
    config = {"study_hash": study.hash, "round": 1}
    attempts = {
        "get_parameters": ("get_parameters", lambda: compat.getparametersins_to_recorddict(GetParametersIns({}))),
        "plain_fit": ("train", lambda: compat.fitins_to_recorddict(FitIns(weights, config), True)),
        "plain_evaluate": ("evaluate", lambda: compat.evaluateins_to_recorddict(EvaluateIns(weights, config), True)),
        "secagg_cohort_2": ("train", lambda: _setup(2, 2)),
        "secagg_threshold_1": ("train", lambda: _setup(3, 1)),
        "query": ("query", lambda: compat.getparametersins_to_recorddict(GetParametersIns({}))),
    }
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    results: dict[str, list[dict]] = {}
    for name, (message_type, content) in attempts.items():
        messages = [Message(content=content(), dst_node_id=n, message_type=message_type, group_id=name) for n in nodes]
        replies = list(grid.send_and_receive(messages, timeout=120))
        results[name] = [summarize(r) for r in replies]
        print(f"{name}: {len(replies)} replies", flush=True)
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "adversary.json").write_text(json.dumps({"nodes": len(nodes), "results": results}))
