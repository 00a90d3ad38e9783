"""Personalization: what stays on each client never travels, survives the client's restart and the server's resume.

Through the real ClientApp in this process (a node as its SuperNode runs it) and through a whole
simulated federation: the keys and bytes of every train reply, the files each client keeps, and the
per-client accuracies of the global and of each client's own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType
from round_records import make_record
from server_messages import Node, global_model, instruction, query, round_config, settings

import fedtune.client.app as client_app
from fedtune import messages as keys
from fedtune import protocol
from fedtune.backbones import build_model
from fedtune.client.personal import KEEP_ROUNDS, PersonalStore
from fedtune.config import ConfigError, PersonalizationConfig, load_config
from fedtune.params import num_bytes, personal_keys, stage_state, trainable_stages, trainable_state_dict
from fedtune.report import RunDirectory

pytestmark = pytest.mark.usefixtures("server_identity")
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _personal(method: str, *, affine: bool = False) -> PersonalizationConfig:
    return PersonalizationConfig(method=method, fedbn_affine=affine)  # type: ignore[arg-type]


def test_each_method_keeps_its_own_keys_of_the_trainable_stages() -> None:
    model = global_model().model  # MobileNetV3-small
    stages = trainable_stages(model, 2)  # features_12 (a convolution and a BatchNorm), pre_logits, the head
    assert personal_keys(model, stages, None) == frozenset()
    assert personal_keys(model, stages, _personal("fedbn")) == {"stages.features_12.1.running_mean",
                                                                 "stages.features_12.1.running_var"}
    assert personal_keys(model, stages, _personal("fedbn", affine=True)) == {
        "stages.features_12.1.running_mean", "stages.features_12.1.running_var", "stages.features_12.1.weight",
        "stages.features_12.1.bias"}
    assert personal_keys(model, stages, _personal("local_head")) == {"stages.head.1.weight", "stages.head.1.bias"}
    local = personal_keys(model, stages, _personal("local"))
    assert local == set(trainable_state_dict(model, stages)) and "stages.features_12.0.weight" in local
    # Only trainable stages: a frozen BatchNorm stays the global model's, bit for bit.
    assert personal_keys(model, trainable_stages(model, 1), _personal("fedbn")) == frozenset()
    shared = trainable_state_dict(model, stages, personalization=_personal("fedbn"))
    assert set(shared) == set(trainable_state_dict(model, stages)) - personal_keys(model, stages, _personal("fedbn"))


@pytest.mark.parametrize(("overrides", "problem"), [
    (["personalization.method=local_head", "train.unfreeze=[]"], "nothing else trains"),
    (["personalization.method=fedbn", "privacy.dp_sgd.enabled=true"], "under differential privacy they stay frozen"),
    (["personalization.method=local", "privacy.secure_aggregation.enabled=true"], "sends nothing to aggregate"),
    (["personalization.fedbn_affine=true"], "applies to method fedbn, not none"),
    (["personalization.method=local", "early_stopping.enabled=true", "early_stopping.metric=central_accuracy"],
     "keeps its initial head"),
    (["personalization.method=ditto"], "personalization.method"),
    (["personalization.finetune_epochs=2"], "applies to method finetune, not none"),
    (["personalization.method=fedbn", "personalization.finetune_epochs=2"], "applies to method finetune, not fedbn"),
    (["personalization.method=finetune", "privacy.dp_sgd.enabled=true"], "outside DP-SGD"),
])
def test_a_personalization_that_cannot_work_is_a_config_error(overrides: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(QUICKSTART, overrides)


def test_the_store_keeps_the_last_rounds_and_a_replay_drops_the_later_ones(tmp_path: Path) -> None:
    store = PersonalStore(tmp_path, "run-1")
    for server_round in range(1, 6):
        store.save(server_round, {"w": torch.full((2,), float(server_round))})
    assert sorted(p.name for p in store.folder.iterdir()) == [f"round-{r}.safetensors" for r in (3, 4, 5)]
    assert len(list(store.folder.iterdir())) == KEEP_ROUNDS
    assert store.load(before_round=6)["w"][0] == 5 and store.load(before_round=5)["w"][0] == 4
    assert store.load(before_round=3) == {}  # nothing kept from before round 3
    # The server resumed from its round-3 checkpoint and replays round 4: round 5's state is gone.
    assert store.load(before_round=4)["w"][0] == 3
    store.save(4, {"w": torch.full((2,), 40.0)})
    assert sorted(p.name for p in store.folder.iterdir()) == ["round-3.safetensors", "round-4.safetensors"]
    # A damaged file is skipped, naming it, for the round before it.
    (store.folder / "round-4.safetensors").write_bytes(b"not a safetensors file")
    assert store.load(before_round=5)["w"][0] == 3
    # Another run's state is its own.
    assert PersonalStore(tmp_path, "run-2").load(before_round=99) == {}


def _message(*overrides: str, server_round: int, blocks: int = 2, message_type: str = MessageType.TRAIN) -> Message:
    """A round's train (or evaluate) message as the server sends it: the shared tensors alone."""
    model = global_model()
    stages = trainable_stages(model.model, blocks)
    config = {**round_config(settings_json=json.dumps(settings(*overrides)), server_round=server_round),
              keys.TRAINABLE_STAGES: stages}
    personalization = protocol.ClientSettings.model_validate(settings(*overrides)).personalization
    return instruction(config, arrays=trainable_state_dict(model.model, stages, personalization=personalization),
                       message_type=message_type)


@pytest.mark.parametrize("method", ["fedbn", "local_head", "local"])
def test_personal_tensors_stay_on_the_node_and_come_back_after_a_restart(tmp_path: Path, method: str) -> None:
    node = Node(cache=tmp_path / "node")
    assert not node.send(query(with_backbone=True)).has_error()
    overrides = (f"personalization.method={method}", "train.trainable_blocks=2")
    model = global_model().model
    stages = trainable_stages(model, 2)
    personal = personal_keys(model, stages, _personal(method))

    reply, trained = client_app.run_training(_message(*overrides, server_round=1), node.context)

    assert not reply.has_error(), reply.error.reason
    sent = dict(reply.content[keys.ARRAYS].items())
    assert personal and not personal & set(sent)  # not one personal key in the reply ...
    assert set(sent) == set(trainable_state_dict(model, stages)) - personal
    shared = trainable_state_dict(model, stages, personalization=_personal(method))
    assert sum(array.numpy().nbytes for array in sent.values()) == num_bytes(shared)  # ... nor one byte of them
    stage_names = {key.split(".")[1] for key in personal}
    mine = {key: value.clone() for key, value in stage_state(trained, stage_names).items() if key in personal}
    initial = stage_state(model, stage_names)
    assert any(not torch.equal(mine[key], initial[key]) for key in mine)  # they trained here

    # The node restarts on the same disk. Its process's resident model is put back to the cached
    # global model at every message (fedtune/client/resident.py): what comes back comes from disk.
    restarted = Node(cache=tmp_path / "node")
    parsed = protocol.parse_round_instruction(_message(*overrides, server_round=2).content)
    with client_app._local_round(parsed, restarted.context, split="train") as local:
        restored = stage_state(local.model, stage_names)
        assert all(torch.equal(restored[key], initial[key]) for key in personal)  # the global model's ...
        local.make_personal(before_round=2)
        restored = stage_state(local.model, stage_names)
        assert all(torch.equal(restored[key], mine[key]) for key in personal)  # ... then this client's own

    evaluated = restarted.send(_message(*overrides, server_round=1, message_type=MessageType.EVALUATE))
    assert not evaluated.has_error(), evaluated.error.reason
    metrics = evaluated.content.metric_records[keys.METRICS]
    assert {keys.PERSONAL_ACCURACY, keys.PERSONAL_LOSS, "accuracy"} <= set(metrics)
    assert not evaluated.content.array_records


def test_the_summary_reports_each_clients_own_model_beside_the_global_one(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path, "exp")
    run.append_round(make_record(1, client_accuracy={"client 0": 0.5, "client 1": 0.25},
                                 client_personal_accuracy={"client 0": 1.0, "client 1": 0.75}))
    summary = json.loads((run.path / "history.json").read_text())["summary"]
    assert summary["final_clients_accuracy"]["worst_client"] == "client 1"
    assert summary["final_clients_personal_accuracy"] == {
        "round": 1, "clients": 2, "mean": 0.875, "median": 0.875, "worst10": 0.75, "worst_client": "client 1",
        "worst_client_accuracy": 0.75}


@pytest.mark.parametrize("method", ["fedbn", "local"])
def test_a_federation_never_sends_a_personal_tensor_and_reports_each_clients_own_model(
        tmp_path: Path, ray_can_import_tests: None, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch,
        method: str) -> None:
    from probe_clients import PROBE_DIR_ENV, recording_app

    from fedtune.client.task import SHARED_CACHE
    from fedtune.simulation import simulate

    probe = tmp_path / "probe"
    monkeypatch.setenv(PROBE_DIR_ENV, str(probe))
    cfg = load_config(QUICKSTART, [
        "data.image_size=32", "federation.num_clients=3", "federation.rounds=3", "train.local_epochs=1",
        "train.trainable_blocks=1", "train.unfreeze=[]", f"personalization.method={method}",
        f"output.dir={tmp_path / 'runs'}"])

    outcome = simulate(cfg, client_app=recording_app)

    history = RunDirectory.load_history(outcome.run_dir)
    lite = build_model("efficientnet_lite0", num_classes=10, weights="none")  # the keys are the architecture's
    stages = trainable_stages(lite, 1)  # conv_head (a convolution and a BatchNorm) and the head
    personal = personal_keys(lite, stages, cfg.personalization)
    assert personal
    for client in range(3):
        for server_round in range(1, 4):
            seen = json.loads((probe / f"p{client}-r{server_round}.json").read_text())
            assert not personal & set(seen["received_keys"]), (client, server_round)  # never sent to it ...
            assert not personal & set(seen["sent_keys"]), (client, server_round)  # ... nor by it
        state = isolated_cache / SHARED_CACHE / "clients" / str(client) / "personal"
        (run_folder,) = state.iterdir()
        assert sorted(path.name for path in run_folder.iterdir()) == [f"round-{r}.safetensors" for r in (1, 2, 3)]
    for record in history[1:]:
        assert sorted(record.client_personal_accuracy) == ["client 0", "client 1", "client 2"]
        assert record.clients_personal_accuracy_worst10 == min(record.client_personal_accuracy.values())
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["final_clients_personal_accuracy"]["clients"] == 3
    if method == "local":  # nothing travels: each client trains alone
        assert all(not json.loads(path.read_text())["sent_keys"] for path in probe.glob("p*-r*.json"))


def test_fedbn_with_no_batchnorm_that_trains_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    from fedtune.server.preflight import PreflightError, preflight

    head_only = load_config(QUICKSTART, ["personalization.method=fedbn", "train.unfreeze=[]", f"output.dir={tmp_path}"])
    with pytest.raises(PreflightError, match=r"fedbn keeps the BatchNorm layers .* trainable_blocks up to 0"):
        preflight(head_only, simulation=True)
    # quickstart unfreezes conv_head (a BatchNorm) from round 4: fedbn has something to keep.
    preflight(load_config(QUICKSTART, ["personalization.method=fedbn", f"output.dir={tmp_path}"]), simulation=True)


def test_finetune_trains_the_global_model_for_the_evaluation_alone(tmp_path: Path) -> None:
    node = Node(cache=tmp_path / "node")
    assert not node.send(query(with_backbone=True)).has_error()
    overrides = ("personalization.method=finetune", "personalization.finetune_epochs=2", "train.trainable_blocks=2")
    model = global_model().model
    stages = trainable_stages(model, 2)
    assert personal_keys(model, stages, _personal("finetune")) == frozenset()  # everything travels

    evaluated = node.send(_message(*overrides, server_round=1, message_type=MessageType.EVALUATE))

    assert not evaluated.has_error(), evaluated.error.reason
    metrics = evaluated.content.metric_records[keys.METRICS]
    assert {keys.PERSONAL_ACCURACY, keys.PERSONAL_LOSS, "accuracy", "loss"} <= set(metrics)
    assert metrics[keys.PERSONAL_LOSS] != metrics["loss"]  # it trained before measuring its own model
    assert not (tmp_path / "node" / "personal").exists()  # and kept nothing
    # The next message starts from the global model again.
    parsed = protocol.parse_round_instruction(_message(*overrides, server_round=2).content)
    with client_app._local_round(parsed, node.context, split="train") as local:
        now, initial = stage_state(local.model, stages), stage_state(model, stages)
        assert all(torch.equal(now[key], initial[key]) for key in initial)
    reply, _ = client_app.run_training(_message(*overrides, server_round=2), node.context)
    assert set(reply.content[keys.ARRAYS].keys()) == set(trainable_state_dict(model, stages))


def test_a_resumed_server_replays_the_round_from_each_clients_state_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path) -> None:
    from interruptions import crash_in_round
    from safetensors.torch import load_file

    from fedtune.client.task import SHARED_CACHE
    from fedtune.simulation import simulate

    def config(folder: Path):  # noqa: ANN202 - an ExperimentConfig
        return load_config(QUICKSTART, [
            "data.image_size=32", "federation.num_clients=2", "federation.rounds=3", "train.local_epochs=1",
            "train.trainable_blocks=1", "train.unfreeze=[]", "personalization.method=local_head",
            f"output.dir={folder}"])

    def heads(run_key: str, client: int) -> dict[str, torch.Tensor]:
        folder = isolated_cache / SHARED_CACHE / "clients" / str(client) / "personal" / f"run-{run_key}"
        return load_file(folder / "round-3.safetensors")

    uninterrupted = simulate(config(tmp_path / "a"))
    # Killed after round 2 trained (each client saved its round-2 head), before it was checkpointed.
    run_dir = crash_in_round(monkeypatch, config(tmp_path / "b"), crashed_round=2)

    resumed = simulate(config(tmp_path / "b"))

    assert resumed.run_dir == run_dir and resumed.rounds_completed == 3
    # Round 2 ran again from each client's round-1 head, not from the head the killed round left:
    # every client ends with the very head of the run that was never interrupted.
    runs = {folder.name.removeprefix("run-") for client in (0, 1)
            for folder in (isolated_cache / SHARED_CACHE / "clients" / str(client) / "personal").iterdir()}
    assert len(runs) == 2  # one per run, whatever their keys
    first, second = sorted(runs)
    for client in (0, 1):
        a, b = heads(first, client), heads(second, client)
        assert a.keys() == b.keys() == {"stages.head.1.weight", "stages.head.1.bias"}
        assert all(torch.equal(a[key], b[key]) for key in a), client
    history = RunDirectory.load_history(resumed.run_dir)
    reference = RunDirectory.load_history(uninterrupted.run_dir)
    assert [r.client_personal_accuracy for r in history[1:]] == [r.client_personal_accuracy for r in reference[1:]]
