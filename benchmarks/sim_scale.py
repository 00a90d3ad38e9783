"""A simulation's cost against the size of its federation: 100 to 100,000 registered clients, 10 or 100 sampled a round.

    python benchmarks/sim_scale.py                       # N = 100, 10,000, 100,000; 10 and 100 a round; 2 runs each
    python benchmarks/sim_scale.py --clients 100 100000 --per-round 10 --rounds 6 --repeats 3
    python benchmarks/sim_scale.py --per-round 100 --augment --out benchmarks/results/sim-scale-augmented

Each run is `fedtune simulate` of the quickstart task (EfficientNet-Lite0, ImageNet weights, 32 px,
head only, one local epoch, federated evaluation on the clients that train, every round) in a
process of its own: a fresh Ray, fresh caches. The data is an MNIST-format set made from
scikit-learn's digits (tests/mnist_format.py: each example a digits image with seeded noise), with
`--examples` examples for each of the N clients (iid) and 500 test images, loaded through fedtune's
real `torchvision:MNIST` source; the per-client work is the same at every N, except for one thing:
a client computes its frozen features the first time it is sampled and reuses them after (the
feature cache). At N = 100 with 100 sampled, every warm round's clients have them; at 100,000,
nearly every client is new. `--augment` (data.augment: a new random crop of each image every
epoch, so training features are never cached) makes every round compute them at every N.

Reported, for each (N, sampled per round), medians over the runs (run in turn, N by N):
- round 1 starts: seconds from launching the process to the start of round 1 (Python's imports,
  data, the model, Ray's start, round 0's central evaluation, the workers' warm-up);
- warm round: the period between the ends of two consecutive rounds, rounds 2..R (everything the
  server does per round, the checkpoint included), and its ratio to the same at N = 100;
- peak PSS: the largest proportional set size of the whole process tree (driver, Ray's daemons,
  workers), sampled every 0.5 s (/proc, Linux);
- cache disk: bytes under the clients' cache folder at the end of the run;
- bytes: sent per warm round as real nodes would receive them, the backbone as real nodes would
  receive it over the run (once per client), and the backbone the server actually serialised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proctree import tree_pss_bytes  # benchmarks/proctree.py, beside this script
from tables import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/mnist_format.py: the data set's maker


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _one_run(args: argparse.Namespace) -> None:
    """Child process: one simulation; its figures as JSON on the last line of stdout."""
    from fedtune import lifeline

    lifeline.hold()  # Ray's processes end with this one, even when a timeout kills it
    import fedtune.server.run as run_module
    from fedtune.config import load_config
    from fedtune.report import RunDirectory
    from fedtune.simulation import simulate

    scratch = Path(args.scratch)
    cache = scratch / "cache"
    os.environ["FEDTUNE_CACHE_DIR"] = str(cache)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "data.source=torchvision:MNIST", f"data.root={args.data}", "data.download=false", "data.image_size=32",
        "data.val_fraction=0.25", "data.partition.scheme=iid", "data.partition.min_examples=2",
        f"federation.num_clients={args.child_clients}", f"federation.clients_per_round={args.child_per_round}",
        f"federation.rounds={args.rounds}", "train.trainable_blocks=0", "train.unfreeze=[]", "train.local_epochs=1",
        "early_stopping.enabled=false", f"output.dir={scratch / 'runs'}", f"data.augment={str(args.augment).lower()}",
    ])
    starts: list[float] = []
    ends: list[float] = []
    play_round, append_round = run_module.play_round, RunDirectory.append_round

    def timed_round(*a: object, **k: object) -> object:
        starts.append(time.time())
        return play_round(*a, **k)  # type: ignore[arg-type]

    def timed_append(self: RunDirectory, record: object) -> None:
        append_round(self, record)  # type: ignore[arg-type]
        ends.append(time.time())

    # This process's run only: a measurement.
    run_module.play_round = timed_round  # type: ignore[assignment]
    RunDirectory.append_round = timed_append  # type: ignore[method-assign]
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    print(json.dumps({
        "round_1_starts": starts[0] - args.launched,
        "warm_rounds": [b - a for a, b in zip(ends[1:], ends[2:], strict=False)],  # ends[0]: round 0
        "cache_bytes": _folder_bytes(cache),
        "bytes_sent_warm": statistics.median(r.bytes_sent for r in history[2:]),
        "backbone_on_nodes": sum(r.bytes_sent_backbone for r in history),
        "backbone_serialised": sum(r.bytes_backbone_serialised or 0 for r in history),
        "rounds": len(history) - 1,
    }))


def _run_in_child(args: argparse.Namespace, clients: int, per_round: int, data: Path, log: Path) -> dict:
    """One run in a process of its own, its process tree's PSS sampled meanwhile."""
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as scratch:
        command = [sys.executable, __file__, "--child-clients", str(clients), "--child-per-round", str(per_round),
                   "--rounds", str(args.rounds), "--data", str(data), "--scratch", scratch,
                   "--launched", repr(time.time()), *(["--augment"] if args.augment else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with log.open("w") as output:
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=output, text=True, env=env)
            peak = 0
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.wait(0.5):
                    peak = max(peak, tree_pss_bytes(child.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            stdout, _ = child.communicate(timeout=600 + 120 * args.rounds)
            done.set()
            sampler.join()
            output.write(stdout)
    if child.returncode != 0:
        raise RuntimeError(f"N={clients}, {per_round} a round: exited with code {child.returncode}; see {log}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["peak_pss"] = peak
    return figures


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--per-round", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--examples", type=int, default=8, help="Train examples per client in the data set made.")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds per run (round 1 is left out of warm rounds).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each setup.")
    parser.add_argument("--augment", action="store_true", help="data.augment on: no cached training features.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sim-scale")
    parser.add_argument("--work", type=Path, default=None, help="Where the data sets go (default: a temp folder).")
    for hidden in ("--child-clients", "--child-per-round"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_clients:
        _one_run(args)
        return
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: round 1 is left out and a median needs rounds")
    if 100 not in args.clients:
        parser.error("the ratios are to N = 100: keep 100 in --clients")
    from mnist_format import write_digits_as_mnist

    args.out = args.out.resolve()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="sim-scale-data-"))
    load_before = os.getloadavg()[0]
    results: dict[tuple[int, int], list[dict]] = {}
    for clients in args.clients:
        data = write_digits_as_mnist(work / f"n{clients}", train=clients * args.examples, test=500)
        for per_round in args.per_round:
            if per_round > clients:
                continue
            for repeat in range(1, args.repeats + 1):
                print(f"N={clients:,}, {per_round} a round, run {repeat}/{args.repeats} ...", flush=True)
                log = args.out / "logs" / f"n{clients}-k{per_round}-{repeat}.log"
                figures = _run_in_child(args, clients, per_round, data, log)
                results.setdefault((clients, per_round), []).append(figures)
                print(f"  round 1 starts after {figures['round_1_starts']:.1f} s; warm rounds "
                      f"{' '.join(f'{s:.2f}' for s in figures['warm_rounds'])} s; peak PSS "
                      f"{figures['peak_pss'] / 2**30:.2f} GiB; cache {_mib(figures['cache_bytes'])} MiB", flush=True)

    def warm(key: tuple[int, int]) -> float:
        return statistics.median(statistics.median(run["warm_rounds"]) for run in results[key])

    rows = []
    for (clients, per_round), runs in results.items():
        base = (100, per_round)
        rows.append({
            "N clients": f"{clients:,}",
            "sampled a round": per_round,
            "round 1 starts (s)": f"{statistics.median(r['round_1_starts'] for r in runs):.1f}",
            "warm round (s)": f"{warm((clients, per_round)):.2f}",
            "x N=100": f"{warm((clients, per_round)) / warm(base):.2f}" if base in results else "-",
            "runs' warm medians (s)": " ".join(f"{statistics.median(r['warm_rounds']):.2f}" for r in runs),
            "peak PSS (GiB)": f"{max(r['peak_pss'] for r in runs) / 2**30:.2f}",
            "cache disk (MiB)": _mib(statistics.median(r["cache_bytes"] for r in runs)),
            "sent a warm round (MiB)": _mib(statistics.median(r["bytes_sent_warm"] for r in runs)),
            "backbone as on nodes (MiB)": _mib(statistics.median(r["backbone_on_nodes"] for r in runs)),
            "backbone serialised (MiB)": _mib(statistics.median(r["backbone_serialised"] for r in runs)),
        })
    note = (f"{args.rounds} rounds a run (round 1 left out of warm rounds), {args.repeats} runs a setup; "
            f"{args.examples} train examples a client; data.augment {str(args.augment).lower()}; {os.cpu_count()} "
            f"CPU cores (1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after).")
    raw = [{"clients": c, "per_round": k, "runs": runs} for (c, k), runs in results.items()]
    table = write_results(args.out, rows, note, raw={"runs": raw})
    print(f"\n{table}\n\n{note}")


if __name__ == "__main__":
    main()
