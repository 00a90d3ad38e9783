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

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune import lifeline
from fedtune.bundle import APP_ROOT, local_identity
from fedtune.gateway import FleetGateway, Gateway, bind
from fedtune.logs import setup_logging
from fedtune.loopback_tls import make_loopback_tls
from fedtune.ports import LOOPBACK, free_loopback_port, wait_until_listening

CONNECTION = "fedtune"
# A worker that keeps dying (say, it cannot import torch) is restarted no more often than this.
WORKER_RESTART_INTERVAL = 5.0
# How long a Flower daemon gets after SIGTERM before SIGKILL: the SuperLink's web server would
# otherwise wait for its open connections (35-80 s were seen).
STOP_GRACE = 3.0
# How often `fedtune server` asks for its run's status once the log stream has ended early.
STATUS_INTERVAL = 2.0


class NodeError(RuntimeError):
    """A node cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class TLSFiles:
    """What the server needs of deploy/make-certs.sh's files: its certificate and key (ca.crt goes to clients)."""

    certificate: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TLSFiles:
        directory = directory.resolve()
        files = cls(directory / "server.crt", directory / "server.key")
        missing = [str(p) for p in (files.certificate, files.key) if not p.is_file()]
        if missing:
            raise NodeError(f"missing TLS files: {', '.join(missing)}; make them with deploy/make-certs.sh {directory}")
        return files


def make_node_key(path: Path) -> Path:
    """Write a SuperNode key pair: `path` (private, mode 600) and `path`.pub; returns the public key's path.

    Flower authenticates SuperNodes with NIST elliptic-curve keys in OpenSSH format (P-384 here, as
    in Flower's docs); the private key never leaves the client node.
    """
    public = path.with_name(path.name + ".pub")
    existing = [str(p) for p in (path, public) if p.exists()]
    if existing:
        raise NodeError(f"not overwriting existing key files: {', '.join(existing)}")
    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def read_authorized_keys(source: Path) -> list[str]:
    """The public keys of the SuperNodes allowed to join: a file with one OpenSSH key per line
    (`#` comments allowed), or a folder of `*.pub` files. Every key is checked before anything starts."""
    if source.is_dir():
        files = sorted(source.glob("*.pub"))
        if not files:
            raise NodeError(f"no *.pub files in {source}: put the clients' public keys there (fedtune keygen)")
    elif source.is_file():
        files = [source]
    else:
        raise NodeError(f"authorized keys not found: {source}")
    keys: list[str] = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = serialization.load_ssh_public_key(line.encode())
            except (ValueError, TypeError) as error:
                raise NodeError(f"{file}:{number} is not an OpenSSH public key: {error}") from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise NodeError(f"{file}:{number}: Flower needs an elliptic-curve (ecdsa) key; make one with "
                                "`fedtune keygen PATH`")
            keys.append(line)
    if not keys:
        raise NodeError(f"{source} holds no public keys")
    return keys


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


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    def check_alive() -> None:
        if process.poll() is not None:
            raise NodeError(f"the SuperLink exited with code {process.returncode} before it listened on port {port}")

    if not wait_until_listening(port, timeout=timeout, check_alive=check_alive):
        raise NodeError(f"the SuperLink did not listen on {LOOPBACK}:{port} within {timeout:.0f} s")


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:
    """Run in the child before exec: Linux sends it SIGTERM when fedtune's process dies, even by
    kill -9, so a SuperLink or SuperNode never outlives the command that started it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a Flower daemon in a process group of its own, tied to this process's life.

    Flower's daemons start helpers (SuperExec, ServerApp, ClientApp processes) that can outlive
    them; the group lets `_stop` end those that stay in it, fedtune/lifeline.py the others (the
    SuperExec starts a session of its own).
    """
    on_linux = sys.platform.startswith("linux")
    return subprocess.Popen(command, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if on_linux else None)


def _stop(*processes: subprocess.Popen) -> None:
    """Stop daemons started by `_start`, each with every process of its group, all at once (what
    left their groups: fedtune/lifeline.py)."""
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process, signal.SIGKILL)  # the daemon if it is still there, and helpers that ignored SIGTERM
        process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # nothing left of it
        pass


def _write_connection(flwr_home: Path, port: int, ca: Path) -> None:
    """The `flwr` CLI's connection to the loopback SuperLink, the only one it has."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{LOOPBACK}:{port}"\nroot-certificates = "{ca.resolve()}"\n'
    )


def _register_nodes(public_keys: list[str], env: dict[str, str], state_dir: Path, timeout: float) -> None:
    """Register each public key with the running SuperLink; only registered SuperNodes may connect.

    A client that connects before its key is registered is refused; `fedtune client` then tries
    again a few seconds later.
    """
    key_dir = state_dir / "authorized-keys"
    key_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    for index, public_key in enumerate(public_keys):
        key_file = key_dir / f"node-{index}.pub"  # `flwr supernode register` reads keys from files
        key_file.write_text(public_key + "\n")
        while True:
            answer = subprocess.run(
                [_executable("flwr"), "supernode", "register", str(key_file), CONNECTION, "--format", "json"],
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


@contextlib.contextmanager
def _sigterm_ends_the_command() -> Iterator[None]:
    """SIGTERM (`docker stop`, `kill`) unwinds like Ctrl-C: the port is closed and the daemons are
    stopped on the way out, where Python's default would end the process on the spot."""
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
) -> int:
    """Start a SuperLink, submit one run of `config` to it, stream its logs, stop the SuperLink.

    The SuperLink listens on loopback, behind the Fleet API gateway on `host`:`port`. With
    `authorized_keys`, only SuperNodes holding one of those keys may connect. Returns the exit code
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
    with _sigterm_ends_the_command():
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            return _serve_on(public, config, overrides, tls=tls, state_dir=state_dir, public_keys=public_keys,
                             startup_timeout=startup_timeout)
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
) -> int:
    # The SuperLink's state stays in memory (Flower's default). With a database file, under load
    # (or with a large backbone in flight) its SQLite writers time out on each other's locks
    # ("database is locked") and runs failed; nothing in it is needed after the run: the server's
    # own checkpoint is what a restart resumes from.
    loopback = make_loopback_tls(state_dir / "loopback-tls")
    link_port = free_loopback_port()
    superlink = [_executable("flower-superlink"), "--disable-runtime-dependency-installation",
                 "--ssl-ca-certfile", str(loopback.ca), "--ssl-certfile", str(loopback.certificate),
                 "--ssl-keyfile", str(loopback.key), "--host", LOOPBACK, "--port", str(link_port)]
    if public_keys:
        superlink.append("--enable-supernode-auth")
    flwr_home = state_dir / "flwr-home"
    env = _flower_env(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    _write_connection(flwr_home, link_port, loopback.ca)
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
        process = _start(superlink, env)
        _wait_for_port(link_port, process, startup_timeout)
        if public_keys:
            _register_nodes(public_keys, env, state_dir, startup_timeout)
        gateway_app.open()
        return _run(config, overrides, env, state_dir)
    finally:
        gateway.stop()  # first: the public port closes at once
        if process is not None:
            _stop(process)


def _flwr(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_executable("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True)


def _run(config: Path, overrides: list[str], env: dict[str, str], cwd: Path) -> int:
    """Submit one run, stream its logs, and return its exit code from the status of THAT run."""
    run_config = f"config='{config.resolve()}' set='{';'.join(overrides)}'"
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
    subprocess.run([_executable("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env, cwd=cwd)
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
    command = [_executable("flower-supernode"), "--superlink", server, "--port", str(port),
               "--node-config", " ".join(node_config)]
    command += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    lifeline.hold()
    # -P: the working directory is not searched for modules, so a folder there named client/ or
    # server/ cannot stand in for fedtune's (the worker checks where its packages come from, too).
    worker = _Worker([sys.executable, "-P", "-m", "fedtune.worker", "--runtime-api-address", f"{LOOPBACK}:{port}",
                      "--parent-pid", str(os.getpid())])
    with _sigterm_ends_the_command():
        return _supervise([*command, "--isolation", "process"], give_up_after, worker=worker)


class _Worker:
    """fedtune's ClientApp worker beside a SuperNode started with `--isolation process`.

    Started again whenever it exits (an app that crashed the process, say), at most once per
    WORKER_RESTART_INTERVAL; it waits for the SuperNode's Runtime API by itself, also across a
    restart of the SuperNode.
    """

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._process: subprocess.Popen | None = None
        self._started = 0.0

    def keep_alive(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            _stop(self._process)  # anything it started
            if time.monotonic() < self._started + WORKER_RESTART_INTERVAL:
                return  # not yet: the next call starts it
            print(f"fedtune: the ClientApp worker exited with code {self._process.returncode}; starting another",
                  file=sys.stderr, flush=True)
        self._started = time.monotonic()
        self._process = _start(self._command, _flower_env())

    def running(self) -> list[subprocess.Popen]:
        return [self._process] if self._process is not None else []


_SETTLED = 60.0  # seconds a SuperNode has run when its exit is no longer part of a failing start


def _supervise(command: list[str], give_up_after: float, *, worker: _Worker, retry_every: float = 5.0) -> int:
    """Run the SuperNode until this process is stopped, starting it again whenever it ends.

    Flower's SuperNode retries a server that is down, but it exits when the server refuses it: a
    server with node authentication before it has registered the node's key, or a restarted
    server that no longer knows the node. After `give_up_after` s of such exits in a row, stop.
    The `worker` is kept running meanwhile, and stopped with the SuperNode when this ends.
    """
    failing_since: float | None = None
    while True:
        started = time.monotonic()
        process = _start(command, _flower_env())
        try:
            while (code := process.poll()) is None:
                worker.keep_alive()
                time.sleep(0.5)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): both at once, not one grace period after the other
            _stop(process, *worker.running())
            raise
        _stop(process)
        if time.monotonic() - started > _SETTLED:
            failing_since = None  # it had been running: this is a new failure, not one more of a streak
        failing_since = failing_since if failing_since is not None else started
        if time.monotonic() - failing_since >= give_up_after:
            _stop(*worker.running())
            print(f"error: the SuperNode stopped (exit code {code}); if its log says 'Failed to activate SuperNode', "
                  "the server accepts only known nodes: start this node with --auth-key and have the server's "
                  "operator add its public key to --authorized-keys", file=sys.stderr)
            return code or 1
        print(f"the SuperNode stopped (exit code {code}); starting it again in {retry_every:.0f} s", file=sys.stderr)
        time.sleep(retry_every)
