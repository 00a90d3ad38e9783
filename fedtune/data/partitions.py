"""Partitioners (iid, Dirichlet, shards) for up to millions of clients, each client's validation split and
training subsample, a fingerprint.

Every partitioner decides an owner for each example, with vectorised numpy: time and memory grow
with examples + partitions (+ classes x partitions for Dirichlet's draw, drawn a slice at a time),
never with their product alone. The result is a `Partitioning`: all partitions in one index array.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedtune.data.images import ImageDataset

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[Scheme, ...] = ("iid", "dirichlet", "shards")

# Dirichlet draws only (class x partition) proportions per attempt and deals examples out once a
# draw gives every partition min_examples, so even thousands of rejected draws cost milliseconds
# for a small federation. Up to DIRICHLET_TOP_UP_ABOVE partitions it redraws up to
# DIRICHLET_ATTEMPTS times, exactly as fedtune always has (so a seed gives the partitions it
# always gave), and says so when no draw fits. Above that, redrawing stops paying: a draw fits only
# if not one of N partitions falls short, a chance that shrinks exponentially with N (at 10,000
# clients of 2 examples each, 2,000 redraws failed). So a large federation redraws only while the
# draws stay within DIRICHLET_REDRAW_BUDGET proportions (about 0.1 s), then keeps its last
# draw and tops up the partitions that fall short (`_top_up`).
DIRICHLET_ATTEMPTS = 2_000
DIRICHLET_TOP_UP_ABOVE = 1_000
DIRICHLET_REDRAW_BUDGET = 2_000_000
# Proportions held in memory at once while drawing: classes are drawn in slices of this many values.
_DRAW_SLICE = 1 << 20


# ---------------------------------------------------------------------------------------------
# The result: every partition's indices in two arrays
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partitioning:
    """Partition k holds the example indices order[offsets[k]:offsets[k + 1]], ascending.

    8 x (examples + partitions + 1) bytes whatever the number of partitions; both arrays are read-only,
    so one Partitioning can be handed to every client a process serves.
    """

    order: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def indices(self, k: int) -> np.ndarray:
        """Partition k's example indices, ascending (a read-only view)."""
        if not 0 <= k < len(self):
            raise IndexError(f"partition {k} of a partitioning into {len(self)}")
        return self.order[self.offsets[k]:self.offsets[k + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def as_lists(self) -> list[list[int]]:
        return [part.tolist() for part in np.split(self.order, self.offsets[1:-1])]

    @classmethod
    def of(cls, examples: np.ndarray, owners: np.ndarray, num_partitions: int) -> Partitioning:
        """The partitioning in which example examples[j] belongs to partition owners[j] (each example once)."""
        order = _sort_by(owners, examples)
        offsets = np.zeros(num_partitions + 1, dtype=np.int64)
        np.cumsum(np.bincount(owners, minlength=num_partitions), out=offsets[1:])
        order.setflags(write=False)
        offsets.setflags(write=False)
        return cls(order, offsets)


# ---------------------------------------------------------------------------------------------
# Partitioners
# ---------------------------------------------------------------------------------------------


def partition(
    labels: Sequence[int] | np.ndarray,
    *,
    scheme: Scheme,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_examples: int = 1,
) -> list[list[int]]:
    """`partitioning(...)` as one sorted list of indices per partition (for small federations)."""
    return partitioning(labels, scheme=scheme, num_partitions=num_partitions, seed=seed, alpha=alpha,
                        shards_per_partition=shards_per_partition, min_examples=min_examples).as_lists()


def partitioning(
    labels: Sequence[int] | np.ndarray,
    *,
    scheme: Scheme,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_examples: int = 1,
) -> Partitioning:
    """Split indices 0..len(labels)-1 into num_partitions disjoint, covering partitions.

    Deterministic for (labels, scheme, num_partitions, seed, params). Every partition ends with at
    least min_examples indices, or a ValueError names the settings and numbers that cannot give that.
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
        parts = _iid(n, num_partitions, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_partitions, rng, alpha=alpha, min_examples=min_examples)
    elif scheme == "shards":
        parts = _shards(y, num_partitions, rng, shards_per_partition=shards_per_partition)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    smallest = int(parts.sizes().min())
    if smallest < min_examples:
        hint = (f" (shards of at least {n // (num_partitions * shards_per_partition)} examples; raise "
                f"shards_per_partition, or lower min_examples)" if scheme == "shards" else "")
        raise ValueError(
            f"{scheme} partitioning of {n} examples into {num_partitions} partitions gives one only "
            f"{smallest} examples, fewer than min_examples={min_examples}{hint}"
        )
    return parts


def _iid(n: int, num_partitions: int, rng: np.random.Generator) -> Partitioning:
    # a shuffle cut into num_partitions runs whose sizes differ by at most one, as np.array_split cuts
    runs = np.repeat(np.arange(num_partitions), _even_sizes(n, num_partitions))
    return Partitioning.of(rng.permutation(n), runs, num_partitions)


def _dirichlet(
    y: np.ndarray, num_partitions: int, rng: np.random.Generator, *, alpha: float, min_examples: int
) -> Partitioning:
    """Each class is split among the partitions in Dirichlet(alpha) proportions, drawn anew per class."""
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    classes, num_classes = _dense_classes(y)
    members = np.split(_stable_order(classes), np.cumsum(np.bincount(classes))[:-1])
    class_sizes = np.array([len(m) for m in members], dtype=np.int64)
    if num_partitions <= DIRICHLET_TOP_UP_ABOVE:
        attempts = DIRICHLET_ATTEMPTS
    else:
        attempts = max(1, min(DIRICHLET_ATTEMPTS, DIRICHLET_REDRAW_BUDGET // (num_classes * num_partitions)))

    def proportions(generator: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
        return _proportions(num_classes, num_partitions, generator, alpha=alpha)

    for attempt in range(attempts):
        before_draw = rng.bit_generator.state  # to see this draw again, to deal it out or top it up
        last = attempt == attempts - 1
        totals, slots = _draw(class_sizes, proportions(rng), num_partitions, keep_slots=last)
        if totals.min() >= min_examples:
            break
    else:
        if num_partitions <= DIRICHLET_TOP_UP_ABOVE:
            raise ValueError(
                f"dirichlet partitioning is infeasible: in {DIRICHLET_ATTEMPTS} draws with alpha={alpha}, no split "
                f"of {len(y)} examples gave all {num_partitions} partitions at least min_examples={min_examples}; "
                f"raise alpha, or lower min_examples or num_partitions (above {DIRICHLET_TOP_UP_ABOVE:,} "
                f"partitions, the ones short of min_examples are topped up instead)"
            )
    if slots is None:  # a draw before the last fitted: draw it again, keeping the slots this time
        _, slots = _draw(class_sizes, proportions(_generator_at(rng, before_draw)), num_partitions, keep_slots=True)
    assert slots is not None
    examples = _deal(members, rng)
    if totals.min() >= min_examples:
        return Partitioning.of(examples, slots, num_partitions)
    owner = np.empty(len(y), dtype=np.int64)
    owner[examples] = slots
    owner = _top_up(owner, classes, proportions(_generator_at(rng, before_draw)), num_partitions=num_partitions,
                    min_examples=min_examples, rng=rng)
    return Partitioning.of(np.arange(len(y)), owner, num_partitions)


def _generator_at(rng: np.random.Generator, state: Mapping[str, Any]) -> np.random.Generator:
    """A new generator of rng's kind, in `state` (a bit_generator.state that rng had)."""
    replay = np.random.Generator(type(rng.bit_generator)())
    replay.bit_generator.state = state
    return replay


def _proportions(
    num_classes: int, num_partitions: int, rng: np.random.Generator, *, alpha: float
) -> Iterator[tuple[int, np.ndarray]]:
    """Each class's Dirichlet(alpha) proportions over the partitions: (first class, rows), a slice of classes at a time.

    The same numbers as one (classes x partitions) draw (numpy draws row by row), in bounded memory.
    """
    concentration = np.full(num_partitions, alpha)
    rows = max(1, _DRAW_SLICE // num_partitions)
    for first in range(0, num_classes, rows):
        yield first, rng.dirichlet(concentration, size=min(rows, num_classes - first))


def _draw(
    class_sizes: np.ndarray, proportions: Iterator[tuple[int, np.ndarray]], num_partitions: int, *, keep_slots: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(totals, slots) of one draw: totals counts each partition's examples; slots (if kept) lists,
    class by class, the partition each of that class's examples goes to, in dealing order."""
    totals = np.zeros(num_partitions, dtype=np.int64)
    runs = []
    for first, rows in proportions:
        sizes = class_sizes[first:first + len(rows)]
        bounds = (np.cumsum(rows, axis=1) * sizes[:, None]).astype(np.int64)
        bounds[:, -1] = sizes  # float rounding must not drop the last examples of a class
        counts = np.diff(bounds, axis=1, prepend=0)
        totals += counts.sum(axis=0)
        if keep_slots:
            runs.append(np.repeat(np.tile(np.arange(num_partitions), len(sizes)), counts.ravel()))
    return totals, np.concatenate(runs) if keep_slots else None


def _deal(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The examples in slot order: each class's, shuffled."""
    return np.concatenate([rng.permutation(chosen) for chosen in members])


def _top_up(
    owner: np.ndarray,
    classes: np.ndarray,
    proportions: Iterable[tuple[int, np.ndarray]],
    *,
    num_partitions: int,
    min_examples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Give each partition short of min_examples what it lacks, from the others' examples past their first min_examples.

    Each missing example is given the class the partition's own proportions draw for it (so a
    partition of a skewed draw stays skewed, one of a flat draw stays mixed) and is one of that
    class, as far as other partitions have such examples to spare; the rest are drawn at random.
    Examples are taken at random among each class's spare ones: partitions give in proportion to
    what they can spare, and none falls short. Possible whenever there are min_examples x
    partitions examples.
    """
    num_classes = int(classes.max()) + 1
    sizes = np.bincount(owner, minlength=num_partitions)
    short = np.maximum(min_examples - sizes, 0)
    # each partition's examples in a random order: all but its first min_examples are spare
    shuffled = rng.permutation(len(owner))
    grouped = shuffled[_stable_order(owner[shuffled])]
    spare = rng.permutation(grouped[_rank_in_runs(sizes) >= min_examples])
    spare = spare[_stable_order(classes[spare])]  # by class, in a random order within each
    # the places to fill, each with the class its partition draws for it, grouped by that class
    places = np.repeat(np.flatnonzero(short), short[short > 0])
    wants = _draw_classes(places, proportions, rng)
    places, wants = places[_stable_order(wants)], np.sort(wants)
    wanted = np.bincount(wants, minlength=num_classes)
    spare_by_class = np.bincount(classes[spare], minlength=num_classes)
    matched = np.minimum(wanted, spare_by_class)
    # the first matched[c] spare examples of class c fill the first matched[c] places wanting c
    taken = _rank_in_runs(spare_by_class) < matched[classes[spare]]
    filled = _rank_in_runs(wanted) < matched[wants]
    owner[spare[taken]] = places[filled]
    owner[rng.choice(spare[~taken], size=int((~filled).sum()), replace=False)] = places[~filled]
    return owner


def _draw_classes(
    partitions: np.ndarray, proportions: Iterable[tuple[int, np.ndarray]], rng: np.random.Generator
) -> np.ndarray:
    """For each entry of `partitions`, a class drawn from that partition's proportions, independently.

    An exponential race: the class with the least Exp(1) / proportion wins, with probability equal
    to its proportion; one pass over the classes, memory for the entries only.
    """
    fastest = np.full(len(partitions), np.inf)
    drawn = np.zeros(len(partitions), dtype=np.int64)
    with np.errstate(divide="ignore", over="ignore"):  # a proportion of 0 (or nearly) never wins: inf
        for first, rows in proportions:
            for offset, row in enumerate(rows):
                time = rng.standard_exponential(len(partitions)) / row[partitions]
                won = time < fastest
                fastest[won] = time[won]
                drawn[won] = first + offset
    return drawn


def _shards(
    y: np.ndarray, num_partitions: int, rng: np.random.Generator, *, shards_per_partition: int
) -> Partitioning:
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
    classes, _ = _dense_classes(y)
    shuffled = rng.permutation(len(y))
    ordered = shuffled[_stable_order(classes[shuffled])]
    holders = rng.permutation(num_shards).reshape(num_partitions, shards_per_partition)
    shard_owner = np.empty(num_shards, dtype=np.int64)
    shard_owner[holders.ravel()] = np.repeat(np.arange(num_partitions), shards_per_partition)
    return Partitioning.of(ordered, np.repeat(shard_owner, _even_sizes(len(y), num_shards)), num_partitions)


# ---------------------------------------------------------------------------------------------
# Vectorised helpers
# ---------------------------------------------------------------------------------------------


def _even_sizes(n: int, parts: int) -> np.ndarray:
    """np.array_split's piece sizes: the first n % parts pieces one longer."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return sizes


def _sort_by(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` (distinct integers in [0, len(values))) ordered by (key, value); keys are non-negative integers.

    Each pair is packed into one int64, key x n + value, and sorted by numpy's vectorised integer
    sort: 5-20x faster at millions of values than a stable argsort, which is a timsort for keys
    over 16 bits. Exact while key x n stays below 2^63 (keys here are partitions or classes).
    """
    n = len(values)
    packed = keys * n + values
    packed.sort()
    return np.remainder(packed, n, out=packed)


def _rank_in_runs(sizes: np.ndarray) -> np.ndarray:
    """0, 1, ..., sizes[0] - 1, 0, 1, ..., sizes[1] - 1, ...: each position's rank within its run."""
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable") for non-negative integer keys."""
    return _sort_by(keys, np.arange(len(keys)))


def _dense_classes(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Each example's class numbered 0..C-1 in label order, and C, the number of distinct labels."""
    if y.min() >= 0 and y.max() < 2 * len(y) + 65_536:  # the usual 0..C-1 labels: counted, 6x faster than sorted
        present = np.bincount(y) > 0
        return (np.cumsum(present) - 1)[y], int(present.sum())
    labels, classes = np.unique(y, return_inverse=True)
    return classes.reshape(-1), len(labels)


# ---------------------------------------------------------------------------------------------
# Each client's local validation split; a partition's fingerprint
# ---------------------------------------------------------------------------------------------


def split_validation(
    indices: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, *, fraction: float, seed: int
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


def training_subset(
    indices: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, *, fraction: float, seed: int
) -> list[int]:
    """The ceil(fraction x n) examples of a client's n training examples it trains on (at least one).

    Nested and stratified: the seed alone (never the fraction) puts the examples in one order that
    interleaves the classes in proportion (a class's j-th example, in a seeded shuffle of that
    class, at (j + u) / its count, u a seeded offset per class), and a fraction keeps a prefix of
    it. So a smaller fraction keeps a subset of a larger one's examples, which makes the points of
    a data-efficiency curve comparable, and each class keeps its share give or take one example.
    The order does not depend on the order of `indices`; `labels` are the whole dataset's. Sorted.
    """
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"training fraction must be in (0, 1], got {fraction}")
    chosen = np.unique(np.asarray(indices, dtype=np.int64))
    n = len(chosen)
    if n and (chosen[0] < 0 or chosen[-1] >= len(labels)):
        raise ValueError(f"indices must lie in [0, {len(labels)}) (labels are the whole dataset's, indexed by them)")
    # rounded first: 0.1 x 30 is 3.0000000000000004 in floating point, and must keep 3
    keep = max(1, math.ceil(round(fraction * n, 9)))
    if keep >= n:
        return [int(i) for i in chosen]
    y = np.asarray(labels, dtype=np.int64)[chosen]
    rng = np.random.default_rng(seed)
    place = np.empty(n)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        place[members] = (np.arange(len(members)) + rng.random()) / len(members)
    kept = chosen[np.argsort(place, kind="stable")[:keep]]
    return sorted(int(i) for i in kept)


def fingerprint(dataset: ImageDataset, indices: Sequence[int]) -> str:
    """Stable short hash of (dataset identity, indices in order), to key feature caches.

    Covers the pixels only: a cache of model outputs must add the backbone, weights and
    preprocessing to its key.
    """
    h = hashlib.sha256(dataset.identity.encode())
    h.update(b"\0")
    h.update(np.asarray(indices, dtype="<i8").tobytes())
    return h.hexdigest()[:16]

