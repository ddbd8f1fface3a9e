import time, os
from flwr.app import Message, RecordDict, ConfigRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
client_app = ClientApp()
@client_app.query()
def echo(msg: Message, context: Context) -> Message:
    work = float(msg.content["c"]["work"])
    t = time.perf_counter()
    while time.perf_counter() - t < work: pass
    return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)
server_app = ServerApp()
@server_app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    out = open(os.environ["ECHO_OUT"], "a")
    for work in (0.0, 0.0, 0.0, 0.01, 0.01, 0.03):
        msgs = [Message(RecordDict({"c": ConfigRecord({"work": work})}), dst_node_id=n, message_type="query") for n in nodes]
        t = time.monotonic()
        replies = list(grid.send_and_receive(msgs))
        out.write(f"{len(nodes)} nodes work={work*1000:.0f}ms stage={time.monotonic()-t:.2f}s replies={len(replies)}\n"); out.flush()
