"""The warm worker as its SuperNode's executor: ClientApp tasks run in this process.

A SuperNode in Flower 1.41 hands each message to a SuperExec, which starts a ``flwr-clientapp``
process per message; that process pulls the message over the SuperNode's runtime API, runs the
ClientApp and pushes the reply. Starting it costs 1.5-3 s a message on a loaded machine
(bench/flower_overhead.py). A SuperNode started with ``--isolation process`` starts no SuperExec
and waits for one to connect: ``flora flower-worker --supernode HOST:PORT`` is that executor.
It asks the SuperNode for ClientApp tasks (``AcquireTask``, as flower-superexec does) and runs
each one here with Flower's own steps, those of ``flwr.supernode.runtime.run_clientapp``
(pull the task input and the message, heartbeat, push the reply and the task output), calling
flora's ClientApp in this process: the model, the data partition and the imports stay warm,
and no process starts per message. Other task types are left to other executors.

An exception in the app becomes the node's error reply, as in a ``flwr-clientapp`` process; the
worker keeps serving. It trusts the SuperNode it is pointed at, as flower-superexec does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from flora.flower.supernode import RETRY_CAP, RETRY_FIRST

__all__ = ["run_task", "serve_tasks"]

_logger = logging.getLogger("flora.flower.executor")


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _pull_task(client: RuntimeHttpClient) -> tuple[Message, Context]:
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` without the FAB (flora is
    installed here) and with a 20 ms first retry where Flower waits 1 s: a task is handed out
    while its SuperNode is still pulling the message's arrays from the SuperLink, so the first
    try often finds them missing."""
    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("no message from the SuperNode's runtime API")
    node, tree = Node(node_id=context.node_id), messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=RETRY_FIRST,
        backoff_cap=RETRY_CAP,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's own pull does
    return message, context


def run_task(address: str, token: str, app: Callable[[Message, Context], Message]) -> str:
    """One ClientApp task of the SuperNode at ``address``, run here; a line for the log."""
    start = time.perf_counter()
    what = "task"
    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context = _pull_task(client)
        partition = context.node_config.get("partition-id", "?")
        what = f"{message.metadata.message_type} for partition {partition}"
        try:
            reply = app(message, context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # as flwr-clientapp: the node's error reply carries it
            reason = f"{type(error)}:<'{error}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
            details = f"{error}"
        push_message(client, reply, context)
    finally:
        push_task_output(client, context, status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    took = time.perf_counter() - start
    if status != SubStatus.COMPLETED:
        return f"{what} failed after {took:.1f} s: {details}"
    return f"{what} in {took:.1f} s"


def serve_tasks(
    address: str,
    app: Callable[[Message, Context], Message],
    stop: threading.Event,
    *,
    poll: float = 0.05,
    log: Callable[[str], None] = print,
    max_tasks: int = 0,
) -> int:
    """Run the SuperNode's ClientApp tasks until ``stop`` is set (or ``max_tasks`` > 0 ran).

    Returns the number of tasks run."""
    acquire = _client(address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    ran = 0
    try:
        while not stop.is_set() and (max_tasks <= 0 or ran < max_tasks):
            try:
                found = acquire.AcquireTask(request)
            except Exception as error:  # the SuperNode is not up yet, or restarting
                _logger.debug("AcquireTask failed: %s", error)
                stop.wait(1.0)
                continue
            if not (found.HasField("task") and found.token):
                stop.wait(poll)
                continue
            try:
                log(run_task(address, found.token, app))
            except Exception as error:  # the SuperNode went away mid-task: it times the task out
                log(f"task {found.task.task_id} dropped: {error}")
            ran += 1
    finally:
        acquire.close()
    return ran
