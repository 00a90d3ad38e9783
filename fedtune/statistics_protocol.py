"""The feature-statistics exchange of `fedtune select`: the server's query (written, and parsed by a client), the reply.

One message per node (message type `query.statistics`) asks for every candidate at once: for
candidate i, the client settings of its config (backbone, weights, cut, data), the hash of the
model it computes features with (already in the node's cache: fedtune/server/delivery.py sent it),
and the stage whose output is the feature (average-pooled when it is a feature map). A node refuses
anything not of its exact form with a RefusedMessage naming the field (fedtune/protocol.py).

The reply holds, for candidate i, an ArrayRecord `fedtune.statistics.<i>` of float64 arrays: the
class sums (K x D), the class counts (K) and either the Gram matrix F^T F (D x D) or, when it is
smaller, a factor G of it (R x D, R <= N examples, G^T G = F^T F), and one MetricRecord holding
num-examples and the client's compute seconds per candidate. The factor is a function of the Gram
matrix alone (`gram_factor`), so it tells the server nothing the Gram matrix would not. The server
parses a reply with the worst case in mind (fedtune/server/statistics.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune import messages as keys
from fedtune.candidates import MAX_CANDIDATES
from fedtune.protocol import (
    STAGE_NAME_FORM,
    ClientSettings,
    RefusedMessage,
    VirtualClient,
    excerpt,
    parse_model_hash,
    parse_settings,
    parse_virtual_client,
)
from fedtune.transferability import FeatureStatistics

QUERY_KEYS = frozenset({keys.STATISTICS_SETTINGS, keys.STATISTICS_MODELS, keys.STATISTICS_STAGES,
                        keys.VIRTUAL_PARTITION, keys.VIRTUAL_CLIENTS,
                        # under SecAgg+: the public bounds, and the round Flower's legacy layout numbers
                        keys.STATISTICS_NORMS, keys.STATISTICS_MAX_EXAMPLES, keys.STATISTICS_LEVELS,
                        keys.SERVER_ROUND})
MAX_EXAMPLES = 2**31  # of one client
MAX_LEVELS = 2**30  # SecAgg+'s quantisation levels: Flower quantises to int32
_MAX_NORM = 1e12  # a feature norm bound beyond any real feature's
MESSAGE_TYPE = f"query.{keys.STATISTICS}"
# Eigenvalues of F F^T below this share of the largest are zero (rounding): their rows of the factor are left out.
FACTOR_RANK_CUTOFF = 1e-13


@dataclass(frozen=True)
class StatisticsRequest:
    """One candidate, as the server asks for it."""

    settings: ClientSettings
    model_hash: str
    stage: str


@dataclass(frozen=True)
class SecureBounds:
    """Under SecAgg+: each candidate's public feature norm bound, the most examples a client may hold,
    and SecAgg+'s quantisation levels (a power of two: `two_digits`)."""

    norms: tuple[float, ...]
    max_examples: int
    levels: int


@dataclass(frozen=True)
class StatisticsQuery:
    requests: tuple[StatisticsRequest, ...]
    virtual: VirtualClient | None = None
    secure: SecureBounds | None = None


def statistics_query(requests: Sequence[StatisticsRequest], *, secure: SecureBounds | None = None) -> RecordDict:
    """The content of the query the server sends every node (under SecAgg+, with the public bounds)."""
    config = ConfigRecord({
        keys.STATISTICS_SETTINGS: [request.settings.to_message() for request in requests],
        keys.STATISTICS_MODELS: [request.model_hash for request in requests],
        keys.STATISTICS_STAGES: [request.stage for request in requests],
    })
    if secure is not None:
        config[keys.STATISTICS_NORMS] = [float(norm) for norm in secure.norms]
        config[keys.STATISTICS_MAX_EXAMPLES] = secure.max_examples
        config[keys.STATISTICS_LEVELS] = secure.levels
    return RecordDict({keys.CONFIG: config})


def _secure_bounds(config: ConfigRecord, candidates: int) -> SecureBounds | None:
    if not {keys.STATISTICS_NORMS, keys.STATISTICS_MAX_EXAMPLES, keys.STATISTICS_LEVELS} & set(config):
        return None
    value = config.get(keys.STATISTICS_NORMS)
    norms = [n for n in value if type(n) is float and math.isfinite(n) and 0 < n <= _MAX_NORM] \
        if isinstance(value, list) else []
    if not (isinstance(value, list) and len(value) == candidates == len(norms)):
        raise RefusedMessage(keys.STATISTICS_NORMS, f"must be {candidates} numbers in (0, {_MAX_NORM:g}], one per "
                                                    f"candidate, got {excerpt(value)}")
    most = config.get(keys.STATISTICS_MAX_EXAMPLES)
    if type(most) is not int or not 1 <= most <= MAX_EXAMPLES:
        raise RefusedMessage(keys.STATISTICS_MAX_EXAMPLES, f"must be an integer in [1, {MAX_EXAMPLES}], got "
                                                           f"{excerpt(most)}")
    levels = config.get(keys.STATISTICS_LEVELS)
    if type(levels) is not int or not 2 <= levels <= MAX_LEVELS or levels & (levels - 1):
        raise RefusedMessage(keys.STATISTICS_LEVELS, f"must be a power of two in [2, {MAX_LEVELS}], got "
                                                     f"{excerpt(levels)}")
    return SecureBounds(tuple(norms), most, levels)


def _string_list(config: ConfigRecord, key: str) -> list[str]:
    if key not in config:
        raise RefusedMessage(key, "missing")
    value = config[key]
    if not isinstance(value, list) or not value:
        raise RefusedMessage(key, f"must be a non-empty list, got {excerpt(value)}")
    if len(value) > MAX_CANDIDATES:
        raise RefusedMessage(key, f"asks for {len(value)} candidates, more than {MAX_CANDIDATES}")
    strings = [item for item in value if isinstance(item, str)]
    if len(strings) != len(value):
        raise RefusedMessage(key, "must hold strings only")
    return strings


def parse_statistics_query(content: RecordDict) -> StatisticsQuery:
    """The server's statistics query, each value of its exact form, or RefusedMessage naming the field."""
    if set(content.array_records) or set(content.metric_records) or set(content.config_records) != {keys.CONFIG}:
        raise RefusedMessage("content", f"must hold exactly one config record {keys.CONFIG!r} and nothing else")
    config = content.config_records[keys.CONFIG]
    unknown = sorted(set(config) - QUERY_KEYS)
    if unknown:
        raise RefusedMessage(keys.CONFIG, f"unknown key {excerpt(unknown[0])}")
    settings = _string_list(config, keys.STATISTICS_SETTINGS)
    models = _string_list(config, keys.STATISTICS_MODELS)
    stages = _string_list(config, keys.STATISTICS_STAGES)
    if not len(settings) == len(models) == len(stages):
        raise RefusedMessage(keys.STATISTICS_STAGES, f"{len(settings)} settings, {len(models)} models and "
                                                     f"{len(stages)} stages: one of each per candidate")
    for stage in stages:
        if not STAGE_NAME_FORM.fullmatch(stage):
            raise RefusedMessage(keys.STATISTICS_STAGES, f"{excerpt(stage)} is not a stage name")
    requests = []
    for text, model_hash, stage in zip(settings, models, stages, strict=True):
        try:
            parsed = parse_settings(text)
        except RefusedMessage as error:
            raise RefusedMessage(keys.STATISTICS_SETTINGS, error.problem) from None
        if parsed.data.augment:
            raise RefusedMessage(keys.STATISTICS_SETTINGS, "data.augment: statistics are of the images as they are, "
                                                           "never of random crops")
        requests.append(StatisticsRequest(parsed, parse_model_hash(model_hash, field=keys.STATISTICS_MODELS), stage))
    first = requests[0].settings
    for request in requests[1:]:
        # One federation: every candidate reads the same data, with the same classes and clients.
        if (request.settings.num_clients, request.settings.num_classes, request.settings.seed,
                request.settings.data.source) != (first.num_clients, first.num_classes, first.seed,
                                                  first.data.source):
            raise RefusedMessage(keys.STATISTICS_SETTINGS, "the candidates' settings disagree on the federation "
                                                           "(clients, classes, seed or data source)")
    return StatisticsQuery(tuple(requests), parse_virtual_client(config), _secure_bounds(config, len(requests)))


def gram_factor(features: np.ndarray) -> np.ndarray:
    """G (R x D) with G^T G = F^T F, for F of N x D: the rows u_k^T F for the eigenvectors u_k of F F^T
    with a non-zero eigenvalue, each row's sign set so that its largest entry is positive.

    Row k is s_k v_k^T (F = U S V^T), so G is a function of F^T F alone (its eigenvalues and
    eigenvectors, signs fixed by the rule), up to the basis of an eigenspace whose eigenvalue repeats.
    """
    f = np.asarray(features, dtype=np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(f @ f.T)
    keep = eigenvalues > FACTOR_RANK_CUTOFF * max(float(eigenvalues.max(initial=0.0)), 0.0)
    rows = eigenvectors[:, keep].T @ f
    largest = rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)] if len(rows) else np.zeros(0)
    rows *= np.where(largest < 0, -1.0, 1.0)[:, None]
    return rows[::-1].copy()  # largest eigenvalue first


def statistics_record(features: np.ndarray, labels: np.ndarray, *, num_classes: int) -> ArrayRecord:
    """One candidate's statistics as they travel: the Gram matrix, or its factor when that is smaller."""
    stats = FeatureStatistics.of(features, labels, num_classes=num_classes)
    count, dims = np.shape(features)
    gram = (keys.GRAM_FACTOR, gram_factor(features)) if count < dims else (keys.GRAM, stats.gram)
    return ArrayRecord({
        gram[0]: Array(np.ascontiguousarray(gram[1])),
        keys.CLASS_SUMS: Array(np.ascontiguousarray(stats.class_sums)),
        keys.CLASS_COUNTS: Array(np.ascontiguousarray(stats.class_counts)),
    })


def statistics_reply(records: Sequence[ArrayRecord], *, num_examples: int, seconds: Sequence[float]) -> RecordDict:
    """The reply's content: candidate i's record under `fedtune.statistics.<i>`, and the metrics."""
    content = RecordDict({f"{keys.STATISTICS_RECORD}{index}": record for index, record in enumerate(records)})
    content[keys.METRICS] = MetricRecord({
        keys.NUM_EXAMPLES: num_examples,
        **{f"{keys.STATISTICS_SECONDS}{index}": float(value) for index, value in enumerate(seconds)},
    })
    return content


# --- under SecAgg+ ---------------------------------------------------------------------------------
# SecAgg+ sums integers: each client's statistics are scaled into [-1, 1] by public bounds, then
# Flower quantises them (stochastic rounding to steps of 2 / levels) and masks them. With every
# feature vector clipped to the candidate's norm bound R and at most M examples per client,
# |F^T F| <= M R^2 entrywise, |class sums| <= M R, counts <= M: dividing by these puts every entry
# in [-1, 1]. The Gram matrix travels as its upper triangle (it is symmetric). Each scaled value
# travels as two digits (`two_digits`), so that the sum is exact to about clients x 4 / levels^2.

SECURE_PARTS = ("gram-triangle", "class-sums", "class-counts", "clipped")
DIGITS = ("hi", "lo")


def secure_layout(dims: int, classes: int) -> dict[str, tuple[int, ...]]:
    """The arrays one candidate's statistics travel as under SecAgg+ (`<part>.<digit>`), and their shapes."""
    shapes = {"gram-triangle": (dims * (dims + 1) // 2,), "class-sums": (classes, dims), "class-counts": (classes,),
              "clipped": (1,)}
    return {f"{part}.{digit}": shapes[part] for part in SECURE_PARTS for digit in DIGITS}


def two_digits(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Values in [-1, 1] as (hi, lo): hi on SecAgg+'s quantisation grid, lo the remainder in grid steps.

    With `levels` a power of two, hi = 2 k / levels - 1 is exact in floating point and Flower's
    quantisation maps it to k exactly (its stochastic rounding rounds nothing), and lo in [0, 1]
    quantises with an error of one step: values = hi + lo x 2 / levels, summed over clients to
    within clients x 4 / levels^2, where one quantised value would be off by up to clients x 2 / levels.
    """
    scaled = (np.clip(values, -1.0, 1.0) + 1.0) * (levels / 2)
    steps = np.floor(scaled)
    hi = steps * (2 / levels) - 1.0
    return hi, np.clip(scaled - steps, 0.0, 1.0)


def from_two_digits(hi: np.ndarray, lo: np.ndarray, levels: int) -> np.ndarray:
    """The (summed) values from their (summed) digits."""
    return hi + lo * (2 / levels)


def clip_to_norm(features: np.ndarray, norm: float) -> tuple[np.ndarray, int]:
    """Each feature vector scaled down to the norm bound if longer; and how many were."""
    f = np.asarray(features, dtype=np.float64)
    lengths = np.linalg.norm(f, axis=1)
    longer = lengths > norm
    scale = np.where(longer, norm / np.maximum(lengths, 1e-300), 1.0)
    return f * scale[:, None], int(longer.sum())


def secure_vectors(features: np.ndarray, labels: np.ndarray, *, num_classes: int, norm: float, max_examples: int,
                   levels: int) -> dict[str, np.ndarray]:
    """One candidate's statistics scaled into [-1, 1] by the public bounds (features clipped to `norm`),
    each part as its two digits (`secure_layout`)."""
    if len(features) > max_examples:
        raise RefusedMessage(keys.STATISTICS_MAX_EXAMPLES, f"this client holds {len(features)} examples, more than "
                                                           f"the {max_examples} the sums are scaled for")
    clipped, count = clip_to_norm(features, norm)
    stats = FeatureStatistics.of(clipped, labels, num_classes=num_classes)
    upper = np.triu_indices(len(stats.gram))
    scaled = {
        "gram-triangle": stats.gram[upper] / (max_examples * norm**2),
        "class-sums": stats.class_sums / (max_examples * norm),
        "class-counts": stats.class_counts / max_examples,
        "clipped": np.array([count / max_examples]),
    }
    vectors = {}
    for part, values in scaled.items():
        vectors[f"{part}.hi"], vectors[f"{part}.lo"] = two_digits(values, levels)
    return vectors


def from_secure_sums(sums: dict[str, np.ndarray], *, dims: int, norm: float, max_examples: int, levels: int
                     ) -> tuple[FeatureStatistics, int]:
    """The federation's statistics from the sums over its clients of `secure_vectors`, and how many of
    their features were clipped. Counts are rounded to whole numbers (the sums leave them within a
    tiny fraction of one); a count that is not near one is an error."""
    parts = {part: from_two_digits(sums[f"{part}.hi"], sums[f"{part}.lo"], levels) for part in SECURE_PARTS}
    counts = parts["class-counts"] * max_examples
    clipped = float(parts["clipped"][0]) * max_examples
    for name, value in (("class counts", counts), ("clipped features", np.array([clipped]))):
        if np.abs(value - np.rint(value)).max(initial=0.0) > 0.25:
            raise ValueError(f"secure aggregation: the summed {name} are not whole numbers ({value.tolist()[:5]}): "
                             "quantisation cannot explain that")
    gram = np.zeros((dims, dims))
    gram[np.triu_indices(dims)] = parts["gram-triangle"] * max_examples * norm**2
    gram = gram + np.triu(gram, 1).T
    stats = FeatureStatistics(gram=gram, class_sums=parts["class-sums"] * max_examples * norm,
                              class_counts=np.clip(np.rint(counts), 0, None))
    return stats, int(round(clipped))
