"""The ServerApp's Grid with a reply loop that does not wait 3 s per poll.

Flower 1.42's deployed Grid (`HttpGrid.send_and_receive`) pushes a stage's messages, then checks for
replies every 3 s: a SecAgg+ round of four exchanges loses up to 12 s to it. `PromptGrid` wraps the
run's Grid and does the same loop through its public `push_messages` / `pull_messages` every
`interval` seconds (default 0.2: five requests per second to the loopback SuperLink while a stage
waits; a wrapped Grid that polls faster, as simulation's in-memory one does, keeps its pace).
Everything else is the wrapped Grid's. Flower's workflows call only `send_and_receive`,
`get_node_ids` and `run` (flwr 1.42.0; `tests/test_supernode_process.py` pins the version).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.common import Message, RecordDict
from flwr.server import Grid

REPLY_POLL_SECONDS = 0.2


class PromptGrid(Grid):
    """`grid` with `send_and_receive` polling every `interval` seconds."""

    def __init__(self, grid: Grid, *, interval: float = REPLY_POLL_SECONDS) -> None:
        self._grid = grid
        # never slower than the wrapped Grid's own loop (simulation's in-memory Grid polls every 0.1 s)
        self.interval = min(interval, getattr(grid, "pull_interval", interval))

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then collect their replies until all arrived or `timeout` seconds passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
