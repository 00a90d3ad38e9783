"""Data efficiency: accuracy against the fraction of each client's data, pretrained against scratch,
federated against centralised, with the rounds and the compute each spends (issue 13).

    python benchmarks/efficiency.py configs/antsbees.yaml --out benchmarks/results/efficiency-antsbees
    python benchmarks/efficiency.py configs/quickstart.yaml --out benchmarks/results/efficiency-digits

Every point is one `fedtune simulate` run (the users' code path; benchmarks/transfer.py's
run_variant: a run folder and empty node caches of its own) of the experiment file, head only
(train.trainable_blocks=0, train.unfreeze=[]), with data.train_fraction set: each client trains on
that fraction of its own training split (a seeded, nested, class-stratified subsample, at least one
example a client; fedtune.data.training_subset), its partition and validation split unchanged, and
the server's held-out set the same for all. Four lines: ImageNet weights or random initialisation
(model.weights), federated as configured or centralised (one client holding all the training data,
federation.num_clients=1, iid: the same rounds, local epochs and fraction).

It writes table.md and table.json (every run: final and best central accuracy, rounds to the
target, training FLOPs, wall seconds) and efficiency.png (final accuracy against the fraction).
The target is TARGET_SHARE of the centralised pretrained run's final accuracy on all the data.

Training FLOPs, from FLOPs of one example's forward pass (torch.utils.flop_counter.FlopCounterMode,
which counts a multiply-add as 2 FLOPs; convolutions and matrix products only) through the frozen
part F_frozen and through the trainable part F_trainable, summed over the clients i:

    without augmentation  F_frozen x n_i  +  3 x F_trainable x s_i x E x R
    with augmentation     (F_frozen + 3 x F_trainable) x s_i x E x R

n_i: the examples client i trains on; s_i: the examples its epoch passes (n_i, or whole batches
only when n_i exceeds the batch size, as fedtune's local training drops a last partial batch);
E: local epochs; R: rounds each client trained in (the history's clients trained, over the
clients). Without augmentation the frozen part's output is cached: it runs once per example. A
training step costs ~3 forward passes (the forward, and a backward of about twice its cost).
Evaluation (clients' validation splits, the server's held-out set) is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from tables import write_results  # benchmarks/tables.py, beside this script
from torch.utils.flop_counter import FlopCounterMode
from transfer import run_variant

from fedtune.atomic import replace_atomically
from fedtune.backbones import build_model, preprocessing_for
from fedtune.client.task import NodeIdentity, local_data
from fedtune.config import ExperimentConfig, load_config
from fedtune.data import load_split
from fedtune.params import first_trainable_index, trainable_stages
from fedtune.protocol import ClientSettings
from fedtune.records import RoundRecord
from fedtune.report import RunDirectory

DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
TARGET_SHARE = 0.95
HEAD_ONLY = ["train.trainable_blocks=0"]  # run_variant adds train.unfreeze=[]
CENTRALISED = ["federation.num_clients=1", "data.partition.scheme=iid"]
# (weights, setting) -> overrides; the plot's line styles follow the order.
VARIANTS: dict[tuple[str, str], list[str]] = {
    ("pretrained", "federated"): ["model.weights=imagenet"],
    ("scratch", "federated"): ["model.weights=none"],
    ("pretrained", "centralised"): ["model.weights=imagenet", *CENTRALISED],
    ("scratch", "centralised"): ["model.weights=none", *CENTRALISED],
}
COLOURS = {"pretrained": "tab:blue", "scratch": "tab:orange"}
LINES = {"federated": "-", "centralised": "--"}
FROZEN_SHARE = "frozen part's share"  # of the training FLOPs


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one example's forward pass through the frozen part and the trainable part."""

    frozen: int
    trainable: int


def forward_flops(cfg: ExperimentConfig, num_classes: int) -> ForwardFlops:
    """Counted on one example at the run's input size; weights do not change the count."""
    model = build_model(cfg.model.backbone, num_classes=num_classes, weights="none",
                        head_dropout=cfg.model.head_dropout, cut=cfg.model.cut).eval()
    start = first_trainable_index(model, trainable_stages(model, cfg.train.trainable_blocks))
    size = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size).crop_size
    with torch.no_grad():
        with FlopCounterMode(display=False) as frozen:
            features = model.forward_stages(torch.zeros(1, 3, size, size), 0, start)
        with FlopCounterMode(display=False) as trainable:
            model.forward_stages(features, start)
    return ForwardFlops(frozen=frozen.get_total_flops(), trainable=trainable.get_total_flops())


def examples_per_client(cfg: ExperimentConfig, num_classes: int) -> list[int]:
    """How many examples each client trains on: what each node's own local_data gives it."""
    settings = ClientSettings.of(cfg, num_classes=num_classes)
    with tempfile.TemporaryDirectory() as cache:  # local_data reads no cache; a node needs a cache folder
        return [len(local_data(settings, NodeIdentity.from_node_config(
                    {"partition-id": client, "cache-dir": cache}, simulated=True)).train)  # type: ignore[arg-type]
                for client in range(cfg.federation.num_clients)]


def training_flops(cfg: ExperimentConfig, flops: ForwardFlops, examples: list[int], rounds: list[RoundRecord]) -> dict:
    """The module docstring's formula; returns the total and its frozen part."""
    batch, epochs = cfg.train.batch_size, cfg.train.local_epochs
    passed = [n if n <= batch else (n // batch) * batch for n in examples]
    # Rounds per client: every client trains every round unless the federation samples fewer.
    client_rounds = sum(r.clients_ok for r in rounds if r.round > 0) / len(examples)
    if cfg.data.augment:
        frozen = flops.frozen * sum(passed) * epochs * client_rounds
    else:
        frozen = flops.frozen * sum(examples)
    trainable = 3 * flops.trainable * sum(passed) * epochs * client_rounds
    return {"total": frozen + trainable, "frozen": frozen, "client_rounds": client_rounds}


def rounds_to(target: float, rounds: list[RoundRecord]) -> int | None:
    return next((r.round for r in rounds if r.round > 0 and (r.central_accuracy or 0.0) >= target), None)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _completed_run(folder: Path) -> Path | None:
    runs = sorted(p for p in folder.glob("*/") if (p / "summary.json").is_file()) if folder.is_dir() else []
    return runs[-1] if runs else None


def study(config: Path, out: Path, *, fractions: list[float], overrides: list[str], resume: bool) -> None:
    base = load_config(config, [*overrides, *HEAD_ONLY, "train.unfreeze=[]"])
    classes = load_split(base.data.source, "train", root=base.data.root, download=base.data.download,
                         seed=base.seed, bad_images=base.data.bad_images).classes
    flops = forward_flops(base, len(classes))
    runs: dict[tuple[float, str, str], dict[str, Any]] = {}
    for fraction in fractions:
        for (weights, setting), variant in VARIANTS.items():
            run_overrides = [*overrides, *HEAD_ONLY, *variant, f"data.train_fraction={fraction:g}"]
            folder = out / _slug(f"{fraction:g} {weights} {setting}")
            finished = _completed_run(folder) if resume else None
            run_dir = finished or run_variant(config, run_overrides, folder)
            cfg = load_config(config, [*run_overrides, "train.unfreeze=[]"])
            examples = examples_per_client(cfg, len(classes))
            rounds = RunDirectory.load_history(run_dir / "history.json")
            summary = json.loads((run_dir / "summary.json").read_text())
            runs[fraction, weights, setting] = {
                "rounds": rounds, "examples": examples, "wall_seconds": summary["wall_seconds"],
                "flops": training_flops(cfg, flops, examples, rounds), "run": run_dir,
            }

    reference = runs[max(fractions), "pretrained", "centralised"]["rounds"][-1].central_accuracy or 0.0
    target = TARGET_SHARE * reference
    rows = []
    for (fraction, weights, setting), run in runs.items():
        rounds, examples = run["rounds"], run["examples"]
        reached = rounds_to(target, rounds)
        rows.append({
            "fraction": fraction,
            "weights": weights,
            "setting": setting,
            "examples per client (min-median-max)": f"{min(examples)}-{statistics.median(examples):g}-{max(examples)}",
            "examples in all": sum(examples),
            "final accuracy": rounds[-1].central_accuracy,
            "best accuracy": max(r.central_accuracy or 0.0 for r in rounds if r.round > 0),
            "rounds to target": reached if reached is not None else "not reached",
            "training GFLOPs": run["flops"]["total"] / 1e9,
            FROZEN_SHARE: run["flops"]["frozen"] / run["flops"]["total"],
            "round seconds": sum(r.seconds for r in rounds if r.round > 0),
            "wall seconds": run["wall_seconds"],
        })
    rounds_run = max(r.round for run in runs.values() for r in run["rounds"])
    note = (f"{config.name}, head only, {rounds_run} rounds, seed {base.seed}, {base.federation.num_clients} clients "
            f"federated. Target: {TARGET_SHARE:g} x the centralised pretrained final accuracy on all the data "
            f"({reference:.3f}) = {target:.3f}, on the server's held-out set. Forward FLOPs of one example: "
            f"frozen part {flops.frozen / 1e6:.2f} M, trainable part {flops.trainable / 1e6:.4f} M "
            "(FlopCounterMode); training GFLOPs: F_frozen x n_i (cached features; every epoch with augmentation) "
            "+ 3 x F_trainable x s_i x E x R, summed over clients (benchmarks/efficiency.py). Seconds on 2 CPU cores "
            "shared with other work: round seconds are rounds 1 to the end (round 1 sends the backbone and computes "
            "the frozen features); wall seconds also count round 0 and starting the simulation's nodes.")
    print(write_results(out, rows, note, raw={
        "target": target, "target_share": TARGET_SHARE, "reference_accuracy": reference,
        "forward_flops_per_example": {"frozen": flops.frozen, "trainable": flops.trainable},
        "accuracy_by_round": {f"{f:g} {w} {s}": [r.central_accuracy for r in run["rounds"]]
                              for (f, w, s), run in runs.items()},
        "examples_per_client": {f"{f:g} {w} {s}": run["examples"] for (f, w, s), run in runs.items()},
    }))
    figure = _figure(rows, fractions, target=target, title=config.stem, augmented=base.data.augment)
    replace_atomically(out / "efficiency.png", partial(figure.savefig, format="png", dpi=120))


def _pays(rows: list[dict], target: float, weights: str, setting: str) -> dict | None:
    """The smallest fraction whose run ends at the target or above, if any."""
    return next((r for r in sorted(rows, key=lambda r: r["fraction"]) if r["weights"] == weights
                 and r["setting"] == setting and (r["final accuracy"] or 0.0) >= target), None)


def _where_pretraining_pays(rows: list[dict], target: float, *, augmented: bool) -> str:
    """What pretraining gains at the smallest and the largest fraction, the smallest fraction at which each
    federated start reaches the target, and the training compute."""
    def run(fraction: float, weights: str, setting: str) -> dict:
        return next(r for r in rows if (r["fraction"], r["weights"], r["setting"]) == (fraction, weights, setting))

    def gain(fraction: float, setting: str) -> float:
        pretrained, scratch = run(fraction, "pretrained", setting), run(fraction, "scratch", setting)
        return 100 * ((pretrained["final accuracy"] or 0.0) - (scratch["final accuracy"] or 0.0))

    ends = (min(r["fraction"] for r in rows), max(r["fraction"] for r in rows))
    gains = [f"{setting} " + ", ".join(f"{gain(f, setting):+.0f} at {f:.0%}" for f in ends)
             for setting in ("federated", "centralised")]
    lines = [f"pretraining's gain in final accuracy (points): {'; '.join(gains)}"]
    for weights in ("pretrained", "scratch"):
        reached = _pays(rows, target, weights, "federated")
        if reached is None:
            lines.append(f"{weights}, federated: below the target at every fraction")
        else:
            lines.append(f"{weights}, federated: at the target from {reached['fraction']:.0%} of the data "
                         f"({reached['examples per client (min-median-max)']} examples a client, min-median-max), "
                         f"{reached['training GFLOPs']:.3g} GFLOPs of training")
    federated = [run(f, "pretrained", "federated") for f in ends]
    lines.append(f"training compute, the same for either start: {federated[0]['training GFLOPs']:.3g} GFLOPs at "
                 f"{ends[0]:.0%}, {federated[1]['training GFLOPs']:.3g} at {ends[1]:.0%} (federated), "
                 f"{federated[1][FROZEN_SHARE]:.1%} of it the frozen part's forward passes, "
                 f"{'every epoch (augmentation)' if augmented else 'once per example (cached)'}")
    return "\n".join(lines)


def _figure(rows: list[dict], fractions: list[float], *, target: float, title: str, augmented: bool) -> Figure:
    """Final accuracy against the fraction (log axis), one line per (weights, setting), and where pretraining pays."""
    figure = Figure(figsize=(10, 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for weights, setting in VARIANTS:
        line = sorted((r for r in rows if r["weights"] == weights and r["setting"] == setting),
                      key=lambda r: r["fraction"])
        ax.plot([r["fraction"] for r in line], [r["final accuracy"] for r in line], color=COLOURS[weights],
                linestyle=LINES[setting], marker="o" if setting == "federated" else "s", label=f"{weights}, {setting}")
    ax.axhline(target, color="grey", linestyle=":", linewidth=1,
               label=f"target: {TARGET_SHARE:g} x centralised pretrained, all data")
    # below the axes, where it hides no point
    caption = _where_pretraining_pays(rows, target, augmented=augmented)
    ax.text(0.0, -0.14, caption, transform=ax.transAxes, va="top", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "grey"})
    pays = _pays(rows, target, "pretrained", "federated")
    if pays is not None:
        ax.annotate("", xy=(pays["fraction"], pays["final accuracy"]), xytext=(pays["fraction"], target * 0.8),
                    arrowprops={"arrowstyle": "->", "color": COLOURS["pretrained"]})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.xaxis.set_minor_formatter(NullFormatter())
    # what a fraction means for a federated client: its examples (the median client's)
    top = ax.secondary_xaxis("top")
    top.set_xticks(fractions, [next(r["examples per client (min-median-max)"].split("-")[1] for r in rows
                                    if r["fraction"] == f and r["setting"] == "federated") for f in fractions])
    top.xaxis.set_minor_formatter(NullFormatter())
    top.set_xlabel("examples the median federated client trains on", fontsize=8)
    ax.set_xlabel("fraction of each client's training data (log scale)")
    ax.set_ylabel("final accuracy (server's held-out set)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Data efficiency, head only: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return figure


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, the table and the plot")
    parser.add_argument("--fractions", type=_fraction, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="fractions of each client's training data (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra override for all runs, e.g. federation.rounds=5")
    parser.add_argument("--resume", action="store_true",
                        help="reuse each variant's finished run in --out instead of running it again")
    args = parser.parse_args()
    study(args.config, args.out, fractions=sorted(set(args.fractions)), overrides=args.overrides, resume=args.resume)


if __name__ == "__main__":
    main()
