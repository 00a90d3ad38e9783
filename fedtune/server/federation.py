"""The server's run: build the model, drive the rounds through a Flower strategy, record everything."""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import messages as keys
from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.config import ClientSettings, ExperimentConfig
from fedtune.console import RoundProgress
from fedtune.data import load_split
from fedtune.engine import resolve_device
from fedtune.model_file import CLASS_NAMES, encode_class_names
from fedtune.monitoring import RunMonitor
from fedtune.params import first_trainable_index, load_tensors, state_hash, trainable_stages, trainable_state_dict
from fedtune.records import RoundRecord, summarize_history
from fedtune.report import RunDirectory
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, RandomState, find_resumable
from fedtune.server.delivery import ModelDelivery
from fedtune.server.evaluate import CentralEvaluator
from fedtune.server.preflight import check_model_fits, check_monitoring
from fedtune.server.privacy_report import PrivacyReport
from fedtune.server.secure_aggregation import secure_train_round
from fedtune.server.transport import Transport
from fedtune.strategies import build_strategy, fit_sampling_to, restore_strategy_state, strategy_state
from fedtune.strategies.bound import BoundEvent, UpdateBound, bound_applies
from fedtune.strategies.validation import (
    MetricSpec,
    check_evaluate_replies,
    check_train_replies,
    specs_of,
    train_metric_specs,
)

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    rounds_completed: int
    stop_reason: str
    final_central_accuracy: float
    backbone_deliveries: dict[int, int]


class EarlyStopping:
    """Stops when the watched metric has not improved by min_delta for `patience` rounds."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg.early_stopping
        self.maximise = self.cfg.metric.endswith("accuracy")
        self.best: float | None = None
        self.best_round = 0
        self.stale = 0

    def update(self, record: RoundRecord) -> bool:
        """Record a round; True when the run should stop."""
        value = getattr(record, self.cfg.metric)
        if value is None or math.isnan(value):
            return False
        improved = self.best is None or (
            value > self.best + self.cfg.min_delta if self.maximise else value < self.best - self.cfg.min_delta
        )
        if improved:
            self.best, self.best_round, self.stale = value, record.round, 0
        else:
            self.stale += 1
        return self.cfg.enabled and self.stale >= self.cfg.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "stale": self.stale}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.best_round, self.stale = state["best"], int(state["best_round"]), int(state["stale"])


def _wait_for_nodes(transport: Transport, cfg: ExperimentConfig) -> None:
    """Strategies wait forever for missing nodes; fail instead, saying how to fix it."""
    expected = cfg.federation.num_clients
    deadline = time.monotonic() + cfg.federation.connect_timeout
    while (connected := len(transport.connected_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    if connected != expected:
        raise RuntimeError(node_count_mismatch(connected, expected))


def node_count_mismatch(connected: int, expected: int) -> str:
    """What to do when the federation's node count is not federation.num_clients."""
    return (f"{connected} nodes are connected but federation.num_clients is {expected}: in simulation with "
            f"`flwr run`, pass --federation-config \"num-supernodes={expected}\" (or set federation.num_clients "
            f"to {connected}); on real nodes, start {expected} clients")


@dataclass
class _TrainOutcome:
    """What a round's training produced, however it was aggregated."""

    aggregated: ArrayRecord | None = None
    metrics: MetricRecord | None = None
    client_metrics: dict[int, MetricRecord] = field(default_factory=dict)  # node -> its train metrics, if aggregated
    problems: dict[int, str] = field(default_factory=dict)  # node -> why its update is not in the aggregate
    bounded: list[BoundEvent] = field(default_factory=list)  # what strategy.bound did, client by client
    rejected: int = 0
    failed: int = 0


@dataclass
class _EvaluateOutcome:
    """What a round's federated evaluation produced."""

    metrics: MetricRecord | None = None
    problems: dict[int, str] = field(default_factory=dict)  # node -> why its reply is not in the metrics
    capped: list[BoundEvent] = field(default_factory=list)
    rejected: int = 0
    failed: int = 0


@dataclass
class _Federation:
    """The server's state during a run, and how one round is played."""

    transport: Transport  # every message of the run goes through it; it counts their bytes
    cfg: ExperimentConfig
    model: StagedModel
    model_hash: str
    strategy: Strategy
    delivery: ModelDelivery
    evaluator: CentralEvaluator
    settings: str  # ClientSettings as sent in every message
    privacy: PrivacyReport
    run_key: str  # names the run on the clients' disks; the same after a resume
    bound: UpdateBound | None  # strategy.bound, where it applies
    train_metrics: dict[str, MetricSpec]  # what a train reply must report

    @property
    def at_budget(self) -> set[int]:
        """Clients that refused to train past their privacy budget: they left the run, and are sampled no more."""
        return self.transport.departed

    def checkpoint(self, completed: int, stopper: EarlyStopping, elapsed_seconds: float) -> Checkpoint:
        """Everything the next round depends on, after `completed` rounds."""
        tensors, scalars = strategy_state(self.strategy)
        return Checkpoint(
            round=completed, run_key=self.run_key, model_hash=self.model_hash, elapsed_seconds=elapsed_seconds,
            model=self.model.state_dict(), strategy_tensors=tensors, strategy_scalars=scalars,
            random_state=RandomState.capture(), early_stopping=stopper.state(), at_budget=sorted(self.at_budget),
            privacy=self.privacy.state(), deliveries=dict(self.delivery.deliveries),
        )

    def restore(self, checkpoint: Checkpoint, stopper: EarlyStopping) -> None:
        """Back to the state of `checkpoint`: the server continues as if it had never stopped."""
        if checkpoint.model_hash != self.model_hash:
            raise CheckpointError(
                f"the unfinished run's initial model ({checkpoint.model_hash[:12]}) is not this run's "
                f"({self.model_hash[:12]}): the backbone's weights changed; set output.resume=false to start afresh"
            )
        load_tensors(self.model, checkpoint.model, expected_keys=list(self.model.state_dict()))
        restore_strategy_state(self.strategy, checkpoint.strategy_tensors, checkpoint.strategy_scalars)
        checkpoint.random_state.restore()
        stopper.restore(checkpoint.early_stopping)
        self.transport.departed = set(checkpoint.at_budget)
        self.privacy.restore(checkpoint.privacy)
        self.delivery.deliveries = dict(checkpoint.deliveries)

    def eligible_clients(self) -> int:
        return len(self.transport.get_node_ids())  # those at their budget left out

    def travelling(self, stages: list[str]) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.model, stages, statistics=not self.cfg.privacy.freezes_statistics)

    def central(self, stages: list[str]) -> tuple[float, float]:
        metrics = self.evaluator(self.model, frozen_prefix=first_trainable_index(self.model, stages))
        return metrics.loss, metrics.accuracy

    def _train_plain(
        self, server_round: int, messages: list[Message], arrays: ArrayRecord
    ) -> _TrainOutcome:
        """Send; parse each reply; bound the updates; aggregate with the strategy (and its DP wrapper, if any)."""
        replies = self.delivery.send_and_receive(self.transport, messages)
        checked = check_train_replies(
            replies, specs_of(arrays), metrics=self.train_metrics, server_round=server_round,
            name_of=self.delivery.name_of, reject_unchanged=arrays if self.cfg.privacy.central.enabled else None,
        )
        usable, bounded = checked.valid, []
        problems = dict(checked.problems)
        if self.bound is not None:
            outcome = self.bound.apply(usable, arrays, server_round=server_round, name_of=self.delivery.name_of)
            usable, bounded = outcome.kept, outcome.events
            problems |= {event.node: event.detail for event in bounded if event.kind == "norm_rejected"}
        aggregated, metrics = self.strategy.aggregate_train(server_round, usable) if usable else (None, None)
        if aggregated is not None and not _finite(aggregated):
            # A server optimiser's step or a robust rule on extreme (yet finite) updates can still overflow.
            log.error("round %d: the aggregate holds non-finite values; the model is unchanged", server_round)
            aggregated = None
        return _TrainOutcome(
            aggregated=aggregated,
            metrics=metrics,
            client_metrics={r.metadata.src_node_id: r.content.metric_records[keys.METRICS] for r in usable},
            problems=problems,
            bounded=bounded,
            rejected=len(checked.rejected),
            # replies that never came count as failures too
            failed=len(checked.failed) + len(messages) - len(replies),
        )

    def _evaluate(self, server_round: int, messages: list[Message]) -> _EvaluateOutcome:
        """Send; parse each reply; cap the weights; aggregate the metrics."""
        replies = self.delivery.send_and_receive(self.transport, messages)
        checked = check_evaluate_replies(replies, server_round=server_round, name_of=self.delivery.name_of)
        capped = []
        if self.bound is not None:
            capped = self.bound.cap_weights(checked.valid, what="evaluation", server_round=server_round,
                                            name_of=self.delivery.name_of)
        metrics = self.strategy.aggregate_evaluate(server_round, checked.valid) if checked.valid else None
        return _EvaluateOutcome(
            metrics=metrics, problems=checked.problems, capped=capped, rejected=len(checked.rejected),
            failed=len(checked.failed) + len(messages) - len(replies),
        )

    def _train_secure(
        self, server_round: int, messages: list[Message], arrays: ArrayRecord
    ) -> _TrainOutcome:
        """SecAgg+: the server learns only the average of the sampled clients' updates."""
        nodes = [m.metadata.dst_node_id for m in messages]
        self.delivery.ensure_models(self.transport, nodes)
        aggregated, metrics, report = secure_train_round(
            self.transport,  # every protocol message is metered with the round's other messages
            server_round=server_round,
            node_ids=nodes,
            arrays=arrays,
            config=messages[0].content.config_records[keys.CONFIG],  # with what the strategy added (FedProx's mu)
            settings=self.cfg.privacy.secure_aggregation,
            timeout=self.cfg.federation.round_timeout,
            metric_specs=self.train_metrics,
            name_of=self.delivery.name_of,
        )
        # A node may drop out because it lost its cached model; ask it again before its next round.
        self.delivery.forget(report.dropped)
        return _TrainOutcome(
            aggregated=aggregated,
            metrics=metrics,
            client_metrics=report.client_metrics,
            problems={node: f"dropped out of secure aggregation at stage {stage!r}"
                      for node, stage in report.dropped.items()},
            rejected=0,
            failed=len(report.dropped),
        )

    def play_round(self, server_round: int) -> tuple[RoundRecord, _TrainOutcome]:
        """Train (and aggregate), evaluate on clients and centrally; the round's record."""
        started = time.monotonic()
        blocks = self.cfg.train.trainable_blocks_at(server_round)
        stages = trainable_stages(self.model, blocks)
        arrays = ArrayRecord(self.travelling(stages))
        config = ConfigRecord(
            {keys.CLIENT_CONFIG: self.settings, keys.MODEL_HASH: self.model_hash, keys.TRAINABLE_STAGES: stages}
        )
        traffic = self.transport.start_count()  # every message until the record: train, evaluate, queries, SecAgg+

        train_messages = list(self.strategy.configure_train(server_round, arrays, config, self.transport))
        train = self._train_secure if self.cfg.privacy.secure_aggregation.enabled else self._train_plain
        outcome = train(server_round, train_messages, arrays) if train_messages else _TrainOutcome()
        if outcome.aggregated is not None:
            load_tensors(self.model, outcome.aggregated.to_torch_state_dict(), expected_keys=list(arrays.keys()))
        else:
            log.warning("round %d: no valid update to aggregate; the model is unchanged", server_round)

        eval_arrays = ArrayRecord(self.travelling(stages))
        eval_messages = list(self.strategy.configure_evaluate(server_round, eval_arrays, config, self.transport))
        evaluation = self._evaluate(server_round, eval_messages) if eval_messages else _EvaluateOutcome()
        fed_metrics = evaluation.metrics

        for node, problem in outcome.problems.items():
            if problem.startswith(keys.PRIVACY_REFUSAL):
                log.info("round %d: %s is at its privacy budget and leaves the run", server_round,
                         self.delivery.name_of(node))
                self.at_budget.add(node)

        central_loss, central_accuracy = self.central(stages)
        privacy_figures = self.privacy.round_figures(
            outcome.client_metrics,
            released=outcome.aggregated is not None,
            clipping_norm=getattr(self.strategy, "clipping_norm", None),  # the central-DP wrappers' current norm
        )
        record = RoundRecord(
            round=server_round,
            trainable_blocks=str(blocks),
            clients_sampled=len(train_messages),
            clients_ok=len(outcome.client_metrics),
            clients_rejected=outcome.rejected,
            clients_failed=outcome.failed,
            bytes_sent=traffic.sent,
            bytes_received=traffic.received,
            bytes_sent_backbone=traffic.sent_backbone,
            train_loss=_metric(outcome.metrics, "train_loss"),
            train_accuracy=_metric(outcome.metrics, "train_accuracy"),
            federated_loss=_metric(fed_metrics, "loss"),
            federated_accuracy=_metric(fed_metrics, "accuracy"),
            central_loss=central_loss,
            central_accuracy=central_accuracy,
            seconds=time.monotonic() - started,
            updates_rejected_norm=sum(e.kind == "norm_rejected" for e in outcome.bounded),
            updates_clipped=sum(e.kind == "norm_clipped" for e in outcome.bounded),
            weights_capped=sum(e.kind == "weight_capped" for e in outcome.bounded),
            evaluations_rejected=evaluation.rejected,
            evaluations_failed=evaluation.failed,
            extra=privacy_figures,
            client_problems=self._client_problems(outcome, evaluation),
        )
        return record, outcome

    def _client_problems(self, train: _TrainOutcome, evaluation: _EvaluateOutcome) -> dict[str, str]:
        """Client name -> what went wrong with its replies this round, and what the server did about it."""
        notes: dict[int, list[str]] = {}
        for node, problem in train.problems.items():
            action = "failed" if problem.startswith(keys.PRIVACY_REFUSAL) else "left out"
            notes.setdefault(node, []).append(f"train reply {action}: {problem}")
        for event in train.bounded:
            if event.kind != "norm_rejected":  # those are among the problems already
                notes.setdefault(event.node, []).append(f"train update {event.kind.replace('_', ' ')}: {event.detail}")
        for node, problem in evaluation.problems.items():
            notes.setdefault(node, []).append(f"evaluate reply left out: {problem}")
        for event in evaluation.capped:
            notes.setdefault(event.node, []).append(f"evaluate weight capped: {event.detail}")
        return {self.delivery.name_of(node): "; ".join(items) for node, items in sorted(notes.items())}


def run_federation(grid: Grid, cfg: ExperimentConfig) -> RunOutcome:
    """Run every round of `cfg` on the nodes behind `grid`; results go to a new run directory.

    `grid` is Flower's, as the ServerApp gets it: every message of the run goes through one
    Transport around it (fedtune/server/transport.py), which counts each round's bytes.
    """
    # Flower samples clients with `random` and draws central-DP noise with numpy's global generator.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Everything that can fail on bad input (data, weights) happens before the run directory
    # exists, so a failed start leaves nothing behind.
    test_set = load_split(cfg.data.source, "test", root=cfg.data.root, download=cfg.data.download, seed=cfg.seed,
                          bad_images=cfg.data.bad_images, decode_now=True)  # a corrupt image fails here, not in round 0
    preprocessing = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size)
    test_set = test_set.with_transform(preprocessing.transform(augment=False))
    num_classes = len(test_set.classes)
    model = build_model(
        cfg.model.backbone, num_classes=num_classes, weights=cfg.model.weights, head_dropout=cfg.model.head_dropout
    )
    check_model_fits(cfg, model)  # fails early, naming the key, if trainable_blocks or lr_multipliers do not fit
    check_monitoring(cfg)  # output.mlflow: MLflow installed, and able to open that kind of store
    initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model_hash = state_hash(initial_state)
    resumable = find_resumable(cfg) if cfg.output.resume else None
    checkpoint = Checkpoint.load(resumable) if resumable is not None else None
    # Names the run on the clients' disks; a resumed run keeps its key, so their ledgers continue.
    run_key = checkpoint.run_key if checkpoint else f"{cfg.name}-{secrets.token_hex(6)}"
    buffers = frozenset(name for name, _ in model.named_buffers())
    transport = Transport(grid)
    federation = _Federation(
        transport=transport,
        cfg=cfg,
        model=model,
        model_hash=model_hash,
        strategy=build_strategy(cfg, buffer_keys=buffers),
        delivery=ModelDelivery(
            model_hash=model_hash, backbone=ArrayRecord(initial_state), timeout=cfg.federation.round_timeout
        ),
        evaluator=CentralEvaluator(test_set, device=resolve_device(cfg.train.device)),
        settings=ClientSettings.of(cfg, num_classes=num_classes, run_key=run_key).to_message(),
        privacy=PrivacyReport(cfg),
        run_key=run_key,
        bound=UpdateBound(cfg.strategy.bound, buffer_keys=buffers) if bound_applies(cfg) else None,
        train_metrics=train_metric_specs(dp_sgd=cfg.privacy.dp_sgd.enabled),
    )
    stopper = EarlyStopping(cfg)
    if checkpoint is not None:
        federation.restore(checkpoint, stopper)
    _wait_for_nodes(transport, cfg)

    log.info("model %s: %s, %d classes, hash %s", cfg.model.backbone, cfg.model.weights, num_classes, model_hash[:12])
    started = time.monotonic()
    if checkpoint is not None and resumable is not None:
        run_dir = RunDirectory(resumable.parent)
        first_round = checkpoint.round + 1
        started -= checkpoint.elapsed_seconds
        log.info("resuming %s after round %d, from its checkpoint", run_dir.path, checkpoint.round)
    else:
        run_dir = RunDirectory.create(cfg.output.dir, cfg.name)
        run_dir.write_config(cfg.to_json())
        log.info("run directory: %s", run_dir.path)
        first_round = 1
        loss0, acc0 = federation.central(trainable_stages(model, cfg.train.trainable_blocks_at(1)))
        baseline = RoundRecord(
            round=0, trainable_blocks=str(cfg.train.trainable_blocks), clients_sampled=0, clients_ok=0,
            clients_rejected=0, clients_failed=0, bytes_sent=0, bytes_received=0, bytes_sent_backbone=0,
            train_loss=None, train_accuracy=None, federated_loss=None, federated_accuracy=None,
            central_loss=loss0, central_accuracy=acc0, seconds=0.0,
        )
        run_dir.append_round(baseline)
        stopper.update(baseline)
        federation.checkpoint(0, stopper, elapsed_seconds=0.0).save(run_dir.path)

    # TensorBoard and MLflow, if asked for: the rounds recorded so far, then each round as it ends.
    monitor = RunMonitor.open(cfg, run_dir.path, history=[r for r in run_dir.records if r.round < first_round],
                              resumed=checkpoint is not None)

    def finish(completed: int, stop_reason: str, *, failed: bool = False) -> RunOutcome:
        outcome = _finish(run_dir, cfg, model, model_hash=model_hash, delivery=federation.delivery,
                          privacy=federation.privacy, completed=completed, stop_reason=stop_reason, started=started,
                          classes=test_set.classes)
        monitor.close(run_dir.path, failed=failed)  # after _finish: MLflow gets the final model and summary
        return outcome

    stop_reason = f"completed {cfg.federation.rounds} rounds"
    completed = first_round - 1
    with RoundProgress(cfg.federation.rounds, title=f"{cfg.name}: federated fine-tuning") as progress, monitor:
        for record in run_dir.records:
            progress.round_done(record, replayed=True)
        for server_round in range(first_round, cfg.federation.rounds + 1):
            eligible = federation.eligible_clients()
            if federation.at_budget and eligible < cfg.federation.min_clients:
                # Clients at their budget are a normal end (the guarantee held), not a failure.
                stop_reason = (
                    f"{keys.PRIVACY_REFUSAL}: {len(federation.at_budget)} clients are at their budget and "
                    f"{eligible} remain, fewer than federation.min_clients ({cfg.federation.min_clients})"
                )
                progress.message(stop_reason)
                break
            fit_sampling_to(federation.strategy, cfg, eligible)
            record, outcome = federation.play_round(server_round)
            run_dir.append_round(record)
            monitor.write(record)  # before the checkpoint: a resumed run writes only the rounds after it
            progress.round_done(record)
            completed = server_round
            early_stop = stopper.update(record)
            # After the history: a kill between the two replays this round, whose record is then replaced.
            federation.checkpoint(completed, stopper, elapsed_seconds=time.monotonic() - started).save(run_dir.path)
            only_refusals = all(p.startswith(keys.PRIVACY_REFUSAL) for p in outcome.problems.values())
            if record.clients_sampled and not outcome.client_metrics and not (outcome.problems and only_refusals):
                # Every client failing the same way (bad data path, infeasible partitioning) would
                # otherwise burn all remaining rounds on an unchanged model.
                reasons = sorted(set(outcome.problems.values())) or ["no replies before the round timeout"]
                finish(completed, "aborted: no usable update", failed=True)
                raise RuntimeError(
                    f"round {server_round}: no client returned a usable update, so the run stops "
                    f"(results so far: {run_dir.path}). Reasons: " + " | ".join(reasons)
                )
            if early_stop:
                stop_reason = (
                    f"early stopping: {cfg.early_stopping.metric} did not improve for "
                    f"{cfg.early_stopping.patience} rounds (best {stopper.best:.4f} in round {stopper.best_round})"
                )
                progress.message(stop_reason)
                break
    return finish(completed, stop_reason)


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(array.numpy()).all() for array in arrays.values())


def _metric(record: object, name: str) -> float | None:
    if record is None or name not in record:  # type: ignore[operator]
        return None
    return float(record[name])  # type: ignore[index]


def _finish(
    run_dir: RunDirectory,
    cfg: ExperimentConfig,
    model: StagedModel,
    *,
    model_hash: str,
    delivery: ModelDelivery,
    privacy: PrivacyReport,
    completed: int,
    stop_reason: str,
    started: float,
    classes: list[str],
) -> RunOutcome:
    """Save the final model, summary and plots."""
    history = run_dir.records
    last = history[-1]
    metadata = {
        "backbone": cfg.model.backbone,
        "num_classes": str(len(classes)),
        CLASS_NAMES: encode_class_names(classes),
        "head_dropout": str(cfg.model.head_dropout),
        "image_size": str(cfg.data.image_size or ""),
        "data_source": cfg.data.source,
        "initial_model_hash": model_hash,
        "rounds": str(completed),
    }
    run_dir.save_model({k: v.detach().cpu() for k, v in model.state_dict().items()}, metadata)
    summary = {
        "name": cfg.name,
        "stop_reason": stop_reason,
        **summarize_history(history),
        "final_central_loss": last.central_loss,
        "initial_central_accuracy": history[0].central_accuracy,
        "backbone_deliveries_per_node": {str(k): v for k, v in sorted(delivery.deliveries.items())},
        "wall_seconds": time.monotonic() - started,
    }
    run_dir.write_summary(summary)
    # The run is over (summary.json says so): its checkpoint, a second copy of the model, can go.
    (run_dir.path / CHECKPOINT_FILE).unlink(missing_ok=True)
    privacy_summary = privacy.summary(history)
    if privacy_summary:
        run_dir.write_privacy(privacy_summary)
    run_dir.write_plots(epsilon_budget=cfg.privacy.dp_sgd.target_epsilon if cfg.privacy.dp_sgd.enabled else None)
    log.info("results: %s", run_dir.path)
    return RunOutcome(
        run_dir=run_dir.path,
        rounds_completed=completed,
        stop_reason=stop_reason,
        final_central_accuracy=float(last.central_accuracy or float("nan")),
        backbone_deliveries=dict(delivery.deliveries),
    )
