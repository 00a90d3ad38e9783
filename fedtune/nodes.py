"""`fedtune server` and `fedtune client`: Flower's SuperLink and SuperNode, started the safe way.

What they take care of, that the plain Flower commands leave to the user:
- the network reaches only the Fleet API (fedtune/gateway.py): the SuperLink listens on loopback,
  so only `fedtune server` itself submits, stops and lists runs and registers node keys;
- TLS unless the server listens on loopback only, or `--insecure` is asked for;
- a client node runs only its own installed fedtune, never code the server sends (fedtune/worker.py);
- the SuperLink never reinstalls dependencies into a fresh environment (Flower's default: GBs,
  and once a different torch);
- the CLI's connection lives in a private FLWR_HOME, so no `pyproject.toml` or user config is
  rewritten; the exit code of `fedtune server` is that of the run it submitted;
- node-local settings (partition, data folder, cache) come from the client node's command line;
- SuperNode authentication from plain key files: `fedtune keygen` on a client node, its public key
  in the server's `--authorized-keys`, which registers it with the SuperLink before the run;
- no process outlives the command (fedtune/lifeline.py), and SIGTERM frees the port at once.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from fedtune import lifeline
from fedtune.bundle import APP_ROOT, local_identity
from fedtune.credentials import TLSFiles, is_loopback, make_node_key, read_authorized_keys
from fedtune.flower_cli import register_nodes, submit_and_follow, wait_for_superlink, write_connection
from fedtune.gateway import FleetGateway, Gateway, bind
from fedtune.logs import setup_logging
from fedtune.loopback_tls import make_loopback_tls
from fedtune.ports import LOOPBACK, free_loopback_port
from fedtune.processes import (
    NodeError,
    Worker,
    executable,
    flower_env,
    sigterm_ends_the_command,
    start_daemon,
    stop_daemons,
    supervise,
)

__all__ = ["NodeError", "join", "make_node_key", "serve"]


def serve(
    config: Path,
    overrides: list[str],
    *,
    host: str,
    port: int,
    certs: Path | None,
    insecure: bool,
    state_dir: Path,
    authorized_keys: Path | None = None,
    startup_timeout: float = 60.0,
    task: dict[str, str] | None = None,
) -> int:
    """Start a SuperLink, submit one run of `config` to it, stream its logs, stop the SuperLink.

    The SuperLink listens on loopback, behind the Fleet API gateway on `host`:`port`. With
    `authorized_keys`, only SuperNodes holding one of those keys may connect. `task` holds run-config
    entries that make the run do something else than train (`flower_cli.submit_and_follow`): `select`
    ranks candidates (`fedtune server --select`), `gap` reports the domain gap (`--gap`). Returns the exit code
    of the run this call submitted: 0 when it completed, 1 when it failed or was stopped.
    """
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise NodeError(f"the fedtune app is not at {APP_ROOT}: run the server from a source checkout")
    if certs is not None and insecure:
        raise NodeError("--certs and --insecure contradict each other: choose one")
    state_dir = state_dir.resolve()  # Flower resolves relative paths against changing working dirs
    tls = TLSFiles.in_dir(certs) if certs is not None else None
    if tls is None and not insecure and not is_loopback(host):
        raise NodeError(
            f"serving on {host} needs TLS: pass --certs DIR (make it with deploy/make-certs.sh DIR <address>), "
            "or --insecure if you really mean it"
        )
    if authorized_keys is not None and tls is None:
        raise NodeError("--authorized-keys needs TLS (Flower authenticates SuperNodes only over TLS): pass --certs")
    public_keys = read_authorized_keys(authorized_keys) if authorized_keys is not None else []
    try:
        public = bind(host, port)  # before anything starts: a port in use is the first thing to know
    except OSError as error:
        raise NodeError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    setup_logging()  # the gateway's refusals go to stderr
    lifeline.hold()
    with sigterm_ends_the_command():
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            return _serve_on(public, config, overrides, tls=tls, state_dir=state_dir, public_keys=public_keys,
                             startup_timeout=startup_timeout, task=task)
        finally:
            public.close()


def _serve_on(
    public: socket.socket,
    config: Path,
    overrides: list[str],
    *,
    tls: TLSFiles | None,
    state_dir: Path,
    public_keys: list[str],
    startup_timeout: float,
    task: dict[str, str] | None = None,
) -> int:
    # The SuperLink's state stays in memory (Flower's default). With a database file, under load
    # (or with a large backbone in flight) its SQLite writers time out on each other's locks
    # ("database is locked") and runs failed; nothing in it is needed after the run: the server's
    # own checkpoint is what a restart resumes from.
    loopback = make_loopback_tls(state_dir / "loopback-tls")
    link_port = free_loopback_port()
    superlink = [executable("flower-superlink"), "--disable-runtime-dependency-installation",
                 "--ssl-ca-certfile", str(loopback.ca), "--ssl-certfile", str(loopback.certificate),
                 "--ssl-keyfile", str(loopback.key), "--host", LOOPBACK, "--port", str(link_port)]
    if public_keys:
        superlink.append("--enable-supernode-auth")
    flwr_home = state_dir / "flwr-home"
    env = flower_env(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    write_connection(flwr_home, link_port, loopback.ca)
    gateway_app = FleetGateway(f"https://{LOOPBACK}:{link_port}",
                               verify=ssl.create_default_context(cafile=str(loopback.ca)))
    try:
        gateway = Gateway(public, gateway_app, certificate=tls.certificate if tls else None,
                          key=tls.key if tls else None)
    except (OSError, ssl.SSLError) as error:  # only TLS files are read here
        raise NodeError(f"cannot use {tls.certificate if tls else ''} and its key: {error}") from None
    # Serving at once: SuperNodes that come before the SuperLink is up and their keys are
    # registered are told to come back (503), rather than left waiting in the listen queue and
    # let in all together.
    gateway.start()
    process: subprocess.Popen | None = None
    try:
        process = start_daemon(superlink, env)
        wait_for_superlink(link_port, process, startup_timeout)
        if public_keys:
            register_nodes(public_keys, env, state_dir, startup_timeout)
        gateway_app.open()
        return submit_and_follow(config, overrides, env, state_dir, task=task)
    finally:
        gateway.stop()  # first: the public port closes at once
        if process is not None:
            stop_daemons(process)


def join(
    server: str,
    *,
    partition_id: int | None,
    num_partitions: int | None,
    data: Path | None,
    cache_dir: Path | None,
    download: bool = False,
    cache_max_gb: float | None = None,
    max_epsilon: float | None = None,
    max_delta: float | None = None,
    root_certificates: Path | None,
    insecure: bool,
    port: int,
    auth_key: Path | None = None,
    give_up_after: float = 600.0,
) -> int:
    """Run a SuperNode connected to `server` (HOST:PORT) until it is stopped; returns its exit code.

    A SuperNode refused by the server is started again every few seconds for `give_up_after` s.
    The SuperNode hands its messages to one long-lived ClientApp worker (fedtune/worker.py) beside
    it, which runs this node's own fedtune and refuses any other app the server sends. Flower's
    default, a `flwr-clientapp` process per message running the app the server sent, is not offered:
    it would let whoever controls the server run code on this node.
    """
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
    if auth_key is not None and not auth_key.is_file():
        raise NodeError(f"SuperNode key not found: {auth_key} (make one with `fedtune keygen {auth_key}`)")
    if data is not None and not data.exists():
        raise NodeError(f"data folder not found: {data}")
    try:
        local_identity()  # the worker checks every app bundle against it: fail here, not in the worker
    except (FileNotFoundError, ValueError) as error:
        raise NodeError(str(error)) from None
    if partition_id is None and data is None:
        raise NodeError("say what this node trains on: --data PATH (its own dataset, used whole) or --partition-id N "
                        "(a partition of the experiment's dataset, or of --data)")
    # Without a partition, the node's own dataset is used whole; partition-id 0 only seeds it.
    node_config = [f"partition-id={partition_id or 0}"] + (["own-data=true"] if partition_id is None else [])
    if num_partitions is not None:
        node_config.append(f"num-partitions={num_partitions}")
    if data is not None:
        node_config.append(f'data-root="{data.resolve()}"')
    if cache_dir is not None:
        node_config.append(f'cache-dir="{cache_dir.resolve()}"')
    if download:
        node_config.append("download=true")  # the server's data.download never decides this
    if cache_max_gb is not None:
        if not 0 < cache_max_gb < float("inf"):
            raise NodeError(f"--cache-max-gb must be a positive number of GB, not {cache_max_gb}")
        node_config.append(f"cache-max-gb={cache_max_gb}")
    if max_delta is not None and max_epsilon is None:
        raise NodeError("--max-delta goes with --max-epsilon: it is the delta of this node's own privacy budget")
    for flag, value, high in (("--max-epsilon", max_epsilon, 1e6), ("--max-delta", max_delta, 1.0)):
        if value is not None and not 0 < value < high:
            raise NodeError(f"{flag} must be above 0 and below {high:g}, not {value}")
    if max_epsilon is not None:
        node_config.append(f"max-epsilon={max_epsilon}")
    if max_delta is not None:
        node_config.append(f"max-delta={max_delta}")
    command = [executable("flower-supernode"), "--superlink", server, "--port", str(port),
               "--node-config", " ".join(node_config)]
    command += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    lifeline.hold()
    # -P: the working directory is not searched for modules, so a folder there named client/ or
    # server/ cannot stand in for fedtune's (the worker checks where its packages come from, too).
    worker = Worker([sys.executable, "-P", "-m", "fedtune.worker", "--runtime-api-address", f"{LOOPBACK}:{port}",
                      "--parent-pid", str(os.getpid())])
    with sigterm_ends_the_command():
        return supervise([*command, "--isolation", "process"], give_up_after, worker=worker)
