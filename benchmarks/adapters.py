"""Parameter-efficient fine-tuning against head-only and against head plus last block, side by side.

    python benchmarks/adapters.py configs/antsbees.yaml --out benchmarks/results/adapters-antsbees
    python benchmarks/adapters.py configs/quickstart.yaml --out benchmarks/results/adapters-digits

Runs `fedtune simulate` of the experiment once per variant and seed (`--seeds`; one seed gives every
variant the same partition, validation splits and initial head), with no unfreeze schedule:

- head only: train.trainable_blocks=0;
- last block: trainable_blocks=1, the backbone's last block trained whole with the head;
- lora: trainable_blocks=1, LoRA adapters (train.lora: rank 8, alpha 16) in that block;
- bitfit: trainable_blocks=1, the block's biases alone;
- with `--adapter-lr STAGE=MULTIPLIER ...` (e.g. conv_head=10), lora and bitfit once more for each,
  with that stage at MULTIPLIER x train.lr (train.lr_multipliers): LoRA's B starts at zero and biases move
  little, so adapters usually want a higher rate than whole blocks.

From each run: the server's central accuracy after the last round, the best over the rounds, and the
median bytes of a round after the first (both directions, train and evaluate messages; the first
round also delivers the backbone). Writes table.md and table.json, and accuracy.png (central
accuracy by round, each variant's median over the seeds). A finished run is reused.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runs import simulated_run  # benchmarks/runs.py, beside this script
from tables import write_results

from fedtune.console import format_bytes
from fedtune.report import RunDirectory

VARIANTS: dict[str, list[str]] = {
    "head only": ["train.trainable_blocks=0"],
    "last block": ["train.trainable_blocks=1"],
    "lora": ["train.trainable_blocks=1", "train.adapter=lora"],
    "bitfit": ["train.trainable_blocks=1", "train.adapter=bitfit"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="results (table.md, table.json, accuracy.png)")
    parser.add_argument("--runs", type=Path, help="where the runs go (default: OUT/runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--adapter-lr", metavar="STAGE=MULTIPLIER", nargs="+", default=[],
                        help="also run lora and bitfit with this stage's learning-rate multiplier (each one given)")
    args = parser.parse_args()
    runs = args.runs or args.out / "runs"
    variants = dict(VARIANTS)
    for choice in args.adapter_lr:
        stage, _, multiplier = choice.partition("=")
        for adapter in ("lora", "bitfit"):
            variants[f"{adapter}, {stage} lr x{multiplier}"] = [
                *VARIANTS[adapter], f"train.lr_multipliers={{{stage}: {float(multiplier)}}}"]

    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    for variant, settings in variants.items():
        finals, bests, later, trajectories = [], [], [], []
        for seed in args.seeds:
            folder = runs / f"{''.join(c if c.isalnum() else '-' for c in variant)}-seed{seed}"
            run = simulated_run(args.config, folder, ["train.unfreeze=[]", f"seed={seed}", *settings, *args.overrides])
            history = RunDirectory.load_history(run / "history.json")
            accuracy = [r.central_accuracy for r in history if r.central_accuracy is not None]
            finals.append(accuracy[-1])
            bests.append(max(accuracy[1:]))
            later += [r.bytes_sent + r.bytes_received for r in history if r.round > 1]
            trajectories.append(accuracy)
        curves[variant] = [statistics.median(values) for values in zip(*trajectories, strict=True)]
        rows.append({
            "variant": variant, "seeds": len(args.seeds),
            "final accuracy (median)": statistics.median(finals), "lowest": min(finals),
            "best accuracy (median)": statistics.median(bests),
            "bytes per round (after the first)": format_bytes(int(statistics.median(later))),
            "bytes": int(statistics.median(later)),
        })
    block = next(row["bytes"] for row in rows if row["variant"] == "last block")
    for row in rows:
        row["bytes vs last block"] = f"{block / row['bytes']:.1f}x fewer" if row["bytes"] < block else "-"
    note = (f"{args.config.name}, seeds {' '.join(map(str, args.seeds))}; central accuracy on the server's held-out "
            "split; bytes per round: median over the rounds after the first, both directions, every client, "
            "train and evaluate messages. Overrides: " + (" ".join(args.overrides) or "none"))
    print(write_results(args.out, rows, note, raw={"curves": curves}))

    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for variant, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker="o", markersize=3, label=variant)
    ax.set_xlabel("round")
    ax.set_ylabel("central accuracy (median over seeds)")
    ax.set_title(f"{args.config.stem}: what trains, and its accuracy by round", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.savefig(args.out / "accuracy.png", dpi=110)


if __name__ == "__main__":
    main()
