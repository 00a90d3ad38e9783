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

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runs import simulated_run  # benchmarks/runs.py, beside this script
from scipy.stats import kendalltau

from fedtune.console import compare_table, format_bytes
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


def fine_tune(config: Path, candidate: str, *, seed: int, out: Path, extra: list[str]) -> Path:
    """Head-only federated fine-tuning of one candidate; returns its run directory (reused if done)."""
    overrides = ["train.trainable_blocks=0", "train.unfreeze=[]", f"seed={seed}", *candidate_overrides(candidate),
                 *extra]
    return simulated_run(config, out / f"{slug(candidate)}-seed{seed}", overrides, fresh_caches=True)


def final_accuracy(run: Path) -> float:
    rounds = RunDirectory.load_history(run / "history.json")
    value = rounds[-1].central_accuracy
    if value is None:
        raise RuntimeError(f"{run}: the last round has no central accuracy")
    return value


SCORES = {"logme_centred": "LogME, centred (ranks)", "logme": "LogME (published)", "shrunk_h_score": "shrunk H-score"}


def run_selection(config: Path, candidates: list[str], *, out: Path, extra: list[str]) -> dict[str, Any]:
    """`fedtune select` on empty node caches (as on new nodes); its selection.json (reused if done)."""
    folder = out / "select"
    found = sorted(folder.glob("*/selection.json")) if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fedtune", "select", str(config), "--set", f"output.dir={folder}",
                   "--candidates", " ".join(candidates)]  # one value: typer takes one per option
        for item in extra:
            command += ["--set", item]
        print("$", " ".join(command), flush=True)
        env = {**os.environ, "FEDTUNE_CACHE_DIR": str(folder / "node-caches")}
        subprocess.run(command, check=True, stdout=sys.stderr, env=env)
        found = sorted(folder.glob("*/selection.json"))
    return json.loads(found[-1].read_text())


def first_round(run: Path) -> tuple[float, int]:
    """Seconds and bytes (both directions) of a run's first round: the model sent, the features computed."""
    rounds = RunDirectory.load_history(run / "history.json")
    first = next(r for r in rounds if r.round == 1)
    return first.seconds, first.bytes_sent + first.bytes_received


def scores_figure(rows: list[dict[str, Any]], taus: dict[str, float], title: str) -> Figure:
    figure = Figure(figsize=(4.2 * len(SCORES), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    for position, (key, label) in enumerate(SCORES.items(), start=1):
        ax = figure.add_subplot(1, len(SCORES), position)
        xs = [row[key] for row in rows]
        ys = [row["median final accuracy"] for row in rows]
        ax.scatter(xs, ys)
        for row, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(row["candidate"].replace("efficientnet_", ""), (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("median final accuracy, head-only fine-tuning" if position == 1 else "")
        ax.set_title(f"Kendall tau-b {taus[key]:.2f}", fontsize=10)
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=11)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the table")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for all runs")
    args = parser.parse_args()

    selection = run_selection(args.config, args.candidates, out=args.out, extra=args.overrides)
    scored = {row["candidate"]: row for row in selection["scores"]}
    accuracies: dict[str, list[float]] = {candidate: [] for candidate in args.candidates}
    runs: dict[str, list[Path]] = {candidate: [] for candidate in args.candidates}
    for seed in args.seeds:
        for candidate in args.candidates:
            run = fine_tune(args.config, candidate, seed=seed, out=args.out / "fine-tuning", extra=args.overrides)
            accuracies[candidate].append(final_accuracy(run))
            runs[candidate].append(run)

    rows: list[dict[str, Any]] = []
    for candidate, values in accuracies.items():
        rows.append({
            "candidate": candidate,
            **{key: scored[candidate][key] for key in SCORES},
            "final accuracy by seed": " ".join(f"{v:.3f}" for v in values),
            "median final accuracy": statistics.median(values),
        })
    rows.sort(key=lambda row: -row["logme_centred"])
    accuracy = [row["median final accuracy"] for row in rows]
    taus = {key: float(kendalltau([row[key] for row in rows], accuracy).statistic) for key in SCORES}
    first_rounds = [first_round(run) for run in runs[args.candidates[0]]]
    round_seconds = statistics.median(seconds for seconds, _ in first_rounds)
    round_bytes = int(statistics.median(size for _, size in first_rounds))
    cost = {
        "selection seconds": selection["seconds"],
        "selection bytes": selection["bytes_sent"] + selection["bytes_received"],
        f"first round of {args.candidates[0]}: seconds (median of seeds)": round_seconds,
        f"first round of {args.candidates[0]}: bytes": round_bytes,
    }
    table = compare_table(rows, list(rows[0]))
    summary = "\n".join([
        "Kendall tau-b against the median final accuracy: "
        + ", ".join(f"{SCORES[key]} {value:.2f}" for key, value in taus.items()),
        f"selection: {cost['selection seconds']:.1f} s and {format_bytes(cost['selection bytes'])} for "
        f"{len(args.candidates)} candidates; one first round of {args.candidates[0]}: {round_seconds:.1f} s and "
        f"{format_bytes(round_bytes)}",
    ])
    print(table + "\n\n" + summary)
    (args.out / "table.md").write_text(table + "\n\n" + summary + "\n")
    (args.out / "table.json").write_text(json.dumps({"rows": rows, "kendall_tau_b": taus, "cost": cost}, indent=2))
    figure = scores_figure(rows, taus, f"{args.config.stem}: selection scores against head-only fine-tuning")
    figure.savefig(args.out / "scores.png", dpi=110)


if __name__ == "__main__":
    main()
