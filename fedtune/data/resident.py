"""What a process keeps between messages: the splits it loaded and their partitionings, each in a small LRU memo.

One actor of a simulation serves many virtual clients, and a node's worker serves every round of a
run: without these, each message would read its data again and partition all N clients again to
keep one. With them a process loads a split once per run and partitions it once per setting;
each client then takes its own indices, a slice.

Bounds, whatever the number of messages or clients: at most MAX_SPLITS loaded splits, each costing
what its loader keeps in memory (an in-memory set's pixels, e.g. MNIST's train split 47 MB,
CIFAR-10's 150 MB; a folder's file paths, about 100 bytes an image; digits 92 KB) plus its labels
(8 bytes an example); and at most MAX_PARTITIONINGS partitionings of 8 x (examples + partitions)
bytes each (48 MB for 5 million examples over a million clients).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from fedtune.data.images import BadImages, ImageDataset, Split
from fedtune.data.partitions import Partitioning, Scheme, partitioning
from fedtune.data.sources import load_split

MAX_SPLITS = 2  # a run's train split and one other: a node serving two runs in turn does not reload per message
MAX_PARTITIONINGS = 4

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most `size` values, the least recently used dropped first; safe to share between threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value kept for key, or make()'s, then kept; nothing is kept when make raises."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = make()  # outside the lock: it may take seconds, and must not hold up other keys
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


@dataclass(frozen=True)
class ResidentSplit:
    """A loaded split with its labels as a read-only array, and their digest (what a partitioning depends on)."""

    dataset: ImageDataset
    labels: np.ndarray
    labels_digest: str

    @classmethod
    def of(cls, dataset: ImageDataset) -> ResidentSplit:
        labels = np.asarray(dataset.targets, dtype=np.int64)
        labels.setflags(write=False)
        return cls(dataset, labels, hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest())


SPLITS: Memo[tuple[object, ...], ResidentSplit] = Memo(MAX_SPLITS)
PARTITIONINGS: Memo[tuple[object, ...], Partitioning] = Memo(MAX_PARTITIONINGS)


def resident_split(
    source: str,
    split: Split,
    *,
    root: str | None,
    download: bool,
    seed: int,
    bad_images: BadImages,
    scope: str,
) -> ResidentSplit:
    """load_split(...) (without decode_now), read once per `scope` in this process and kept in SPLITS.

    `scope` names a run: during a run a process reads its data once, and a change to the files
    shows from the next run on (a run trains on one dataset, and its feature caches are keyed by it).
    """
    key = (scope, source, split, root, download, seed, bad_images)
    return SPLITS.get(key, lambda: ResidentSplit.of(
        load_split(source, split, root=root, download=download, seed=seed, bad_images=bad_images)))


def resident_partitioning(
    split: ResidentSplit,
    *,
    scheme: Scheme,
    num_partitions: int,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    min_examples: int,
) -> Partitioning:
    """partitioning(split.labels, ...), computed once per labels and settings in this process, kept in PARTITIONINGS."""
    key = (split.labels_digest, scheme, num_partitions, seed, alpha, shards_per_partition, min_examples)
    return PARTITIONINGS.get(key, lambda: partitioning(
        split.labels, scheme=scheme, num_partitions=num_partitions, seed=seed, alpha=alpha,
        shards_per_partition=shards_per_partition, min_examples=min_examples))
