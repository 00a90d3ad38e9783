"""Parameter-efficient fine-tuning (train.adapter): only adapter and head tensors train and travel, the rest
stays the initial model's to the bit, and the merged export predicts what the adapted model predicts.

ViT-B/16 and ConvNeXt-T weights cannot be downloaded here: their mechanics (names, bytes, freezing,
merging) are checked with random weights. Training goes through the real ClientApp and real Opacus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp
from server_messages import NUM_CLASSES, GlobalModel, Node, instruction, query, round_config, settings
from torch.utils.data import TensorDataset

import fedtune.client.app as client_app
from fedtune import messages as keys
from fedtune.adapters import AdapterPlan, add_adapters, lora_targets, merged_state
from fedtune.backbones import StagedModel, build_model
from fedtune.client.privacy import PrivacyLedger, train_private_round
from fedtune.config import ConfigError, DPSGDConfig, TrainConfig, load_config
from fedtune.params import (
    first_trainable_index,
    freeze_all_but,
    num_bytes,
    stage_state,
    state_hash,
    trainable_stages,
    trainable_state_dict,
)
from fedtune.protocol import ClientSettings
from fedtune.server.preflight import PreflightError, check_model_fits

pytestmark = pytest.mark.usefixtures("server_identity")
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CPU = torch.device("cpu")


def _adapted(backbone: str, plan: AdapterPlan, *, num_classes: int = 3, seed: int = 0) -> StagedModel:
    torch.manual_seed(seed)
    return add_adapters(build_model(backbone, num_classes=num_classes, weights="none"), plan)


def _perturb_adapters(model: StagedModel) -> None:
    """LoRA's B starts at zero (the adapter does nothing): give it values, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize(("backbone", "blocks", "adapted_layers", "size"), [
    # Lite0's conv_head is one 1x1 convolution; its depthwise convolutions are never targets.
    ("efficientnet_lite0", 2, {"blocks_6": ["0.conv_pw", "0.conv_pwl"], "conv_head": ["0"]}, 64),
    # ConvNeXt-T: the MLP's two Linear layers in each of the last stage's blocks; pre_logits (a
    # LayerNorm) has no layer LoRA adapts and stays frozen whole.
    ("convnext_tiny", 2, {"features_7": [f"{b}.block.{i}" for b in range(3) for i in (3, 5)], "pre_logits": []}, 64),
    # ViT-B/16: the attention layer (its in and out projections) and the MLP; the final LayerNorm none.
    ("vit_b_16", 2, {"encoder_11": ["self_attention", "mlp.0", "mlp.3"], "encoder_norm": []}, 224),
])
def test_lora_adapts_the_right_layers_and_only_its_tensors_and_the_head_train_and_travel(
    backbone: str, blocks: int, adapted_layers: dict[str, list[str]], size: int
) -> None:
    plain = build_model(backbone, num_classes=3, weights="none")
    assert {name: lora_targets(plain.stages[name], None) for name in adapted_layers} == adapted_layers
    model = _adapted(backbone, AdapterPlan(kind="lora", blocks=blocks, rank=4, alpha=8))
    stages = trainable_stages(model, blocks)
    assert model.adapted_stages == set(adapted_layers)

    travelling = trainable_state_dict(model, stages)
    adapter_keys = {key for key in travelling if ".lora_A." in key or ".lora_B." in key}
    head_keys = set(stage_state(model, ["head"]))
    assert adapter_keys and set(travelling) == adapter_keys | head_keys  # no base weight, no BatchNorm statistic
    freeze_all_but(model, stages)
    assert {f"stages.{name}" for name, p in model.stages.named_parameters() if p.requires_grad} == set(travelling)
    # At least 10x fewer bytes than the same blocks trained whole.
    whole = trainable_state_dict(plain, trainable_stages(plain, blocks))
    assert num_bytes(whole) >= 10 * num_bytes({key: travelling[key] for key in adapter_keys})

    # The merged export: the plain backbone's names and shapes, predicting what the adapted model predicts.
    _perturb_adapters(model)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted_out = model.eval()(images)
        exported = build_model(backbone, num_classes=3, weights="none").eval()
        exported.load_state_dict(merged_state(model))  # strict: every key of the plain model, no other
        assert torch.allclose(exported(images), adapted_out, atol=1e-5, rtol=0)
        assert not torch.allclose(plain.eval()(images), adapted_out, atol=1e-3)  # the adapters do change it
    assert any(".lora_A." in key for key in model.state_dict())  # merging left the adapted model as it was


def test_bitfit_trains_and_sends_the_adapted_blocks_biases_alone() -> None:
    model = _adapted("efficientnet_lite0", AdapterPlan(kind="bitfit", blocks=1))
    stages = trainable_stages(model, 1)  # conv_head (a 1x1 convolution without bias, then BatchNorm) and the head
    travelling = set(trainable_state_dict(model, stages))
    assert travelling == {"stages.conv_head.1.bias", "stages.head.1.weight", "stages.head.1.bias"}
    assert merged_state(model).keys() == model.state_dict().keys()  # nothing to merge


@pytest.mark.parametrize("adapter", ["lora", "bitfit"])
def test_a_node_sends_back_adapter_and_head_tensors_and_keeps_the_rest_bit_identical(
    tmp_path: Path, adapter: str
) -> None:
    """A round of the real ClientApp on MobileNetV3-small with `adapter` in its last two blocks."""
    client_settings = settings(f"train.adapter={adapter}", "train.trainable_blocks=2", "train.lora.rank=4")
    plan = AdapterPlan.of(ClientSettings.model_validate(client_settings).train)
    model = _adapted("mobilenet_v3_small", plan, num_classes=NUM_CLASSES)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    server = GlobalModel(model, state, state_hash(state), trainable_stages(model, 2))
    node = Node(cache=tmp_path / "node")
    assert not node.send(query(server, with_backbone=True)).has_error()  # the adapted model, delivered
    sent = trainable_state_dict(model, server.stages)
    message = instruction(round_config(server, settings_json=json.dumps(client_settings)), arrays=sent, model=server)

    reply, trained = client_app.run_training(message, node.context)

    assert not reply.has_error(), reply.error.reason
    returned = {key: torch.from_numpy(array.numpy()) for key, array in reply.content[keys.ARRAYS].items()}
    assert set(returned) == set(sent)  # adapters and head: the keys, and so the bytes, of what was sent
    changed = [key for key in sent if not torch.equal(returned[key], sent[key])]
    assert any(key.startswith("stages.head.") for key in changed)
    assert any(not key.startswith("stages.head.") for key in changed)  # the adapters trained
    # The node's model after training: all but what it sent is the initial model's, to the bit (the
    # adapted blocks' BatchNorm statistics included: they stay in eval mode).
    after = trained.state_dict()
    frozen = [key for key in state if key not in sent]
    assert frozen and all(torch.equal(after[key], state[key]) for key in frozen)
    assert any(".running_mean" in key for key in frozen if "features_12" in key)


def test_adapter_settings_that_cannot_work_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainable_blocks is 0 in every round"):
        load_config(QUICKSTART, ["train.adapter=lora", "train.unfreeze=[]"])
    with pytest.raises(ConfigError, match="train.lora.rank"):
        load_config(QUICKSTART, ["train.adapter=lora", "train.lora.rank=0"])
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(QUICKSTART, ["train.adapter=lora", "train.lora.target_modules=['../conv']"])
    model = build_model("efficientnet_lite0", num_classes=10, weights="none")
    depthwise = load_config(QUICKSTART, ["train.adapter=lora", "train.lora.target_modules=[conv_dw]",
                                         "train.unfreeze=[]", "train.trainable_blocks=2"])
    with pytest.raises(PreflightError, match="conv_dw is a grouped"):
        check_model_fits(depthwise, model)
    missing = load_config(QUICKSTART, ["train.adapter=lora", "train.lora.target_modules=[conv_pw, qkv]",
                                       "train.unfreeze=[]", "train.trainable_blocks=2"])
    with pytest.raises(PreflightError, match="no layer named qkv"):
        check_model_fits(missing, model)
    assert not model.adapted_stages  # the check adapted a copy


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_dp_sgd_on_lora_adapters_spends_what_an_independent_accountant_says(clipping: str) -> None:
    """The independent-accountant check of tests/test_privacy.py, on Lite0 with LoRA in conv_head."""
    model = _adapted("efficientnet_lite0", AdapterPlan(kind="lora", blocks=1, rank=4, alpha=8), num_classes=3)
    stages = trainable_stages(model, 1)
    start = first_trainable_index(model, stages)
    generator = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(48, 320, 2, 2, generator=generator), torch.arange(48) % 3)  # conv_head's input
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    dp = DPSGDConfig(enabled=True, target_epsilon=4.0, target_delta=1e-5, batch_size=8, clipping=clipping)
    ledger = PrivacyLedger()
    epsilons = []
    for server_round in range(2):
        _, epsilon = train_private_round(model, data, stages=stages, cfg=TrainConfig(lr=0.05, batch_size=8), dp=dp,
                                         ledger=ledger, planned_rounds=3, start=start, seed=server_round, device=CPU)
        epsilons.append(epsilon)

    independent = rdp.RdpAccountant()
    independent.compose(dp_event.PoissonSampledDpEvent(ledger.sample_rate,
                                                       dp_event.GaussianDpEvent(ledger.noise_multiplier)),
                        sum(steps for _, _, steps in ledger.history))
    assert epsilons[0] < epsilons[1] == pytest.approx(independent.get_epsilon(1e-5), rel=0.01)
    assert epsilons[1] < 4.0
    after = model.state_dict()
    travelling = set(trainable_state_dict(model, stages))
    assert all(torch.equal(after[key], initial[key]) for key in initial if key not in travelling)
    assert any(not torch.equal(after[key], initial[key]) for key in travelling if ".lora_" in key)


def test_lora_with_dp_sgd_and_secure_aggregation_in_a_real_federation(tmp_path: Path, isolated_cache: Path) -> None:
    """Flower's simulation on Ray, real Lite0 and digits, through the real SecAgg+ handlers: LoRA in
    conv_head trained under DP-SGD (Opacus) and summed under SecAgg+. Each client's ledger on its disk
    composes, by an independent accountant, to the epsilon the server reports; only adapter and head
    bytes travel; the exported model is the adapted one merged."""
    from fedtune.backbones import preprocessing_for
    from fedtune.data import load_split
    from fedtune.engine import evaluate
    from fedtune.predict import load_saved
    from fedtune.report import RunDirectory
    from fedtune.simulation import simulate

    cfg = load_config(QUICKSTART, [
        "data.image_size=32", "federation.num_clients=3", "federation.rounds=2", "train.local_epochs=1",
        "train.trainable_blocks=1", "train.unfreeze=[]", "train.adapter=lora", "train.lora.rank=4",
        "privacy.secure_aggregation.enabled=true", "privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=8",
        f"output.dir={tmp_path / 'runs'}",
    ])
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    assert [r.clients_ok for r in history[1:]] == [3, 3]
    assert all(len([k for k in r.extra if k.startswith("epsilon_client_")]) == 3 for r in history[1:])
    report = json.loads((outcome.run_dir / "privacy.json").read_text())
    assert set(report) == {"sample_level", "secure_aggregation"}
    assert history[-1].central_accuracy > history[0].central_accuracy

    privacy = report["sample_level"]
    node_of = {name.split()[1]: node for node, name in privacy["clients"].items()}  # "client 2 (node 872484…)"
    ledgers = sorted(isolated_cache.rglob("privacy/run-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:  # fedtune.client.privacy.LedgerStore's files
        ledger = json.loads(path.read_text())
        partition = path.parents[1].name.removeprefix("node-")  # <cache>/node-<partition>/privacy/run-<key>.json
        independent = rdp.RdpAccountant()
        for noise, rate, steps in ledger["history"]:
            independent.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise)), steps)
        reported = privacy["epsilon_by_client_by_round"][node_of[partition]][-1]
        assert reported == pytest.approx(independent.get_epsilon(1e-5), rel=0.01)

    # Round 2 moves LoRA's A and B of conv_head's 1x1 convolution (320 -> 1280, rank 4) and the head, not conv_head.
    adapters = (320 * 4 + 4 * 1280) * 4
    head = (1280 * 10 + 10) * 4
    whole_block = (320 * 1280 + 2 * 1280) * 4 + head
    received = history[2].bytes_received
    # Each client's masked reply (SecAgg+ masks a float32 as 64 bits) with SecAgg+'s own messages: no base weight.
    assert 3 * 2 * (adapters + head) < received < 1.1 * 3 * 2 * (adapters + head)
    assert 10 * 3 * adapters < 3 * whole_block

    saved = load_saved(outcome.run_dir)  # the plain Lite0, LoRA merged into conv_head's weight
    assert not any("lora" in key or "base_layer" in key for key in saved.model.state_dict())
    pre = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size)
    test_set = load_split(cfg.data.source, "test", root=cfg.data.root, download=False, seed=cfg.seed)
    test_set = test_set.with_transform(pre.transform(augment=False))
    accuracy = evaluate(saved.model, test_set, device=CPU).accuracy
    assert accuracy == pytest.approx(history[-1].central_accuracy, abs=1e-9)  # what the server measured, adapted


def test_under_gradual_unfreezing_adapters_sit_in_the_widest_blocks_on_server_and_nodes() -> None:
    """The server applies the schedule; a node learns only the widest blocks, where the adapters sit, and builds
    the very model the server holds (its hash names the cached model)."""
    cfg = load_config(QUICKSTART, ["train.adapter=lora", "train.trainable_blocks=0",
                                   "train.unfreeze=[{from_round: 3, trainable_blocks: 2}]"])
    node_train = ClientSettings.of(cfg, num_classes=10).train
    assert node_train.unfreeze == () and node_train.trainable_blocks == 2
    server = _adapted("efficientnet_lite0", AdapterPlan.of(cfg.train), num_classes=10)
    node = _adapted("efficientnet_lite0", AdapterPlan.of(node_train), num_classes=10, seed=1)
    assert server.adapted_stages == node.adapted_stages == {"blocks_6", "conv_head"}
    assert server.state_dict().keys() == node.state_dict().keys()
    # Rounds 1-2 train the head alone: nothing of the adapters travels yet.
    assert set(trainable_state_dict(server, trainable_stages(server, 0))) == set(stage_state(server, ["head"]))
