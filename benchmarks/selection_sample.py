"""How far can `fedtune select --sample` cut the statistics before the ranking stops predicting fine-tuning?

    python benchmarks/selection_sample.py configs/quickstart.yaml --fine-tuning benchmarks/results/selection-digits \
        --out benchmarks/results/selection-sample-digits --seeds 0 1 2
    python benchmarks/selection_sample.py configs/antsbees.yaml --fine-tuning benchmarks/results/selection-antsbees \
        --out benchmarks/results/selection-sample-antsbees --seeds 0 1 4

For each share of every client's training split (`--samples`) and each seed (each seed draws its own
partition and its own class-stratified sample, as `fedtune select --set seed=S` does), it runs
`fedtune select` on the candidates of a benchmarks/selection.py study, from empty node caches, and
compares each score's ranking with that study's median final accuracy of head-only fine-tuning
(its table.json: no fine-tuning is run here) by Kendall's tau-b. It prints and writes, per share:
the median and the lowest tau over the seeds; table.md, table.json and tau.png. What a share costs
is benchmarks/selection_cost.py's to measure, side by side with a round on a quiet machine. A
selection folder that already holds a selection.json is reused.
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
from scipy.stats import kendalltau

from fedtune.console import compare_table

SCORES = {"logme_centred": "LogME, centred (ranks)", "logme": "LogME (published)", "shrunk_h_score": "shrunk H-score"}


def selection(config: Path, candidates: list[str], *, sample: float, seed: int, out: Path) -> dict[str, Any]:
    """`fedtune select --sample` at this seed, on empty node caches; its selection.json (reused if there)."""
    folder = out / f"sample-{sample:g}-seed{seed}"
    found = sorted(folder.glob("*/selection.json")) if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fedtune", "-q", "select", str(config), "--set", f"output.dir={folder}",
                   "--set", f"seed={seed}", "--sample", f"{sample:g}", "--candidates", " ".join(candidates)]
        print("$", " ".join(command), flush=True)
        env = {**os.environ, "FEDTUNE_CACHE_DIR": str(folder / "node-caches")}
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        found = sorted(folder.glob("*/selection.json"))
    return json.loads(found[-1].read_text())


def taus(scores: list[dict[str, Any]], accuracy: dict[str, float]) -> dict[str, float]:
    """Kendall's tau-b of each score's ranking against the fine-tuning accuracy, over the candidates."""
    names = [row["candidate"] for row in scores]
    truth = [accuracy[name] for name in names]
    return {key: float(kendalltau([row[key] for row in scores], truth).statistic) for key in SCORES}


def tau_figure(rows: list[dict[str, Any]], title: str) -> Figure:
    figure = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    samples = [row["sample"] for row in rows]
    ax = figure.add_subplot()
    for key, label in SCORES.items():
        ax.plot(samples, [row[f"{key} tau median"] for row in rows], marker="o", label=label)
        ax.fill_between(samples, [row[f"{key} tau lowest"] for row in rows],
                        [row[f"{key} tau median"] for row in rows], alpha=0.15)
    ax.axhline(0.6, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("share of each client's training split")
    ax.set_ylabel("Kendall tau-b (median over seeds;\nshaded down to the lowest)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--fine-tuning", type=Path, required=True,
                        help="a benchmarks/selection.py output folder (its table.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    study = json.loads((args.fine_tuning / "table.json").read_text())
    accuracy = {row["candidate"]: row["median final accuracy"] for row in study["rows"]}
    candidates = list(accuracy)
    rows: list[dict[str, Any]] = []
    for sample in sorted(args.samples):
        found = [selection(args.config, candidates, sample=sample, seed=seed, out=args.out) for seed in args.seeds]
        by_seed = [taus(chosen["scores"], accuracy) for chosen in found]
        row: dict[str, Any] = {"sample": sample, "seeds": len(found),
                               "examples (median)": statistics.median(c["scores"][0]["examples"] for c in found)}
        for key in SCORES:
            row[f"{key} tau median"] = statistics.median(tau[key] for tau in by_seed)
            row[f"{key} tau lowest"] = min(tau[key] for tau in by_seed)
        rows.append(row)
    table = compare_table(rows, list(rows[0]))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    tau_figure(rows, f"{args.config.stem}: ranking against fine-tuning, by the statistics' sample").savefig(
        args.out / "tau.png", dpi=110)


if __name__ == "__main__":
    main()
