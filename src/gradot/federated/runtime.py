"""An in-process Flower runtime: N virtual SuperNodes that run a ``ClientApp`` in this process.

Flower's own simulation runtime (``flwr.simulation.run_simulation``, ``flwr run`` on a local
simulation) runs ClientApps only on Ray (``flwr[simulation]``): a second large dependency, several
seconds of start-up, and a worker process per CPU, each with its own copy of the emulator. On the
small machines gradot targets that costs more than the training it schedules. ``LocalGrid`` is the
smallest thing that can stand in for it: a :class:`flwr.serverapp.Grid` that delivers each
``Message`` to the destination node's ``ClientApp`` (mods included, so ``secaggplus_mod`` runs
unchanged) with that node's persistent ``Context``, and returns the reply or, when the ClientApp
raises, an error reply, exactly as Flower's simulation workers do. The ``ServerApp``, strategies
and workflows are Flower's own and run unchanged; only the transport is replaced. The deployment
runtime (SuperLink + SuperNodes over gRPC) needs none of this.

Nodes run one at a time (``ClientApp`` calls are sequential), which is what a 2-core machine can do
anyway and lets the nodes share one emulator in memory (every client loads the global adapter
before it trains). ``drop`` makes a node stop answering from a given call on (it "disconnects"),
so tests can check that a round goes on without it. With a time limit (Flower's workflows pass the
round timeout) each node gets that long for its reply; one that takes longer is left behind and
treated as gone for the rest of the run.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

__all__ = ["LocalGrid", "run_local"]

#: Error code Flower uses for "the ClientApp raised" (flwr.common.constant.ErrorCode).
_CLIENT_APP_RAISED = 2


class LocalGrid(Grid):
    """A ``Grid`` over ``num_nodes`` in-process virtual SuperNodes running ``client_app``.

    ``node_config(i)`` gives node ``i``'s node config (Flower's simulation gives ``partition-id``
    and ``num-partitions``); ``run_config`` is shared by the ServerApp and every ClientApp.
    ``drop``: ``{node index: n}`` makes that node go silent after answering ``n`` messages.
    """

    def __init__(self, client_app, num_nodes: int, run_config: dict | None = None,
                 node_config: Callable[[int], dict] | None = None, drop: dict[int, int] | None = None,
                 run_id: int = 1):
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self._run = Run.create_empty(run_id)
        # Node ids as Flower draws them: large random integers (never 0, the SuperLink's id).
        ids = [int.from_bytes(uuid.uuid4().bytes[:7], "big") + 1 for _ in range(num_nodes)]
        self.node_ids = ids
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": num_nodes,
                                      **(node_config(i) if node_config else {})},
                         state=RecordDict(), run_config=dict(self.run_config))
            for i, nid in enumerate(ids)
        }
        self.drop = {ids[i]: n for i, n in (drop or {}).items()}
        self.answered = dict.fromkeys(ids, 0)
        self.replies: dict[str, Message] = {}
        self.late: set[str] = set()  # messages whose reply came after the time limit
        self.lock = threading.Lock()

    # -- Grid interface ---------------------------------------------------------------------

    def set_run(self, run_id: int) -> None:  # pragma: no cover - Flower's runners call it; nothing to do
        pass

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self.node_ids if not self._silent(nid)]

    def _silent(self, nid: int) -> bool:
        return nid in self.drop and self.answered[nid] >= self.drop[nid]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if not msg.metadata.message_id:  # send_and_receive may have named it already
                msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            ids.append(msg.metadata.message_id)
            # Through Flower's wire format and back, as a SuperLink would carry it: the node gets its
            # own copy (mods may edit what they receive) and nothing unserialisable gets through.
            reply = self._deliver(message_from_proto(message_to_proto(msg)))
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                reply = message_from_proto(message_to_proto(reply))
                with self.lock:
                    if msg.metadata.message_id not in self.late:
                        self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self.lock:
            return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if timeout is None:
            wanted = set(self.push_messages(list(messages)))
            # Every reply there will be is ready once push_messages returns (nodes run inline); a
            # silent node never answers, so waiting for it would only spend the timeout.
            return self.pull_messages(wanted)
        # With a time limit each node gets ``timeout`` seconds of its own (nodes run one after
        # another here, at the same time in a deployment): a node still busy when its time is up is
        # left behind, its late reply dropped, and it is treated as gone from then on.
        wanted = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            done = threading.Event()
            worker = threading.Thread(target=lambda m=msg: (self.push_messages([m]), done.set()), daemon=True)
            worker.start()
            if not done.wait(timeout):
                nid = msg.metadata.dst_node_id
                log.warning("node %s: no reply within %g s; treated as gone", nid, timeout)
                with self.lock:
                    self.drop[nid] = 0  # silent from now on; the late reply is discarded on arrival
                    self.late.add(msg.metadata.message_id)
            wanted.append(msg.metadata.message_id)
        return self.pull_messages(wanted)

    # -- delivery ---------------------------------------------------------------------------

    def _deliver(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        if nid not in self.contexts:
            return Message(Error(code=_CLIENT_APP_RAISED, reason=f"no node {nid}"), reply_to=msg)
        if self._silent(nid):
            log.info("node %s is gone: no reply to %s", nid, msg.metadata.message_type)
            return None
        self.answered[nid] += 1
        context = self.contexts[nid]
        server = TaskIdentity._node_id
        TaskIdentity.node_id = nid  # what a message created inside the ClientApp names as its sender
        try:
            reply = self.client_app(message=msg, context=context)
        except Exception as exc:  # a raising ClientApp is an error reply, as in Flower's runtimes
            log.warning("node %s: ClientApp raised %s: %s", nid, type(exc).__name__, exc)
            return Message(Error(code=_CLIENT_APP_RAISED, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        finally:
            TaskIdentity.node_id = server
        if self._silent(nid):  # it answered its last message before going away: the reply is lost
            log.info("node %s disconnected before its reply to %s was delivered", nid, msg.metadata.message_type)
            return None
        return reply


def run_local(server_app, client_app, num_nodes: int, run_config: dict | None = None,
              node_config: Callable[[int], dict] | None = None, drop: dict[int, int] | None = None) -> LocalGrid:
    """Run ``server_app`` to completion against ``num_nodes`` in-process nodes; returns the grid."""
    grid = LocalGrid(client_app, num_nodes, run_config, node_config, drop)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(grid.run_config))
    # Flower keeps the running task's identity in process-wide class attributes (one task per
    # process in its own runtimes); here the ServerApp is the task, the nodes borrow it per call.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, 0
    t0 = time.perf_counter()
    try:
        server_app(grid=grid, context=context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    log.info("in-process federation finished in %.1f s", time.perf_counter() - t0)
    return grid
