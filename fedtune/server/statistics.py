"""Feature statistics from the federation, per candidate backbone: sent for, checked, summed (and the server's own).

`prepare_candidates` builds the server's copy of each candidate (its model, exactly as a run of its
config would build it, so the model hash and the clients' cached features are the ones that run
uses) and what the clients are asked (fedtune/statistics_protocol.py). `collect_statistics` makes
sure every client caches each model (one ModelDelivery per distinct model, fedtune/server/delivery.py:
each node receives each model once, and a cut candidate whose whole backbone is also a candidate
shares its model and its forward pass), sends every client one query for all candidates, and parses
each reply with the worst case in mind: a reply that is not exactly what the server's own copy of
the candidates implies is refused, logged naming the client and the problem, and left out. It
returns a `Collection`: each client's FeatureStatistics per candidate, and their cost.
`collect_statistics_securely` does the same under SecAgg+, where the Collection holds only the sums.
In a simulation, `warm_up` first puts every model in the virtual clients' machine cache.
`reference_statistics` computes the same statistics on the server's own test split.

Use (fedtune/server/selection.py): `prepare_candidates`, then `warm_up` in a simulation, then
`collect_statistics` (or `collect_statistics_securely`) on the run's Transport, then `Collection.sums()`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from torch import nn

from fedtune import messages as keys
from fedtune.backbones import HEAD, StagedModel, build_model, preprocessing_for
from fedtune.candidates import Candidate
from fedtune.config import SECAGG_MODULUS, ExperimentConfig, SecureAggregationConfig
from fedtune.data import ImageDataset
from fedtune.engine import extract_features
from fedtune.params import state_hash
from fedtune.protocol import ClientSettings, says_model_missing
from fedtune.server.delivery import ModelDelivery
from fedtune.server.secure_aggregation import SecureAggregationError, secure_train_round
from fedtune.server.transport import Transport, payload_bytes
from fedtune.statistics_protocol import (
    FACTOR_RANK_CUTOFF,
    MAX_LEVELS,
    MESSAGE_TYPE,
    SecureBounds,
    StatisticsRequest,
    from_secure_sums,
    secure_layout,
    statistics_query,
)
from fedtune.strategies.validation import TensorSpec, UnusableReply, decode_tensor
from fedtune.text import concise_reason
from fedtune.transferability import FeatureStatistics

log = logging.getLogger("fedtune.server")

MAX_EXAMPLES = 2**31  # of one client: a count above it is refused
MAX_SECONDS = 1e7  # a client's compute seconds for one candidate (informational, but bounded)
# Rounding a client's float64 sums may leave: the Gram matrix's asymmetry and the Cauchy-Schwarz
# bounds below are checked to this share of the largest value.
_TOLERANCE = 1e-9
_F64 = np.dtype(np.float64)


@dataclass(frozen=True)
class StatisticsShape:
    """What one candidate's statistics must be: `dims` features, `classes` classes."""

    label: str
    dims: int
    classes: int


@dataclass(frozen=True)
class PreparedCandidate:
    """A candidate as the server holds it: its config, its model, and what the clients are asked."""

    candidate: Candidate
    cfg: ExperimentConfig
    model: StagedModel  # the server's copy, as a run of `cfg` builds it
    model_hash: str
    request: StatisticsRequest  # the model the clients compute with (perhaps a whole backbone this one cuts)
    feature_dim: int
    num_classes: int
    delivery: ModelDelivery  # shared by the candidates that compute with one model

    @property
    def label(self) -> str:
        return self.candidate.label

    @property
    def shape(self) -> StatisticsShape:
        return StatisticsShape(self.label, self.feature_dim, self.num_classes)


def _head_inputs(model: StagedModel) -> int:
    linear = [module for module in model.stages[HEAD].modules() if isinstance(module, nn.Linear)]
    return linear[0].in_features


def prepare_candidates(
    configs: Sequence[tuple[Candidate, ExperimentConfig]], *, num_classes: int, run_key: str, timeout: float,
    presumed: bool,
) -> list[PreparedCandidate]:
    """Each candidate's model and request. Models are built as `run_federation` builds them (the torch
    seed set just before), so the hash is the one a later run of the chosen config uses.

    A candidate cut at a block whose whole backbone, with the same weights, is also a candidate
    computes its features with that backbone's model, at the cut block (average-pooled): one model
    sent, one forward pass for both.
    """
    built: dict[tuple[str, str, str | None], tuple[StagedModel, str, ExperimentConfig]] = {}
    for candidate, cfg in configs:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model.backbone, num_classes=num_classes, weights=cfg.model.weights,
                            head_dropout=cfg.model.head_dropout, cut=cfg.model.cut)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        built[(candidate.backbone, candidate.weights, candidate.cut)] = (model, state_hash(state), cfg)
    deliveries: dict[str, ModelDelivery] = {}
    prepared = []
    for candidate, cfg in configs:
        model, model_hash, _ = built[(candidate.backbone, candidate.weights, candidate.cut)]
        sibling = built.get((candidate.backbone, candidate.weights, None))
        if candidate.cut is not None and sibling is not None:  # the clients compute with the whole backbone
            sent_model, sent_hash, sent_cfg = sibling
            stage = candidate.cut
        else:
            sent_model, sent_hash, sent_cfg = model, model_hash, cfg
            stage = list(model.stages)[model.stage_index(HEAD) - 1]
        if sent_hash not in deliveries:
            deliveries[sent_hash] = ModelDelivery(model_hash=sent_hash, backbone=ArrayRecord(sent_model.state_dict()),
                                                  timeout=timeout, presumed=presumed)
        # Statistics are of the images as they are: a run with data.augment caches no features either.
        plain = sent_cfg.model_copy(update={"data": sent_cfg.data.model_copy(update={"augment": False})})
        settings = ClientSettings.of(plain, num_classes=num_classes, run_key=run_key)
        prepared.append(PreparedCandidate(
            candidate=candidate, cfg=cfg, model=model, model_hash=model_hash,
            request=StatisticsRequest(settings=settings, model_hash=sent_hash, stage=stage),
            feature_dim=_head_inputs(model), num_classes=num_classes, delivery=deliveries[sent_hash],
        ))
    return prepared


# --- one reply ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientStatistics:
    """One client's reply, parsed: its statistics per candidate, its count and compute seconds."""

    statistics: list[FeatureStatistics]
    num_examples: int
    seconds: list[float]


def _whole_count(value: object, name: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_EXAMPLES:
        raise UnusableReply(f"metric {name!r} must be an integer in [1, {MAX_EXAMPLES}], got {str(value)[:40]}")
    return value


def _metrics(content: RecordDict, candidates: int) -> tuple[int, list[float]]:
    if set(content.metric_records) != {keys.METRICS}:
        raise UnusableReply(f"expected one MetricRecord {keys.METRICS!r}")
    metrics = content.metric_records[keys.METRICS]
    expected = {keys.NUM_EXAMPLES, *(f"{keys.STATISTICS_SECONDS}{i}" for i in range(candidates))}
    if set(metrics) != expected:
        unexpected = sorted(set(metrics) - expected)[:3]
        missing = sorted(expected - set(metrics))[:3]
        raise UnusableReply(f"metrics: missing {missing}, unexpected {[name[:40] for name in unexpected]}")
    seconds = []
    for index in range(candidates):
        value = metrics[f"{keys.STATISTICS_SECONDS}{index}"]
        if type(value) not in (int, float) or not 0 <= float(value) <= MAX_SECONDS:  # type: ignore[arg-type]
            raise UnusableReply(f"metric '{keys.STATISTICS_SECONDS}{index}' must be a number of seconds in "
                                f"[0, {MAX_SECONDS:g}]")
        seconds.append(float(value))  # type: ignore[arg-type]
    return _whole_count(metrics[keys.NUM_EXAMPLES], keys.NUM_EXAMPLES), seconds


def _factor_rows(array: Array, *, limit: int, dims: int) -> int:
    """The rows a Gram factor declares: a 2-d shape (R, dims) with R <= limit, checked before any decoding."""
    shape = array.shape
    if not (isinstance(shape, list | tuple) and len(shape) == 2 and all(type(n) is int for n in shape)):
        raise UnusableReply(f"{keys.GRAM_FACTOR} declares the shape {str(shape)[:60]}, not (rows, {dims})")
    rows, columns = shape
    if columns != dims or not 0 <= rows <= limit:
        raise UnusableReply(f"{keys.GRAM_FACTOR} has shape ({rows}, {columns}), expected (R, {dims}) with R <= {limit}")
    return rows


def _factor(record: ArrayRecord, *, dims: int, num_examples: int) -> np.ndarray | None:
    """The record's Gram factor (R x dims, R <= its examples), or None when it carries the whole matrix."""
    if keys.GRAM_FACTOR not in record:
        return None
    rows = _factor_rows(record[keys.GRAM_FACTOR], limit=min(num_examples, dims), dims=dims)
    return decode_tensor(keys.GRAM_FACTOR, record[keys.GRAM_FACTOR], TensorSpec((rows, dims), _F64))


def _gram(record: ArrayRecord, *, dims: int) -> np.ndarray:
    """The Gram matrix the record carries whole, checked to be one."""
    gram = decode_tensor(keys.GRAM, record[keys.GRAM], TensorSpec((dims, dims), _F64))
    scale = float(np.abs(gram).max(initial=0.0))
    if float(np.abs(gram - gram.T).max(initial=0.0)) > _TOLERANCE * scale:
        raise UnusableReply(f"{keys.GRAM} is not symmetric")
    diagonal = np.diag(gram)
    if (diagonal < 0).any():
        raise UnusableReply(f"{keys.GRAM} has a negative diagonal entry (a sum of squares)")
    # Cauchy-Schwarz: |sum_n f_ni f_nj| <= sqrt(sum_n f_ni^2 sum_n f_nj^2).
    if (np.abs(gram) > np.sqrt(np.outer(diagonal, diagonal)) * (1 + _TOLERANCE) + _TOLERANCE * scale).any():
        raise UnusableReply(f"{keys.GRAM} is no Gram matrix: an entry exceeds the root of its diagonal entries' "
                            "product")
    return (gram + gram.T) / 2


def parse_statistics_record(record: ArrayRecord, *, dims: int, classes: int, num_examples: int) -> FeatureStatistics:
    """One candidate's statistics from a client, every value checked against what it must be for
    `num_examples` examples of `dims` features in `classes` classes; UnusableReply says what is wrong."""
    names = set(record)
    if names not in ({keys.GRAM, keys.CLASS_SUMS, keys.CLASS_COUNTS}, {keys.GRAM_FACTOR, keys.CLASS_SUMS,
                                                                     keys.CLASS_COUNTS}):
        shown = sorted(name[:40] for name in names)[:5]
        raise UnusableReply(f"expected {keys.CLASS_SUMS}, {keys.CLASS_COUNTS} and {keys.GRAM} or {keys.GRAM_FACTOR}; "
                            f"got {shown}")
    counts = decode_tensor(keys.CLASS_COUNTS, record[keys.CLASS_COUNTS], TensorSpec((classes,), _F64))
    if (counts < 0).any() or (counts != np.rint(counts)).any():
        raise UnusableReply(f"{keys.CLASS_COUNTS} must be whole numbers >= 0")
    if int(counts.sum()) != num_examples:
        raise UnusableReply(f"{keys.CLASS_COUNTS} add up to {int(counts.sum())}, but the reply claims "
                            f"{num_examples} examples")
    sums = decode_tensor(keys.CLASS_SUMS, record[keys.CLASS_SUMS], TensorSpec((classes, dims), _F64))
    # A factor stands for the Gram matrix it is one of (symmetric and positive semi-definite by
    # construction), which is formed only if the server needs it whole (FeatureStatistics.gram).
    factor = _factor(record, dims=dims, num_examples=num_examples)
    gram: np.ndarray | None = None
    if factor is None:
        gram = _gram(record, dims=dims)
        trace = float(np.trace(gram))
    else:
        with np.errstate(over="ignore"):  # a hostile factor's squares may overflow: refused just below
            trace = float(np.sum(np.square(factor)))
    if (sums[counts == 0] != 0).any():
        raise UnusableReply(f"{keys.CLASS_SUMS} holds a non-zero sum for a class of no examples")
    # |sum of a class's features|^2 <= its count x the sum of their squared norms <= count x tr(F^T F).
    if not math.isfinite(trace):
        raise UnusableReply(f"{keys.GRAM_FACTOR if factor is not None else keys.GRAM}: the features' squared norms "
                            "overflow a float64")
    if (np.square(sums).sum(axis=1) > counts * trace * (1 + _TOLERANCE) + _TOLERANCE * max(trace, 1.0)).any():
        raise UnusableReply(f"{keys.CLASS_SUMS} cannot come from features whose Gram matrix has this trace")
    if factor is not None:
        _check_in_span(sums, factor, counts=counts, trace=trace)
    return FeatureStatistics(gram=gram, class_sums=sums, class_counts=counts, factor=factor)


def _check_in_span(sums: np.ndarray, factor: np.ndarray, *, counts: np.ndarray, trace: float) -> None:
    """Each class sum is a sum of features, and features lie in the span of the factor's rows, up to the
    directions gram_factor leaves out (eigenvalues s^2 of F F^T below FACTOR_RANK_CUTOFF of the largest;
    along them a class's sum F^T y has squared norm at most |y|^2 max s^2 <= count x cutoff x tr F^T F).
    The server scores in that span (FeatureStatistics.in_span): a sum outside it would score differently."""
    if not len(factor):
        outside = sums
    else:
        basis, _ = np.linalg.qr(factor.T)
        outside = sums - (sums @ basis) @ basis.T
    allowed = counts * FACTOR_RANK_CUTOFF * trace + _TOLERANCE**2 * counts * max(trace, 1.0)
    if (np.square(outside).sum(axis=1) > allowed).any():
        raise UnusableReply(f"{keys.CLASS_SUMS} lie outside the span of {keys.GRAM_FACTOR}'s rows: they are not "
                            "sums of the features it describes")


def parse_statistics_reply(content: RecordDict, candidates: Sequence[StatisticsShape]) -> ClientStatistics:
    """A client's whole reply: exactly one record per candidate and the metrics, each of its exact form."""
    if content.config_records:
        raise UnusableReply("a statistics reply carries no config records")
    expected = {f"{keys.STATISTICS_RECORD}{index}" for index in range(len(candidates))}
    if set(content.array_records) != expected:
        found = sorted(name[:40] for name in content.array_records)[:5]
        raise UnusableReply(f"expected the ArrayRecords {sorted(expected)[:5]}, got {found}")
    num_examples, seconds = _metrics(content, len(candidates))
    statistics: list[FeatureStatistics] = []
    for index, candidate in enumerate(candidates):
        try:
            stats = parse_statistics_record(content.array_records[f"{keys.STATISTICS_RECORD}{index}"],
                                            dims=candidate.dims, classes=candidate.classes,
                                            num_examples=num_examples)
        except UnusableReply as problem:
            raise UnusableReply(f"candidate {candidate.label}: {problem}") from None
        if statistics and not np.array_equal(stats.class_counts, statistics[0].class_counts):
            raise UnusableReply(f"candidate {candidate.label}: class counts differ from the first candidate's, "
                                "on the same data")
        statistics.append(stats)
    return ClientStatistics(statistics, num_examples, seconds)


# --- the whole federation ------------------------------------------------------------------------


@dataclass
class Cost:
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    client_seconds: float = 0.0  # the clients' own compute, as they reported it (summed over clients)

    def add(self, seconds: float, sent: int, received: int) -> None:
        self.seconds += seconds
        self.bytes_sent += sent
        self.bytes_received += received


@dataclass
class Collection:
    """What the federation sent: each client's statistics per candidate, their sums, who was left out, the cost."""

    candidates: list[PreparedCandidate]
    per_client: dict[int, ClientStatistics] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # client -> why its reply was refused
    failed: dict[int, str] = field(default_factory=dict)  # client -> the error it replied, or none in time
    cost_by_candidate: list[Cost] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    # Under SecAgg+: the sums alone (per_client stays empty), the clients in them, and per candidate
    # how many of their features were clipped to its public norm bound.
    secure_sums: list[FeatureStatistics] | None = None
    secure_clients: list[int] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)

    @property
    def used(self) -> list[int]:
        """The clients whose statistics are in the sums."""
        return sorted(self.secure_clients if self.secure_sums is not None else self.per_client)

    def sums(self) -> list[FeatureStatistics]:
        """Per candidate, the statistics of the pooled data of the clients used (in a fixed order)."""
        if self.secure_sums is not None:
            return list(self.secure_sums)
        if not self.per_client:
            raise RuntimeError("no client sent usable statistics: " + " | ".join(
                sorted({*self.failed.values(), *self.refused.values()}) or ["no replies"]))
        totals = []
        for index in range(len(self.candidates)):
            parts = [self.per_client[client].statistics[index] for client in sorted(self.per_client)]
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            totals.append(total)
        return totals


def _users(candidates: Sequence[PreparedCandidate]) -> list[list[int]]:
    """The candidates' indices grouped by the model (delivery) they compute with."""
    users: dict[int, list[int]] = {}
    for index, candidate in enumerate(candidates):
        users.setdefault(id(candidate.delivery), []).append(index)
    return list(users.values())


def warm_up(transport: Transport, candidates: Sequence[PreparedCandidate], workers: list[int], *,
            pinged: Sequence[str]) -> None:
    """In a simulation, before the selection starts: the workers have answered their warm-up query
    (`pinged`: ModelDelivery.ping), and their machine's shared cache holds every candidate's model
    (ModelDelivery.warm_up), as a run's does before its round 1. The bytes real nodes would receive
    are counted when the clients are sent their first message (ModelDelivery.ensure_models)."""
    for number, indices in enumerate(_users(candidates)):
        candidates[indices[0]].delivery.warm_up(transport, workers, pinged=list(pinged) if number == 0 else [])


def _deliver(transport: Transport, candidates: Sequence[PreparedCandidate], clients: list[int],
             collection: Collection) -> None:
    """Each distinct model to every client that lacks it; its cost split between the candidates that use it."""
    for indices in _users(candidates):
        delivery = candidates[indices[0]].delivery
        started, traffic = time.monotonic(), transport.start_count()
        delivery.ensure_models(transport, clients)
        seconds = time.monotonic() - started
        for index in indices:
            collection.cost_by_candidate[index].add(seconds / len(indices), traffic.sent_on_nodes // len(indices),
                                                    traffic.received // len(indices))
        collection.cost.add(seconds, traffic.sent_on_nodes, traffic.received)


def collect_statistics(
    transport: Transport,
    candidates: Sequence[PreparedCandidate],
    *,
    clients: list[int],
    timeout: float,
    name_of: Callable[[int], str] = lambda node: f"client {node}",
) -> Collection:
    """Every client's statistics of every candidate, parsed; their cost in seconds and bytes.
    (In a simulation, `warm_up` first.)"""
    collection = Collection(list(candidates), cost_by_candidate=[Cost() for _ in candidates])
    _deliver(transport, candidates, clients, collection)
    started, traffic = time.monotonic(), transport.start_count()
    query = statistics_query([candidate.request for candidate in candidates])
    replies = transport.send_and_receive(
        [Message(content=query, message_type=MESSAGE_TYPE, dst_node_id=client) for client in clients], timeout=timeout)
    lost = [r.metadata.src_node_id for r in replies if says_model_missing(r)]
    if lost:  # a node whose cache lost a model: sent it again (at most MAX_DELIVERIES), and asked again, once
        log.warning("%s lost a candidate's model; sending it again", ", ".join(map(name_of, lost)))
        for delivery in {id(c.delivery): c.delivery for c in candidates}.values():
            delivery.forget(lost)
            delivery.ensure_models(transport, lost)
        again = transport.send_and_receive(
            [Message(content=query, message_type=MESSAGE_TYPE, dst_node_id=client) for client in lost],
            timeout=timeout)
        replies = [r for r in replies if r.metadata.src_node_id not in lost] + list(again)
    received_by_candidate = [0] * len(candidates)
    compute_by_candidate = [0.0] * len(candidates)
    answered = set()
    for reply in replies:
        client = reply.metadata.src_node_id
        answered.add(client)
        if reply.has_error():
            collection.failed[client] = concise_reason(reply.error.reason)
            log.warning("%s sent no statistics: %s", name_of(client), collection.failed[client])
            continue
        try:
            parsed = parse_statistics_reply(reply.content, [candidate.shape for candidate in candidates])
        except UnusableReply as problem:
            collection.refused[client] = str(problem)
            log.warning("refused the statistics of %s: %s", name_of(client), problem)
            continue
        collection.per_client[client] = parsed
        for index in range(len(candidates)):
            record = reply.content.array_records[f"{keys.STATISTICS_RECORD}{index}"]
            received_by_candidate[index] += payload_bytes(record)
            compute_by_candidate[index] += parsed.seconds[index]
    for client in sorted(set(clients) - answered):
        collection.failed[client] = f"no reply within {timeout:g} s"
        log.warning("%s sent no statistics within %g s", name_of(client), timeout)
    seconds = time.monotonic() - started
    # The exchange's seconds go to each candidate in proportion to the compute its clients reported for it;
    # the query's bytes evenly (it names every candidate alike).
    total_compute = sum(compute_by_candidate) or 1.0
    for index, cost in enumerate(collection.cost_by_candidate):
        share = compute_by_candidate[index] / total_compute if sum(compute_by_candidate) else 1 / len(candidates)
        cost.add(seconds * share, traffic.sent // len(candidates), received_by_candidate[index])
        cost.client_seconds += compute_by_candidate[index]
    collection.cost.add(seconds, traffic.sent, traffic.received)
    log.info("statistics of %d candidates from %d of %d clients (%d refused, %d failed)", len(candidates),
             len(collection.per_client), len(clients), len(collection.refused), len(collection.failed))
    return collection


def reference_features(candidate: PreparedCandidate, test_set: ImageDataset, *, device: torch.device
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The candidate's features (N x D, float64) and labels of the server's own held-out split, through
    the server's copy of its model (what its head reads), with the candidate's own preprocessing."""
    cfg = candidate.cfg
    images = test_set.with_transform(preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size)
                                     .transform(augment=False))
    model = candidate.model.to(device)
    vectors, labels = extract_features(model, images, stop=model.stage_index(HEAD), batch_size=64,
                                       device=device).tensors
    if vectors.dim() != 2 or vectors.shape[1] != candidate.feature_dim:
        raise RuntimeError(f"{candidate.label}: the head's input has shape {tuple(vectors.shape)}")
    return vectors.double().numpy(), labels.numpy()


def reference_statistics(candidate: PreparedCandidate, test_set: ImageDataset, *, device: torch.device
                         ) -> FeatureStatistics:
    """The candidate's statistics on the server's own held-out split (`reference_features`)."""
    features, labels = reference_features(candidate, test_set, device=device)
    return FeatureStatistics.of(features, labels, num_classes=candidate.num_classes)


# --- under SecAgg+ -------------------------------------------------------------------------------------

# The public norm bound of a candidate's features: this many times the longest feature vector of the
# server's own held-out split. Clients clip longer ones (and the sums say how many they clipped).
NORM_MARGIN = 2.0


def secure_bounds(candidates: Sequence[PreparedCandidate], test_set: ImageDataset, *, clients: list[int],
                  max_examples: int, device: torch.device) -> SecureBounds:
    """Public bounds for SecAgg+, from the server's own data: each candidate's norm bound, NORM_MARGIN x
    the longest of its reference features, and the most examples a client may hold."""
    norms = []
    for candidate in candidates:
        features, _ = reference_features(candidate, test_set, device=device)
        longest = float(np.linalg.norm(features, axis=1).max(initial=0.0))
        if longest <= 0:
            raise RuntimeError(f"{candidate.label}: every feature of the server's held-out split is zero")
        norms.append(NORM_MARGIN * longest)
    return SecureBounds(tuple(norms), max_examples, quantization_for(len(clients)))


def quantization_for(clients: int) -> int:
    """SecAgg+'s quantisation levels for the statistics: the largest power of two (`two_digits` needs one)
    that the modular sum of `clients` values leaves room for, within the int32 Flower quantises to
    (flwr/common/secure_aggregation/quantization.py)."""
    levels = MAX_LEVELS
    while levels > 2 and clients * levels >= SECAGG_MODULUS:
        levels //= 2
    return levels


def collect_statistics_securely(
    transport: Transport,
    candidates: Sequence[PreparedCandidate],
    *,
    clients: list[int],
    secure: SecureAggregationConfig,
    bounds: SecureBounds,
    timeout: float,
    name_of: Callable[[int], str] = lambda node: f"client {node}",
) -> Collection:
    """The sums of every client's statistics of every candidate, through SecAgg+: the server sees no
    client's own. Each client sends its statistics scaled into [-1, 1] by `bounds`
    (fedtune/statistics_protocol.py, secure_vectors) as the masked update of one secure round with
    weight 1 (fedtune/server/secure_aggregation.py); the mean that round returns, times the clients in
    it, is the sum. Each scaled value travels as two digits (fedtune/statistics_protocol.py, two_digits):
    the sums are then off by at most clients x 4 / levels^2 per scaled entry, mean zero."""
    collection = Collection(list(candidates), cost_by_candidate=[Cost() for _ in candidates])
    _deliver(transport, candidates, clients, collection)
    started, traffic = time.monotonic(), transport.start_count()
    layout = {f"{index}.{name}": shape for index, candidate in enumerate(candidates)
              for name, shape in secure_layout(candidate.feature_dim, candidate.num_classes).items()}
    zeros = ArrayRecord({name: Array(np.zeros(shape)) for name, shape in layout.items()})
    query = statistics_query([candidate.request for candidate in candidates], secure=bounds)
    settings = secure.model_copy(update={"clipping_range": 1.0, "max_weight": 1.0, "quantization_range": bounds.levels})
    try:
        mean, _, report = secure_train_round(transport, server_round=1, node_ids=clients, arrays=zeros,
                                             config=query.config_records[keys.CONFIG], settings=settings,
                                             timeout=timeout, name_of=name_of)
    except SecureAggregationError as error:
        raise RuntimeError(f"secure aggregation of the statistics halted: {error}") from None
    count = len(report.completed)
    sums, clipped = [], []
    for index, candidate in enumerate(candidates):
        parts = {name: mean[f"{index}.{name}"].numpy() * count
                 for name in secure_layout(candidate.feature_dim, candidate.num_classes)}
        stats, clipped_here = from_secure_sums(parts, dims=candidate.feature_dim, norm=bounds.norms[index],
                                               max_examples=bounds.max_examples, levels=bounds.levels)
        sums.append(stats)
        clipped.append(clipped_here)
    collection.secure_sums, collection.secure_clients, collection.clipped = sums, report.completed, clipped
    collection.failed = {node: report.reasons.get(node, f"dropped out at '{stage}'")
                         for node, stage in report.dropped.items()}
    seconds = time.monotonic() - started
    for cost in collection.cost_by_candidate:  # one masked vector holds every candidate: shared evenly
        cost.add(seconds / len(candidates), traffic.sent // len(candidates), traffic.received // len(candidates))
    collection.cost.add(seconds, traffic.sent, traffic.received)
    log.info("statistics of %d candidates summed securely over %d of %d clients", len(candidates), count,
             len(clients))
    return collection
