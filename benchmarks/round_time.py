"""Round time on real nodes with no training work: stock Flower against fedtune's setup.

    python benchmarks/round_time.py --rounds 6
    python benchmarks/round_time.py --rounds 4 --setups app-worker --out benchmarks/results/round-time-app

On loopback, one SuperLink (`--insecure`, no runtime dependency installation) and 2 client nodes
run the no-op app in benchmarks/noop_app: every round, each node gets a train message and replies
at once (its ClientApp imports torch, as fedtune's does). Setups, one after the other:

(a) stock Flower 1.41: `flower-supernode` with its default subprocess isolation (a new
    `flwr-clientapp` process per message), and the ServerApp's `grid.send_and_receive` as is;
(b) fedtune: a SuperNode with `--isolation process` and fedtune's long-lived ClientApp worker, as
    `fedtune client` runs them, and the ServerApp on fedtune's grid (fedtune/server/transport.py), as `fedtune
    server` runs it. The worker runs only the app installed beside it, so here it is handed the
    no-op app and the identity of its bundle in place of fedtune's (`fedtune.worker.serve`);
(c) a probe, not something fedtune ships: (b) with the SuperNode's hard-coded sleeps
    (flwr/supernode/start_client_internal.py:263 and :470, 3 s and 0.5 s) cut to 0.1 s by
    replacing `time` in that module, to show how much of (b) those sleeps are.

Round times come from the ServerApp's own timestamps (push of the round's messages to the last
reply), not from the processes' wall time; "dispatch" is push to the ClientApp handling the
message, "return" is the ClientApp's reply to the server having it. Round 1 is reported apart
(in (a) and (b) the ClientApp's first import happens in it or before it); the median is over the
later rounds.

The second command runs the real app, with little work: (e) `fedtune server` + 2 `fedtune client`
on quickstart at 32 px, head only (train and evaluate messages, central evaluation); round times
are the run's own (history.json). (d), `fedtune client --isolation subprocess`, is gone with that
option: Flower's per-message processes run whatever app the server sends. Logs of every process
go to OUT/<setup>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tables import write_results  # benchmarks/tables.py, beside this script

from fedtune.console import compare_table
from fedtune.ports import wait_until_listening
from fedtune.processes import signal_group
from fedtune.report import RunDirectory

REPO = Path(__file__).resolve().parents[1]
NOOP_APP = REPO / "benchmarks" / "noop_app"
BIN = Path(sys.executable).parent
SLEEP_CAP = 0.1
PATCHED_SUPERNODE = (
    "import sys, time, types\n"
    "import flwr.supernode.start_client_internal as node_loop\n"
    "from flwr.supernode.cli import flower_supernode\n"
    # the module uses `time` for its three sleeps only (lines 263, 470, 506 in Flower 1.41)
    f"node_loop.time = types.SimpleNamespace(sleep=lambda s: time.sleep(min(s, {SLEEP_CAP})))\n"
    "sys.argv[0] = 'flower-supernode'\n"
    "flower_supernode()\n"
)

# fedtune's ClientApp worker with the no-op app (and its bundle's identity) in place of fedtune's.
NOOP_WORKER = (
    "import sys\n"
    "from pathlib import Path\n"
    f"sys.path.insert(0, {str(NOOP_APP)!r})\n"
    "from noopapp import client\n"
    "from fedtune import worker\n"
    "from fedtune.bundle import BundleChecker, local_identity\n"
    f"worker.serve(sys.argv[1], app=client, bundles=BundleChecker(local_identity(Path({str(NOOP_APP)!r}))))\n"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stock_node(partition: int, superlink: int) -> list[list[str]]:
    del partition  # the no-op app reads no node config
    return [[str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink}",
             "--port", str(_free_port())]]


def _fedtune_node(partition: int, superlink: int) -> list[list[str]]:
    del partition
    port = _free_port()
    return [[str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink}",
             "--port", str(port), "--isolation", "process"],
            [sys.executable, "-c", NOOP_WORKER, f"127.0.0.1:{port}"]]


def _probe_node(partition: int, superlink: int) -> list[list[str]]:
    del partition
    port = _free_port()
    return [[sys.executable, "-c", PATCHED_SUPERNODE, "--insecure", "--superlink", f"127.0.0.1:{superlink}",
             "--port", str(port), "--isolation", "process"],
            [sys.executable, "-c", NOOP_WORKER, f"127.0.0.1:{port}"]]


NodeCommands = Callable[[int, int], list[list[str]]]  # (partition, SuperLink port) -> the node's commands
Rounds = list[dict[str, Any]]  # per round: seconds, replies and, for the no-op app, dispatch/return/pids


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    run: Callable[[int, int, Path], Rounds]  # (rounds, nodes, logs folder) -> its rounds


class Processes:
    """Processes started in their own sessions, each logging to a file; all stopped on exit."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], **env: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.logs,
                                       env={**self.env, **env}, start_new_session=True)
        self.started.append((name, process))
        return process

    def check(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}: see {self.logs / name}.log")

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        # Whole sessions, each started process with what it started (a SuperNode's ClientApps, say).
        for _, process in reversed(self.started):
            signal_group(process, signal.SIGTERM)
        for _, process in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()


def _wait_for_port(port: int, processes: Processes, timeout: float = 60.0) -> None:
    if not wait_until_listening(port, timeout=timeout, check_alive=processes.check, interval=0.2):
        raise RuntimeError(f"nothing listened on port {port} within {timeout:.0f} s")


def _environment() -> dict[str, str]:
    # This checkout's fedtune (and fedtune/server/transport.py, which the no-op ServerApp imports) for every process.
    return {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_noop(rounds: int, nodes: int, logs: Path, *, node: NodeCommands, grid: str) -> Rounds:
    """The no-op app on one SuperLink and `nodes` nodes started by `node`; the ServerApp's timestamps."""
    results = logs / "rounds.json"
    env = _environment()
    port = _free_port()
    cli_home = logs / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    with Processes(logs, env) as processes:
        processes.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
                                      "--disable-runtime-dependency-installation"], FLWR_HOME=str(logs / "link-home"))
        _wait_for_port(port, processes)
        for partition in range(nodes):
            for index, command in enumerate(node(partition, port)):
                processes.start(f"node-{partition}-{index}", command, FLWR_HOME=str(logs / f"node-{partition}-home"))
        run_config = f"rounds={rounds} nodes={nodes} results='{results}' grid='{grid}'"
        submitted = subprocess.run([str(BIN / "flwr"), "run", str(NOOP_APP), "bench", "--run-config", run_config],
                                   cwd=logs, env={**env, "FLWR_HOME": str(cli_home)}, capture_output=True, text=True)
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed: {submitted.stdout[-2000:]}{submitted.stderr[-2000:]}")
        deadline = time.monotonic() + 180 + 60 * rounds
        while not (results.is_file() and "finished" in (record := json.loads(results.read_text()))):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the run did not finish in time: see {logs}")
            processes.check()
            time.sleep(1)
    return record["rounds"]


def run_app(rounds: int, nodes: int, logs: Path) -> Rounds:
    """fedtune's app, quickstart at 32 px head only, on `fedtune server` and `nodes` `fedtune client`s."""
    env = _environment()
    port = _free_port()
    runs = logs / "runs"
    settings = [f"federation.num_clients={nodes}", f"federation.rounds={rounds}", "train.unfreeze=[]",
                "data.image_size=32", f"output.dir={runs}"]
    with Processes(logs, env) as processes:
        server_command = [sys.executable, "-m", "fedtune", "server", str(REPO / "configs/quickstart.yaml"),
                          "--insecure", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(logs / "state"),
                          *(arg for item in settings for arg in ("--set", item))]
        server = processes.start("server", server_command, FLWR_HOME=str(logs / "server-home"))
        for partition in range(nodes):
            processes.start(f"node-{partition}", [sys.executable, "-m", "fedtune", "client", "--insecure",
                                                  "--server", f"127.0.0.1:{port}", "--port", str(_free_port()),
                                                  "--partition-id", str(partition), "--num-partitions", str(nodes),
                                                  "--cache-dir", str(logs / f"cache-{partition}")],
                            FLWR_HOME=str(logs / f"node-{partition}-home"))
        try:
            code = server.wait(timeout=300 + 120 * rounds)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the run did not finish in time: see {logs}") from None
        if code != 0:
            raise RuntimeError(f"fedtune server exited with code {code}: see {logs / 'server.log'}")
    (history,) = runs.glob("quickstart-*/history.json")
    return [{"seconds": r.seconds, "replies": r.clients_ok} for r in RunDirectory.load_history(history)[1:]]


SETUPS = [
    Setup("stock", "(a) no-op app, stock Flower 1.41: subprocess isolation, Flower's grid",
          partial(run_noop, node=_stock_node, grid="flower")),
    Setup("fedtune", "(b) no-op app, fedtune's ClientApp worker + fedtune's grid",
          partial(run_noop, node=_fedtune_node, grid="prompt")),
    Setup("probe", f"(c) probe: (b) + SuperNode sleeps cut to {SLEEP_CAP} s (not shipped)",
          partial(run_noop, node=_probe_node, grid="prompt")),
    Setup("app-worker", "(e) fedtune app, fedtune server + fedtune client (ClientApp worker)", run_app),
]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarize(label: str, rounds: Rounds, nodes: int) -> dict[str, object]:
    later = rounds[1:]
    seconds = [r["seconds"] for r in later]
    pids = {pid for r in rounds for pid in r.get("pids", [])}
    return {
        "setup": label,
        "round 1 (s)": round(rounds[0]["seconds"], 2),
        "later rounds, median (s)": _median(seconds),
        "min-max (s)": f"{min(seconds):.2f}-{max(seconds):.2f}",
        "n": len(later),
        "dispatch, median (s)": _median([d for r in later for d in r.get("dispatch", [])]),
        "return, median (s)": _median([d for r in later for d in r.get("return", [])]),
        "ClientApp processes": len(pids) or None,
        "replies": f"{sum(r['replies'] for r in rounds)}/{len(rounds) * nodes}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="Rounds per setup (the first is reported apart).")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--setups", nargs="+", choices=[s.key for s in SETUPS], default=["stock", "fedtune", "probe"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "round-time")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 is reported apart from the median")
    args.out = args.out.resolve()  # the processes run in folders of their own
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = []
    for setup in (s for s in SETUPS if s.key in args.setups):
        print(f"running {setup.label} ...", flush=True)
        logs = args.out / setup.key
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        try:
            rows.append(summarize(setup.label, setup.run(args.rounds, args.nodes, logs), args.nodes))
        except RuntimeError as error:  # one setup that fails is a result too; the others still run
            rows.append({"setup": setup.label, "failed": str(error)})
        print(compare_table(rows[-1:], list(rows[-1])), flush=True)
    note = (f"{args.nodes} nodes on loopback, {args.rounds} rounds per setup; "
            f"{os.cpu_count()} CPU cores shared with other work (1-min load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after).")
    table = write_results(args.out, rows, note)
    print(f"\n{table}\n\n{note}")


if __name__ == "__main__":
    main()
