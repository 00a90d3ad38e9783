"""The `flwr` CLI driven by `fedtune server`: its private connection, node keys, one run and that run's status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from fedtune.atomic import write_text_atomically
from fedtune.bundle import APP_ROOT
from fedtune.ports import LOOPBACK, wait_until_listening
from fedtune.processes import NodeError, executable

CONNECTION = "fedtune"
# How often `fedtune server` asks for its run's status once the log stream has ended early.
STATUS_INTERVAL = 2.0


def wait_for_superlink(port: int, process: subprocess.Popen, timeout: float) -> None:
    def check_alive() -> None:
        if process.poll() is not None:
            raise NodeError(f"the SuperLink exited with code {process.returncode} before it listened on port {port}")

    if not wait_until_listening(port, timeout=timeout, check_alive=check_alive):
        raise NodeError(f"the SuperLink did not listen on {LOOPBACK}:{port} within {timeout:.0f} s")


def write_connection(flwr_home: Path, port: int, ca: Path) -> None:
    """The `flwr` CLI's connection to the loopback SuperLink, the only one it has."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        flwr_home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{LOOPBACK}:{port}"\nroot-certificates = "{ca.resolve()}"\n'
    )


def register_nodes(public_keys: list[str], env: dict[str, str], state_dir: Path, timeout: float) -> None:
    """Register each public key with the running SuperLink; only registered SuperNodes may connect.

    A client that connects before its key is registered is refused; `fedtune client` then tries
    again a few seconds later.
    """
    key_dir = state_dir / "authorized-keys"
    key_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    for index, public_key in enumerate(public_keys):
        key_file = key_dir / f"node-{index}.pub"  # `flwr supernode register` reads keys from files
        write_text_atomically(key_file, public_key + "\n")
        while True:
            answer = subprocess.run(
                [executable("flwr"), "supernode", "register", str(key_file), CONNECTION, "--format", "json"],
                env=env, cwd=state_dir, capture_output=True, text=True,
            )
            try:
                reply = json.loads(answer.stdout)
            except ValueError:
                reply = {"success": False, "error-message": (answer.stderr or answer.stdout).strip()[-300:]}
            message = str(reply.get("error-message", ""))
            if reply.get("success") or "already in use" in message:
                break
            # The port accepts connections a little before the Control API answers.
            if "unavailable" not in message or time.monotonic() > deadline:
                raise NodeError(f"could not register the SuperNode key {public_key[:40]}...: {message.strip()}")
            time.sleep(1)


def _flwr(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([executable("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True)


def submit_and_follow(config: Path, overrides: list[str], env: dict[str, str], cwd: Path, *,
                      task: dict[str, str] | None = None) -> int:
    """Submit one run, stream its logs, and return its exit code from the status of THAT run.

    `task`: run-config entries (keys of pyproject.toml's [tool.flwr.app.config]) that make the run do
    something else than train: `select` (candidates separated by spaces: fedtune/server/selection.py)
    or `gap` (`head` or a block: fedtune/server/gap.py). Values must hold no quote (') (the callers
    refuse them)."""
    extra = "".join(f" {key}='{value}'" for key, value in (task or {}).items())
    run_config = f"config='{config.resolve()}' set='{';'.join(overrides)}'{extra}"
    submitted = _flwr("run", str(APP_ROOT), CONNECTION, "--run-config", run_config, "--format", "json",
                      env=env, cwd=cwd)
    try:
        run_id = int(json.loads(submitted.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        problem = (submitted.stdout + submitted.stderr).strip()[-500:]
        print(f"error: the run could not be submitted to the SuperLink: {problem}", file=sys.stderr)
        return submitted.returncode or 1
    print(f"fedtune: submitted run {run_id}", file=sys.stderr, flush=True)
    # Logs go to this process's output as they come; the stream ends when the run has finished.
    subprocess.run([executable("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env, cwd=cwd)
    # `flwr run` and `flwr log` exit 0 whatever became of the run: ask the SuperLink how it ended.
    state, details = _run_status(run_id, env, cwd)
    while state in ("pending", "starting", "running"):  # the log stream ended early: wait for the run itself
        time.sleep(STATUS_INTERVAL)
        state, details = _run_status(run_id, env, cwd)
    if state == "finished:completed":
        return 0
    if state == "finished:stopped":
        details = f"run {run_id} was stopped before it completed (`flwr stop` on the server machine)"
    print(f"error: the run ended {state}: {details or 'see the log above'}", file=sys.stderr)
    return 1


def _run_status(run_id: int, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """(status, details) of run `run_id`, e.g. ("finished:failed", "..."); ("unknown", why) if it cannot be read."""
    listing = _flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", env=env, cwd=cwd)
    try:
        (run,) = [r for r in json.loads(listing.stdout)["runs"] if int(r["run-id"]) == run_id]
        return str(run["status"]), str(run.get("status-details") or "")
    except (ValueError, KeyError, TypeError):
        return "unknown", f"could not read the status of run {run_id} from `flwr ls`: {listing.stderr.strip()[-300:]}"
