"""One round on the server: `play_round` plays its steps in order; a helper below it does each step.

The run (fedtune/server/run.py) builds the `Server` once and calls `play_round` once per round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedtune import messages as keys
from fedtune.backbones import StagedModel
from fedtune.config import ExperimentConfig
from fedtune.engine import Metrics
from fedtune.params import first_trainable_index, load_tensors, trainable_stages, trainable_state_dict
from fedtune.records import ClientSpread, RoundRecord
from fedtune.server.delivery import ModelDelivery
from fedtune.server.evaluate import CentralEvaluator
from fedtune.server.privacy_report import PrivacyReport
from fedtune.server.secure_aggregation import SecureAggregationError, apply_update, secure_train_round
from fedtune.server.transport import Traffic, Transport
from fedtune.strategies.bound import BoundEvent, UpdateBound
from fedtune.strategies.central_dp import CentralDP, CentralNoise
from fedtune.strategies.validation import (
    EVALUATE_ACCURACY,
    EVALUATE_METRICS,
    PERSONAL_EVALUATE_METRICS,
    MetricSpec,
    check_evaluate_replies,
    check_train_replies,
    specs_of,
)

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class Server:
    """What a round works with, built once per run; none of it is reassigned during the run.

    A round changes the run's state only inside these parts, each of which a checkpoint saves
    (fedtune/server/run.py): the model's tensors, the strategy's learned state, the nodes known to
    hold the backbone (`delivery`), the clients that left at their privacy budget
    (`transport.departed`) and the privacy ledger (`privacy`).
    """

    cfg: ExperimentConfig
    transport: Transport  # every message of the run goes through it; it counts their bytes
    model: StagedModel
    model_hash: str
    strategy: Strategy
    delivery: ModelDelivery
    evaluator: CentralEvaluator
    privacy: PrivacyReport
    bound: UpdateBound | None  # strategy.bound, where it applies
    settings: str  # ClientSettings as sent in every message
    train_metrics: dict[str, MetricSpec]  # what a train reply must report

    @property
    def central_dp(self) -> CentralDP | None:
        """The strategy, when it is central DP's (privacy.central)."""
        return self.strategy if isinstance(self.strategy, CentralDP) else None

    @property
    def at_budget(self) -> set[int]:
        """Clients that refused to train past their privacy budget: they left the run, and are sampled no more."""
        return self.transport.departed


@dataclass
class TrainOutcome:
    """What a round's training produced, however it was aggregated."""

    aggregated: ArrayRecord | None = None
    metrics: MetricRecord | None = None
    client_metrics: dict[int, MetricRecord] = field(default_factory=dict)  # node -> its train metrics, if aggregated
    problems: dict[int, str] = field(default_factory=dict)  # node -> why its update is not in the aggregate
    bounded: list[BoundEvent] = field(default_factory=list)  # what strategy.bound did, client by client
    rejected: int = 0
    failed: int = 0


@dataclass
class EvaluateOutcome:
    """What a round's federated evaluation produced."""

    sampled: int = 0  # evaluate messages sent; 0: no federated evaluation this round
    metrics: MetricRecord | None = None
    problems: dict[int, str] = field(default_factory=dict)  # node -> why its reply is not in the metrics
    capped: list[BoundEvent] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0
    accuracy: dict[int, float] = field(default_factory=dict)  # node -> its accuracy, of the valid replies
    personal_accuracy: dict[int, float] = field(default_factory=dict)  # node -> its own model's (personalization)


def play_round(server: Server, server_round: int) -> tuple[RoundRecord, TrainOutcome]:
    """Train and aggregate, evaluate (on the clients, when due, and centrally), account for privacy; the record."""
    started = time.monotonic()
    # Which stages train this round (gradual unfreezing): only their tensors travel.
    blocks = server.cfg.train.trainable_blocks_at(server_round)
    stages = trainable_stages(server.model, blocks)
    arrays = ArrayRecord(travelling(server, stages))
    config = ConfigRecord(
        {keys.CLIENT_CONFIG: server.settings, keys.MODEL_HASH: server.model_hash, keys.TRAINABLE_STAGES: stages}
    )
    # Every message since the previous round's record (the run starts each count): train, evaluate,
    # queries, SecAgg+, and before the run's first round a simulation's warm-up.
    traffic = server.transport.traffic

    # The strategy samples the clients and builds their train messages. Each sampled client that
    # lacks the backbone is sent it first; then it trains, and its reply is validated and bounded
    # before the strategy aggregates (under SecAgg+, the server receives only the masked sum).
    train_messages = list(server.strategy.configure_train(server_round, arrays, config, server.transport))
    if server.cfg.privacy.secure_aggregation.enabled:
        trained = train_securely(server, server_round, train_messages, arrays)
    elif train_messages:
        trained = train_and_aggregate(server, server_round, train_messages, arrays)
    else:  # central DP's Poisson sampling can draw no client
        trained = TrainOutcome()
    if trained.aggregated is None and server.central_dp is not None:
        # Central DP releases the model plus its noise every round, with or without an aggregate: an
        # unchanged model would tell that nobody was drawn, which the accountant does not allow for.
        trained.aggregated = server.central_dp.release_noise_alone(server_round, arrays)
    if trained.aggregated is not None:
        load_tensors(server.model, trained.aggregated.to_torch_state_dict(), expected_keys=list(arrays.keys()))
    elif train_messages:
        log.warning("round %d: no valid update to aggregate; the model is unchanged", server_round)

    # Federated evaluation, in the rounds federation.evaluation names (every k, and the last): the
    # new model on sampled clients' own validation data. The other rounds send nothing more.
    evaluated = EvaluateOutcome()
    if server.cfg.federated_evaluation and server.cfg.federation.evaluates_in(server_round):
        evaluated = evaluate_on_clients(server, server_round, stages, config)

    # Clients at their privacy budget leave the run (after this round's evaluation sampled them).
    leave_at_budget(server, trained.problems, server_round)

    # Central evaluation on the server's held-out split, then ε for the round.
    central = evaluate_centrally(server, stages)
    privacy_figures = server.privacy.round_figures(
        trained.client_metrics,
        clipping_norm=getattr(server.strategy, "clipping_norm", None),  # the central-DP wrappers' current norm
    )
    record = round_record(
        server, server_round, blocks=blocks, sampled=len(train_messages), traffic=traffic, trained=trained,
        evaluated=evaluated, central=central, privacy_figures=privacy_figures, seconds=time.monotonic() - started,
    )
    return record, trained


def travelling(server: Server, stages: list[str]) -> dict[str, torch.Tensor]:
    """The tensors sent to clients for `stages` (with BatchNorm statistics unless privacy freezes them, and
    never those personalization keeps on the clients)."""
    return trainable_state_dict(server.model, stages, statistics=not server.cfg.privacy.freezes_statistics,
                                personalization=server.cfg.personalization)


def train_and_aggregate(
    server: Server, server_round: int, messages: list[Message], arrays: ArrayRecord
) -> TrainOutcome:
    """Send; parse each reply; bound the updates; aggregate with the strategy (and its DP wrapper, if any)."""
    replies = server.delivery.send_and_receive(server.transport, messages)  # the backbone first, to nodes lacking it
    checked = check_train_replies(
        replies, specs_of(arrays), metrics=server.train_metrics, server_round=server_round,
        name_of=server.delivery.name_of, reject_unchanged=arrays if server.cfg.privacy.central.enabled else None,
    )
    usable, bounded = checked.valid, []
    problems = dict(checked.problems)
    if server.bound is not None:
        outcome = server.bound.apply(usable, arrays, server_round=server_round, name_of=server.delivery.name_of)
        usable, bounded = outcome.kept, outcome.events
        problems |= {event.node: event.detail for event in bounded if event.kind == "norm_rejected"}
    aggregated, metrics = server.strategy.aggregate_train(server_round, usable) if usable else (None, None)
    if aggregated is not None and not _finite(aggregated):
        # A server optimiser's step or a robust rule on extreme (yet finite) updates can still overflow.
        log.error("round %d: the aggregate holds non-finite values; the model is unchanged", server_round)
        aggregated = None
    return TrainOutcome(
        aggregated=aggregated,
        metrics=metrics,
        client_metrics={r.metadata.src_node_id: r.content.metric_records[keys.METRICS] for r in usable},
        problems=problems,
        bounded=bounded,
        rejected=len(checked.rejected),
        # replies that never came count as failures too
        failed=len(checked.failed) + len(messages) - len(replies),
    )


def train_securely(server: Server, server_round: int, messages: list[Message], arrays: ArrayRecord) -> TrainOutcome:
    """SecAgg+: the server learns only the sum of the sampled clients' updates (under central DP, noised).

    Under central DP a draw of two clients or more is summed by SecAgg+; a draw of one has no sum
    to hide in, so that client noises its own update (`train_alone`); a round with no update (an
    empty draw, or clients that failed or refused at their budget) releases the noise alone
    (`play_round`).
    """
    noise = server.central_dp.noise if server.central_dp is not None else None
    if noise is None or len(messages) >= 2:
        return _secure_sum(server, server_round, messages, arrays, noise) if messages else TrainOutcome()
    if messages:
        return train_alone(server, server_round, messages[0], arrays, noise)
    return TrainOutcome()


def _secure_sum(
    server: Server, server_round: int, messages: list[Message], arrays: ArrayRecord, noise: CentralNoise | None
) -> TrainOutcome:
    """One SecAgg+ round on the drawn clients; clients that refuse at their budget leave the run."""
    nodes = [m.metadata.dst_node_id for m in messages]
    server.delivery.ensure_models(server.transport, nodes)
    try:
        aggregated, metrics, report = secure_train_round(
            server.transport,  # every protocol message is metered with the round's other messages
            server_round=server_round,
            node_ids=nodes,
            arrays=arrays,
            config=messages[0].content.config_records[keys.CONFIG],  # with what the strategy added (FedProx's mu)
            settings=server.cfg.privacy.secure_aggregation,
            timeout=server.cfg.federation.round_timeout,
            metric_specs=server.train_metrics,
            name_of=server.delivery.name_of,
            noise=noise,
        )
    except SecureAggregationError as error:
        if not error.refused:
            raise
        # Refusals at the budget halted the protocol (too few clients left to unmask): they are
        # recorded and leave the run, which goes on without them; the round has no update.
        log.warning("%s", error)
        return TrainOutcome(problems=dict(error.refused), failed=len(error.refused))
    # A node may drop out because it lost its cached model; ask it again before its next round.
    server.delivery.forget(report.dropped)
    problems = {node: f"dropped out of secure aggregation at stage {stage!r}"
                + (f": {report.reasons[node]}" if node in report.reasons else "")
                for node, stage in report.dropped.items()}
    return TrainOutcome(
        aggregated=aggregated,
        metrics=metrics,
        client_metrics=report.client_metrics,
        problems=problems | report.refused,  # a refusal reads as one, as without SecAgg+ (leave_at_budget)
        rejected=0,
        failed=len(report.dropped),
    )


def train_alone(
    server: Server, server_round: int, message: Message, arrays: ArrayRecord, noise: CentralNoise
) -> TrainOutcome:
    """Central DP under SecAgg+, a Poisson draw of one client: it adds the round's noise to its clipped
    update itself (keys.OWN_NOISE_STDDEV), and the server divides that by the expected count as it
    would the secure sum, seeing only what the round releases."""
    node = message.metadata.dst_node_id
    log.info("round %d: the Poisson draw is %s alone, too few for SecAgg+: it noises its own clipped update",
             server_round, server.delivery.name_of(node))
    config = ConfigRecord({**message.content.config_records[keys.CONFIG],
                           keys.OWN_NOISE_STDDEV: noise.lone_client_stddev})
    alone = Message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}), dst_node_id=node,
                    message_type=MessageType.TRAIN, group_id=str(server_round))
    replies = server.delivery.send_and_receive(server.transport, [alone])
    checked = check_train_replies(replies, specs_of(arrays), metrics=server.train_metrics, server_round=server_round,
                                  name_of=server.delivery.name_of)
    outcome = TrainOutcome(problems=dict(checked.problems), rejected=len(checked.rejected),
                           failed=len(checked.failed) + 1 - len(replies))
    if checked.valid:
        reply = checked.valid[0].content
        trained = reply.array_records[keys.ARRAYS]
        update = [trained[name].numpy().astype(np.float64) - array.numpy() for name, array in arrays.items()]
        outcome.aggregated = apply_update(arrays, noise.of_lone_client(update), server_round)
        outcome.metrics = outcome.client_metrics[node] = reply.metric_records[keys.METRICS]
    return outcome


def evaluate_on_clients(server: Server, server_round: int, stages: list[str], config: ConfigRecord) -> EvaluateOutcome:
    """The strategy samples the clients; send; parse each reply; cap the weights; aggregate the metrics."""
    arrays = ArrayRecord(travelling(server, stages))
    messages = list(server.strategy.configure_evaluate(server_round, arrays, config, server.transport))
    if not messages:  # no eligible client left to sample
        return EvaluateOutcome()
    replies = server.delivery.send_and_receive(server.transport, messages)
    personal = server.cfg.personalization.method != "none"
    checked = check_evaluate_replies(replies, server_round=server_round, name_of=server.delivery.name_of,
                                     metrics=PERSONAL_EVALUATE_METRICS if personal else EVALUATE_METRICS)
    capped = []
    if server.bound is not None:
        capped = server.bound.cap_weights(checked.valid, what="evaluation", server_round=server_round,
                                          name_of=server.delivery.name_of)
    metrics = server.strategy.aggregate_evaluate(server_round, checked.valid) if checked.valid else None
    return EvaluateOutcome(
        sampled=len(messages), metrics=metrics, problems=checked.problems, capped=capped,
        rejected=len(checked.rejected), failed=len(checked.failed) + len(messages) - len(replies),
        accuracy=_metric_by_node(checked.valid, EVALUATE_ACCURACY),
        personal_accuracy=_metric_by_node(checked.valid, keys.PERSONAL_ACCURACY) if personal else {},
    )


def _metric_by_node(replies: list[Message], name: str) -> dict[int, float]:
    """Node -> one metric of its (parsed, so present and a number) reply."""
    return {reply.metadata.src_node_id: float(cast(float, reply.content.metric_records[keys.METRICS][name]))
            for reply in replies}


def leave_at_budget(server: Server, problems: dict[int, str], server_round: int) -> None:
    """Clients that refused to train past their privacy budget are sampled no more."""
    for node, problem in problems.items():
        if problem.startswith(keys.PRIVACY_REFUSAL):
            log.info("round %d: %s is at its privacy budget and leaves the run", server_round,
                     server.delivery.name_of(node))
            server.at_budget.add(node)


def evaluate_centrally(server: Server, stages: list[str]) -> Metrics:
    """The model on the server's held-out split; the frozen prefix below `stages` is computed once."""
    return server.evaluator(server.model, frozen_prefix=first_trainable_index(server.model, stages))


def round_record(
    server: Server,
    server_round: int,
    *,
    blocks: int | str,
    sampled: int,
    traffic: Traffic,
    trained: TrainOutcome,
    evaluated: EvaluateOutcome,
    central: Metrics,
    privacy_figures: dict[str, float],
    seconds: float,
) -> RoundRecord:
    """The round's line in the history: what it cost, what it produced, what went wrong and with whom."""
    client_accuracy = _by_name(evaluated.accuracy, name_of=server.delivery.name_of)
    personal_accuracy = _by_name(evaluated.personal_accuracy, name_of=server.delivery.name_of)
    return RoundRecord(
        round=server_round,
        trainable_blocks=str(blocks),
        clients_sampled=sampled,
        clients_ok=len(trained.client_metrics),
        clients_rejected=trained.rejected,
        clients_failed=trained.failed,
        bytes_sent=traffic.sent_on_nodes,
        bytes_received=traffic.received,
        bytes_sent_backbone=traffic.backbone_on_nodes,
        bytes_backbone_serialised=traffic.sent_backbone,
        train_loss=_metric(trained.metrics, "train_loss"),
        train_accuracy=_metric(trained.metrics, "train_accuracy"),
        federated_loss=_metric(evaluated.metrics, "loss"),
        federated_accuracy=_metric(evaluated.metrics, "accuracy"),
        central_loss=central.loss,
        central_accuracy=central.accuracy,
        seconds=seconds,
        updates_rejected_norm=sum(e.kind == "norm_rejected" for e in trained.bounded),
        updates_clipped=sum(e.kind == "norm_clipped" for e in trained.bounded),
        weights_capped=sum(e.kind == "weight_capped" for e in trained.bounded),
        evaluations_sampled=evaluated.sampled,
        evaluations_rejected=evaluated.rejected,
        evaluations_failed=evaluated.failed,
        extra=privacy_figures,
        client_problems=client_problems(trained, evaluated, name_of=server.delivery.name_of),
        client_accuracy=client_accuracy,
        **ClientSpread.of(client_accuracy.values()).columns(),
        client_personal_accuracy=personal_accuracy,
        **ClientSpread.of(personal_accuracy.values()).columns(prefix="clients_personal_accuracy"),
    )


def _by_name(values: dict[int, float], *, name_of: Callable[[int], str]) -> dict[str, float]:
    """Node -> value as client name -> value. Names come from what nodes claim (their partition); two
    that claim the same name are told apart by their node ids rather than one hiding the other."""
    named: dict[str, float] = {}
    for node, value in sorted(values.items()):
        name = name_of(node)
        named[f"{name} [node {node}]" if name in named else name] = value
    return named


def client_problems(
    trained: TrainOutcome, evaluated: EvaluateOutcome, *, name_of: Callable[[int], str]
) -> dict[str, str]:
    """Client name -> what went wrong with its replies this round, and what the server did about it."""
    notes: dict[int, list[str]] = {}
    for node, problem in trained.problems.items():
        action = "failed" if problem.startswith(keys.PRIVACY_REFUSAL) else "left out"
        notes.setdefault(node, []).append(f"train reply {action}: {problem}")
    for event in trained.bounded:
        if event.kind != "norm_rejected":  # those are among the problems already
            notes.setdefault(event.node, []).append(f"train update {event.kind.replace('_', ' ')}: {event.detail}")
    for node, problem in evaluated.problems.items():
        notes.setdefault(node, []).append(f"evaluate reply left out: {problem}")
    for event in evaluated.capped:
        notes.setdefault(event.node, []).append(f"evaluate weight capped: {event.detail}")
    return {name_of(node): "; ".join(items) for node, items in sorted(notes.items())}


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(array.numpy()).all() for array in arrays.values())


def _metric(record: MetricRecord | None, name: str) -> float | None:
    if record is None or name not in record:
        return None
    return float(cast(float, record[name]))  # parsed at the edge (strategies/validation.py): a number, never a list
