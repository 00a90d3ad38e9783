"""Ghost clipping computes what Opacus computes: per-sample norms, clipped sums, noise, and the privacy ledger."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from fedtune.backbones import HEAD, StagedModel, build_model
from fedtune.client.fast_clipping import GhostClipping, UnsupportedLayer, unsupported_layers
from fedtune.client.privacy import PrivacyLedger, _StatisticsFrozenBatchNorm, train_private_round
from fedtune.config import ConfigError, DPSGDConfig, TrainConfig, load_config
from fedtune.params import first_trainable_index, trainable_stages

CPU = torch.device("cpu")


def frozen_batchnorm(channels: int) -> nn.Module:
    """What a DP-SGD round makes of a pretrained BatchNorm: fixed statistics, a trainable ChannelAffine."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return _StatisticsFrozenBatchNorm(bn)


# name -> (model, input shape of one example, the rule expected for each trainable layer)
CASES: dict[str, tuple[nn.Module, tuple[int, ...], dict[str, str]]] = {
    "linear 2-D": (nn.Sequential(nn.Linear(20, 7)), (20,), {"0": "ghost"}),
    # 6 positions: the two 6x6 Gram matrices are smaller than a 12x5 gradient.
    "linear 3-D, Gram matrices": (nn.Sequential(nn.Linear(12, 5), nn.Flatten(), nn.Linear(30, 3)), (6, 12),
                                  {"0": "ghost", "2": "ghost"}),
    # 16 positions: the per-sample gradient (5x3) is smaller than the 16x16 Gram matrices.
    "linear 3-D, materialised": (nn.Sequential(nn.Linear(5, 3), nn.Flatten(), nn.Linear(48, 3)), (16, 5),
                                 {"0": "ghost", "2": "ghost"}),
    # 9 positions (3x3 at stride 1, 5x5 at stride 2): Gram matrices smaller than a 16x16 gradient.
    "1x1 conv, stride 1": (nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 9, 4)),
                           (16, 3, 3), {"0": "ghost", "3": "ghost"}),
    "1x1 conv, stride 2": (nn.Sequential(nn.Conv2d(16, 16, 1, stride=2), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(16 * 9, 4)), (16, 5, 5), {"0": "ghost", "3": "ghost"}),
    "1x1 conv, materialised": (nn.Sequential(nn.Conv2d(6, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 4)),
                               (6, 5, 5), {"0": "ghost", "3": "ghost"}),
    "ChannelAffine": (nn.Sequential(frozen_batchnorm(6), nn.Flatten(), nn.Linear(6 * 16, 4)), (6, 4, 4),
                      {"0.affine": "channel", "2": "ghost"}),
    "3x3 conv (Opacus's grad sampler)": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(),
                                                       nn.Linear(4 * 25, 4)),
                                         (3, 5, 5), {"0": "sampler", "2": "ghost"}),
}


def batch(shape: tuple[int, ...], size: int = 9, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def opacus_per_sample_gradients(model: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Opacus's hooks mode (its grad samplers, functorch for the rest): each parameter's per-sample gradients."""
    wrapped = GradSampleModule(model, loss_reduction="sum")
    try:
        nn.functional.cross_entropy(wrapped(inputs), targets, reduction="sum").backward()
        return {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    finally:
        wrapped.to_standard_module()
        model.zero_grad(set_to_none=True)


def norms_of(per_sample: dict[str, Tensor]) -> Tensor:
    return torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()], dim=1).norm(dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_norms_equal_opacus_per_sample_gradient_norms(case: str) -> None:
    model, shape, rules = CASES[case]
    torch.manual_seed(0)
    inputs, targets = batch(shape)
    expected = norms_of(opacus_per_sample_gradients(model, inputs, targets))

    with GhostClipping(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=9) as clipping:
        assert clipping.rules == rules
        norms = clipping.per_sample_norms(nn.functional.cross_entropy(model(inputs), targets, reduction="sum"),
                                          batch_size=len(targets))
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0.0)
    assert all(p.grad is None for p in model.parameters())  # the backward pass went to the outputs only


def mixed_model() -> nn.Module:
    """Every rule in one network: 1x1 conv (ghost), BatchNorm's affine (channel), 3x3 conv (sampler), Linear."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(4, 6, 1, stride=2), frozen_batchnorm(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 9, 3))


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.5, 1e3])  # all clipped, some, none
def test_without_noise_the_gradients_equal_opacus_dp_optimizer(max_grad_norm: float) -> None:
    inputs, targets = batch((4, 6, 6), size=12, seed=2)
    expected_batch_size = 10  # Poisson sampling's expected size, not this batch's: the sum is divided by it

    reference = mixed_model()
    wrapped = GradSampleModule(reference)  # loss_reduction "mean", as make_private sets it
    optimizer = DPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size)
    nn.functional.cross_entropy(wrapped(inputs), targets).backward()
    optimizer.pre_step()
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}
    wrapped.to_standard_module()

    model = mixed_model()
    with GhostClipping(model, max_grad_norm=max_grad_norm, noise_multiplier=0.0,
                       expected_batch_size=expected_batch_size) as clipping:
        clipping.clipped_noised_gradients(nn.functional.cross_entropy(model(inputs), targets, reduction="sum"),
                                              batch_size=len(targets))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_noise_has_std_noise_multiplier_times_clip_over_expected_batch_size() -> None:
    model = mixed_model()
    inputs, targets = batch((4, 6, 6), size=12, seed=3)
    settings = {"max_grad_norm": 0.5, "expected_batch_size": 10}

    def gradients(noise_multiplier: float, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        with GhostClipping(model, noise_multiplier=noise_multiplier, generator=generator, **settings) as clipping:
            clipping.clipped_noised_gradients(nn.functional.cross_entropy(model(inputs), targets, reduction="sum"),
                                              batch_size=len(targets))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    clipped_mean = gradients(0.0, seed=0)
    noise = torch.cat([gradients(2.0, seed) - clipped_mean for seed in range(20)])  # ~ 20 x 578 coordinates
    expected_std = 2.0 * 0.5 / 10
    assert noise.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(noise.mean().item()) < 4 * expected_std / noise.numel() ** 0.5
    # An empty batch's step is the same noise and nothing else.
    generator = torch.Generator().manual_seed(5)
    with GhostClipping(model, noise_multiplier=2.0, generator=generator, **settings) as clipping:
        clipping.noise_only_gradients()
    pure = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert pure.std().item() == pytest.approx(expected_std, rel=0.15)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_an_example_with_a_non_finite_gradient_is_left_out_not_clipped_as_small(
    poison: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Opacus 1.6 (the reference) lets one such example turn every parameter's gradient into NaN:
    C / (NaN + 1e-6) clamped at 1 is NaN, and 0 x inf is NaN too. Here the example contributes
    nothing, the others are clipped as usual, and a warning says how many were left out."""
    inputs, targets = batch((4, 6, 6), size=12, seed=4)
    poisoned = inputs.clone()
    poisoned[3, 0, 0, 0] = poison

    reference = mixed_model()
    wrapped = GradSampleModule(reference)
    optimizer = DPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=0.5, expected_batch_size=10)
    nn.functional.cross_entropy(wrapped(poisoned), targets).backward()
    optimizer.pre_step()
    assert any(not torch.isfinite(p.grad).all() for p in reference.parameters())  # what Opacus does
    wrapped.to_standard_module()

    def clipped(model: nn.Module, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        with GhostClipping(model, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=10) as clipping:
            clipping.clipped_noised_gradients(nn.functional.cross_entropy(model(inputs), targets, reduction="sum"),
                                              batch_size=len(targets))
            dropped = clipping.non_finite_examples
        return {name: p.grad.clone() for name, p in model.named_parameters()} | {"dropped": torch.tensor(dropped)}

    keep = torch.arange(12) != 3
    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        got = clipped(mixed_model(), poisoned, targets)
    without = clipped(mixed_model(), inputs[keep], targets[keep])
    assert got.pop("dropped").item() == 1 and without.pop("dropped").item() == 0
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, without[name], rtol=1e-5, atol=1e-7, msg=name)
    assert "1 of 12 examples in this batch have a NaN or infinite gradient norm" in caplog.text


class Scale(nn.Module):
    """A layer with a Parameter that neither ghost clipping nor Opacus's grad samplers know."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def test_layers_ghost_clipping_cannot_clip_are_named_and_refused() -> None:
    model = nn.Sequential(Scale(8), nn.Linear(8, 3))
    assert unsupported_layers(model) == ["0 (Scale)"]
    with pytest.raises(UnsupportedLayer, match=r"no rule for 0 \(Scale\)"):
        GhostClipping(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)

    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.Tanh(), shared)  # one layer, two calls: its gradient is a sum of two
    inputs, targets = batch((4,), size=5)
    with GhostClipping(twice, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4):
        with pytest.raises(UnsupportedLayer, match="ran twice in one forward pass"):
            twice(inputs)

    in_place = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    with GhostClipping(in_place, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4) as clipping:
        loss = nn.functional.cross_entropy(in_place(inputs), targets, reduction="sum")
        with pytest.raises(RuntimeError, match="output of layer 0 was modified in place"):
            clipping.per_sample_norms(loss, batch_size=len(targets))


class FoldedTime(nn.Module):
    """A Linear applied to (batch x time) rows: its input's first dimension is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.reshape(-1, x.shape[-1])).reshape(len(x), -1)


def test_a_layer_that_does_not_see_the_batch_first_is_refused_not_given_wrong_norms() -> None:
    model = FoldedTime()
    inputs, targets = batch((2, 4), size=5)
    with GhostClipping(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4) as clipping:
        loss = nn.functional.cross_entropy(model(inputs), targets, reduction="sum")
        with pytest.raises(RuntimeError, match=r"layer linear ran on an input of shape \(10, 4\), not on the batch "
                                               "of 5 examples first"):
            clipping.clipped_noised_gradients(loss, batch_size=5)
    assert all(p.grad is None for p in model.parameters())


def custom_staged_model() -> StagedModel:
    torch.manual_seed(0)
    return StagedModel([("stem", nn.Linear(6, 8)), ("custom", Scale(8)), (HEAD, nn.Linear(8, 3))])


def test_auto_falls_back_to_opacus_per_sample_gradients_and_ghost_refuses(caplog: pytest.LogCaptureFixture) -> None:
    model = custom_staged_model()
    stages = trainable_stages(model, 1)  # the Scale stage and the head
    data = TensorDataset(torch.randn(16, 8), torch.arange(16) % 3)  # what the frozen stem gives
    cfg = TrainConfig(lr=0.1, batch_size=4, local_epochs=1)

    def train(clipping: str) -> PrivacyLedger:
        ledger = PrivacyLedger()
        train_private_round(model, data, stages=stages, cfg=cfg, dp=DPSGDConfig(enabled=True, target_epsilon=8.0,
                                                                                  clipping=clipping, batch_size=4),
                            ledger=ledger, planned_rounds=1, start=first_trainable_index(model, stages), device=CPU)
        return ledger

    before = model.stages["custom"].scale.detach().clone()
    with caplog.at_level(logging.DEBUG, logger="fedtune.client"):
        assert sum(steps for _, _, steps in train("auto").history) == 4
    assert "Opacus's per-sample gradients this round: ghost clipping has no rule for custom (Scale)" in caplog.text
    assert not torch.equal(model.stages["custom"].scale, before)  # Opacus (functorch) trained it
    with pytest.raises(ValueError, match=r"clipping is ghost, but ghost clipping has no rule for custom \(Scale\)"):
        train("ghost")


def test_the_clipping_setting_is_validated() -> None:
    assert DPSGDConfig().clipping == "auto"
    with pytest.raises(ConfigError, match="clipping"):
        load_config(Path(__file__).resolve().parents[1] / "configs/quickstart.yaml", ["privacy.dp_sgd.clipping=fast"])


@pytest.mark.parametrize("blocks", [0, 1])
def test_both_engines_write_the_same_ledger(blocks: int) -> None:
    """Same data, seeds and plan: ghost clipping and Opacus's hooks mode account exactly the same steps."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=3, weights="none").eval()
    stages = trainable_stages(model, blocks)
    start = first_trainable_index(model, stages)
    with torch.no_grad():
        features = model.forward_stages(torch.randn(30, 3, 32, 32), 0, stop=start)
    data = TensorDataset(features, torch.arange(30) % 3)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    cfg = TrainConfig(lr=0.01, batch_size=8, local_epochs=2)
    ledgers, epsilons = {}, {}
    for clipping in ("ghost", "per_sample"):
        model.load_state_dict(initial)
        dp = DPSGDConfig(enabled=True, target_epsilon=4.0, clipping=clipping, batch_size=8)
        ledger = PrivacyLedger()
        for server_round in range(2):
            _, epsilons[clipping] = train_private_round(model, data, stages=stages, cfg=cfg, dp=dp, ledger=ledger,
                                                        planned_rounds=3, start=start, seed=server_round, device=CPU)
        ledgers[clipping] = ledger
    assert ledgers["ghost"] == ledgers["per_sample"]
    assert ledgers["ghost"].history == [(ledgers["ghost"].noise_multiplier, 1 / 4, 16)]
    assert epsilons["ghost"] == epsilons["per_sample"]
