"""DP-SGD on clients: epsilon over the whole run, checked independently; the budget is never passed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp
from dp_accounting.pld import pld_privacy_accountant
from torch import Tensor
from torch.utils.data import TensorDataset

from fedtune.backbones import StagedModel, build_model
from fedtune.client.privacy import LedgerStore, PrivacyBudgetExhausted, PrivacyLedger, train_private_round
from fedtune.config import ConfigError, DPSGDConfig, TrainConfig, load_config
from fedtune.params import first_trainable_index, trainable_stages
from fedtune.protocol import ClientSettings

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite0() -> StagedModel:
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", num_classes=10, weights="imagenet")


def head_features() -> TensorDataset:
    """What a client trains the head on when the backbone is frozen: cached 1280-d features."""
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(100, 1280, generator=generator), torch.randint(0, 10, (100,), generator=generator))


def private_rounds(model: StagedModel, ledger: PrivacyLedger, dp: DPSGDConfig, rounds: int, planned: int) -> list:
    stages = trainable_stages(model, 0)
    results = []
    for server_round in range(rounds):
        results.append(train_private_round(
            model, head_features(), stages=stages, cfg=TrainConfig(lr=0.01, batch_size=16, local_epochs=2), dp=dp,
            ledger=ledger, planned_rounds=planned, start=first_trainable_index(model, stages), seed=server_round,
            device=CPU,
        ))
    return results


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_over_rounds_matches_an_independent_accountant(lite0: StagedModel, accountant: str) -> None:
    dp = DPSGDConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, accountant=accountant, batch_size=16)
    ledger = PrivacyLedger()
    results = private_rounds(lite0, ledger, dp, rounds=3, planned=4)
    epsilons = [epsilon for _, epsilon in results]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # it accumulates across rounds

    # The same mechanism, composed by Google's dp-accounting: RDP for RDP, the exact privacy-loss
    # distribution (PLD) for Opacus's PRV accountant.
    steps = sum(s for _, _, s in ledger.history)
    event = dp_event.PoissonSampledDpEvent(ledger.sample_rate, dp_event.GaussianDpEvent(ledger.noise_multiplier))
    if accountant == "rdp":
        independent = rdp.RdpAccountant()
    else:
        independent = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    independent.compose(event, steps)
    assert epsilons[-1] == pytest.approx(independent.get_epsilon(1e-5), rel=0.01)


def test_noise_is_calibrated_for_the_whole_plan_and_the_client_refuses_past_it(lite0: StagedModel) -> None:
    dp = DPSGDConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, batch_size=16)
    ledger = PrivacyLedger()
    epsilons = [epsilon for _, epsilon in private_rounds(lite0, ledger, dp, rounds=4, planned=4)]
    assert max(epsilons) <= 3.0
    assert epsilons[-1] > 0.95 * 3.0  # the plan spends (almost) all of the budget, not much less
    with pytest.raises(PrivacyBudgetExhausted, match="past the target 3.0"):
        private_rounds(lite0, ledger, dp, rounds=1, planned=4)
    assert ledger.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(epsilons[-1])  # nothing was spent


def test_the_ledger_survives_a_client_restart(lite0: StagedModel, tmp_path: Path) -> None:
    dp = DPSGDConfig(enabled=True, target_epsilon=3.0, batch_size=16)
    uninterrupted = PrivacyLedger()
    private_rounds(lite0, uninterrupted, dp, rounds=3, planned=4)

    store = LedgerStore(tmp_path, run_key="digits-20261124-1")
    before_restart = PrivacyLedger()
    private_rounds(lite0, before_restart, dp, rounds=2, planned=4)
    store.save(before_restart)
    after_restart = LedgerStore(tmp_path, run_key="digits-20261124-1").load()  # a new process reads the node's disk
    private_rounds(lite0, after_restart, dp, rounds=1, planned=4)
    assert after_restart.history == uninterrupted.history
    assert after_restart.epsilon(delta=1e-5, accountant="rdp") == uninterrupted.epsilon(delta=1e-5, accountant="rdp")
    assert LedgerStore(tmp_path, run_key="digits-20261124-2").load() == PrivacyLedger()  # another run starts afresh


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_dp_sgd_trains_a_block_with_batchnorm_and_inplace_activations(backbone: str) -> None:
    """Lite0's conv_head is BatchNormAct2d + ReLU6(inplace); ResNet-18's layer4 has BatchNorm2d and ReLU(inplace)."""
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3, weights="none")
    stages = trainable_stages(model, 1)
    start = first_trainable_index(model, stages)
    model.eval()
    with torch.no_grad():
        features = model.forward_stages(torch.randn(24, 3, 64, 64), 0, stop=start)
        before = model.forward_stages(features, start)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(features, torch.arange(24) % 3)
    dp = DPSGDConfig(enabled=True, target_epsilon=8.0, batch_size=8)
    train_private_round(model, data, stages=stages, cfg=TrainConfig(lr=0.05, batch_size=8, local_epochs=1), dp=dp,
                        ledger=PrivacyLedger(), planned_rounds=1, start=start, device=CPU)

    after = model.state_dict()
    assert after.keys() == initial.keys()  # the same names travel, on server and clients
    stats = [k for k in initial if stages[0] in k and ("running_" in k or "num_batches" in k)]
    weights = [k.replace("running_mean", "weight") for k in stats if k.endswith("running_mean")]
    assert stats and all(torch.equal(after[k], initial[k]) for k in stats)  # statistics stay pretrained
    assert weights and any(not torch.equal(after[k], initial[k]) for k in weights)  # affine parameters train
    # The swapped layers compute what BatchNorm computes in eval mode: load the trained tensors
    # into a plain model and compare outputs.
    plain = build_model(backbone, num_classes=3, weights="none").eval()
    plain.load_state_dict(after)
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_stages(features, start), plain.forward_stages(features, start),
                              atol=1e-5)
        assert not torch.allclose(plain.forward_stages(features, start), before)


def test_dp_sgd_settings_that_cannot_work_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="privacy.dp_sgd: cannot be combined with strategy fedprox"):
        load_config(REPO / "configs/quickstart.yaml", ["privacy.dp_sgd.enabled=true", "strategy.name=fedprox"])
    with pytest.raises(ConfigError, match="set target_epsilon"):
        load_config(REPO / "configs/quickstart.yaml", ["privacy.dp_sgd.enabled=true",
                                                       "privacy.dp_sgd.target_epsilon=null"])


def test_a_ledger_saved_before_reads_and_saves_back_the_same(tmp_path: Path) -> None:
    # A node's ledger as fedtune has always written it: the format on disk must not change.
    saved = '{"noise_multiplier": 3.232421875, "sample_rate": 0.25, "history": [[3.232421875, 0.25, 16]]}'
    store = LedgerStore(tmp_path, run_key="digits-20261124-1")
    store.path.parent.mkdir(parents=True)
    store.path.write_text(saved, encoding="utf-8")
    ledger = store.load()
    assert ledger == PrivacyLedger(noise_multiplier=3.232421875, sample_rate=0.25, history=[(3.232421875, 0.25, 16)])
    store.save(ledger)
    assert store.path.read_text(encoding="utf-8") == saved


@pytest.mark.parametrize(("history", "problem"), [
    ("[[-1.0, 0.25, 16]]", r"history\[0\] noise multiplier: -1.0"),
    ("[[1.0, 0.25, 16], [NaN, 0.25, 16]]", r"history\[1\] noise multiplier: nan"),
    ("[[1.0, 4.0, 16]]", r"history\[0\] sample rate: 4.0"),
    ("[[1.0, 0.25, 0]]", r"history\[0\] steps: 0"),
])
def test_a_ledger_with_impossible_entries_is_refused_as_damaged_and_kept(
    tmp_path: Path, history: str, problem: str
) -> None:
    store = LedgerStore(tmp_path, run_key="digits-20261124-1")
    store.path.parent.mkdir(parents=True)
    damaged = f'{{"noise_multiplier": 1.0, "sample_rate": 0.25, "history": {history}}}'
    store.path.write_text(damaged, encoding="utf-8")
    with pytest.raises(ValueError, match=f"privacy ledger .* is damaged .*{problem}"):
        store.load()
    assert store.path.read_text(encoding="utf-8") == damaged  # the budget already spent is not forgotten


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_three_examples_at_batch_size_one_never_raise_and_every_step_is_counted(
    lite0: StagedModel, clipping: str
) -> None:
    """Poisson sampling at rate 1/3 draws an empty batch about 30% of the time: each is a step of
    pure noise, never an exception, and the ledger counts it (with either clipping engine)."""
    stages = trainable_stages(lite0, 0)
    cfg = TrainConfig(lr=0.01, batch_size=1, local_epochs=2)
    dp = DPSGDConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, clipping=clipping, batch_size=1)
    generator = torch.Generator().manual_seed(3)
    tiny = TensorDataset(torch.randn(3, 1280, generator=generator), torch.tensor([0, 1, 1]))
    before = {key: value.clone() for key, value in lite0.stages["head"].state_dict().items()}
    for seed in range(6):  # 72 steps, about 21 of them empty (each is with probability (2/3)^3)
        ledger = PrivacyLedger()
        for server_round in range(2):
            metrics, epsilon = train_private_round(
                lite0, tiny, stages=stages, cfg=cfg, dp=dp, ledger=ledger, planned_rounds=2,
                start=first_trainable_index(lite0, stages), seed=1000 * seed + server_round, device=CPU,
            )
            assert metrics.num_examples == 3 and 0 < epsilon <= 3.0
        # 2 rounds x 2 epochs x 3 batches (empty or not), all at the calibrated noise and rate 1/3.
        assert sum(steps for _, _, steps in ledger.history) == 12
        assert {(noise, rate) for noise, rate, _ in ledger.history} == {(ledger.noise_multiplier, 1 / 3)}
        lite0.stages["head"].load_state_dict(before)


def test_full_batch_dp_gd_takes_one_step_per_epoch_at_sampling_rate_one(lite0: StagedModel) -> None:
    dp = DPSGDConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5, batch_size="full")
    ledger = PrivacyLedger()
    results = private_rounds(lite0, ledger, dp, rounds=2, planned=2)
    # 2 rounds x 2 local epochs, one step each over all 100 examples; the plan spends the budget.
    assert ledger.history == [(ledger.noise_multiplier, 1.0, 4)]
    assert 0.95 * 3.0 < results[-1][1] <= 3.0
    event = dp_event.GaussianDpEvent(ledger.noise_multiplier)
    independent = rdp.RdpAccountant()
    independent.compose(event, 4)
    assert results[-1][1] == pytest.approx(independent.get_epsilon(1e-5), rel=0.01)


def test_a_dp_batch_size_of_its_own_sets_the_sampling_rate(tmp_path: Path) -> None:
    path = tmp_path / "dp.yaml"
    path.write_text((REPO / "configs" / "quickstart.yaml").read_text())
    for value, expected in (("full", "full"), ("64", 64), ("auto", "auto")):
        cfg = load_config(path, overrides=["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.batch_size={value}"])
        assert cfg.privacy.dp_sgd.batch_size == expected
    for bad in ("0", "half", "1.5"):
        with pytest.raises(ConfigError, match="privacy.dp_sgd.batch_size"):
            load_config(path, overrides=["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.batch_size={bad}"])


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_the_noise_is_secret_unless_the_run_asks_for_reproducible_noise(lite0: StagedModel, clipping: str) -> None:
    """By default the batches and the noise come from seeds nobody knows: the same round twice, same
    seed, trains two different heads. With `reproducible`, the run's seed fixes both."""
    stages = trainable_stages(lite0, 0)
    start = first_trainable_index(lite0, stages)
    initial = {key: value.clone() for key, value in lite0.stages["head"].state_dict().items()}

    def head_after_a_round(reproducible: bool) -> Tensor:
        lite0.stages["head"].load_state_dict(initial)
        dp = DPSGDConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None, clipping=clipping,
                         reproducible=reproducible, batch_size=16)
        train_private_round(lite0, head_features(), stages=stages, cfg=TrainConfig(lr=0.01, batch_size=16), dp=dp,
                            ledger=PrivacyLedger(), planned_rounds=1, start=start, seed=7, device=CPU)
        return lite0.stages["head"][1].weight.detach().clone()

    assert torch.equal(head_after_a_round(True), head_after_a_round(True))
    assert not torch.equal(head_after_a_round(False), head_after_a_round(False))
    lite0.stages["head"].load_state_dict(initial)


def test_dp_batch_size_auto_is_the_full_batch_only_for_long_head_only_runs() -> None:
    def resolved(*overrides: str) -> int | str:
        cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides=["privacy.dp_sgd.enabled=true", *overrides])
        return ClientSettings.of(cfg, num_classes=10).dp_sgd.batch_size

    # The quickstart unfreezes conv_head at round 4, and its 8 rounds x 2 epochs are too few steps.
    assert resolved() == 32
    assert resolved("train.unfreeze=[]") == 32
    assert resolved("train.unfreeze=[]", "train.local_epochs=4") == "full"  # 32 epochs in all
    assert resolved("train.unfreeze=[]", "train.local_epochs=4", "train.trainable_blocks=1") == 32
    assert resolved("train.local_epochs=4") == 32  # the block unfrozen at round 4 trains too
    assert resolved("privacy.dp_sgd.batch_size=64") == 64
    assert resolved("privacy.dp_sgd.batch_size=full") == "full"


def test_a_node_refuses_settings_with_an_unresolved_dp_batch_size() -> None:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides=["privacy.dp_sgd.enabled=true"])
    sent = json.loads(ClientSettings.of(cfg, num_classes=10).to_message())
    sent["dp_sgd"]["batch_size"] = "auto"
    with pytest.raises(ConfigError, match="dp_sgd.batch_size: 'auto' must arrive resolved"):
        ClientSettings.from_message(json.dumps(sent))
