"""One global model against each client's own: personalization methods side by side on one federation.

    python benchmarks/personalization.py configs/antsbees.yaml --out benchmarks/results/personalization-antsbees \
        --set train.trainable_blocks=1

Runs `fedtune simulate` of the experiment once per `personalization.method` (`--methods`; the same
seed, so the same partition and the same validation split on every client), and reads from each
run's history the last federated evaluation: every client's accuracy on its own validation split,
of the global model (method none) or of its own model (the others), as mean, worst 10% (the mean
of the lowest ceil(10%) clients) and median; how many clients do better than, as well as, and
worse than their own local-only model (method local, when it is among the methods); the server's
central accuracy; and the median bytes of a round after the first (both directions, as real nodes
would move them). Writes table.md, table.json and clients.png (each client's accuracy by method).
A finished run is reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runs import simulated_run  # benchmarks/runs.py, beside this script

from fedtune.console import compare_table, format_bytes
from fedtune.records import ClientSpread, RoundRecord
from fedtune.report import RunDirectory

METHODS = ["none", "fedbn", "local_head", "finetune", "local"]


def run(config: Path, method: str, *, out: Path, overrides: list[str]) -> Path:
    """`fedtune simulate` with this method; its run folder (reused when it finished)."""
    return simulated_run(config, out / method, [f"personalization.method={method}", *overrides])


def own_accuracy(record: RoundRecord, method: str) -> dict[str, float]:
    """Each client's accuracy on its own validation split: the global model's, or under
    personalization its own model's."""
    return record.client_accuracy if method == "none" else record.client_personal_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    per_client: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        history = RunDirectory.load_history(run(args.config, method, out=args.out, overrides=args.overrides))
        last = next(r for r in reversed(history) if own_accuracy(r, method))
        accuracy = per_client[method] = own_accuracy(last, method)
        spread = ClientSpread.of(accuracy.values())
        later = [r.bytes_sent + r.bytes_received for r in history if r.round > 1]
        rows.append({"method": method, "round": last.round, "clients": len(accuracy),
                     "mean per-client accuracy": spread.mean, "worst 10%": spread.worst10,
                     "median": spread.median, "central accuracy (server's model)": last.central_accuracy,
                     "bytes per round": format_bytes(int(statistics.median(later))) if later else "-"})
    if "local" in per_client:
        alone = per_client["local"]
        for row in rows:
            mine = per_client[row["method"]]
            both = [name for name in alone if name in mine]
            row["clients above / level with / below their local-only model"] = " / ".join(
                str(sum(compare(mine[name], alone[name]) for name in both))
                for compare in (float.__gt__, float.__eq__, float.__lt__))
    table = compare_table(rows, list(rows[0]))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps({"rows": rows, "per_client": per_client}, indent=2) + "\n")
    figure = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    names = sorted({name for accuracy in per_client.values() for name in accuracy},
                   key=lambda name: int(name.split()[-1]) if name.split()[-1].isdigit() else 0)
    width = 0.8 / len(per_client)
    for index, (method, accuracy) in enumerate(per_client.items()):
        ax.bar([position + index * width for position in range(len(names))],
               [accuracy.get(name, 0.0) for name in names], width=width, label=method)
    ax.set_xticks([position + 0.4 - width / 2 for position in range(len(names))], names, rotation=45, fontsize=8)
    ax.set_ylabel("accuracy on the client's own validation split")
    ax.set_title(f"{args.config.stem}: each client's accuracy, last evaluation (none: the global model)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    figure.savefig(args.out / "clients.png", dpi=110)


if __name__ == "__main__":
    main()
