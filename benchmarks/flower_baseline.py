"""fedtune against the same workload written as a Flower example writes it: time and bytes, side by side.

The baseline is the pattern of Flower's own examples (quickstart-pytorch, flowertune): a ServerApp
running FedAvg's `strategy.start`, and a ClientApp that, for every message, builds the network,
loads the full model it was sent, trains it on its partition with the frozen layers recomputed in
every forward pass, and sends the full model back. The work is the same as fedtune's: the same
backbone and pretrained weights, the same digits partitions (Dirichlet, seed 0), image size,
optimiser, local epochs, batch size and rounds, head only; federated evaluation on each client's
validation split and central evaluation on the test split every round.

    python benchmarks/flower_baseline.py --repeats 3 --rounds 4 --out benchmarks/results/flower-baseline

Each run is a subprocess of its own (a fresh Ray), the two kinds alternate, and the table gives
medians: the warm round (rounds 2 onwards, central evaluation included), the whole run's wall
time, and the bytes of a warm round, both measured on the server's side of the grid (the
payload of every message sent and received) so that both sides are metered the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"
NUM_CLIENTS = 10

client_app = ClientApp()


def _settings(rounds: int) -> list[str]:
    """The fedtune overrides of this workload; the baseline reads the same values from the config."""
    return [f"federation.rounds={rounds}", "train.unfreeze=[]", "train.trainable_blocks=0",
            f"federation.num_clients={NUM_CLIENTS}"]


def _config(rounds: int) -> ExperimentConfig:
    from fedtune.config import load_config

    return load_config(CONFIG, _settings(rounds))


def _net(cfg: ExperimentConfig) -> nn.Module:
    from fedtune.backbones import build_model

    return build_model(cfg.model.backbone, num_classes=10, weights="none", head_dropout=cfg.model.head_dropout)


@cache
def _client_data(rounds: int, partition_id: int) -> tuple[Subset, Subset]:
    """A client's train and validation sets, loaded once per process, as Flower's examples keep
    their FederatedDataset in a module global."""
    from fedtune.backbones import preprocessing_for
    from fedtune.data import load_split, partition, split_validation

    cfg = _config(rounds)
    data = cfg.data
    full = load_split(data.source, "train", root=None, download=False, seed=cfg.seed)
    parts = partition(full.targets, scheme=data.partition.scheme, num_partitions=cfg.federation.num_clients,
                      seed=cfg.seed, alpha=data.partition.alpha, min_examples=data.partition.min_examples)
    train_idx, val_idx = split_validation(parts[partition_id], full.targets, fraction=data.val_fraction,
                                          seed=cfg.seed + partition_id)
    pre = preprocessing_for(cfg.model.backbone).at_size(data.image_size)
    return (Subset(full.with_transform(pre.transform(augment=False)), train_idx),
            Subset(full.with_transform(pre.transform(augment=False)), val_idx))


def _freeze_all_but_head(net: nn.Module) -> None:
    for name, parameter in net.named_parameters():
        parameter.requires_grad = name.startswith("stages.head.")


def _evaluate(net: nn.Module, data: Iterable) -> tuple[float, float, int]:
    net.eval()
    loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in data:
            out = net(images)
            loss += float(nn.functional.cross_entropy(out, labels, reduction="sum"))
            correct += int((out.argmax(1) == labels).sum())
            seen += len(labels)
    return loss / max(seen, 1), correct / max(seen, 1), seen


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(int(msg.content["config"]["rounds"]))
    net = _net(cfg)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _freeze_all_but_head(net)
    train_set, _ = _client_data(cfg.federation.rounds, int(context.node_config["partition-id"]))
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay)
    net.train()
    for module_name, module in net.named_modules():  # frozen BatchNorm keeps its statistics
        if module_name.startswith("stages.") and not module_name.startswith("stages.head"):
            module.eval()
    for _ in range(cfg.train.local_epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(images), labels).backward()  # the frozen layers, every batch
            optimizer.step()
    reply = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                        "metrics": MetricRecord({"num-examples": len(train_set)})})
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = _config(int(msg.content["config"]["rounds"]))
    net = _net(cfg)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, val_set = _client_data(cfg.federation.rounds, int(context.node_config["partition-id"]))
    loss, accuracy, seen = _evaluate(net, DataLoader(val_set, batch_size=128))
    metrics = MetricRecord({"num-examples": seen, "loss": loss, "accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


class MeteredGrid(Grid):
    """Flower's grid, unchanged, with the payload of every message counted as fedtune's transport counts it."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent = 0
        self.received = 0

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> object:  # Flower's Run
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from fedtune.server.transport import payload_bytes

        messages = list(messages)
        self.sent += sum(payload_bytes(m.content) for m in messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        from fedtune.server.transport import payload_bytes

        replies = list(self.grid.pull_messages(message_ids))
        self.received += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        from fedtune.server.transport import payload_bytes

        messages = list(messages)
        self.sent += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.received += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies


def run_baseline(rounds: int) -> dict[str, object]:
    """One run of the Flower-example workload in this process; per-round times, bytes and accuracy."""
    from flwr.simulation import run_simulation

    from fedtune.data import load_split

    cfg = _config(rounds)
    server_app = ServerApp()
    record: dict[str, object] = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        metered = MeteredGrid(grid)
        torch.manual_seed(cfg.seed)
        net = _net(cfg)
        pretrained = _pretrained(cfg)
        net.load_state_dict(pretrained.state_dict())
        from fedtune.backbones import preprocessing_for

        pre = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size)
        test = load_split(cfg.data.source, "test", root=None, download=False, seed=cfg.seed)
        test_loader = DataLoader(test.with_transform(pre.transform(augment=False)), batch_size=128)
        marks: list[tuple[float, int, int, float]] = []

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            net.load_state_dict(arrays.to_torch_state_dict())
            _, accuracy, _ = _evaluate(net, test_loader)
            marks.append((time.monotonic(), metered.sent, metered.received, accuracy))
            return MetricRecord({"accuracy": accuracy})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=NUM_CLIENTS)
        strategy.start(grid=metered, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({"rounds": rounds}), evaluate_config=ConfigRecord({"rounds": rounds}),
                       evaluate_fn=central)
        record["rounds"] = [
            {"round": i, "seconds": marks[i][0] - marks[i - 1][0], "bytes_sent": marks[i][1] - marks[i - 1][1],
             "bytes_received": marks[i][2] - marks[i - 1][2], "central_accuracy": marks[i][3]}
            for i in range(1, len(marks))
        ]

    # The ClientApp of this file imported by its module name (benchmarks/ is on PYTHONPATH), not
    # from __main__, which Ray's workers cannot import.
    import flower_baseline

    run_simulation(server_app=server_app, client_app=flower_baseline.client_app, num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "address": "local"}})
    return record


def _pretrained(cfg: ExperimentConfig) -> nn.Module:
    from fedtune.backbones import build_model

    return build_model(cfg.model.backbone, num_classes=10, weights=cfg.model.weights,
                       head_dropout=cfg.model.head_dropout)


def run_fedtune(rounds: int, out: Path) -> dict[str, object]:
    """One fedtune simulation of the same workload; its history's per-round figures."""
    from fedtune.config import load_config
    from fedtune.simulation import simulate

    cfg = load_config(CONFIG, [*_settings(rounds), f"output.dir={out}"])
    outcome = simulate(cfg)
    history = json.loads((outcome.run_dir / "history.json").read_text())["rounds"]
    return {"rounds": [{key: r[key] for key in ("round", "seconds", "bytes_sent", "bytes_received",
                                                  "central_accuracy")} for r in history if r["round"] >= 1]}


def _summary(kind: str, runs: list[dict[str, object]]) -> dict[str, object]:
    def warm(key: str) -> float:
        return statistics.median(statistics.median(r[key] for r in run["rounds"][1:]) for run in runs)

    return {
        "kind": kind,
        "runs": len(runs),
        "warm round s": warm("seconds"),
        "run wall s": statistics.median(run["wall"] for run in runs),
        "warm round bytes": warm("bytes_sent") + warm("bytes_received"),
        "final central accuracy": statistics.median(run["rounds"][-1]["central_accuracy"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flower-baseline")
    parser.add_argument("--one", choices=("fedtune", "baseline"), help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        started = time.monotonic()
        record = run_fedtune(args.rounds, args.record.parent / "runs") if args.one == "fedtune" \
            else run_baseline(args.rounds)
        record["wall"] = time.monotonic() - started
        args.record.write_text(json.dumps(record))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "work"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks"),
                                                          os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, list[dict[str, object]]] = {"fedtune": [], "baseline": []}
    for repeat in range(args.repeats):
        for kind in runs:  # alternating, so that load on the machine falls on both alike
            record_file = scratch / f"{kind}-{repeat}.json"
            subprocess.run([sys.executable, __file__, "--one", kind, "--rounds", str(args.rounds),
                            "--record", str(record_file)], check=True, env=env, cwd=REPO)
            runs[kind].append(json.loads(record_file.read_text()))
            print(f"{kind} run {repeat + 1}/{args.repeats}: "
                  f"{[round(r['seconds'], 2) for r in runs[kind][-1]['rounds']]} s per round", flush=True)
    rows = [_summary(kind, kind_runs) for kind, kind_runs in runs.items()]
    fedtune_row, baseline_row = rows
    ratios = {
        "kind": "baseline / fedtune",
        "runs": args.repeats,
        "warm round s": baseline_row["warm round s"] / fedtune_row["warm round s"],
        "run wall s": baseline_row["run wall s"] / fedtune_row["run wall s"],
        "warm round bytes": baseline_row["warm round bytes"] / fedtune_row["warm round bytes"],
        "final central accuracy": None,
    }
    from fedtune.console import compare_table, format_bytes

    shown = [{**row, "warm round bytes": format_bytes(row["warm round bytes"])} for row in rows]
    table = compare_table([*shown, ratios], list(rows[0]))
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps({"rows": [*rows, ratios], "runs": runs,
                                                      "command": " ".join(sys.argv)}, indent=1))


if __name__ == "__main__":
    main()
