"""The ClientApp process of a client node: runs this node's own fedtune for every message.

Flower 1.41 runs every message in a new `flwr-clientapp` process: its SuperExec acquires one task
from the SuperNode's Runtime API and starts `flwr-clientapp --token TOKEN` for it
(flwr/supercore/superexec/executor/subprocess_executor.py:54-85), which unpacks the app bundle (FAB)
the server sent, imports its ClientApp, handles exactly one message and exits
(flwr/supernode/runtime/run_clientapp.py:151-234). Two costs: a Python start and the import of torch
and the app per message (3.5-6 s here), and, worse, whoever controls the server runs its own code
on every node.

This worker takes the place of the SuperExec and of `flwr-clientapp` at once, through the same
Runtime API: it acquires a task (`AcquireTask`, as `flower-superexec` does), then does what
`flwr-clientapp` does for it, using Flower's own functions (`pull_task_input`, `push_message`,
`push_task_output`), and waits for the next task in the same process, torch already imported and
the model kept resident (fedtune/client/resident.py: its cached file is hashed once, not per
message). It never unpacks, imports or runs anything from the bundle: it runs the ClientApp
installed on this node (`fedtune.client.app`, which the app's `client.app:app` names), and only
when the bundle is the same fedtune (fedtune/bundle.py). Any other bundle gets an error reply saying what differs,
and a log line; the message, the node's settings and its data are not touched.

`fedtune client` starts it beside its SuperNode and restarts it if it exits; it is not meant to be
started by hand:

    python -P -m fedtune.worker --runtime-api-address 127.0.0.1:9094 --parent-pid PID
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from logging import ERROR
from types import FrameType

from flwr.app import Context, Error, Message
from flwr.clientapp.client_app import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedtune.bundle import BundleChecker, local_identity
from fedtune.logs import setup_logging

# How often an idle worker asks the SuperNode for a task. Flower's SuperExec asks every 1 s
# (FLWR_SUPEREXEC_TASK_POLL_INTERVAL); a request to a local HTTP API every 0.2 s costs nothing
# measurable, and the SuperNode itself looks for new messages only every 3 s when idle.
ACQUIRE_INTERVAL = 0.2


class WorkerError(RuntimeError):
    """The worker cannot run this node's fedtune; the message says why."""


def load_local_app() -> tuple[ClientApp, BundleChecker]:
    """This node's ClientApp, imported from the fedtune installation beside this module, and a
    checker of bundles against that same installation."""
    # Only fedtune's own modules are imported, so folders named client/ or server/ elsewhere on
    # the path (the working directory, PYTHONPATH) cannot stand in for the node's code.
    from fedtune.client.app import app  # imports torch too: done once, before the first message

    setup_logging()  # after the import of Opacus (by fedtune.client.app), whose root handler would repeat every line

    try:
        return app, BundleChecker(local_identity())
    except (FileNotFoundError, ValueError) as error:
        raise WorkerError(str(error)) from None


def _run_task(runtime_api_address: str, token: str, app: ClientApp, bundles: BundleChecker) -> None:
    """One message, as flwr/supernode/runtime/run_clientapp.py:82-234 handles it, without exiting,
    and with this node's ClientApp in place of the bundle's."""
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on loopback, without TLS, as with Flower's SuperExec
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        refusal = bundles.refusal(fab.content)
        if refusal is not None:
            log(ERROR, "run %s (%s %s): %s", run.run_id, run.fab_id, run.fab_version, refusal)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=refusal), reply_to=message)
            details = refusal
        else:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - any failure of the app becomes an error reply, as in Flower
        details = f"{type(error)}:<'{error}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=error)
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    except BaseException:
        # Stopped mid-task (Ctrl-C, SIGTERM, the supervisor gone): report the task as failed
        # without retrying, then let the worker exit.
        details = "the ClientApp worker was stopped"
        retry_invoker.max_tries = 1
        raise
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as error:  # noqa: BLE001 - the task's status is still reported below
            log(ERROR, "Failed to push reply message", exc_info=error)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def serve(runtime_api_address: str, *, app: ClientApp | None = None, bundles: BundleChecker | None = None) -> None:
    """Acquire and handle ClientApp tasks from the SuperNode at `runtime_api_address`, until stopped.

    By default this node's fedtune (`load_local_app`); a benchmark on this machine may hand in
    another app with the checker of its bundle (benchmarks/round_time.py). The server never can.
    """
    if app is None or bundles is None:
        app, bundles = load_local_app()
    tasks = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),  # waits for a SuperNode that is still starting
    )
    # fedtune's own logger: Flower's INFO lines are shown only under `fedtune -v` (fedtune/logs.py).
    logging.getLogger("fedtune.worker").info("ClientApp worker ready: runs %s for the messages of the SuperNode "
                                             "at %s", bundles.local.label, runtime_api_address)
    try:
        while True:
            acquired = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if acquired.HasField("task") and acquired.token:
                _run_task(runtime_api_address, acquired.token, app, bundles)
            else:
                time.sleep(ACQUIRE_INTERVAL)
    finally:
        tasks.close()


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception, so that a task in progress is reported as failed on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedtune.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="The SuperNode's Runtime API, HOST:PORT.")
    parser.add_argument("--parent-pid", type=int, help="Exit when this process (the supervisor) is gone.")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # Flower's: raises SIGINT here once the parent is gone
    try:
        serve(args.runtime_api_address)
    except WorkerError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
