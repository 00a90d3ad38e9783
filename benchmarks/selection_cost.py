"""What `fedtune select` costs beside one round of fine-tuning, on the same machine, each from empty node caches.

    python benchmarks/selection_cost.py configs/quickstart.yaml --out benchmarks/results/selection-cost-digits
    python benchmarks/selection_cost.py configs/antsbees.yaml --out benchmarks/results/selection-cost-antsbees

Runs, in turns (`--repeats`): `fedtune select` on the default candidates, and `fedtune simulate` of one
round of head-only fine-tuning of efficientnet_lite0 (the first round: it sends the model and computes
the frozen features, as any first round on new nodes does), then the same round after the selection
(whose statistics left that candidate's training features in the caches). Prints a table of the
seconds (the selection's, from its first message to its scores; the round's, from history.json; and
each command's wall time) and bytes (as real nodes would receive them), and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.console import compare_table, format_bytes
from fedtune.report import RunDirectory


def _run(command: list[str], cache: Path) -> float:
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=sys.stderr, env={**os.environ, "FEDTUNE_CACHE_DIR": str(cache)})
    return time.monotonic() - started


def _newest(folder: Path, *, selection: bool) -> Path:
    """The newest selection folder, or run folder, under `folder`."""
    found = [path for path in folder.iterdir() if ("-select-" in path.name) == selection]
    return max(found, key=lambda path: path.stat().st_mtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    fedtune = [sys.executable, "-m", "fedtune", "-q"]
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        work = args.out / f"repeat-{repeat}"
        sets = [item for override in [f"output.dir={work / 'runs'}", *args.overrides] for item in ("--set", override)]
        round_sets = [*sets, "--set", "federation.rounds=1", "--set", "train.trainable_blocks=0",
                      "--set", "train.unfreeze=[]", "--set", "model.backbone=efficientnet_lite0",
                      "--set", "model.weights=imagenet", "--set", "model.cut=null"]
        wall = _run([*fedtune, "select", str(args.config), *sets], work / "cache-select")
        selection = json.loads((_newest(work / "runs", selection=True) / "selection.json").read_text())
        rows.append({"repeat": repeat, "what": f"fedtune select, {len(selection['scores'])} candidates",
                     "seconds": selection["seconds"], "command wall seconds": wall,
                     "bytes": selection["bytes_sent"] + selection["bytes_received"]})
        for label, cache in (("round 1, empty caches", work / "cache-round"),
                             ("round 1, after the selection", work / "cache-select")):
            wall = _run([*fedtune, "simulate", str(args.config), *round_sets], cache)
            run = _newest(work / "runs", selection=False)
            first = next(r for r in RunDirectory.load_history(run) if r.round == 1)
            rows.append({"repeat": repeat, "what": f"head-only fine-tuning of efficientnet_lite0, {label}",
                         "seconds": first.seconds, "command wall seconds": wall,
                         "bytes": first.bytes_sent + first.bytes_received})
    for row in rows:
        row["bytes"] = format_bytes(int(row["bytes"]))
    table = compare_table(rows, list(rows[0]))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
