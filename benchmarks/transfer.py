"""Pretrained vs scratch vs centralised: the transfer-learning evidence table in the README.

Runs the same experiment file in variants, each through `fedtune simulate` (the same code path
users run), and prints a markdown table:

    python benchmarks/transfer.py configs/antsbees.yaml --out benchmarks/results/antsbees
    python benchmarks/transfer.py configs/quickstart.yaml --out benchmarks/results/digits

(a) federated fine-tuning from the pretrained backbone, head only and head + last block;
(b) the same from random initialisation with the same budget;
(c) centralised: one client holding all the training data, same code path and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from fedtune.console import compare_table
from fedtune.report import RunDirectory

VARIANTS: dict[str, list[str]] = {
    "(a) pretrained, head only": ["model.weights=imagenet", "train.trainable_blocks=0"],
    "(a) pretrained, head + last block": ["model.weights=imagenet", "train.trainable_blocks=1"],
    "(b) scratch, head only": ["model.weights=none", "train.trainable_blocks=0"],
    "(b) scratch, head + last block": ["model.weights=none", "train.trainable_blocks=1"],
    "(c) centralised, head only": [
        "model.weights=imagenet", "train.trainable_blocks=0", "federation.num_clients=1", "data.partition.scheme=iid",
    ],
    "(c) centralised, head + last block": [
        "model.weights=imagenet", "train.trainable_blocks=1", "federation.num_clients=1", "data.partition.scheme=iid",
    ],
}


def run_variant(config: Path, overrides: list[str], out: Path) -> Path:
    """One `fedtune simulate` run in a folder of its own; returns its run directory.

    Each variant gets empty node caches, so its figures include sending the backbone once and
    computing the frozen features once, as a first run on new nodes would.
    """
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedtune", "simulate", str(config), "--set", f"output.dir={out}",
               "--set", "train.unfreeze=[]"]
    for item in overrides:
        command += ["--set", item]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(out / "node-caches")}
    subprocess.run(command, check=True, stdout=sys.stderr, env=env)
    runs = sorted(p for p in out.iterdir() if (p / "summary.json").is_file())
    return runs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra override for all variants")
    args = parser.parse_args()

    results = {}
    for label, overrides in VARIANTS.items():
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        run_dir = run_variant(args.config, [*args.overrides, *overrides], args.out / slug)
        rounds = RunDirectory.load_history(run_dir / "history.json")
        summary = json.loads((run_dir / "summary.json").read_text())
        results[label] = (rounds, summary, run_dir)

    rows = []
    for label, (rounds, summary, _) in results.items():
        mode = "head only" if "head only" in label else "head + last block"
        central_final = results[f"(c) centralised, {mode}"][0][-1].central_accuracy or 0.0
        target = 0.95 * central_final
        reached = next((r.round for r in rounds if r.round > 0 and (r.central_accuracy or 0) >= target), None)
        trained = [r for r in rounds if r.round > 0]
        steady = trained[1:] or trained
        rows.append({
            "variant": label,
            "final accuracy": rounds[-1].central_accuracy,
            "best accuracy": max(r.central_accuracy or 0.0 for r in trained),
            "final vs (c)": (rounds[-1].central_accuracy or 0.0) / central_final if central_final else None,
            "rounds to 95% of (c)": reached if reached is not None else "not reached",
            "bytes per round, all clients": sum(r.bytes_sent + r.bytes_received for r in steady) / len(steady),
            "bytes of backbone, once per client": summary["bytes_sent_backbone_total"],
            "wall seconds": summary["wall_seconds"],
        })
    table = compare_table(rows, list(rows[0]))
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
