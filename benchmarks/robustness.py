"""Robust-aggregation evidence for the README: each attack against each defence, and what each defence costs.

    python benchmarks/robustness.py attacks --out benchmarks/results/robustness-attacks
    python benchmarks/robustness.py cost --out benchmarks/results/robustness-cost

`attacks`: 5 clients on the quickstart task at 32 px, head only, `--rounds` rounds; 1 or 2 of them
attack. The attackers are tests/probe_clients.py's `attack_app`: they train for real, then corrupt
their reply: `scaled` (update x 1e6), `sign-flip` (x -10), `noise` (Gaussian, sigma 1 per
coordinate), `lie` (their own update, claimed to come from 10^12 examples) and `lie-poison` (a
random direction of an honest update's norm, claimed from 10^12 examples: within the norm bound,
to show what the bound alone cannot stop). Each defence: FedAvg without the bound (what the
attacks do), FedAvg with the default bound (rejecting) and with it clipping instead, and each
robust rule with the default bound and without it. Each run is compared with the same defence
run by the honest clients alone (the attackers take no part). The table gives final accuracy,
points below the honest-alone run, the updates the bound rejected / clipped / capped (totals), and
wall seconds: medians over `--seeds`.

`cost`: the default task (configs/quickstart.yaml as it is: 10 clients, 64 px, 8 rounds, the last
block unfrozen from round 4), no attacker; each defence against plain FedAvg without the bound:
final accuracy and points below (medians over seeds), seconds per round; and the milliseconds one
aggregation takes (bound + strategy) for 10 replies of that task's trainable tensors, in-process.

Every simulation runs in a process of its own (`fedtune simulate`'s code path with the attack
ClientApp), sharing one node cache, so the backbone and frozen features are computed once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
ATTACKS = ("scaled", "sign-flip", "noise", "lie", "lie-poison")
ATTACK_TASK = ["data.image_size=32", "federation.num_clients=5", "train.trainable_blocks=0", "train.unfreeze=[]"]


def defences(attackers: int, clients: int) -> dict[str, list[str]]:
    """Each defence's overrides, its robust rule set to tolerate `attackers` where `clients` allow it."""
    def rule(name: str) -> list[str]:
        if name == "fedtrimmedavg":
            return [f"strategy.name={name}", f"strategy.trim_fraction={max(attackers, 1) / clients:g}"]
        if name in ("krum", "multikrum"):
            return [f"strategy.name={name}", f"strategy.num_malicious={min(max(attackers, 1), (clients - 3) // 2)}"]
        if name == "bulyan":
            return [f"strategy.name={name}", f"strategy.num_malicious={min(max(attackers, 1), (clients - 3) // 4)}"]
        return [f"strategy.name={name}"]

    table = {"fedavg, no bound": ["strategy.bound.enabled=false"], "fedavg + bound (default)": [],
             "fedavg + bound, clip": ["strategy.bound.norm_action=clip"]}
    for name in ROBUST:
        table[f"{name} + bound"] = rule(name)
        table[f"{name}, no bound"] = [*rule(name), "strategy.bound.enabled=false"]
    return table


def simulate_once(config: Path, overrides: list[str], attacks: str, out: Path, cache: Path) -> dict[str, Any]:
    """One simulation in a process of its own; its history's figures."""
    out.mkdir(parents=True, exist_ok=True)
    done = out / "result.json"
    if done.is_file():  # a re-run of the benchmark continues where it stopped
        return json.loads(done.read_text())
    command = [sys.executable, __file__, "_run", str(config), "--attacks", attacks, "--out", str(out),
               *[arg for item in overrides for arg in ("--set", item)]]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=sys.stderr, env=env)
    result = json.loads(done.read_text())
    result["wall_seconds"] = time.monotonic() - started
    done.write_text(json.dumps(result))
    return result


def _run(config: Path, overrides: list[str], attacks: str, out: Path) -> None:
    """The child process: the simulation with the attack ClientApp; writes result.json."""
    from probe_clients import ATTACKS_ENV, attack_app

    from fedtune.config import load_config
    from fedtune.report import RunDirectory
    from fedtune.simulation import simulate

    os.environ[ATTACKS_ENV] = attacks
    cfg = load_config(config, [*overrides, f"output.dir={out / 'runs'}"])
    outcome = simulate(cfg, client_app=attack_app)
    history = RunDirectory.load_history(outcome.run_dir)
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    (out / "result.json").write_text(json.dumps({
        "accuracy": history[-1].central_accuracy,
        "accuracy_by_round": [r.central_accuracy for r in history],
        "seconds_per_round": statistics.median(r.seconds for r in history[2:]) if len(history) > 2 else None,
        **{key: summary[key] for key in ("updates_rejected_norm_total", "updates_clipped_total",
                                         "weights_capped_total", "clients_rejected_total")},
    }))


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def attacks_table(out: Path, *, seeds: list[int], rounds: int, attacks: list[str], attackers_counts: list[int],
                  only: list[str] | None) -> list[dict[str, Any]]:
    config = REPO / "configs" / "quickstart.yaml"
    cache = out / "node-caches"
    rows = []
    for attackers in attackers_counts:
        for defence, overrides in defences(attackers, 5).items():
            if only and not any(defence.startswith(name) for name in only):
                continue
            settings = [*ATTACK_TASK, f"federation.rounds={rounds}", *overrides]
            absent = ",".join(f"{p}:absent" for p in range(attackers))
            alone = {seed: simulate_once(config, [*settings, f"seed={seed}"], absent,
                                         out / _slug(f"{defence}-{attackers}-alone-s{seed}"), cache) for seed in seeds}
            for attack in attacks:
                plan = ",".join(f"{p}:{attack}" for p in range(attackers))
                results = {seed: simulate_once(config, [*settings, f"seed={seed}"], plan,
                                               out / _slug(f"{defence}-{attackers}-{attack}-s{seed}"), cache)
                           for seed in seeds}
                rows.append({
                    "defence": defence,
                    "attack": attack,
                    "attackers": attackers,
                    "accuracy": _median([r["accuracy"] for r in results.values()]),
                    "honest alone": _median([r["accuracy"] for r in alone.values()]),
                    "points below": _median([100 * (alone[s]["accuracy"] - results[s]["accuracy"]) for s in seeds]),
                    "rejected": _median([r["updates_rejected_norm_total"] for r in results.values()]),
                    "clipped": _median([r["updates_clipped_total"] for r in results.values()]),
                    "capped": _median([r["weights_capped_total"] for r in results.values()]),
                    "seconds": _median([r["wall_seconds"] for r in results.values()]),
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def aggregation_milliseconds(repeats: int = 5) -> dict[str, float]:
    """One aggregation (bound + strategy) of 10 replies of the default task's trainable tensors."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune import messages as keys
    from fedtune.backbones import build_model
    from fedtune.config import load_config
    from fedtune.params import trainable_stages, trainable_state_dict
    from fedtune.strategies import build_strategy
    from fedtune.strategies.bound import UpdateBound, bound_applies

    # What Flower's ServerApp runtime sets before a strategy runs (flwr/server/compat/app.py):
    # messages take their metadata from it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    config = REPO / "configs" / "quickstart.yaml"
    model = build_model("efficientnet_lite0", num_classes=10, weights="none")
    sent = {k: v.numpy() for k, v in trainable_state_dict(model, trainable_stages(model, 1)).items()}
    buffers = frozenset(name for name, _ in model.named_buffers())
    rng = np.random.default_rng(0)
    timings = {}
    for defence, overrides in defences(1, 10).items():
        cfg = load_config(config, overrides)
        bound = UpdateBound(cfg.strategy.bound, buffer_keys=buffers) if bound_applies(cfg) else None
        samples = []
        for _ in range(repeats):
            strategy = build_strategy(cfg, buffer_keys=buffers)
            instruction = RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})
            replies = [
                Message(RecordDict({
                    keys.ARRAYS: ArrayRecord({k: Array((v + rng.normal(scale=0.01, size=v.shape)).astype(v.dtype))
                                              for k, v in sent.items()}),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 100 + n, "train_loss": 1.0, "train_accuracy": 0.5}),
                }), reply_to=Message(instruction, n + 1, "train"))
                for n in range(10)
            ]
            started = time.perf_counter()
            if bound is not None:
                replies = bound.apply(replies, ArrayRecord({k: Array(v) for k, v in sent.items()}), server_round=1,
                                      name_of=str).kept
            strategy.aggregate_train(1, replies)
            samples.append(1000 * (time.perf_counter() - started))
        timings[defence] = statistics.median(samples)
    return timings


def cost_table(out: Path, *, seeds: list[int], only: list[str] | None) -> list[dict[str, Any]]:
    config = REPO / "configs" / "quickstart.yaml"
    cache = out / "node-caches"
    milliseconds = aggregation_milliseconds()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for defence, overrides in defences(1, 10).items():
        if defence.endswith((", no bound", ", clip")) and defence != "fedavg, no bound":
            continue  # without attackers the bound changes nothing but the weights of the largest clients
        if only and not any(defence.startswith(name) for name in only) and defence != "fedavg, no bound":
            continue
        results[defence] = {
            seed: simulate_once(config, [f"seed={seed}", *overrides], "", out / _slug(f"{defence}-s{seed}"), cache)
            for seed in seeds
        }
    baseline = results["fedavg, no bound"]
    rows = []
    for defence, by_seed in results.items():
        rows.append({
            "defence": defence,
            "accuracy": _median([r["accuracy"] for r in by_seed.values()]),
            "fedavg accuracy": _median([r["accuracy"] for r in baseline.values()]),
            "points below fedavg": _median([100 * (baseline[s]["accuracy"] - by_seed[s]["accuracy"]) for s in seeds]),
            "seconds per round": _median([r["seconds_per_round"] for r in by_seed.values()]),
            "aggregation ms": milliseconds[defence],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _write(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    from fedtune.console import compare_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    table = compare_table(rows, list(rows[0]))
    (out / "table.md").write_text(table + "\n")
    print(table)
    if "attack" in rows[0]:
        summary = compare_table(*_points_below_by_attack(rows))
        (out / "points-below.md").write_text(summary + "\n")
        print(summary)


def _points_below_by_attack(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Defences by attack and number of attackers: points below the honest clients alone."""
    columns = list(dict.fromkeys(f"{r['attack']} x{r['attackers']}" for r in rows))
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        table.setdefault(row["defence"], {"defence": row["defence"]})[f"{row['attack']} x{row['attackers']}"] = (
            round(row["points below"], 1)
        )
    return list(table.values()), ["defence", *columns]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    attacks = commands.add_parser("attacks", help="each attack against each defence, 5 clients")
    cost = commands.add_parser("cost", help="each defence without attackers on the default task")
    for sub in (attacks, cost):
        sub.add_argument("--out", type=Path, required=True, help="folder for the runs and the table")
        sub.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        sub.add_argument("--only", nargs="+", help="defences whose names start with these (default: all)")
    attacks.add_argument("--rounds", type=int, default=10)
    attacks.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    attacks.add_argument("--attackers", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    one = commands.add_parser("_run", help=argparse.SUPPRESS)
    one.add_argument("config", type=Path)
    one.add_argument("--attacks", default="")
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    command = " ".join(["python benchmarks/robustness.py", *sys.argv[1:]])
    args.out = args.out.resolve()  # the simulations run in processes of their own, and Ray workers elsewhere
    if args.command == "_run":
        _run(args.config, args.overrides, args.attacks, args.out)
    elif args.command == "attacks":
        _write(attacks_table(args.out, seeds=args.seeds, rounds=args.rounds, attacks=args.attacks,
                             attackers_counts=args.attackers, only=args.only), args.out, command)
    else:
        _write(cost_table(args.out, seeds=args.seeds, only=args.only), args.out, command)


if __name__ == "__main__":
    main()
