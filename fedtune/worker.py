"""A long-lived ClientApp process for a SuperNode started with `--isolation process`.

Flower 1.41 runs every message in a new `flwr-clientapp` process: its SuperExec acquires one task
from the SuperNode's Runtime API and starts `flwr-clientapp --token TOKEN` for it
(flwr/supercore/superexec/executor/subprocess_executor.py:54-85), and that process handles exactly
one message, then exits (flwr/supernode/runtime/run_clientapp.py:151-234: one `pull_task_input`,
then `flwr_exit`). Each message thus paid a Python start and the import of torch and the app,
3.5-6 s here. Flower's warm executor pools would avoid that, but only on Kubernetes and only for
AgentApp/model/connector tasks (flwr/supercore/superexec/executor/warm_executor_pool.py:33-35).

This worker takes the place of the SuperExec and of `flwr-clientapp` at once, through the same
Runtime API: it acquires a task (`AcquireTask`, as `flower-superexec` does), then does what
`flwr-clientapp` does for it, using Flower's own functions (`pull_task_input`, `push_message`,
`push_task_output`) - and then waits for the next task in the same process, with torch already
imported. The app is loaded once per app bundle (FAB), as in a fresh process: when a run brings a
different bundle, the modules of the previous one are forgotten first.

`fedtune client` starts it beside its SuperNode and restarts it if it exits; it is not meant to be
started by hand:

    python -m fedtune.worker --runtime-api-address 127.0.0.1:9094 --parent-pid PID
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from logging import ERROR, INFO
from pathlib import Path
from types import FrameType

from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# How often an idle worker asks the SuperNode for a task. Flower's SuperExec asks every 1 s
# (FLWR_SUPEREXEC_TASK_POLL_INTERVAL); a request to a local HTTP API every 0.2 s costs nothing
# measurable, and the SuperNode itself looks for new messages only every 3 s when idle.
ACQUIRE_INTERVAL = 0.2
# fedtune's ClientApp imports these (most of its import time): importing them before the first
# message makes the first round as fast as the others. Third-party packages only: the app's own
# modules must come from the bundle the server sends, so they are imported when a task brings it.
PRELOAD = ("torch", "torchvision")


class _Apps:
    """The ClientApp of the bundle last used, loaded as a fresh `flwr-clientapp` process would."""

    def __init__(self) -> None:
        self._directory: Path | None = None
        self._app: ClientApp | None = None
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def get(self, run: Run, fab: Fab) -> ClientApp:
        directory = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        if self._app is None or directory != self._directory:
            install_from_fab(fab.content, skip_prompt=True)  # unpacks into FLWR_HOME/apps/, once per bundle
            if self._directory is not None:
                _forget(self._directory)
            _forget_modules_named_in(directory)
            self._app = self._load(run.fab_id, run.fab_version, fab.hash_str)
            self._directory = directory
        return self._app


def _top_level_names(directory: Path) -> set[str]:
    return {
        path.stem if path.is_file() else path.name
        for path in directory.iterdir()
        if (path.is_file() and path.suffix == ".py") or (path / "__init__.py").is_file()
    }


def _forget_modules_named_in(directory: Path) -> None:
    """Drop loaded modules that the bundle in `directory` provides, so that they are imported from it.

    Two cases: the modules of an earlier bundle with other code under the same names, and a copy of
    the app installed in this environment (fedtune itself, imported to start this worker).
    """
    names = _top_level_names(directory)
    for module in [m for m in sys.modules if m.partition(".")[0] in names]:
        del sys.modules[module]
    importlib.invalidate_caches()


def _forget(directory: Path) -> None:
    # Flower's loader put the bundle's folder first on sys.path; a later bundle must not import from it.
    while str(directory) in sys.path:
        sys.path.remove(str(directory))


def _run_task(runtime_api_address: str, token: str, apps: _Apps) -> None:
    """One message, as flwr/supernode/runtime/run_clientapp.py:82-234 handles it, without exiting."""
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
        reply = apps.get(run, fab)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as error:  # noqa: BLE001 - any failure of the app becomes an error reply, as in Flower
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(error)}:<'{error}'>"
        if isinstance(error, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            details = "An exception was raised when attempting to load `ClientApp`"
        log(ERROR, "ClientApp raised an exception", exc_info=error)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
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


def serve(runtime_api_address: str) -> None:
    """Acquire and handle ClientApp tasks from the SuperNode at `runtime_api_address`, until stopped."""
    for module in PRELOAD:
        importlib.import_module(module)
    apps = _Apps()
    tasks = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),  # waits for a SuperNode that is still starting
    )
    log(INFO, "ClientApp worker ready: waiting for tasks from the SuperNode at %s", runtime_api_address)
    try:
        while True:
            acquired = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if acquired.HasField("task") and acquired.token:
                _run_task(runtime_api_address, acquired.token, apps)
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
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
