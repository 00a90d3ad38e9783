"""Privacy evidence for the README: accuracy against epsilon, and DP-SGD's cost.

    python benchmarks/privacy.py table configs/quickstart.yaml --out benchmarks/results/privacy-digits
    python benchmarks/privacy.py table configs/antsbees.yaml --out benchmarks/results/privacy-antsbees
    python benchmarks/privacy.py overhead --out benchmarks/results/dp-overhead

`table` runs `fedtune simulate` (the users' code path) head-only, 10 clients as configured and 1
client holding all the data, without privacy and with DP-SGD at epsilon 0.5, 1, 2, 3, 5, 8
(delta 1e-5) with the default DP batch (`auto`), and at epsilon 3 both choices, train.batch_size and
the full batch (DP-GD). It prints
final accuracy, the epsilon spent, the noise and sampling rate that limit it, and draws accuracy
against epsilon (privacy-utility.png). Every run uses FedAvg: DP-SGD clips the loss's per-sample
gradients, and FedProx's proximal term would bypass that.

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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from tables import write_results
from torch.utils.data import TensorDataset
from transfer import run_variant

from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.client.privacy import PrivacyLedger, train_private_round
from fedtune.config import DPSGDConfig, TrainConfig, load_config
from fedtune.data import load_split
from fedtune.engine import extract_features, train_one_round
from fedtune.params import first_trainable_index, trainable_stages
from fedtune.report import RunDirectory

EPSILONS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
COMPARED_EPSILON = 3.0  # where both DP batch choices run beside the default
SETTINGS: dict[str, list[str]] = {
    "10 clients": [],
    "1 client (all data)": ["federation.num_clients=1", "data.partition.scheme=iid"],
}
# Reproducible noise: the README's figures can be regenerated exactly (public data, no secret to keep).
COMMON = ["train.trainable_blocks=0", "strategy.name=fedavg", "privacy.dp_sgd.reproducible=true"]
CPU = torch.device("cpu")


def _dp(epsilon: float, *extra: str) -> list[str]:
    return ["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.target_epsilon={epsilon:g}",
            "privacy.dp_sgd.target_delta=1e-5", *extra]


def _variants(train_batch: int) -> dict[str, tuple[float | None, list[str]]]:
    """label -> (epsilon, None for non-private; overrides). Plain "epsilon X" rows use the defaults."""
    variants: dict[str, tuple[float | None, list[str]]] = {"non-private": (None, [])}
    for epsilon in EPSILONS:
        variants[f"epsilon {epsilon:g}"] = (epsilon, _dp(epsilon))
    for label, size in (("train.batch_size", str(train_batch)), ("full", "full")):
        variants[f"epsilon {COMPARED_EPSILON:g}, DP batch {label}"] = (
            COMPARED_EPSILON, _dp(COMPARED_EPSILON, f"privacy.dp_sgd.batch_size={size}"))
    return variants


def _dp_batch(config: Path, overrides: list[str]) -> str:
    """What a client's DP batches held in this run: `auto` resolved as the server resolves it."""
    cfg = load_config(config, overrides=[*overrides, "train.unfreeze=[]"])
    return str(cfg.dp_batch_size()) if cfg.privacy.dp_sgd.enabled else "-"


def table(config: Path, out: Path) -> None:
    rows = []
    for setting, setting_overrides in SETTINGS.items():
        for privacy, (epsilon, privacy_overrides) in _variants(load_config(config).train.batch_size).items():
            overrides = [*COMMON, *setting_overrides, *privacy_overrides]
            slug = "".join(c if c.isalnum() else "-" for c in f"{setting} {privacy}").strip("-")
            run_dir = run_variant(config, overrides, out / slug)
            history = RunDirectory.load_history(run_dir / "history.json")
            sample = {}
            if (run_dir / "privacy.json").is_file():
                sample = json.loads((run_dir / "privacy.json").read_text())["sample_level"]
            noise = list(sample.get("noise_multiplier_by_client", {}).values())
            rates = list(sample.get("sample_rate_by_client", {}).values())
            rows.append({
                "setting": setting,
                "privacy": privacy,
                "target epsilon": epsilon if epsilon is not None else "inf",
                "DP batch": _dp_batch(config, overrides),
                "final accuracy": history[-1].central_accuracy,
                "best accuracy": max(r.central_accuracy or 0.0 for r in history[1:]),
                "epsilon spent (max over clients)": sample.get("epsilon_max", "-"),
                "noise multiplier (median)": statistics.median(noise) if noise else "-",
                "sampling rate (median)": statistics.median(rates) if rates else "-",
                "rounds": history[-1].round,
            })
    for row in rows:
        baseline = next(r for r in rows if r["setting"] == row["setting"] and r["privacy"] == "non-private")
        row["points below non-private"] = 100 * ((baseline["final accuracy"] or 0) - (row["final accuracy"] or 0))
    note = (f"Head only, FedAvg, delta 1e-5, {config.name}, reproducible noise; 'DP batch' is what each client's "
            "DP-SGD batches held (privacy.dp_sgd.batch_size, `auto` unless the row says). Accuracy on the server's "
            "held-out set after the last round.")
    print(write_results(out, rows, note))
    _plot(rows, out / "privacy-utility.png", title=config.stem)


def _plot(rows: list[dict], path: Path, *, title: str) -> None:
    """Final accuracy against epsilon (log axis), one line per setting; non-private as a dashed level."""
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for colour, setting in zip(("tab:blue", "tab:orange"), SETTINGS, strict=False):
        ours = [r for r in rows if r["setting"] == setting]
        sweep = [r for r in ours if r["privacy"].startswith("epsilon") and "DP batch" not in r["privacy"]]
        ax.plot([r["target epsilon"] for r in sweep], [r["final accuracy"] for r in sweep], color=colour,
                marker="o", label=f"{setting}: DP-SGD, defaults")
        for marker, batch in (("v", "train.batch_size"), ("*", "full")):
            compared = [r for r in ours if r["privacy"].endswith(f"DP batch {batch}")]
            ax.plot([r["target epsilon"] for r in compared], [r["final accuracy"] for r in compared], color=colour,
                    marker=marker, markersize=11, linestyle="none", label=f"{setting}: DP batch {batch}")
        baseline = next(r for r in ours if r["privacy"] == "non-private")
        ax.axhline(baseline["final accuracy"], color=colour, linestyle="--", linewidth=1,
                   label=f"{setting}: non-private (epsilon = inf)")
    ax.set_xscale("log")
    ax.set_xticks(list(EPSILONS), [f"{e:g}" for e in EPSILONS])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epsilon (delta = 1e-5, per client, whole run)")
    ax.set_ylabel("final accuracy (held-out set)")
    ax.set_title(f"Accuracy against privacy, head only: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    figure.savefig(path, dpi=120)


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
    engines = {clipping: DPSGDConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, clipping=clipping,
                                    batch_size=cfg.batch_size)
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
