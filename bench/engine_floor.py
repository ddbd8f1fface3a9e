"""What a SecAgg+ stage costs in Flower's simulation engine alone: a ServerApp that sends every node
one message per stage and a ClientApp that answers it at once (or after busy-waiting a few ms).

    .venv/bin/python -m bench.engine_floor [--hospitals 100] [--cpus-per-site 1]

Prints seconds per stage for 0, 10 and 30 ms of ClientApp work. The extra over N × work / actors is
the engine's cost per stage (queues, Ray tasks, the in-memory SuperLink's polling): the floor under
each of a fedcare round's 4 SecAgg+ stages and stock FedAvg's 2 (BENCHMARKS.md, "Many hospitals").
The first stage also starts the actors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

WORK_MS = (0, 0, 0, 10, 10, 30)

client_app = ClientApp()
server_app = ServerApp()


@client_app.query()
def answer(msg: Message, context: Context) -> Message:
    busy_until = time.perf_counter() + float(msg.content["stage"]["work_ms"]) / 1000
    while time.perf_counter() < busy_until:
        pass
    return Message(RecordDict({"stage": ConfigRecord({"ok": 1})}), reply_to=msg)


@server_app.main()
def main_stages(grid: Grid, context: Context) -> None:
    expected, deadline = int(os.environ["FEDCARE_ENGINE_FLOOR_SITES"]), time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:  # the engine registers nodes as it starts
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    with open(os.environ["FEDCARE_ENGINE_FLOOR_OUT"], "a", encoding="utf-8") as out:
        for work in WORK_MS:
            messages = [Message(RecordDict({"stage": ConfigRecord({"work_ms": work})}), dst_node_id=node,
                                message_type="query") for node in nodes]
            started = time.monotonic()
            replies = list(grid.send_and_receive(messages))
            out.write(f"{len(nodes)} {work} {time.monotonic() - started:.3f} {len(replies)}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hospitals", type=int, default=100)
    parser.add_argument("--cpus-per-site", type=float, default=1.0)
    args = parser.parse_args()
    from simulations.engine import run_flower_simulation

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stages.txt"
        os.environ["FEDCARE_ENGINE_FLOOR_OUT"] = str(out)
        os.environ["FEDCARE_ENGINE_FLOOR_SITES"] = str(args.hospitals)
        run_flower_simulation(args.hospitals, {}, components={"serverapp": "bench.engine_floor:server_app",
                                                              "clientapp": "bench.engine_floor:client_app"},
                              cpus_per_site=args.cpus_per_site)
        actors = int((os.cpu_count() or 2) // args.cpus_per_site)
        for line in out.read_text().splitlines():
            nodes, work, seconds, replies = line.split()
            work_share = int(nodes) * float(work) / 1000 / actors
            print(f"{nodes} sites, {work:>2} ms of work each: stage {float(seconds):5.2f} s "
                  f"(work {work_share:4.2f} s on {actors} actors, engine {float(seconds) - work_share:4.2f} s), "
                  f"{replies} replies")


if __name__ == "__main__":
    main()
