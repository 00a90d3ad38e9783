"""One training round under SecAgg+: the server learns the weighted average of the clients' updates only.

Flower 1.41 implements SecAgg+ for its legacy (FitIns/FitRes) workflow alone, so a round runs
Flower's own `SecAggPlusWorkflow` on a `LegacyContext` made for that round, with a legacy FedAvg
that targets exactly the nodes fedtune sampled. It replaces configure_train / send / aggregate_train
of an ordinary round; the clients need `fedtune.client.secure_aggregation.secure_aggregation_mod`.

The clients send updates (trained minus sent tensors, see fedtune/client/secure_aggregation.py); the
protocol returns their average weighted by num-examples, and it is added to the tensors sent.

Under central DP (`noise`), every update counts the same: each client sends its clipped update
with weight 1 (and the workflow's max_weight is 1, so SecAgg+ scales it by exactly 1), the
protocol returns their mean, and `CentralNoise` (fedtune/strategies/central_dp.py) turns it back
into their sum over the expected count, with the noise. The quantisation error this adds is
bounded in fedtune/config.py (`ExperimentConfig.secure_quantization_to_noise`).

A client's error reply (its refusal at its privacy budget, say) is a dropout to SecAgg+, which
goes on without it; Flower keeps the errors but not their senders, so the round's grid notes
each sender's reason (`_ReasonsBySender`), and the report says who refused at its budget.

The workflow sends every protocol message (keys, shares, masked vectors, unmasking) through the
grid it is handed; fedtune hands it the run's transport (fedtune/server/transport.py), so those messages
are metered like every other.

`SecAggPlusWorkflow` returns nothing, whether it completed or halted (it only logs "Secure
aggregation halted."), and a halted round would leave the model as it was without anyone
noticing; here every halt raises `SecureAggregationError`, naming the stage and the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, NDArray, Parameters, Scalar, parameters_to_ndarrays
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedtune import messages as keys
from fedtune.config import SECAGG_MODULUS
from fedtune.protocol import encode_secure_fit_config
from fedtune.server.transport import ForwardingGrid
from fedtune.strategies.validation import WEIGHT_ONLY, MetricSpec, UnusableReply, parse_metric_values
from fedtune.text import concise_reason, printable

if TYPE_CHECKING:
    from fedtune.config import SecureAggregationConfig
    from fedtune.strategies.central_dp import CentralNoise

log = logging.getLogger("fedtune.server")

# Flower's default; masks and the modular sum live in [0, MODULUS_RANGE).
MODULUS_RANGE = SECAGG_MODULUS


class SecureAggregationError(RuntimeError):
    """A SecAgg+ round did not produce an aggregate; the model must not be taken as updated.

    `refused` names the clients that refused at their privacy budget (node -> their reason): too
    many of them at once is one way for the protocol to halt, and they leave the run all the same.
    """

    def __init__(self, message: str, *, refused: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.refused = dict(refused or {})


@dataclass(frozen=True)
class SecureRoundReport:
    sampled: list[int]
    completed: list[int]  # nodes whose masked updates are in the aggregate
    dropped: dict[int, str]  # node -> the protocol stage it dropped out in
    num_shares: int  # as Flower resolved them for this round
    threshold: int
    # SecAgg+ masks the tensors only: num-examples and the metrics travel in plain text.
    client_metrics: dict[int, MetricRecord] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)  # dropped node -> the reason of its error reply, if any

    @property
    def refused(self) -> dict[int, str]:
        """Dropped nodes that refused to train past their privacy budget -> their reason."""
        return refusals(self.reasons)


def refusals(reasons: Mapping[int, str]) -> dict[int, str]:
    """Of the reasons nodes gave, their refusals to train past their privacy budget."""
    return {node: reason for node, reason in reasons.items() if reason.startswith(keys.PRIVACY_REFUSAL)}


def secure_train_round(
    grid: Grid,
    *,
    server_round: int,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    config: ConfigRecord,
    settings: SecureAggregationConfig,
    timeout: float | None,
    metric_specs: Mapping[str, MetricSpec] = WEIGHT_ONLY,
    name_of: Callable[[int], str] = lambda node: f"node {node}",
    noise: CentralNoise | None = None,
) -> tuple[ArrayRecord, MetricRecord | None, SecureRoundReport]:
    """Train `arrays` on `node_ids` under SecAgg+; the num-examples-weighted average of what they trained,
    or with `noise` (central DP: `config` carries the clipping norm) the update `noise` releases.

    Returns tensors with the keys, dtypes and shapes of `arrays`, the clients' train metrics averaged
    like Flower's FedAvg does (None if they sent none besides num-examples), and who took part.
    Each client's metrics travel in plain text and are parsed against `metric_specs`: a client whose
    metrics cannot be used is left out of the averaged metrics, with a log line naming it (its
    update is in the secure sum all the same, bounded by clipping_range and max_weight).
    Every message of the protocol goes through `grid` (the run's Transport meters them).
    `timeout` applies to each of the protocol's four exchanges. Raises SecureAggregationError when
    the protocol halts (too few clients left to reconstruct the masks, or clients that do not
    speak SecAgg+), ValueError when the settings cannot work for this many clients.
    """
    nodes = list(dict.fromkeys(node_ids))
    if len(nodes) < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients per round, round {server_round} has "
                         f"{len(nodes)}")
    if len(nodes) * settings.quantization_range >= MODULUS_RANGE:
        # The modular sum of N values, each up to quantization_range, would wrap around silently.
        raise ValueError(
            f"secure aggregation: {len(nodes)} clients x privacy.secure_aggregation.quantization_range="
            f"{settings.quantization_range} must stay below {MODULUS_RANGE}; lower quantization_range"
        )
    names = list(arrays.keys())
    # Under central DP every update weighs 1: scaled by 1 / max_weight = 1, it is quantised as it is.
    max_weight = 1.0 if noise is not None else settings.max_weight
    try:
        workflow = _ObservedSecAggPlus(
            _flower_count_or_fraction(settings.num_shares, "num_shares"),
            _flower_count_or_fraction(settings.reconstruction_threshold, "reconstruction_threshold"),
            max_weight=max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )
    except ValueError as err:  # Flower's own checks of the settings
        raise ValueError(f"privacy.secure_aggregation: {err}") from err

    fit_config = encode_secure_fit_config(
        ConfigRecord({**config, keys.SERVER_ROUND: server_round}),
        names,
        clipping_range=settings.clipping_range,
        max_weight=max_weight,
    )
    proxies = [GridClientProxy(node, grid, grid.run.run_id) for node in nodes]
    strategy = _RoundStrategy(proxies, fit_config)
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    for proxy in proxies:
        context.client_manager.register(proxy)
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})

    senders = _ReasonsBySender(grid)
    workflow(senders, context)

    if workflow.halted_at is not None:
        raise SecureAggregationError(workflow.diagnosis(server_round), refused=refusals(senders.reasons))
    if strategy.results is None:  # the workflow completed without handing over an aggregate
        raise SecureAggregationError(f"round {server_round}: secure aggregation produced no aggregate",
                                     refused=refusals(senders.reasons))
    average_update = parameters_to_ndarrays(strategy.results[0][1].parameters)
    if noise is not None:
        # The mean of the updates whose masked vectors were summed (each weighs 1).
        average_update = noise.release(average_update, summed=len(strategy.results))
    aggregated = apply_update(arrays, average_update, server_round)
    client_metrics, averaged = parse_client_metrics(strategy.results, metric_specs, server_round, name_of)
    metrics = aggregate_metricrecords(averaged, keys.NUM_EXAMPLES) if averaged else MetricRecord()
    completed = sorted(int(proxy.cid) for proxy, _ in strategy.results)
    report = SecureRoundReport(
        sampled=sorted(nodes),
        completed=completed,
        dropped={node: stage for node, stage in workflow.dropped_at.items() if node not in completed},
        num_shares=workflow.state.num_shares,
        threshold=workflow.state.threshold,
        client_metrics=client_metrics,
        reasons={node: reason for node, reason in senders.reasons.items() if node not in completed},
    )
    if report.dropped:
        log.warning("round %d: secure aggregation went on without %d dropped clients: %s", server_round,
                    len(report.dropped), ", ".join(f"{n} ({s})" for n, s in sorted(report.dropped.items())))
    return aggregated, (metrics if len(metrics) else None), report


def _flower_count_or_fraction(value: float, name: str) -> int | float:
    """fedtune's setting as SecAggPlusWorkflow reads it: a float is a fraction, an int a count.

    A value up to 1 is a fraction (1.0: all of them); above 1 it must be a whole count. Flower
    takes a fractional reconstruction_threshold of num_shares, which is the sampled clients for the
    default num_shares 1.0.
    """
    if value <= 1:
        return float(value)
    if not float(value).is_integer():
        raise ValueError(f"privacy.secure_aggregation.{name}={value} must be a fraction up to 1 or a whole count")
    return int(value)


def apply_update(arrays: ArrayRecord, update: Sequence[NDArray], server_round: int) -> ArrayRecord:
    """The tensors sent plus the update (in their order), in their own dtypes and shapes."""
    names = list(arrays.keys())
    if len(update) != len(names):
        raise SecureAggregationError(f"round {server_round}: secure aggregation returned {len(update)} tensors "
                                     f"for {len(names)} sent")
    out = {}
    for name, delta in zip(names, update, strict=True):
        before = arrays[name].numpy()
        if delta.size != before.size or not np.isfinite(delta).all():
            raise SecureAggregationError(f"round {server_round}: the securely aggregated update of {name} is "
                                         f"malformed (shape {delta.shape}, expected {before.shape}, or not finite)")
        delta = delta.reshape(before.shape)  # 0-d tensors travel as shape (1,), see the client
        after = before.astype(np.float64) + delta
        if not np.issubdtype(before.dtype, np.floating):
            after = np.rint(after)  # e.g. BatchNorm's num_batches_tracked: the average count
        out[name] = Array(np.asarray(after.astype(before.dtype)))  # asarray keeps 0-d tensors 0-d
    return ArrayRecord(out)


class _ReasonsBySender(ForwardingGrid):
    """The round's grid, noting the reason of each error reply by its sender.

    Flower's workflow keeps the errors (`WorkflowState.failures`) but not who sent them.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.reasons: dict[int, str] = {}  # node -> its error reply's reason, as cut for the log

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._noted(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._noted(self._grid.send_and_receive(messages, timeout=timeout))

    def _noted(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self.reasons.setdefault(reply.metadata.src_node_id, concise_reason(reply.error.reason))
        return replies


class _RoundStrategy(FedAvg):
    """Legacy FedAvg for one SecAgg+ round: trains exactly the given nodes, keeps what it is handed.

    The workflow hands aggregate_fit every client's FitRes with the parameters replaced by the
    secure aggregate (the updates themselves never reach the server), so there is nothing left to
    average: re-averaging identical vectors would only add rounding.
    """

    def __init__(self, proxies: list[GridClientProxy], fit_config: dict[str, Scalar]) -> None:
        super().__init__(accept_failures=True)
        self.proxies = proxies
        self.fit_config = fit_config
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, dict(self.fit_config))) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:
            self.results = results
            return results[0][1].parameters, {}
        return None, {}


_Stage = Callable[[Grid, LegacyContext, WorkflowState], bool]


class _ObservedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, unchanged, remembering where it halted and who dropped out where."""

    def __init__(self, *args: int | float, **kwargs: float | int | None) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = WorkflowState()
        self.halted_at: str | None = None
        self.dropped_at: dict[int, str] = {}
        self.problems: list[str] = []  # per stage: who dropped and why

    def _observe(self, stage: str, step: _Stage, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        self.state = state
        before = set(state.active_node_ids)
        failures_before = len(state.failures)
        try:
            ok = step(grid, context, state)
        except KeyError as err:
            # A client that answered the protocol without its records: the mod is missing.
            raise SecureAggregationError(
                f"secure aggregation failed at stage '{stage}': a client's reply lacks {err}; do all clients "
                f"run fedtune.client.secure_aggregation.secure_aggregation_mod?"
            ) from err
        if stage == "setup":
            before = set(state.sampled_node_ids)
        lost = before - state.active_node_ids
        for node in lost:
            self.dropped_at.setdefault(node, stage)
        if lost:
            # Flower keeps the errors but not who sent them (and lists some twice).
            reasons = sorted({concise_reason(getattr(f.args[0], "reason", str(f))) for f in
                              state.failures[failures_before:]}) or ["no reply before the timeout"]
            self.problems.append(f"{len(lost)} dropped at '{stage}': " + " | ".join(reasons))
        if not ok:
            self.halted_at = stage
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observe("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observe("share keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observe("collect masked vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._observe("unmask", super().unmask_stage, grid, context, state)

    def diagnosis(self, server_round: int) -> str:
        state = self.state
        text = (
            f"round {server_round}: secure aggregation halted at stage '{self.halted_at}', the model is not "
            f"updated: {len(state.active_node_ids)} of {len(state.sampled_node_ids)} sampled clients were still "
            f"taking part, but every client needs at least {state.threshold} of its {state.num_shares} share "
            f"holders (itself included) to take part (privacy.secure_aggregation.reconstruction_threshold, "
            f"num_shares)"
        )
        return text + "".join(f"; {problem}" for problem in self.problems)


def parse_client_metrics(
    results: Sequence[tuple[ClientProxy, FitRes]],
    specs: Mapping[str, MetricSpec],
    server_round: int,
    name_of: Callable[[int], str],
) -> tuple[dict[int, MetricRecord], list[RecordDict]]:
    """Each client's metrics as it reported them (known ones checked, other finite numbers kept),
    and, to be averaged, those of them that every usable client reported."""
    reported: dict[int, MetricRecord] = {}
    for proxy, res in results:
        node = int(proxy.cid)
        try:
            known, numbers, dropped = parse_metric_values({**res.metrics, keys.NUM_EXAMPLES: res.num_examples}, specs)
        except UnusableReply as problem:
            log.warning("round %d: left the train metrics of %s out of the round's: %s (its masked update is in "
                        "the sum all the same)", server_round, name_of(node), problem)
            continue
        if dropped:
            log.warning("round %d: ignored metrics %s in the train reply of %s: not numbers", server_round,
                        ", ".join(printable(name, 60) for name in dropped[:3]), name_of(node))
        reported[node] = MetricRecord({**numbers, **known})
    # Flower averages the keys of the first record in every other: one client's extra key must not end the round.
    shared = set.intersection(*(set(record) for record in reported.values())) if reported else set()
    averaged = [RecordDict({keys.METRICS: MetricRecord({k: v for k, v in record.items() if k in shared})})
                for record in reported.values()]
    return reported, averaged
