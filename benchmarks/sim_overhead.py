"""A warm simulated round against the compute it simulates, done in a plain loop in one process.

    python benchmarks/sim_overhead.py table --out benchmarks/results/sim-overhead
    python benchmarks/sim_overhead.py profile --blocks 0 --out benchmarks/results/sim-overhead

`table`, for head only and for head + last block (quickstart: EfficientNet-Lite0, digits at
64 px, 10 clients, all sampled every round, feature cache warm), in each of `--runs` runs:

(a) the plain loop, in this process: the same clients, partitions, seeds and local training
    (`train_one_round` on the cached frozen features), then FedAvg, then each client's local
    evaluation and the central evaluation, as the round does them; no Flower, no messages, no
    model restored. Its round 1 is a warm-up; its figure is the median of rounds 2 and later;
(b) `fedtune simulate` (a subprocess, as users run it) with the node caches of all the runs in one
    folder: the round time the run records (history.json), median of rounds 3 and later (rounds 1
    and 2 send the backbone, compute features and verify each node's cached file once per worker).

It prints the medians over runs, the median of each run's (b) / (a), the targets of issue 11
(1.5 head only, 1.2 with the last block) and the machine's load average while it ran (other
work on the machine slows either side unevenly), and writes table.md and table.json to --out.
The loop runs torch with the threads of one virtual client's worker (federation.client_cpus, 1):
it does on one core what the simulation does on all of them (2 workers here).

`profile` runs one simulation (in this process, Flower's engine on Ray) whose virtual clients
run the stock ClientApp with its steps timed in CPU seconds (benchmarks/timed_client.py), rounds
3 and later, and prints where the workers' time goes beside the plain loop's CPU time and both
round times; written to profile-<setting>.md in --out. CPU time is what other work on the machine
inflates least. To profile another fedtune (say, before a change), run the script from that
checkout's folder with it on PYTHONPATH: `python -m` and Ray's workers import from the current
folder first.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedtune.backbones import build_model, preprocessing_for
from fedtune.client.task import NodeIdentity, local_data
from fedtune.config import ExperimentConfig, load_config
from fedtune.console import compare_table
from fedtune.data import load_split
from fedtune.engine import evaluate, extract_features, train_one_round
from fedtune.params import first_trainable_index, load_tensors, trainable_stages, trainable_state_dict
from fedtune.protocol import ClientSettings
from fedtune.report import RunDirectory
from fedtune.server.evaluate import CentralEvaluator

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"
CPU = torch.device("cpu")
SETTINGS = {"head only": 0, "head + last block": 1}
TARGETS = {"head only": 1.5, "head + last block": 1.2}
FIRST_WARM_ROUND = 3


def _slug(label: str) -> str:
    return label.replace(" + ", "-plus-").replace(" ", "-")


def overrides(blocks: int, rounds: int) -> list[str]:
    return ["train.unfreeze=[]", f"train.trainable_blocks={blocks}", f"federation.rounds={rounds}"]


# --- (a) the plain loop ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Client:
    partition: int
    train: Dataset
    validation: Dataset


def plain_loop(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Each round's seconds, in total and by part (wall clock, and CPU as "cpu <part>"): the compute a
    simulated round does, in one process.

    torch gets the threads a virtual client's worker has (federation.client_cpus): the loop does
    the simulation's work on one worker's share of the machine.
    """
    torch.set_num_threads(cfg.federation.client_cpus)
    torch.manual_seed(cfg.seed)
    test_set = load_split(cfg.data.source, "test", root=cfg.data.root, download=cfg.data.download, seed=cfg.seed,
                          decode_now=True)
    preprocessing = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size)
    test_set = test_set.with_transform(preprocessing.transform(augment=False))
    num_classes = len(test_set.classes)
    model = build_model(cfg.model.backbone, num_classes=num_classes, weights=cfg.model.weights,
                        head_dropout=cfg.model.head_dropout)
    settings = ClientSettings.of(cfg, num_classes=num_classes, run_key="plain-loop")
    stages = trainable_stages(model, cfg.train.trainable_blocks_at(1))
    start = first_trainable_index(model, stages)
    statistics_travel = not settings.freeze_statistics
    clients = []
    for partition in range(cfg.federation.num_clients):  # the frozen features, as the warm feature cache holds them
        node = NodeIdentity(partition_id=partition, num_partitions=cfg.federation.num_clients,
                            cache_root=Path(tempfile.gettempdir()), simulated=True)
        data = local_data(settings, node)
        clients.append(_Client(partition, *(extract_features(model, split, stop=start, batch_size=64, device=CPU)
                                            for split in (data.train, data.validation))))
    evaluator = CentralEvaluator(test_set, device=CPU)
    evaluator(model, frozen_prefix=start)  # round 0: computes the test set's frozen features once, as the server does

    rounds = []
    for server_round in range(1, cfg.federation.rounds + 1):
        global_tensors = trainable_state_dict(model, stages, statistics=statistics_travel)
        started, cpu_started = time.perf_counter(), time.process_time()
        updates: list[tuple[dict[str, Tensor], int]] = []
        for client in clients:
            load_tensors(model, global_tensors, expected_keys=list(global_tensors))
            torch.manual_seed(settings.seed + client.partition)
            result = train_one_round(
                model, client.train, stages=stages, cfg=settings.train, start=start,
                freeze_statistics=settings.freeze_statistics, device=CPU,
                seed=settings.seed * 1000 + server_round * 100 + client.partition,
            )
            updates.append((trainable_state_dict(model, stages, statistics=statistics_travel), result.num_examples))
        total = sum(examples for _, examples in updates)
        load_tensors(model, {key: sum(update[key] * (examples / total) for update, examples in updates)
                             for key in global_tensors}, expected_keys=list(global_tensors))
        trained, cpu_trained = time.perf_counter(), time.process_time()
        for client in clients:
            evaluate(model, client.validation, start=start, device=CPU)
        evaluated, cpu_evaluated = time.perf_counter(), time.process_time()
        evaluator(model, frozen_prefix=start)
        finished, cpu_finished = time.perf_counter(), time.process_time()
        rounds.append({"seconds": finished - started, "train": trained - started,
                       "local evaluation": evaluated - trained, "central evaluation": finished - evaluated,
                       "cpu train": cpu_trained - cpu_started, "cpu local evaluation": cpu_evaluated - cpu_trained,
                       "cpu central evaluation": cpu_finished - cpu_evaluated})
    return rounds


# --- (b) the simulation ------------------------------------------------------------------------


def simulated_rounds(blocks: int, rounds: int, work: Path, *, label: str) -> list[float]:
    """The round times one `fedtune simulate` run records."""
    out = work / "runs" / label
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedtune", "simulate", str(CONFIG), "--set", f"output.dir={out}"]
    for item in overrides(blocks, rounds):
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(work / "node-caches")}
    with (out / "simulate.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    run_dir = sorted(p for p in out.iterdir() if (p / "summary.json").is_file())[-1]
    return [r.seconds for r in RunDirectory.load_history(run_dir / "history.json") if r.round > 0]


def table(out: Path, work: Path, *, runs: int, rounds: int) -> None:
    loop: dict[str, list[float]] = {label: [] for label in SETTINGS}
    loop_parts: dict[str, list[dict[str, float]]] = {label: [] for label in SETTINGS}
    simulated: dict[str, list[float]] = {label: [] for label in SETTINGS}
    load: list[float] = []  # the machine's 1-minute load average: other work on it slows both sides unevenly
    for run in range(runs):
        for label, blocks in SETTINGS.items():  # side by side: the loop, then the simulation, then the next setting
            load.append(os.getloadavg()[0])
            plain = plain_loop(load_config(CONFIG, overrides(blocks, rounds)))[1:]
            loop[label].append(statistics.median(r["seconds"] for r in plain))
            loop_parts[label] += plain
            recorded = simulated_rounds(blocks, rounds, work, label=f"{_slug(label)}-{run}")
            warm = recorded[FIRST_WARM_ROUND - 1:]
            simulated[label].append(statistics.median(warm))
            load.append(os.getloadavg()[0])
            print(f"run {run + 1}/{runs}, {label}: plain loop {loop[label][-1]:.3f} s, "
                  f"simulated {simulated[label][-1]:.3f} s (warm rounds {', '.join(f'{s:.2f}' for s in warm)}), "
                  f"ratio {simulated[label][-1] / loop[label][-1]:.2f}, load {load[-2]:.1f}-{load[-1]:.1f}",
                  flush=True)
    rows = []
    for label in SETTINGS:
        parts = {part: statistics.median(r[part] for r in loop_parts[label])
                 for part in ("train", "local evaluation", "central evaluation")}
        # Each run's ratio is of figures taken minutes apart: its median is steadier than a ratio of medians.
        ratio = statistics.median(s / p for s, p in zip(simulated[label], loop[label], strict=True))
        rows.append({
            "trainable": label,
            "plain loop round, s": statistics.median(loop[label]),
            "of it: train / local eval / central eval, s": " / ".join(f"{v:.3f}" for v in parts.values()),
            "simulated warm round, s": statistics.median(simulated[label]),
            "simulated / plain (median of runs)": ratio,
            "target": TARGETS[label],
            "met": "yes" if ratio <= TARGETS[label] else "no",
            "runs x warm rounds": f"{runs} x {rounds - FIRST_WARM_ROUND + 1}",
            "loop threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "load average": f"{min(load):.1f}-{max(load):.1f}",
        })
    write_table(rows, out / "table")


def write_table(rows: list[dict], stem: Path, *, columns: list[str] | None = None) -> None:
    text = compare_table(rows, columns or list(rows[0]))
    print(text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str))


# --- profile -----------------------------------------------------------------------------------

def profile(out: Path, work: Path, *, blocks: int, rounds: int) -> None:
    """One simulation with its virtual clients' steps timed (benchmarks/timed_client.py), beside the plain loop."""
    from fedtune.simulation import simulate

    label = next(name for name, value in SETTINGS.items() if value == blocks)
    profiles = work / "profile"
    profiles.mkdir(parents=True, exist_ok=True)
    # Ray's workers inherit the environment: they import the timed app by name, and cache where this run says.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    os.environ["FEDTUNE_PROFILE_DIR"] = str(profiles)
    os.environ["FEDTUNE_CACHE_DIR"] = str(work / "node-caches")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from timed_client import PROFILE_FROM_ROUND, STEPS, timed_app

    cfg = load_config(CONFIG, [*overrides(blocks, rounds), f"output.dir={work / 'profile-run'}"])
    outcome = simulate(cfg, client_app=timed_app)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    warm = [r.seconds for r in history if r.round >= PROFILE_FROM_ROUND]
    files = sorted(profiles.glob("messages-*.jsonl"))
    messages = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    per_round = len(warm)
    busy = sum(m["cpu"] for m in messages) / per_round
    cpu, share, wall = "CPU s per round", "share of the workers' CPU", "wall s per round"
    rows: list[dict] = []
    steps = {step: sum(m["steps"].get(step, 0.0) for m in messages) / per_round for step in STEPS}
    for step, seconds in steps.items():
        rows.append({"where": f"workers: {step}", cpu: seconds, share: seconds / busy})
    other = busy - sum(steps.values())
    rows.append({"where": "workers: the rest (parsing, Flower's mods, the reply, logging)", cpu: other,
                 share: other / busy})
    rows.append({"where": f"workers: all of each message ({len(files)} workers)", cpu: busy, share: 1.0,
                 wall: sum(m["wall"] for m in messages) / per_round})
    plain = plain_loop(load_config(CONFIG, overrides(blocks, rounds)))[1:]
    plain_cpu = 0.0
    for part in ("train", "local evaluation", "central evaluation"):
        seconds = statistics.median(r[f"cpu {part}"] for r in plain)
        plain_cpu += seconds
        rows.append({"where": f"plain loop: {part}", cpu: seconds})
    rows.append({"where": "plain loop: round", cpu: plain_cpu, wall: statistics.median(r["seconds"] for r in plain)})
    rows.append({"where": f"simulated round (median of rounds {PROFILE_FROM_ROUND}-{rounds})",
                 wall: statistics.median(warm)})
    write_table(rows, out / f"profile-{_slug(label)}", columns=["where", cpu, share, wall])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    table_parser = commands.add_parser("table", help="warm simulated round against the plain loop")
    table_parser.add_argument("--runs", type=int, default=3)
    table_parser.add_argument("--rounds", type=int, default=6)
    profile_parser = commands.add_parser("profile", help="where the virtual clients' time goes")
    profile_parser.add_argument("--blocks", type=int, choices=sorted(SETTINGS.values()), default=0)
    profile_parser.add_argument("--rounds", type=int, default=6)
    for sub in (table_parser, profile_parser):
        sub.add_argument("--out", type=Path, required=True, help="folder for table.md/table.json (or profile-*.md)")
        sub.add_argument("--work", type=Path, help="folder for the runs and node caches (default: a temporary one)")
    args = parser.parse_args()
    if args.rounds < FIRST_WARM_ROUND:
        parser.error(f"--rounds must be at least {FIRST_WARM_ROUND}: rounds 1-{FIRST_WARM_ROUND - 1} are not warm")
    with tempfile.TemporaryDirectory(prefix="sim-overhead-") as scratch:
        work = args.work or Path(scratch)
        if args.command == "table":
            table(args.out, work, runs=args.runs, rounds=args.rounds)
        else:
            profile(args.out, work, blocks=args.blocks, rounds=args.rounds)


if __name__ == "__main__":
    main()
