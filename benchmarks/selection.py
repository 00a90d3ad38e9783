"""Does `fedtune select` rank backbones as fine-tuning does? Kendall's tau of its scores against the runs.

For one experiment file, it runs `fedtune select` on the candidates, then head-only federated
fine-tuning of each candidate through `fedtune simulate` (the same code path users run, with the
experiment's own partition, rounds and optimiser), for each seed, and compares:

    python benchmarks/selection.py configs/antsbees.yaml --out benchmarks/results/selection-antsbees
    python benchmarks/selection.py configs/quickstart.yaml --out benchmarks/results/selection-digits

It writes table.md and table.json (per candidate: its scores, the final accuracy of each seed's
run and their median, and the ranks), and scores.png (each score against the median accuracy).
Kendall's tau-b (ties allowed) compares the LogME ranking with the accuracy ranking; the cost of
selection is set beside the first round of the first candidate's fine-tuning (the round that sends
the model and computes the frozen features, as any first round on new nodes does).
A run folder that already holds a finished run is reused, so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedtune.console import compare_table
from fedtune.report import RunDirectory

CANDIDATES = [
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_lite0:none",
    "efficientnet_lite0@blocks_5",
]


def candidate_overrides(candidate: str) -> list[str]:
    """`BACKBONE[@CUT][:WEIGHTS]` as experiment overrides."""
    backbone, _, weights = candidate.partition(":")
    backbone, _, cut = backbone.partition("@")
    return [f"model.backbone={backbone}", f"model.weights={weights or 'imagenet'}",
            f"model.cut={cut or 'null'}"]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def finished_run(folder: Path) -> Path | None:
    runs = sorted(p for p in folder.iterdir() if (p / "summary.json").is_file()) if folder.is_dir() else []
    return runs[-1] if runs else None


def fine_tune(config: Path, candidate: str, *, seed: int, out: Path, extra: list[str]) -> Path:
    """Head-only federated fine-tuning of one candidate; returns its run directory (reused if done)."""
    folder = out / f"{slug(candidate)}-seed{seed}"
    done = finished_run(folder)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedtune", "simulate", str(config), "--set", f"output.dir={folder}",
               "--set", "train.trainable_blocks=0", "--set", "train.unfreeze=[]", "--set", f"seed={seed}"]
    for item in [*candidate_overrides(candidate), *extra]:
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    # Empty node caches: each run sends its backbone and computes its features once, as on new nodes.
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(folder / "node-caches")}
    subprocess.run(command, check=True, stdout=sys.stderr, env=env)
    run = finished_run(folder)
    if run is None:
        raise RuntimeError(f"{folder}: fedtune simulate finished without a summary.json")
    return run


def final_accuracy(run: Path) -> float:
    rounds = RunDirectory.load_history(run / "history.json")
    value = rounds[-1].central_accuracy
    if value is None:
        raise RuntimeError(f"{run}: the last round has no central accuracy")
    return value


def first_round_seconds(run: Path) -> float:
    rounds = RunDirectory.load_history(run / "history.json")
    return next(r.seconds for r in rounds if r.round == 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the table")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for all runs")
    args = parser.parse_args()

    accuracies: dict[str, list[float]] = {candidate: [] for candidate in args.candidates}
    first_runs: dict[str, Path] = {}
    for seed in args.seeds:
        for candidate in args.candidates:
            run = fine_tune(args.config, candidate, seed=seed, out=args.out / "fine-tuning", extra=args.overrides)
            accuracies[candidate].append(final_accuracy(run))
            first_runs.setdefault(candidate, run)

    rows: list[dict[str, Any]] = []
    for candidate, values in accuracies.items():
        rows.append({
            "candidate": candidate,
            "final accuracy by seed": " ".join(f"{v:.3f}" for v in values),
            "median final accuracy": statistics.median(values),
            "first round seconds": first_round_seconds(first_runs[candidate]),
        })
    table = compare_table(rows, list(rows[0]))
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
