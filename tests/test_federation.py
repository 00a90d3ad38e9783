"""Real federations in Flower's simulation engine (Ray): what trains, what travels, what is rejected."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType
from safetensors.torch import load_file
from wire_tap import WireTap

from fedtune.client.task import SHARED_CACHE
from fedtune.config import ExperimentConfig, load_config
from fedtune.model_file import load_model_file
from fedtune.params import stage_of
from fedtune.records import RoundRecord
from fedtune.report import RunDirectory
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint
from fedtune.server.run import RunOutcome
from fedtune.simulation import simulate

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_OVERHEAD = 0.05



def small_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """The quickstart task at 32 px: real pretrained Lite0, real digits, seconds per round."""
    return load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=3", "federation.rounds=4", "train.local_epochs=1",
        "train.trainable_blocks=0", "train.unfreeze=[{from_round: 3, trainable_blocks: 1}]",
        f"output.dir={tmp_path / 'runs'}", *overrides,
    ])


def test_partial_updates_frozen_bits_and_backbone_once(
    tmp_path: Path, ray_can_import_tests: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probe_clients import PROBE_DIR_ENV, recording_app

    probe = tmp_path / "probe"
    monkeypatch.setenv(PROBE_DIR_ENV, str(probe))
    cfg = small_config(tmp_path)
    outcome = simulate(cfg, client_app=recording_app)

    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    final, meta = load_model_file(outcome.run_dir / "model.safetensors")
    initial_hash = meta["initial_model_hash"]
    head = {k: v for k, v in final.items() if stage_of(k) == "head"}
    block = {k: v for k, v in final.items() if stage_of(k) == "conv_head" and not k.endswith("num_batches_tracked")}
    head_bytes = sum(t.numel() * t.element_size() for t in head.values())
    block_bytes = sum(t.numel() * t.element_size() for t in block.values())

    # The virtual clients share this machine's cache: the full model was sent once, to the first
    # client of the warm-up, and counted as real nodes would receive it: once per client, in round 1.
    assert summary["backbone_deliveries_per_node"] == {"0": 1}
    assert history[1].bytes_sent_backbone > 0
    assert all(r.bytes_sent_backbone == 0 and r.bytes_backbone_serialised == 0 for r in history[2:])

    n = cfg.federation.num_clients
    full_bytes = sum(t.numel() * t.element_size() for t in final.values())
    assert full_bytes <= history[1].bytes_backbone_serialised <= full_bytes * (1 + PROTOCOL_OVERHEAD)
    # Round 1 as on real nodes: each client gets the full model once, in a message of its own, then
    # the trainable tensors for training and for evaluation.
    assert n * full_bytes <= history[1].bytes_sent_backbone <= n * full_bytes * (1 + PROTOCOL_OVERHEAD)
    expected_first = n * full_bytes + 2 * n * head_bytes
    assert expected_first <= history[1].bytes_sent <= expected_first * (1 + PROTOCOL_OVERHEAD)
    # Later rounds carry only the trainable tensors, within the protocol overhead; unfreezing the
    # last block in round 3 makes its tensors travel from round 3 on.
    for record in history[1:]:
        trainable = head_bytes + (block_bytes if record.round >= 3 else 0)
        if record.round > 1:
            sent = record.bytes_sent  # train + evaluate messages
            assert 2 * n * trainable <= sent <= 2 * n * trainable * (1 + PROTOCOL_OVERHEAD), record
        assert n * trainable <= record.bytes_received <= n * trainable * (1 + PROTOCOL_OVERHEAD), record

    assert (probe / "p0-backbone.log").read_text().splitlines() == ["delivered"]
    shared_cache = Path(os.environ["FEDTUNE_CACHE_DIR"]) / SHARED_CACHE
    assert [p.name for p in (shared_cache / "models").iterdir()] == [f"{initial_hash}.safetensors"]
    cached = load_file(shared_cache / "models" / f"{initial_hash}.safetensors")
    for p in range(cfg.federation.num_clients):
        assert p == 0 or not (probe / f"p{p}-backbone.log").exists()
        for server_round in range(1, cfg.federation.rounds + 1):
            sent_to_client = json.loads((probe / f"p{p}-r{server_round}.json").read_text())
            expected_stages = {"head"} | ({"conv_head"} if server_round >= 3 else set())
            assert {stage_of(k) for k in sent_to_client["received_keys"]} == expected_stages
            assert sent_to_client["received_keys"] == sent_to_client["sent_keys"]
            assert not sent_to_client["got_backbone"]  # train messages carry only what trains
            # Frozen tensors (BatchNorm statistics included) are bit-identical to the server's
            # initial model after local training: the cache holds exactly what the server hashed.
            trained = load_file(probe / f"p{p}-r{server_round}.safetensors")
            frozen = [k for k in trained if stage_of(k) not in expected_stages]
            assert frozen
            for key in frozen:
                assert torch.equal(trained[key], cached[key]), (p, server_round, key)
            # ... while what trained did move.
            assert not torch.equal(trained["stages.head.1.weight"], cached["stages.head.1.weight"])
    # The server's model never changed what never trained.
    never_trained = [k for k in final if stage_of(k) not in {"head", "conv_head"}]
    for key in never_trained:
        assert torch.equal(final[key], cached[key]), key

    assert history[-1].central_accuracy > history[0].central_accuracy + 0.3
    # Each client's own accuracy, every round: named, counted once each, summarised, drawn.
    for record in history[1:]:
        assert sorted(record.client_accuracy) == [f"client {p}" for p in range(n)]
        accuracies = sorted(record.client_accuracy.values())
        assert record.clients_accuracy_worst10 == accuracies[0]  # 10% of 3 clients: the worst one
        assert record.clients_accuracy_median == accuracies[1]
        assert min(accuracies) <= record.federated_accuracy <= max(accuracies)
    assert summary["final_clients_accuracy"]["worst_client_accuracy"] == min(history[-1].client_accuracy.values())
    assert (outcome.run_dir / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A later run with the same backbone: every node still caches it, nothing but trainables travel.
    again = simulate(small_config(tmp_path, "federation.rounds=1", "train.unfreeze=[]"), client_app=recording_app)
    again_summary = json.loads((again.run_dir / "summary.json").read_text())
    assert again_summary["backbone_deliveries_per_node"] == {}
    assert again_summary["bytes_sent_backbone_total"] == 0


def test_malformed_replies_train_and_evaluate_are_left_out_and_the_run_completes(
    tmp_path: Path, ray_can_import_tests: None, caplog: pytest.LogCaptureFixture
) -> None:
    # probe_clients.TRAIN_BREAKAGE / EVALUATE_BREAKAGE: 3 of 5 clients send a different broken
    # reply each round, train and evaluate alike; a fourth adds metrics the server does not know.
    from probe_clients import malformed_app

    cfg = small_config(tmp_path, "federation.num_clients=5", "federation.rounds=2", "train.unfreeze=[]")
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        outcome = simulate(cfg, client_app=malformed_app)

    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert outcome.rounds_completed == 2 and outcome.stop_reason == "completed 2 rounds"
    for record in history[1:]:
        assert (record.clients_ok, record.clients_rejected, record.clients_failed) == (2, 3, 0)
        assert (record.evaluations_rejected, record.evaluations_failed) == (3, 0)
        assert record.federated_accuracy is not None and record.train_loss is not None
        assert len(record.client_problems) == 3
    messages = [r.getMessage() for r in caplog.records]
    train = [m for m in messages if "rejected the train reply of client" in m]
    evaluate = [m for m in messages if "rejected the evaluate reply of client" in m]
    assert len(train) == 6 and len(evaluate) == 6
    # Each line names the broken client by its partition (0, 1 and 2 break; 3 and 4 do not).
    assert {m.split(" reply of client ")[1].split(" ")[0].rstrip(":") for m in train + evaluate} == {"0", "1", "2"}
    for problem in ("holds non-finite values", "has shape (3, 3)", "missing tensors",
                    "metric 'train_loss' must be a finite number >= 0, got a list of 2 values",
                    "has shape (1000000000000,)",
                    "metric 'num-examples' must be a positive integer up to 2**53, got -5"):
        assert sum(problem in m for m in train) == 1, problem
    for problem in ("metric 'num-examples' is missing",
                    "metric 'num-examples' must be a positive integer up to 2**53, got -5",
                    "metric 'accuracy' must be a number in [0, 1], got a list of 2 values",
                    "metric 'loss' must be a finite number >= 0, got nan",
                    "an evaluate reply carries no tensors", "metric 'accuracy' must be a number in [0, 1], got 2.0"):
        assert sum(problem in m for m in evaluate) == 1, problem
    ignored = [m for m in messages if "ignored unknown metrics" in m]
    assert sum("['my_extra_metric'] in the train reply" in m for m in ignored) == 1
    assert sum("['loss_per_class'] in the train reply" in m for m in ignored) == 1
    assert sum("['f1'] in the evaluate reply" in m for m in ignored) == 2
    assert summary["clients_rejected_total"] == 6 and summary["evaluations_rejected_total"] == 6
    assert sorted(entry["rounds"] for entry in summary["problems_by_client"].values()) == [2, 2, 2]
    final, _ = load_model_file(outcome.run_dir / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    assert history[-1].central_accuracy > history[0].central_accuracy


def test_dp_sgd_federation_reports_each_clients_epsilon_every_round(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "federation.rounds=3", "train.unfreeze=[]", "privacy.dp_sgd.enabled=true",
                       "privacy.dp_sgd.target_epsilon=2.0")
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    per_round = [{k: v for k, v in r.extra.items() if k.startswith("epsilon_client_")} for r in history[1:]]
    assert all(len(epsilons) == cfg.federation.num_clients for epsilons in per_round)
    for client in per_round[0]:
        trajectory = [epsilons[client] for epsilons in per_round]
        assert trajectory == sorted(trajectory) and 0 < trajectory[0] and trajectory[-1] <= 2.0
    assert [r.extra["epsilon_max"] for r in history[1:]] == [max(e.values()) for e in per_round]
    assert history[-1].central_accuracy > history[0].central_accuracy


def test_clients_at_their_privacy_budget_refuse_and_the_run_ends_cleanly(tmp_path: Path) -> None:
    # A fixed noise multiplier with a small budget: the budget runs out before the planned rounds,
    # at different rounds for clients of different sizes (their sampling rates differ).
    cfg = small_config(tmp_path, "federation.rounds=8", "train.unfreeze=[]", "privacy.dp_sgd.enabled=true",
                       "privacy.dp_sgd.noise_multiplier=2.0", "privacy.dp_sgd.target_epsilon=1.5")
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    assert outcome.stop_reason.startswith("privacy budget exhausted")
    assert 1 < outcome.rounds_completed < cfg.federation.rounds
    # A client that refused is never asked again: each round samples those still under budget.
    refused = 0
    for record in history[1:]:
        assert record.clients_sampled == cfg.federation.num_clients - refused
        refused += record.clients_failed
    assert refused == cfg.federation.num_clients
    assert any(0 < r.clients_sampled < cfg.federation.num_clients for r in history[1:])  # some left early
    privacy = json.loads((outcome.run_dir / "privacy.json").read_text())["sample_level"]
    assert len(privacy["epsilon_by_client_by_round"]) == cfg.federation.num_clients
    # Keyed by partition: the simulation's clients are its partitions.
    assert privacy["clients"] == {str(p): f"client {p}" for p in range(cfg.federation.num_clients)}
    assert privacy["target_epsilon"] == 1.5 and set(privacy["noise_multiplier_by_client"].values()) == {2.0}
    assert (outcome.run_dir / "privacy.png").is_file()
    spent = [r.extra["epsilon_max"] for r in history[1:] if "epsilon_max" in r.extra]
    assert spent and max(spent) <= 1.5  # no client ever passed its budget


def _simulate_tapped(cfg: ExperimentConfig) -> tuple[list[RunOutcome], WireTap]:
    """`cfg` in Flower's simulation with a wire tap below the server's transport; the outcome unless the run failed."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtune.client.app import app as client_app
    from fedtune.server.run import run_federation

    taps: list[WireTap] = []
    outcomes: list[RunOutcome] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        taps.append(WireTap(grid))  # it sees every message that crosses, whichever path sent it
        outcomes.append(run_federation(taps[0], cfg))

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}})
    return outcomes, taps[0]


# The kill below is an exception in the ServerApp's thread, as intended.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_federated_evaluation_every_2_rounds_sends_evaluate_messages_only_then_and_a_resume_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 2 rounds of 3: rounds 2 and 3 (the last) evaluate on the clients, round 1 sends no evaluate
    message at all; a server killed in round 2 resumes on the same schedule."""
    cfg = small_config(tmp_path, "federation.rounds=3", "train.unfreeze=[]", "federation.evaluation.every=2")
    clients = cfg.federation.num_clients
    append_round = RunDirectory.append_round

    def crash_in_round_2(self: RunDirectory, record: RoundRecord) -> None:
        if record.round == 2:
            raise KeyboardInterrupt("the server is killed")
        append_round(self, record)

    monkeypatch.setattr(RunDirectory, "append_round", crash_in_round_2)
    outcomes, first_life = _simulate_tapped(cfg)
    monkeypatch.setattr(RunDirectory, "append_round", append_round)
    assert not outcomes  # killed after round 2's exchanges, before its record and checkpoint
    (run_dir,) = Path(cfg.output.dir).iterdir()
    checkpoint = Checkpoint.load(run_dir / CHECKPOINT_FILE)
    # Of the model, the checkpoint holds what trained (the head); the rest is the initial model.
    assert checkpoint.round == 1 and {stage_of(key) for key in checkpoint.model} == {"head"}
    # Round 1: the model query and delivery, then training; no evaluate exchange.
    assert first_life.rounds[0].messages == Counter({MessageType.QUERY: 2 * clients, MessageType.TRAIN: clients})
    assert first_life.rounds[1].messages == Counter({MessageType.TRAIN: clients, MessageType.EVALUATE: clients})

    (outcome,), second_life = _simulate_tapped(cfg)  # resumes from round 1's checkpoint

    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    assert outcome.run_dir == run_dir and outcome.rounds_completed == 3
    assert [r.round for r in history] == [0, 1, 2, 3]
    assert [r.evaluations_sampled for r in history] == [0, 0, clients, clients]
    assert [r.federated_accuracy is not None for r in history] == [False, False, True, True]
    assert all(r.central_accuracy is not None for r in history)
    # The resumed server played rounds 2 and 3, each with its evaluation (after re-asking the nodes
    # of this new simulation whether they hold the model).
    assert [wire.messages[MessageType.EVALUATE] for wire in second_life.rounds] == [clients, clients]
    assert [wire.messages[MessageType.TRAIN] for wire in second_life.rounds] == [clients, clients]
    # Round 1 sent the trainable tensors once per client, for training only.
    head_only_twice = history[2].bytes_sent - history[2].bytes_sent_backbone
    assert history[1].bytes_sent - history[1].bytes_sent_backbone < 0.6 * head_only_twice
