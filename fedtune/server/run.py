"""The server's run: start it or resume it, play its rounds until done or stopped, write its results.

One round is `play_round` (fedtune/server/round.py); this module is everything around it: the
model and the test split, waiting for the nodes, the checkpoint after every round (and resuming
from it), early stopping, and the run directory's final files.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fedtune import messages as keys
from fedtune.adapters import AdapterPlan, add_adapters, merged_state
from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.config import ExperimentConfig
from fedtune.console import RoundProgress
from fedtune.data import load_split
from fedtune.engine import resolve_device
from fedtune.model_file import CLASS_NAMES, encode_class_names
from fedtune.monitoring import RunMonitor
from fedtune.params import load_tensors, stage_state, state_hash, trainable_stages
from fedtune.protocol import ClientSettings
from fedtune.records import RoundRecord, summarize_history
from fedtune.report import RunDirectory
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, RandomState, find_resumable
from fedtune.server.delivery import ModelDelivery
from fedtune.server.evaluate import CentralEvaluator
from fedtune.server.preflight import check_model_fits, check_monitoring
from fedtune.server.privacy_report import PrivacyReport
from fedtune.server.round import Server, evaluate_centrally, play_round
from fedtune.server.transport import Transport
from fedtune.strategies import build_strategy, fit_sampling_to, restore_strategy_state, strategy_state
from fedtune.strategies.bound import UpdateBound, bound_applies
from fedtune.strategies.validation import train_metric_specs

log = logging.getLogger("fedtune.server")


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    rounds_completed: int
    stop_reason: str
    final_central_accuracy: float
    backbone_deliveries: dict[int, int]


class EarlyStopping:
    """Stops when the watched metric has not improved by min_delta for `patience` rounds that measured it.

    A round without the metric neither improves it nor counts against the patience: with a
    federated_* metric and federated evaluation every k rounds (federation.evaluation.every), the
    patience is counted in evaluations, k rounds apart. A round whose evaluation failed on every
    client is skipped the same way.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg.early_stopping
        self.maximise = self.cfg.metric.endswith("accuracy")
        # Rounds between two measurements of the metric: federated ones come with federated evaluation.
        self.every = cfg.federation.evaluation.every if self.cfg.metric.startswith("federated_") else 1
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

    def reason(self) -> str:
        """Why the run stops, once `update` said it should."""
        counted = "rounds" if self.every == 1 else f"evaluations (one every {self.every} rounds)"
        return (f"early stopping: {self.cfg.metric} did not improve for {self.cfg.patience} {counted} "
                f"(best {self.best:.4f} in round {self.best_round})")

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "stale": self.stale}

    def restore(self, state: dict[str, Any]) -> None:
        self.best, self.best_round, self.stale = state["best"], int(state["best_round"]), int(state["stale"])


def node_count_mismatch(connected: int, expected: int) -> str:
    """What to do when the federation's node count is not federation.num_clients."""
    return (f"{connected} nodes are connected but federation.num_clients is {expected}: in simulation with "
            f"`flwr run`, pass --federation-config \"num-supernodes={expected}\" (or set federation.num_clients "
            f"to {connected}); on real nodes, start {expected} clients")


def run_federation(grid: Grid, cfg: ExperimentConfig) -> RunOutcome:
    """Run every round of `cfg` on the nodes behind `grid`; results go to a new run directory.

    `grid` is Flower's, as the ServerApp gets it: every message of the run goes through one
    Transport around it (fedtune/server/transport.py), which counts each round's bytes.
    """
    # Flower's strategies sample clients with `random`. Central DP draws from generators of its own,
    # never seeded from cfg.seed unless asked to (fedtune/strategies/central_dp.py, CentralRandomness).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    virtual = plays_virtual_clients(grid, cfg)
    transport = Transport(grid, virtual_clients=cfg.federation.num_clients if virtual else None)
    if virtual:  # the simulation's workers start their imports now, while the server loads its data and model
        warming = list(range(min(len(simulation_pool(grid, cfg)), cfg.federation.num_clients)))
        pinged = ModelDelivery.ping(transport, warming)
    # Everything that can fail on bad input (data, weights) happens before the run directory
    # exists, so a failed start leaves nothing behind.
    test_set = load_split(cfg.data.source, "test", root=cfg.data.root, download=cfg.data.download, seed=cfg.seed,
                          bad_images=cfg.data.bad_images, decode_now=True)  # a corrupt image fails here, not in round 0
    preprocessing = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size)
    test_set = test_set.with_transform(preprocessing.transform(augment=False))
    num_classes = len(test_set.classes)
    model = build_model(
        cfg.model.backbone, num_classes=num_classes, weights=cfg.model.weights, head_dropout=cfg.model.head_dropout,
        cut=cfg.model.cut,
    )
    # train.adapter: after the seed, so every run of this config draws the same LoRA A (B starts at zero).
    check_model_fits(cfg, add_adapters(model, AdapterPlan.of(cfg.train)))  # names the key that does not fit
    check_monitoring(cfg)  # output.mlflow: MLflow installed, and able to open that kind of store
    initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model_hash = state_hash(initial_state)
    resumable = find_resumable(cfg) if cfg.output.resume else None
    checkpoint = Checkpoint.load(resumable) if resumable is not None else None
    # Names the run on the clients' disks; a resumed run keeps its key, so their ledgers continue.
    run_key = checkpoint.run_key if checkpoint else f"{cfg.name}-{secrets.token_hex(6)}"
    buffers = frozenset(name for name, _ in model.named_buffers())
    server = Server(
        transport=transport,
        cfg=cfg,
        model=model,
        model_hash=model_hash,
        strategy=build_strategy(cfg, buffer_keys=buffers),
        delivery=ModelDelivery(
            model_hash=model_hash, backbone=ArrayRecord(initial_state), timeout=cfg.federation.round_timeout,
            presumed=virtual,
        ),
        evaluator=CentralEvaluator(test_set, device=resolve_device(cfg.train.device)),
        settings=ClientSettings.of(cfg, num_classes=num_classes, run_key=run_key).to_message(),
        privacy=PrivacyReport(cfg),
        bound=UpdateBound(cfg.strategy.bound, buffer_keys=buffers) if bound_applies(cfg) else None,
        train_metrics=train_metric_specs(dp_sgd=cfg.privacy.dp_sgd.enabled),
    )
    stopper = EarlyStopping(cfg)
    if checkpoint is not None:
        _restore(server, checkpoint, stopper)
    wait_for_nodes(server.transport, cfg)

    log.info("model %s: %s, %d classes, hash %s", cfg.model.backbone, cfg.model.weights, num_classes, model_hash[:12])
    started = time.monotonic()
    if checkpoint is not None and resumable is not None:
        run_dir = RunDirectory(resumable.parent)
        first_round = checkpoint.round + 1
        started -= checkpoint.elapsed_seconds
        log.info("resuming %s after round %d, from its checkpoint", run_dir.path, checkpoint.round)
    else:
        run_dir = _start_afresh(server, stopper, run_key=run_key)
        first_round = 1

    # From here, every message counts in the first round this server plays (a simulation's warm-up too).
    server.transport.start_count()
    if virtual:
        log.info("%d virtual clients, played by %d simulation nodes", cfg.federation.num_clients, len(warming))
        server.delivery.warm_up(server.transport, warming, pinged=pinged)

    # TensorBoard and MLflow, if asked for: the rounds recorded so far, then each round as it ends.
    monitor = RunMonitor.open(cfg, run_dir.path, history=[r for r in run_dir.records if r.round < first_round],
                              resumed=checkpoint is not None)

    def finish(completed: int, stop_reason: str, *, failed: bool = False) -> RunOutcome:
        outcome = _finish(run_dir, cfg, model, model_hash=model_hash, delivery=server.delivery,
                          privacy=server.privacy, completed=completed, stop_reason=stop_reason, started=started,
                          classes=test_set.classes)
        monitor.close(run_dir.path, failed=failed)  # after _finish: MLflow gets the final model and summary
        return outcome

    stop_reason = f"completed {cfg.federation.rounds} rounds"
    completed = first_round - 1
    with RoundProgress(cfg.federation.rounds, title=f"{cfg.name}: federated fine-tuning") as progress, monitor:
        for record in run_dir.records:
            progress.round_done(record, replayed=True)
        for server_round in range(first_round, cfg.federation.rounds + 1):
            eligible = len(server.transport.get_node_ids())  # those at their budget left out
            if server.at_budget and eligible < cfg.fewest_clients_to_train:
                # Clients at their budget are a normal end (the guarantee held), not a failure.
                needed = f"federation.min_clients ({cfg.federation.min_clients})"
                if cfg.fewest_clients_to_train > cfg.federation.min_clients:
                    needed = "the 2 clients secure aggregation needs"
                stop_reason = (
                    f"{keys.PRIVACY_REFUSAL}: {len(server.at_budget)} clients are at their budget and "
                    f"{eligible} remain, fewer than {needed}"
                )
                progress.message(stop_reason)
                break
            fit_sampling_to(server.strategy, cfg, eligible)
            record, trained = play_round(server, server_round)
            server.transport.start_count()
            run_dir.append_round(record)
            monitor.write(record)  # before the checkpoint: a resumed run writes only the rounds after it
            progress.round_done(record)
            completed = server_round
            early_stop = stopper.update(record)
            # After the history: a kill between the two replays this round, whose record is then replaced.
            _checkpoint(server, stopper, completed=completed, run_key=run_key,
                        elapsed_seconds=time.monotonic() - started).save(run_dir.path)
            only_refusals = all(p.startswith(keys.PRIVACY_REFUSAL) for p in trained.problems.values())
            if record.clients_sampled and not trained.client_metrics and not (trained.problems and only_refusals):
                # Every client failing the same way (bad data path, infeasible partitioning) would
                # otherwise burn all remaining rounds on an unchanged model.
                reasons = sorted(set(trained.problems.values())) or ["no replies before the round timeout"]
                finish(completed, "aborted: no usable update", failed=True)
                raise RuntimeError(
                    f"round {server_round}: no client returned a usable update, so the run stops "
                    f"(results so far: {run_dir.path}). Reasons: " + " | ".join(reasons)
                )
            if early_stop:
                stop_reason = stopper.reason()
                progress.message(stop_reason)
                break
    return finish(completed, stop_reason)


def plays_virtual_clients(grid: Grid, cfg: ExperimentConfig) -> bool:
    """Whether the run's clients are virtual clients that a pool of simulation nodes plays
    (fedtune/server/transport.py, VirtualClients): in every simulation (Flower's in-memory grid),
    unless the config needs one node per client (`ExperimentConfig.one_node_per_client`)."""
    return isinstance(grid, InMemoryGrid) and not cfg.one_node_per_client


def simulation_pool(grid: Grid, cfg: ExperimentConfig, *, settle: float = 0.05) -> list[int]:
    """The simulation's nodes. Flower starts the ServerApp first and registers the nodes just after,
    all in one loop (flwr/simulation/run_simulation.py, then flwr/server/superlink/fleet/vce/
    vce_api.py, `_register_nodes`): a count that holds still is final."""
    deadline = time.monotonic() + cfg.federation.connect_timeout
    counted = -1
    while not (nodes := list(grid.get_node_ids())) or len(nodes) != counted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the simulation registered no nodes in federation.connect_timeout "
                               f"({cfg.federation.connect_timeout} s)")
        counted = len(nodes)
        time.sleep(settle)
    return sorted(nodes)


def wait_for_nodes(transport: Transport, cfg: ExperimentConfig) -> None:
    """Strategies wait forever for missing nodes; fail instead, saying how to fix it."""
    expected = cfg.federation.num_clients
    deadline = time.monotonic() + cfg.federation.connect_timeout
    while (connected := len(transport.connected_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    if connected != expected:
        raise RuntimeError(node_count_mismatch(connected, expected))


def _start_afresh(server: Server, stopper: EarlyStopping, *, run_key: str) -> RunDirectory:
    """A new run directory with the config, round 0 (the initial model, centrally evaluated) and its checkpoint."""
    cfg = server.cfg
    run_dir = RunDirectory.create(cfg.output.dir, cfg.name)
    run_dir.write_config(cfg.to_json())
    log.info("run directory: %s", run_dir.path)
    initial = evaluate_centrally(server, trainable_stages(server.model, cfg.train.trainable_blocks_at(1)))
    baseline = RoundRecord(
        round=0, trainable_blocks=str(cfg.train.trainable_blocks), clients_sampled=0, clients_ok=0,
        clients_rejected=0, clients_failed=0, bytes_sent=0, bytes_received=0, bytes_sent_backbone=0,
        train_loss=None, train_accuracy=None, federated_loss=None, federated_accuracy=None,
        central_loss=initial.loss, central_accuracy=initial.accuracy, seconds=0.0, evaluations_sampled=0,
        bytes_backbone_serialised=0,
    )
    run_dir.append_round(baseline)
    stopper.update(baseline)
    _checkpoint(server, stopper, completed=0, run_key=run_key, elapsed_seconds=0.0).save(run_dir.path)
    return run_dir


def _checkpoint(
    server: Server, stopper: EarlyStopping, *, completed: int, run_key: str, elapsed_seconds: float
) -> Checkpoint:
    """Everything the next round depends on, after `completed` rounds."""
    tensors, scalars = strategy_state(server.strategy)
    # Blocks never refreeze, so the stages of the latest round are every stage trained so far: the
    # rest of the model is still the initial one, which a resume rebuilds (fedtune/server/checkpoint.py).
    trained = trainable_stages(server.model, server.cfg.train.trainable_blocks_at(max(completed, 1)))
    return Checkpoint(
        round=completed, run_key=run_key, model_hash=server.model_hash, elapsed_seconds=elapsed_seconds,
        model=stage_state(server.model, trained), strategy_tensors=tensors, strategy_scalars=scalars,
        random_state=RandomState.capture(), early_stopping=stopper.state(), at_budget=sorted(server.at_budget),
        privacy=server.privacy.state(), deliveries=dict(server.delivery.deliveries),
    )


def _restore(server: Server, checkpoint: Checkpoint, stopper: EarlyStopping) -> None:
    """Back to the state of `checkpoint`: the server continues as if it had never stopped."""
    if checkpoint.model_hash != server.model_hash:
        raise CheckpointError(
            f"the unfinished run's initial model ({checkpoint.model_hash[:12]}) is not this run's "
            f"({server.model_hash[:12]}): the backbone's weights changed; set output.resume=false to start afresh"
        )
    # The model was built afresh from the same config (and hashes as the checkpoint's initial model):
    # the tensors training changed go over it.
    try:
        load_tensors(server.model, checkpoint.model, expected_keys=list(checkpoint.model))
    except ValueError as error:
        raise CheckpointError(f"the checkpoint's model tensors do not fit this model ({error}); set "
                              "output.resume=false to start afresh") from None
    try:
        restore_strategy_state(server.strategy, checkpoint.strategy_tensors, checkpoint.strategy_scalars)
    except ValueError as error:  # e.g. central DP's generators (fedtune/strategies/central_dp.py)
        raise CheckpointError(f"the checkpoint's strategy state does not fit this run ({error}); set "
                              "output.resume=false to start afresh") from None
    checkpoint.random_state.restore()
    stopper.restore(checkpoint.early_stopping)
    server.transport.departed = set(checkpoint.at_budget)
    server.privacy.restore(checkpoint.privacy)
    server.delivery.deliveries = dict(checkpoint.deliveries)


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
        "cut": cfg.model.cut or "",
        "image_size": str(cfg.data.image_size or ""),
        "data_source": cfg.data.source,
        "initial_model_hash": model_hash,
        "rounds": str(completed),
    }
    # LoRA adapters merged into the weights they adapt: the plain backbone `fedtune predict` builds.
    run_dir.save_model(merged_state(model), metadata)
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
    privacy_summary = privacy.summary(history, name_of=delivery.name_of)
    if privacy_summary:
        run_dir.write_privacy(privacy_summary)
    run_dir.write_plots(epsilon_budget=cfg.privacy.dp_sgd.target_epsilon if cfg.privacy.dp_sgd.enabled else None,
                        client_names={node: delivery.name_of(node) for node in privacy.dp_sgd_clients})
    log.info("results: %s", run_dir.path)
    return RunOutcome(
        run_dir=run_dir.path,
        rounds_completed=completed,
        stop_reason=stop_reason,
        final_central_accuracy=float(last.central_accuracy or float("nan")),
        backbone_deliveries=dict(delivery.deliveries),
    )
