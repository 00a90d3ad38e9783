"""Partitioning at federation scale: time and peak memory of iid, Dirichlet and shards at 1,000 to 1,000,000 clients.

    python benchmarks/partition_scale.py --out benchmarks/results/partition-scale     # a few minutes
    python benchmarks/partition_scale.py --clients 1000 10000 --runs 3                 # quicker

Data. Partitioning reads the labels only, so the large sets are index-only: digits' 1,437
training labels (10 classes, as uneven as digits' are) repeated to 5 examples per client,
5,000 to 5,000,000 examples. Each (scheme, N) is partitioned --runs times and the median wall
time printed; peak memory is tracemalloc's peak (numpy reports its arrays to it) over one more
call. min_examples is 2, fedtune's default; Dirichlet at alpha 0.5 (the default) and 0.1.

Per message. A client's partition used to cost a reload of its split and a partition of all N
clients for every message; now the first message of a run in a process pays that and later ones
take a slice (fedtune/data/resident.py). Measured on a 20,000-image MNIST-format set made from
digits (each 8x8 scan scaled to 24x24 and placed at a random offset in a 28x28 frame, so copies
differ) read by torchvision's MNIST loader, with 10,000 clients, Dirichlet alpha 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedtune.data import Partitioning, load_split, partitioning, resident
from fedtune.data.partitions import DIRICHLET_ATTEMPTS, Scheme

EXAMPLES_PER_CLIENT = 5
SETTINGS: list[tuple[Scheme, float]] = [("iid", 0.5), ("dirichlet", 0.5), ("dirichlet", 0.1), ("shards", 0.5)]
MIN_EXAMPLES = 2


def _quietly(call: Callable[[], object]) -> None:
    """call(), whose ValueError (an infeasible partitioning) is the outcome being timed."""
    try:
        call()
    except ValueError:
        pass


def _median_seconds(call: Callable[[], object], runs: int) -> float:
    return _median_times(call, runs)[0]


def _median_times(call: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall and CPU seconds of call(). On a machine busy with other work the wall time includes
    waiting for a core; the CPU time does not."""
    walls, cpus = [], []
    for _ in range(runs):
        started, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _peak_bytes(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def scale_rows(clients: list[int], runs: int) -> list[dict[str, object]]:
    digits = np.asarray(load_split("digits", "train", root=None, download=False, seed=0).targets)
    rows = []
    for n_clients in clients:
        labels = np.resize(digits, EXAMPLES_PER_CLIENT * n_clients)
        for scheme, alpha in SETTINGS:
            def call(scheme: Scheme = scheme, alpha: float = alpha, labels: np.ndarray = labels,
                     n_clients: int = n_clients) -> Partitioning:
                return partitioning(labels, scheme=scheme, num_partitions=n_clients, seed=0, alpha=alpha,
                                    min_examples=MIN_EXAMPLES)

            name = scheme if scheme != "dirichlet" else f"dirichlet {alpha:g}"
            try:
                sizes = call().sizes()
                outcome = f"sizes {sizes.min()}-{sizes.max()}"
            except ValueError:
                # Up to 1,000 clients Dirichlet redraws as it always has, and says so when no draw fits.
                outcome = f"no draw fits ({DIRICHLET_ATTEMPTS:,} redraws, as before: error)"
            wall, cpu = _median_times(lambda: _quietly(call), runs)
            peak = _peak_bytes(lambda: _quietly(call)) / 2**20
            rows.append({"clients": n_clients, "examples": len(labels), "scheme": name, "seconds": wall,
                         "cpu_seconds": cpu, "peak_mib": peak, "outcome": outcome})
            print(f"N={n_clients:>9,} {name:<14} {wall:7.3f} s ({cpu:.3f} s CPU)  peak {peak:7.1f} MiB  {outcome}",
                  flush=True)
    return rows


def _write_mnist_format(root: Path, images: int, seed: int) -> None:
    """An MNIST-format set (torchvision's MNIST reads it) of `images` training images made from digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    scans = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count in (("train", images), ("t10k", len(scans))):
        chosen = rng.integers(0, len(scans), count) if split == "train" else np.arange(len(scans))
        frames = np.zeros((count, 28, 28), dtype=np.uint8)
        offsets = rng.integers(0, 5, size=(count, 2))
        big = scans[chosen].repeat(3, axis=1).repeat(3, axis=2)  # 24 x 24
        for i, (dy, dx) in enumerate(offsets):
            frames[i, dy:dy + 24, dx:dx + 24] = big[i]
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, count, 28, 28) + frames.tobytes())
        labels = digits.target[chosen].astype(np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, count) + labels.tobytes())


def message_rows(runs: int, *, images: int = 20_000, n_clients: int = 10_000) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as folder:
        _write_mnist_format(Path(folder), images, seed=0)

        def load() -> resident.ResidentSplit:
            return resident.resident_split("torchvision:MNIST", "train", root=folder, download=False, seed=0,
                                           bad_images="error", scope="run")

        def unmemoised() -> np.ndarray:
            dataset = load_split("torchvision:MNIST", "train", root=folder, download=False, seed=0)
            return partitioning(dataset.targets, scheme="dirichlet", num_partitions=n_clients, seed=0, alpha=0.5,
                                min_examples=MIN_EXAMPLES).indices(n_clients - 1)

        def memoised() -> np.ndarray:
            return resident.resident_partitioning(load(), scheme="dirichlet", num_partitions=n_clients, seed=0,
                                                  alpha=0.5, shards_per_partition=2,
                                                  min_examples=MIN_EXAMPLES).indices(n_clients - 1)

        resident.SPLITS.clear()
        resident.PARTITIONINGS.clear()
        timings = [
            ("the run's first message in a process (one): load, partition all N", _median_seconds(memoised, 1)),
            ("every later message: a slice of the memo (fedtune now)", _median_seconds(memoised, max(runs, 20))),
            ("every message without the memo: load, partition all N", _median_seconds(unmemoised, runs)),
        ]
        # torchvision's MNIST holds the whole idx files in memory, as uint8 pixels and int64 labels;
        # fedtune's split adds its list of labels (8 bytes a reference) and their array
        pixels = (Path(folder) / "MNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size
        labels = 8 * images + 8 * images + load().labels.nbytes
    for path, seconds in timings:
        print(f"{path:<62} {seconds * 1000:9.3f} ms", flush=True)
    print(f"kept per process: the split, {pixels / 2**20:.1f} MiB of pixels and {labels / 2**20:.1f} MiB of labels; "
          f"the partitioning, {8 * (images + n_clients + 1) / 2**20:.1f} MiB", flush=True)
    return [{"path": path, "milliseconds": 1000 * seconds, "images": images, "clients": n_clients,
             "split_pixels_mib": pixels / 2**20, "split_labels_mib": labels / 2**20} for path, seconds in timings]


def _markdown(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "| " + " | ".join("---:" if form else "---" for _, _, form in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], form) for _, key, form in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=5, help="Timed runs of each setting; the median is printed.")
    parser.add_argument("--out", type=Path, help="Folder for table.md and table.json.")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    scale = scale_rows(args.clients, args.runs)
    messages = message_rows(args.runs)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/partition_scale.py " + " ".join(
        ["--clients", *map(str, args.clients), "--runs", str(args.runs), "--out", str(args.out)])
    load = os.getloadavg()[0]
    note = (f"{EXAMPLES_PER_CLIENT} examples a client (digits' labels repeated), min_examples {MIN_EXAMPLES}; medians "
            f"of {args.runs} runs; {os.cpu_count()} CPU cores, 1-minute load average {load:.1f} at the end.")
    table = _markdown(scale, [("clients", "clients", ","), ("examples", "examples", ","), ("scheme", "scheme", ""),
                              ("median s", "seconds", ".3f"), ("CPU s", "cpu_seconds", ".3f"),
                              ("peak MiB", "peak_mib", ".1f"),
                              ("outcome", "outcome", "")])
    per_message = _markdown(messages, [(f"a client's partition ({messages[0]['images']:,} MNIST-format images, "
                                        f"{messages[0]['clients']:,} clients)", "path", ""),
                                       ("median ms", "milliseconds", ".3f")])
    (args.out / "table.md").write_text(f"{table}\n\n{per_message}\n\n{note}\n\nCommand: `{command}`\n")
    (args.out / "table.json").write_text(json.dumps({"scale": scale, "per_message": messages, "note": note,
                                                     "command": command}, indent=2))


if __name__ == "__main__":
    main()
