"""Privacy evidence for the README: accuracy at epsilon 1, 3, 8 against non-private, and DP-SGD's cost.

    python benchmarks/privacy.py table configs/quickstart.yaml --out benchmarks/results/privacy-digits
    python benchmarks/privacy.py table configs/antsbees.yaml --out benchmarks/results/privacy-antsbees
    python benchmarks/privacy.py overhead --out benchmarks/results/dp-overhead

`table` runs `fedtune simulate` (the users' code path) head-only, 10 clients as configured and 1
client holding all the data, non-private and with DP-SGD at epsilon 1, 3, 8 (delta 1e-5), and
prints final accuracy, the epsilon spent, the noise and sampling rate that limit it, and wall time.
Every run uses FedAvg: DP-SGD clips the loss's per-sample gradients, and FedProx's proximal term
would bypass that.

`overhead` times one client's local round in-process, on the same data and model (head only, and
head + last block): non-private, DP-SGD with ghost clipping, and DP-SGD with Opacus's per-sample
gradients (hooks mode); repeated in turns, it prints the medians and their ratios to non-private.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tables import write_results
from torch.utils.data import TensorDataset
from transfer import run_variant

from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.client.privacy import PrivacyLedger, train_private_round
from fedtune.config import DPSGDConfig, TrainConfig
from fedtune.console import compare_table
from fedtune.data import load_split
from fedtune.engine import extract_features, train_one_round
from fedtune.params import first_trainable_index, trainable_stages
from fedtune.report import RunDirectory

PRIVACY: dict[str, list[str]] = {
    "non-private": [],
    "epsilon 1": ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=1", "privacy.dp_sgd.target_delta=1e-5"],
    "epsilon 3": ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=3", "privacy.dp_sgd.target_delta=1e-5"],
    "epsilon 8": ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=8", "privacy.dp_sgd.target_delta=1e-5"],
}
SETTINGS: dict[str, list[str]] = {
    "10 clients": [],
    "1 client (all data)": ["federation.num_clients=1", "data.partition.scheme=iid"],
}
COMMON = ["train.trainable_blocks=0", "strategy.name=fedavg"]
CPU = torch.device("cpu")


def table(config: Path, out: Path) -> None:
    rows = []
    for setting, setting_overrides in SETTINGS.items():
        for privacy, privacy_overrides in PRIVACY.items():
            slug = "".join(c if c.isalnum() else "-" for c in f"{setting} {privacy}").strip("-")
            run_dir = run_variant(config, [*COMMON, *setting_overrides, *privacy_overrides], out / slug)
            history = RunDirectory.load_history(run_dir / "history.json")
            summary = json.loads((run_dir / "summary.json").read_text())
            sample = {}
            if (run_dir / "privacy.json").is_file():
                sample = json.loads((run_dir / "privacy.json").read_text())["sample_level"]
            noise = list(sample.get("noise_multiplier_by_client", {}).values())
            rates = list(sample.get("sample_rate_by_client", {}).values())
            rows.append({
                "setting": setting,
                "privacy": privacy,
                "final accuracy": history[-1].central_accuracy,
                "best accuracy": max(r.central_accuracy or 0.0 for r in history[1:]),
                "epsilon spent (max over clients)": sample.get("epsilon_max", "-"),
                "noise multiplier (median)": statistics.median(noise) if noise else "-",
                "sampling rate (median)": statistics.median(rates) if rates else "-",
                "rounds": history[-1].round,
                # Round 1 also delivers the backbone and computes the cached features.
                "seconds per round (median of rounds 2+)": statistics.median(r.seconds for r in history[2:]),
                "wall seconds": summary["wall_seconds"],
            })
    for row in rows:
        baseline = next(r for r in rows if r["setting"] == row["setting"] and r["privacy"] == "non-private")
        row["points below non-private"] = 100 * ((baseline["final accuracy"] or 0) - (row["final accuracy"] or 0))
        row["round time vs non-private"] = (
            row["seconds per round (median of rounds 2+)"] / baseline["seconds per round (median of rounds 2+)"]
        )
    write_table(rows, out)


def _interleaved_medians(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, float]]:
    """Median CPU and wall seconds of each run, the runs taking turns so that load changes hit all alike.

    CPU seconds (the process's, on one thread, nothing waited for) are what the ratios use: on a
    machine shared with other processes, wall time also counts the time they held the core.
    """
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    wall: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            run()
            cpu[label].append(time.process_time() - cpu_started)
            wall[label].append(time.perf_counter() - wall_started)
    return {label: {"cpu": statistics.median(cpu[label]), "wall": statistics.median(wall[label])} for label in runs}


def _plain_round(model: StagedModel, initial: dict, data: TensorDataset, stages: list[str], start: int,
                 cfg: TrainConfig) -> None:
    model.load_state_dict(initial)
    train_one_round(model, data, stages=stages, cfg=cfg, start=start, freeze_statistics=True, device=CPU)


def _private_round(model: StagedModel, initial: dict, data: TensorDataset, stages: list[str], start: int,
                   cfg: TrainConfig, dp: DPSGDConfig, calibrated: PrivacyLedger) -> None:
    """A steady-state round: the noise was calibrated in round 1 (once per run), as in a federation."""
    model.load_state_dict(initial)
    ledger = PrivacyLedger(noise_multiplier=calibrated.noise_multiplier, sample_rate=calibrated.sample_rate)
    train_private_round(model, data, stages=stages, cfg=cfg, dp=dp, ledger=ledger, planned_rounds=8,
                        start=start, device=CPU)


def overhead(out: Path, repeats: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one client's round on one core: other processes share this machine
    train = load_split("digits", "train", root=None, download=False, seed=0)
    train = train.with_transform(preprocessing_for("efficientnet_lite0").at_size(64).transform(augment=False))
    model = build_model("efficientnet_lite0", num_classes=10, weights="imagenet")
    cfg = TrainConfig(batch_size=32, local_epochs=1, optimizer="adam", lr=0.003)
    engines = {clipping: DPSGDConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, clipping=clipping)
               for clipping in ("ghost", "per_sample")}
    rows: list[dict] = []
    raw: dict[str, dict] = {}
    for label, blocks in (("head only", 0), ("head + last block", 1)):
        stages = trainable_stages(model, blocks)
        start = first_trainable_index(model, stages)
        # What a client trains on when the backbone below is frozen: features cached once.
        features = extract_features(model, train, stop=start, batch_size=64, device=CPU)
        data = TensorDataset(*features.tensors)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        calibrated = PrivacyLedger()
        train_private_round(model, data, stages=stages, cfg=cfg, dp=engines["ghost"], ledger=calibrated,
                            planned_rounds=8, start=start, device=CPU)  # round 1 calibrates the noise
        runs = {"plain": partial(_plain_round, model, initial, data, stages, start, cfg)}
        runs |= {clipping: partial(_private_round, model, initial, data, stages, start, cfg, dp, calibrated)
                 for clipping, dp in engines.items()}
        for run in runs.values():
            run()  # warm-up: first-call allocations and lazy imports
        medians = _interleaved_medians(runs, repeats)
        seconds = {run: figures["cpu"] for run, figures in medians.items()}
        raw[label] = medians
        rows.append({
            "trainable": label,
            "input per example": "x".join(map(str, features.tensors[0].shape[1:])),
            "examples": len(data),
            "non-private, median CPU s": seconds["plain"],
            "ghost clipping, median CPU s": seconds["ghost"],
            "per-sample (Opacus hooks), median CPU s": seconds["per_sample"],
            "ghost / non-private": seconds["ghost"] / seconds["plain"],
            "per-sample / non-private": seconds["per_sample"] / seconds["plain"],
            "repeats": repeats,
        })
    note = (f"One client's local round (1 epoch, batch {cfg.batch_size}, Adam) on cached Lite0 features of the "
            "digits train split at 64 px, CPU, 1 thread; medians of interleaved repeats, in the process's CPU "
            "seconds (wall-clock medians are in table.json). DP-SGD: Poisson "
            "sampling, epsilon 3, delta 1e-5 over 8 planned rounds. Ghost clipping: "
            "fedtune/client/fast_clipping.py; per-sample: Opacus 1.6 make_private (hooks mode).")
    print(write_results(out, rows, note, raw={"median seconds (cpu, wall)": raw}))


def write_table(rows: list[dict], out: Path) -> None:
    text = compare_table(rows, list(rows[0]))
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    table_parser = commands.add_parser("table", help="accuracy at epsilon 1, 3, 8 against non-private")
    table_parser.add_argument("config", type=Path)
    table_parser.add_argument("--out", type=Path, required=True)
    overhead_parser = commands.add_parser("overhead", help="time of a DP-SGD round against a plain one")
    overhead_parser.add_argument("--out", type=Path, required=True)
    overhead_parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.command == "table":
        table(args.config, args.out)
    else:
        overhead(args.out, args.repeats)


if __name__ == "__main__":
    main()
