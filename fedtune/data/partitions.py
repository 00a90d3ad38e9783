"""Partitioners (iid, Dirichlet, shards), each client's local validation split, and a partition's fingerprint."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from fedtune.data.images import ImageDataset

# ---------------------------------------------------------------------------------------------
# Partitioners and the local validation split
# ---------------------------------------------------------------------------------------------

DIRICHLET_ATTEMPTS = 2_000


def partition(
    labels: Sequence[int],
    *,
    scheme: Literal["iid", "dirichlet", "shards"],
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_examples: int = 1,
) -> list[list[int]]:
    """Split indices 0..len(labels)-1 into num_partitions disjoint, covering, sorted lists.

    Deterministic for (labels, scheme, num_partitions, seed, params). Every partition ends with at
    least min_examples indices, or a ValueError says which settings cannot give that.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if num_partitions < 1 or num_partitions > n:
        raise ValueError(f"num_partitions must be between 1 and the number of examples ({n}), got {num_partitions}")
    if min_examples < 1:
        raise ValueError(f"min_examples must be at least 1, got {min_examples}")
    if num_partitions * min_examples > n:
        raise ValueError(
            f"{num_partitions} partitions of at least {min_examples} examples need "
            f"{num_partitions * min_examples} examples; there are {n}"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_partitions, rng, alpha=alpha, min_examples=min_examples)
    elif scheme == "shards":
        parts = _shards(y, num_partitions, rng, shards_per_partition=shards_per_partition)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: dirichlet, iid, shards")
    smallest = min(len(p) for p in parts)
    if smallest < min_examples:
        raise ValueError(
            f"{scheme} partitioning of {n} examples into {num_partitions} partitions gives one only "
            f"{smallest} examples, fewer than min_examples={min_examples}"
        )
    return [sorted(int(i) for i in p) for p in parts]


def _dirichlet(
    y: np.ndarray, num_partitions: int, rng: np.random.Generator, *, alpha: float, min_examples: int
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    class_sizes = np.array([len(members) for members in by_class])
    for _ in range(DIRICHLET_ATTEMPTS):
        # only the (class x partition) counts are drawn per attempt; examples are dealt out once a
        # draw passes, so even thousands of rejected draws cost milliseconds
        proportions = rng.dirichlet(np.full(num_partitions, alpha), size=len(by_class))
        bounds = (np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        bounds[:, -1] = class_sizes  # float rounding must not drop the last examples of a class
        counts = np.diff(bounds, axis=1, prepend=0)
        if counts.sum(axis=0).min() < min_examples:
            continue
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members, cuts in zip(by_class, bounds, strict=True):
            for k, chunk in enumerate(np.split(rng.permutation(members), cuts[:-1])):
                parts[k].append(chunk)
        return [np.concatenate(chunks) for chunks in parts]
    raise ValueError(
        f"dirichlet partitioning is infeasible: in {DIRICHLET_ATTEMPTS} draws with alpha={alpha}, no split of "
        f"{len(y)} examples gave all {num_partitions} partitions at least min_examples={min_examples}; "
        f"raise alpha, or lower num_partitions or min_examples"
    )


def _shards(
    y: np.ndarray, num_partitions: int, rng: np.random.Generator, *, shards_per_partition: int
) -> list[np.ndarray]:
    num_shards = num_partitions * shards_per_partition
    if shards_per_partition < 1:
        raise ValueError(f"shards_per_partition must be at least 1, got {shards_per_partition}")
    if num_shards > len(y):
        raise ValueError(
            f"{num_partitions} partitions x {shards_per_partition} shards = {num_shards} shards, "
            f"more than the {len(y)} examples"
        )
    # shuffle, then stable-sort by label: shards are label-pure runs, but which examples of a
    # label land in which shard still depends on the seed
    shuffled = rng.permutation(len(y))
    ordered = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(ordered, num_shards)
    owners = rng.permutation(num_shards).reshape(num_partitions, shards_per_partition)
    return [np.concatenate([shards[s] for s in row]) for row in owners]


def split_validation(
    indices: Sequence[int], labels: Sequence[int], *, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, validation) subsets of indices; `labels` are the whole dataset's, indexed by them.

    ceil(fraction * n) examples go to validation, but at least one stays for training. Stratified
    when every class present has at least two examples (and there is room for one of each class
    on both sides), plain random otherwise. Both lists are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    chosen = np.asarray(indices, dtype=np.int64)
    n = len(chosen)
    if n and (chosen.min() < 0 or chosen.max() >= len(labels)):
        raise ValueError(f"indices must lie in [0, {len(labels)}) (labels are the whole dataset's, indexed by them)")
    n_val = min(math.ceil(fraction * n), n - 1) if n else 0
    if n_val <= 0:
        return sorted(int(i) for i in chosen), []
    y = np.asarray(labels, dtype=np.int64)[chosen]
    rng = np.random.default_rng(seed)
    _, counts = np.unique(y, return_counts=True)
    if counts.min() >= 2 and len(counts) <= n_val <= n - len(counts):
        from sklearn.model_selection import train_test_split

        train, val = train_test_split(
            chosen, test_size=n_val, stratify=y, random_state=int(rng.integers(2**31 - 1))
        )
    else:
        order = rng.permutation(chosen)
        val, train = order[:n_val], order[n_val:]
    return sorted(int(i) for i in train), sorted(int(i) for i in val)


def fingerprint(dataset: ImageDataset, indices: Sequence[int]) -> str:
    """Stable short hash of (dataset identity, indices in order), to key feature caches.

    Covers the pixels only: a cache of model outputs must add the backbone, weights and
    preprocessing to its key.
    """
    h = hashlib.sha256(dataset.identity.encode())
    h.update(b"\0")
    h.update(np.asarray(indices, dtype="<i8").tobytes())
    return h.hexdigest()[:16]

