"""`fedtune server` and `fedtune client`: Flower's SuperLink and SuperNode, started the safe way.

What they take care of, that the plain Flower commands leave to the user:
- TLS unless the server listens on loopback only, or `--insecure` is asked for;
- the SuperLink never reinstalls dependencies into a fresh environment (Flower's default: GBs,
  and once a different torch);
- the CLI's connection lives in a private FLWR_HOME, so no `pyproject.toml` or user config is
  rewritten; the SuperLink is stopped when the run ends, even on Ctrl-C;
- node-local settings (partition, data folder, cache) come from the client node's command line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml and the packages
CONNECTION = "fedtune"


class NodeError(RuntimeError):
    """A node cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class TLSFiles:
    """What deploy/make-certs.sh writes: the CA (for clients) and the server's certificate and key."""

    ca: Path
    certificate: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TLSFiles:
        files = cls(directory / "ca.crt", directory / "server.crt", directory / "server.key")
        missing = [str(p) for p in (files.ca, files.certificate, files.key) if not p.is_file()]
        if missing:
            raise NodeError(f"missing TLS files: {', '.join(missing)}; make them with deploy/make-certs.sh {directory}")
        return files


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: they start further Flower commands (flwr-serverapp,
    flower-superexec) by name, so the directory of this Python's CLIs goes first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def _executable(name: str) -> str:
    # The CLIs installed beside this Python, whether or not its environment is activated.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise NodeError(f"{name} not found: install fedtune's dependencies (flwr) into this environment")
    return found


def _local_address(host: str) -> str:
    """Where the server's own machine reaches a SuperLink listening on `host`: loopback for the
    wildcard addresses, otherwise `host` itself (bound to one interface, it does not answer on 127.0.0.1)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    dial = _local_address(host)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NodeError(f"the SuperLink exited with code {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((dial, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise NodeError(f"the SuperLink did not listen on {dial}:{port} within {timeout:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _write_connection(flwr_home: Path, host: str, port: int, tls: TLSFiles | None) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{tls.ca}"' if tls else "insecure = true"
    dial = _local_address(host)
    dial = f"[{dial}]" if ":" in dial else dial  # an IPv6 address in HOST:PORT form
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{dial}:{port}"\n{security}\n'
    )


def serve(
    config: Path,
    overrides: list[str],
    *,
    host: str,
    port: int,
    certs: Path | None,
    insecure: bool,
    state_dir: Path,
    startup_timeout: float = 60.0,
) -> int:
    """Start a SuperLink, submit one run of `config` to it, stream its logs, stop the SuperLink.

    Returns the exit code of `flwr run`.
    """
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise NodeError(f"the fedtune app is not at {APP_ROOT}: run the server from a source checkout")
    if certs is not None and insecure:
        raise NodeError("--certs and --insecure contradict each other: choose one")
    tls = TLSFiles.in_dir(certs) if certs is not None else None
    if tls is None and not insecure and not is_loopback(host):
        raise NodeError(
            f"serving on {host} needs TLS: pass --certs DIR (make it with deploy/make-certs.sh DIR <address>), "
            "or --insecure if you really mean it"
        )
    superlink = [_executable("flower-superlink"), "--host", host, "--port", str(port),
                 "--disable-runtime-dependency-installation",
                 "--database", str(state_dir / "superlink.db")]
    superlink += (["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.certificate),
                   "--ssl-keyfile", str(tls.key)] if tls else ["--insecure"])
    state_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = state_dir / "flwr-home"
    _write_connection(flwr_home, host, port, tls)
    env = _flower_env(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    process = subprocess.Popen(superlink, env=env)
    try:
        _wait_for_port(host, port, process, startup_timeout)
        run_config = f"config='{config.resolve()}' set='{';'.join(overrides)}'"
        command = [_executable("flwr"), "run", str(APP_ROOT), CONNECTION, "--stream", "--run-config", run_config]
        code = subprocess.run(command, env=env, cwd=state_dir).returncode
        if code != 0:
            return code
        # `flwr run` exits 0 even when the ServerApp failed: ask the SuperLink how the run ended.
        status, details = _latest_run_status(env, state_dir)
        if not status.endswith(":completed"):
            print(f"error: the run ended {status}: {details or 'see the log above'}", file=sys.stderr)
            return 1
        return 0
    finally:
        _stop(process)


def _latest_run_status(env: dict[str, str], cwd: Path) -> tuple[str, str]:
    listing = subprocess.run([_executable("flwr"), "ls", CONNECTION, "--format", "json"], env=env, cwd=cwd,
                             capture_output=True, text=True)
    try:
        runs = json.loads(listing.stdout)["runs"]
        latest = max(runs, key=lambda run: run["pending-at"])
        return str(latest["status"]), str(latest.get("status-details") or "")
    except (ValueError, KeyError, TypeError):
        return "unknown", f"could not read the run's status from `flwr ls`: {listing.stderr.strip()[-300:]}"


def join(
    server: str,
    *,
    partition_id: int,
    num_partitions: int | None,
    data: Path | None,
    cache_dir: Path | None,
    root_certificates: Path | None,
    insecure: bool,
    port: int,
) -> int:
    """Run a SuperNode connected to `server` (HOST:PORT) until it is stopped; returns its exit code."""
    host, _, server_port = server.rpartition(":")
    if not host or not server_port.isdigit():
        raise NodeError(f"--server must be HOST:PORT, got {server!r}")
    if root_certificates is not None and insecure:
        raise NodeError("--root-certificates and --insecure contradict each other: choose one")
    if root_certificates is None and not insecure:
        raise NodeError(
            f"connecting to {server} needs TLS: pass --root-certificates CA.crt (the server's ca.crt), "
            "or --insecure for a server started with --insecure"
        )
    if root_certificates is not None and not root_certificates.is_file():
        raise NodeError(f"root certificate not found: {root_certificates}")
    if data is not None and not data.exists():
        raise NodeError(f"data folder not found: {data}")
    node_config = [f"partition-id={partition_id}"]
    if num_partitions is not None:
        node_config.append(f"num-partitions={num_partitions}")
    if data is not None:
        node_config.append(f'data-root="{data.resolve()}"')
    if cache_dir is not None:
        node_config.append(f'cache-dir="{cache_dir.resolve()}"')
    command = [_executable("flower-supernode"), "--superlink", server, "--port", str(port),
               "--node-config", " ".join(node_config)]
    command += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    return subprocess.run(command, env=_flower_env()).returncode
