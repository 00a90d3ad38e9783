"""The round floor in simulation: a near-zero-work fedtune round against stock Flower's no-op round, same nodes.

    python benchmarks/sim_floor.py                      # 10 nodes, 8 rounds, 3 runs of each setup
    python benchmarks/sim_floor.py --nodes 10 --rounds 8 --repeats 5 --out benchmarks/results/sim-floor

Every setup is Flower 1.41's simulation engine on a local Ray, `--nodes` virtual nodes, one CPU per
virtual client (as `fedtune simulate` runs them), every node sampled every round:

(a) stock Flower: the no-op ClientApp of benchmarks/noop_app (it imports torch, as fedtune's does,
    and replies at once) and a ServerApp that sends each node one train message per round through
    Flower's own grid (`noopapp.play_rounds`);
(b) the same no-op app with fedtune's grid (fedtune/server/transport.py): what the transport adds;
(c) fedtune with federated evaluation off (`federation.evaluation.enabled=false`): the quickstart
    config at 32 px, head only (features cached after round 1), one local epoch, `--rounds` rounds;
    the real ServerApp and ClientApp, central evaluation and the checkpoint after every round;
(d) (c) with fedtune's default, federated evaluation every round: a second exchange per round.

A round's time is the period between the ends of two consecutive rounds as the ServerApp sees them
(for fedtune: its history records being appended, so the checkpoint and the run's other per-round
work count; for the no-op app: the exchange, which is all it does). Its CPU time is what the whole
process tree (the driver, Ray's daemons, the workers) spent in that period, read from /proc: on a
shared machine the wall time follows the load of others, the CPU time much less. Round 1 (model
delivery, the workers' first imports, the frozen features) is left out; each run's median is over
the later rounds, each setup's figure is the median over its runs, and the setups run interleaved
(a, b, c, d, a, b, ...) so that a change in the machine's load falls on all of them alike. Each
run is a process of its own (a fresh Ray, fresh caches), so no run inherits another's warm state.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Context


from proctree import tree_cpu_seconds  # benchmarks/proctree.py, beside this script
from tables import write_results

REPO = Path(__file__).resolve().parents[1]
NOOP_APP = REPO / "benchmarks" / "noop_app"


Ends = list[tuple[float, float]]  # at the start and at the end of each round: (time.monotonic(), tree CPU s)


def _mark(ends: Ends) -> None:
    ends.append((time.monotonic(), tree_cpu_seconds(os.getpid())))


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    run: Callable[[argparse.Namespace, Path], Ends]  # (arguments, scratch folder) -> ends of rounds 0..R


def _noop(args: argparse.Namespace, scratch: Path, *, grid_kind: str) -> Ends:
    """The no-op app in Flower's simulation engine, marked at the start and after each round."""
    import logging

    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    sys.path.insert(0, str(NOOP_APP))
    from noopapp import client, play_rounds, wait_for_nodes

    ends: Ends = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if grid_kind == "fedtune":
            from fedtune.server.transport import Transport

            grid = Transport(grid)
        node_ids = wait_for_nodes(grid, args.nodes)
        _mark(ends)
        play_rounds(grid, node_ids, args.rounds, after_round=lambda played: _mark(ends))

    run_simulation(server_app=app, client_app=client, num_supernodes=args.nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # fedtune's defaults
                                   "init_args": {"include_dashboard": False, "address": "local",
                                                 "logging_level": logging.WARNING}})
    return ends


def _fedtune(args: argparse.Namespace, scratch: Path, *, evaluate: bool) -> Ends:
    """`fedtune simulate` of the near-zero-work config, marked as each round's record is appended."""
    from fedtune.config import load_config
    from fedtune.report import RunDirectory
    from fedtune.simulation import simulate

    os.environ["FEDTUNE_CACHE_DIR"] = str(scratch / "cache")  # the virtual nodes' caches, fresh for this run
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"federation.num_clients={args.nodes}", f"federation.rounds={args.rounds}", "data.image_size=32",
        "train.unfreeze=[]", "train.local_epochs=1", f"federation.evaluation.enabled={str(evaluate).lower()}",
        f"output.dir={scratch / 'runs'}",
    ])
    ends: Ends = []
    append_round = RunDirectory.append_round

    def timed(self: RunDirectory, record: object) -> None:
        append_round(self, record)  # type: ignore[arg-type]
        _mark(ends)

    RunDirectory.append_round = timed  # type: ignore[method-assign]  # this process's run only: a measurement
    simulate(cfg)
    return ends


SETUPS = [
    Setup("stock", "(a) no-op app, stock Flower (Flower's grid)", lambda a, s: _noop(a, s, grid_kind="flower")),
    Setup("transport", "(b) no-op app, fedtune's grid", lambda a, s: _noop(a, s, grid_kind="fedtune")),
    Setup("fedtune-off", "(c) fedtune, near-zero work, federated evaluation off",
          lambda a, s: _fedtune(a, s, evaluate=False)),
    Setup("fedtune-every", "(d) fedtune, near-zero work, federated evaluation every round (default)",
          lambda a, s: _fedtune(a, s, evaluate=True)),
]


def _one_run(args: argparse.Namespace) -> None:
    """Child process: one run of one setup; the ends of its rounds as JSON on the last line of stdout."""
    from fedtune import lifeline

    lifeline.hold()  # Ray's processes end with this one, even when a timeout kills it
    setup = next(s for s in SETUPS if s.key == args.child)
    with tempfile.TemporaryDirectory(prefix="sim-floor-") as scratch:
        ends = setup.run(args, Path(scratch))
    print(json.dumps(ends))


def _run_in_child(setup: Setup, args: argparse.Namespace, log: Path, *, tries: int = 2) -> Ends:
    """One run in a process of its own, tried again once if it fails: on a loaded machine Ray's start
    sometimes fails (its raylet timed out waiting for its metrics agent here) and the simulation then hangs."""
    command = [sys.executable, __file__, "--child", setup.key, "--nodes", str(args.nodes),
               "--rounds", str(args.rounds)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for attempt in range(1, tries + 1):
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300 + 30 * args.rounds)
        except subprocess.TimeoutExpired as timeout:  # its output is bytes, whatever text=True says
            log.write_bytes((timeout.stdout or b"") + (timeout.stderr or b""))
            problem = f"{setup.key} did not finish in {timeout.timeout:.0f} s: see {log}"
        else:
            log.write_text(done.stdout + done.stderr)
            if done.returncode == 0:
                ends = [(float(at), float(cpu)) for at, cpu in json.loads(done.stdout.strip().splitlines()[-1])]
                if len(ends) == args.rounds + 1:
                    return ends
            problem = f"{setup.key} exited with code {done.returncode}, {args.rounds} rounds not timed: see {log}"
        print(f"  try {attempt} of {tries} failed: {problem}", flush=True)
    raise RuntimeError(problem)


def warm_rounds(ends: Ends) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds of rounds 2..R, from the marks at which rounds 0..R ended."""
    pairs = list(zip(ends[1:], ends[2:], strict=False))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8, help="Rounds per run (round 1 is left out).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each setup, interleaved.")
    parser.add_argument("--setups", nargs="+", choices=[s.key for s in SETUPS], default=[s.key for s in SETUPS])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sim-floor")
    parser.add_argument("--child", choices=[s.key for s in SETUPS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _one_run(args)
        return
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: round 1 is left out and a median needs rounds")
    if "stock" not in args.setups:
        parser.error("the ratios are to stock Flower: keep 'stock' in --setups")
    args.out = args.out.resolve()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    chosen = [s for s in SETUPS if s.key in args.setups]
    wall: dict[str, list[float]] = {s.key: [] for s in chosen}  # each run's median warm round
    cpu: dict[str, list[float]] = {s.key: [] for s in chosen}
    for repeat in range(1, args.repeats + 1):
        for setup in chosen:
            print(f"run {repeat}/{args.repeats}: {setup.label} ...", flush=True)
            log = args.out / "logs" / f"{setup.key}-{repeat}.log"
            seconds, cpu_seconds = warm_rounds(_run_in_child(setup, args, log))
            wall[setup.key].append(statistics.median(seconds))
            cpu[setup.key].append(statistics.median(cpu_seconds))
            print(f"  warm rounds {' '.join(f'{s:.3f}' for s in seconds)} s; CPU "
                  f"{' '.join(f'{s:.3f}' for s in cpu_seconds)} s", flush=True)
    stock_wall, stock_cpu = statistics.median(wall["stock"]), statistics.median(cpu["stock"])
    rows = []
    for setup in chosen:
        runs = wall[setup.key]
        rows.append({
            "setup": setup.label,
            "warm round, median (s)": round(statistics.median(runs), 3),
            "x stock Flower": f"{statistics.median(runs) / stock_wall:.2f}",
            "x stock, run by run": " ".join(f"{run / base:.2f}" for run, base in zip(runs, wall["stock"], strict=True)),
            "CPU s per round (process tree)": round(statistics.median(cpu[setup.key]), 3),
            "CPU x stock": f"{statistics.median(cpu[setup.key]) / stock_cpu:.2f}",
            "runs' medians (s)": " ".join(f"{m:.3f}" for m in runs),
        })
    note = (f"{args.nodes} virtual nodes, every one sampled every round, 1 CPU each; {args.rounds} rounds per run "
            f"(round 1 left out), {args.repeats} runs per setup, interleaved; {os.cpu_count()} CPU cores shared with "
            f"other work (1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after).")
    table = write_results(args.out, rows, note)
    print(f"\n{table}\n\n{note}")


if __name__ == "__main__":
    main()
