"""What `fedtune select` costs beside one round of fine-tuning, on the same machine, each from empty node caches.

    python benchmarks/selection_cost.py configs/quickstart.yaml --out benchmarks/results/selection-cost-digits \
        --repeats 3 --samples 1 0.25
    python benchmarks/selection_cost.py configs/antsbees.yaml --out benchmarks/results/selection-cost-antsbees \
        --repeats 3 --samples 1 0.25

Runs, in turns (`--repeats`): `fedtune select` on the default candidates with each `--sample`, and
`fedtune simulate` of one round of head-only fine-tuning of efficientnet_lite0 (the first round: it
sends the model and computes the frozen features, as any first round on new nodes does), then the
same round after the whole-split selection (whose statistics left that candidate's training features
in the caches). Prints a table of the seconds (the selection's, from its first message to its scores;
the round's, from history.json; and each command's wall time) and bytes (as real nodes would
receive them), each the median of the repeats, and writes it, with every repeat's figures, to --out.
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
    parser.add_argument("--samples", type=float, nargs="+", default=[1.0],
                        help="fedtune select --sample values; the round after the selection follows the first")
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
        for number, sample in enumerate(args.samples):
            wall = _run([*fedtune, "select", str(args.config), *sets, "--sample", f"{sample:g}"],
                        work / f"cache-select-{number}")
            selection = json.loads((_newest(work / "runs", selection=True) / "selection.json").read_text())
            share = f", {sample:.0%} of each client's training split" if sample < 1 else ""
            rows.append({"repeat": repeat, "what": f"fedtune select, {len(selection['scores'])} candidates{share}",
                         "seconds": selection["seconds"], "command wall seconds": wall,
                         "bytes": selection["bytes_sent"] + selection["bytes_received"]})
        for label, cache in (("round 1, empty caches", work / "cache-round"),
                             ("round 1, after the selection", work / "cache-select-0")):
            wall = _run([*fedtune, "simulate", str(args.config), *round_sets], cache)
            run = _newest(work / "runs", selection=False)
            first = next(r for r in RunDirectory.load_history(run) if r.round == 1)
            rows.append({"repeat": repeat, "what": f"head-only fine-tuning of efficientnet_lite0, {label}",
                         "seconds": first.seconds, "command wall seconds": wall,
                         "bytes": first.bytes_sent + first.bytes_received})
    medians = []
    for what in dict.fromkeys(row["what"] for row in rows):
        mine = [row for row in rows if row["what"] == what]
        medians.append({"what": what, "repeats": len(mine),
                        **{key: statistics.median(row[key] for row in mine)
                           for key in ("seconds", "command wall seconds", "bytes")}})
    for row in medians:
        row["bytes"] = format_bytes(int(row["bytes"]))
    table = compare_table(medians, list(medians[0]))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps({"medians": medians, "repeats": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
