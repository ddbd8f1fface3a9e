"""The real fedcare ServerApp, with every message the coordinator receives summarized to
`<out-dir>/received.json`: what a curious coordinator could read in each reply."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray
from flwr.common.serde import message_to_proto
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.server import Grid, ServerApp

from server.app import main as fedcare_main

app = ServerApp()
UNMASKED_CEILING = 1 << 23  # quantized, unmasked values lie in [0, quantization_range = 2^22]
_PRINTABLE = re.compile(rb"[\x20-\x7e]{12,}")  # runs of text in a message's bytes (where a note would show)


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def summarize(msg: Message) -> dict:
    summary: dict = {"type": msg.metadata.message_type, "error": msg.error.reason if msg.has_error() else None,
                     "arrays": 0, "numbers": [], "num_examples": [], "masked_values": 0, "masked_small": 0,
                     "metrics_keys": []}
    # every printable run of the message as the coordinator received it (content, error, metadata)
    wire = message_to_proto(msg).SerializeToString()
    summary["text"] = [run.decode("ascii") for run in _PRINTABLE.findall(wire)]
    if msg.has_error():
        return summary
    content = msg.content
    summary["arrays"] = sum(len(r) for r in content.array_records.values())
    for name, record in content.config_records.items():
        for key, value in record.items():
            if key == Key.MASKED_PARAMETERS:
                for blob in value:
                    arr = bytes_to_ndarray(blob)
                    summary["masked_values"] += int(arr.size)
                    summary["masked_small"] += int((arr < UNMASKED_CEILING).sum())
            elif name == "fitres.metrics":
                summary["metrics_keys"].append(key)
            else:
                summary["numbers"] += _numbers(value)
    for name, record in content.metric_records.items():
        for key, value in record.items():
            summary["numbers"] += _numbers(value)
            if key == "num_examples":
                summary["num_examples"] += _numbers(value)
    return summary


class RecordingGrid(Grid):
    """Delegates to Flower's grid; keeps a summary of every reply."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.received: list[dict] = []

    def set_run(self, run) -> None:  # noqa: ANN001
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self.received += [summarize(m) for m in replies]
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.received += [summarize(m) for m in replies]
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    recording = RecordingGrid(grid)
    try:
        fedcare_main(recording, context)
    finally:
        out = Path(str(context.run_config["out-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "received.json").write_text(json.dumps(recording.received))


