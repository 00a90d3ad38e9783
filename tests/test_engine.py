"""Local training and evaluation: frozen stages stay bit-identical, FedProx pulls back, cached features are exact."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import TensorDataset

from fedtune.backbones import StagedModel, build_model
from fedtune.config import TrainConfig
from fedtune.engine import evaluate, extract_features, make_optimizer, train_one_round
from fedtune.params import first_trainable_index, freeze_all_but, stage_of, trainable_stages, travelling_keys

CPU = torch.device("cpu")
NUM_CLASSES = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # 32-px batches of 8 gain nothing from intra-op threads, and on a shared machine (Ray
    # workers, other test runs) spinning OpenMP threads made this file several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model() -> StagedModel:
    """A lite0 with the offline ImageNet weights (real BatchNorm statistics); tests deepcopy it."""
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", num_classes=NUM_CLASSES, weights="imagenet", head_dropout=0.0)


@pytest.fixture
def model(base_model: StagedModel) -> StagedModel:
    return copy.deepcopy(base_model)


@pytest.fixture
def images() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (8,), generator=generator)
    return TensorDataset(inputs, labels)


def _config(**overrides: object) -> TrainConfig:
    settings = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "batch_size": 4, "local_epochs": 1, "device": "cpu"}
    return TrainConfig(**{**settings, **overrides})


def _snapshot(model: StagedModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _distance(model: StagedModel, start: dict[str, torch.Tensor], keys: list[str]) -> float:
    state = model.state_dict()
    return math.sqrt(sum((state[key] - start[key]).pow(2).sum().item() for key in keys))


@pytest.mark.parametrize("stages", [["head"], ["conv_head", "head"]], ids=["head", "conv_head+head"])
def test_training_changes_only_the_trainable_stages(
    model: StagedModel, images: TensorDataset, stages: list[str]
) -> None:
    before = _snapshot(model)
    trainable = set(travelling_keys(model, stages))

    metrics = train_one_round(model, images, stages=stages, cfg=_config(), seed=0, device=CPU)

    after = model.state_dict()
    frozen = [key for key in before if stage_of(key) not in stages]
    # BatchNorm statistics (and their step counters) are among the checked tensors.
    assert any("running_mean" in key for key in frozen)
    assert any("num_batches_tracked" in key for key in frozen)
    for key in frozen:
        assert torch.equal(after[key], before[key]), f"frozen {key} changed"
    # Every trainable tensor moved, BatchNorm statistics of trainable stages included.
    for key in trainable:
        assert not torch.equal(after[key], before[key]), f"trainable {key} did not change"
    assert metrics.num_examples == len(images)
    assert math.isfinite(metrics.loss)
    assert 0.0 <= metrics.accuracy <= 1.0


def test_training_ends_with_the_model_in_eval_mode(model: StagedModel, images: TensorDataset) -> None:
    train_one_round(model, images, stages=["conv_head", "head"], cfg=_config(), seed=0, device=CPU)
    assert not any(module.training for module in model.modules())


def test_training_is_reproducible_for_a_seed(base_model: StagedModel, images: TensorDataset) -> None:
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base_model)
        torch.manual_seed(0)
        metrics = train_one_round(model, images, stages=["head"], cfg=_config(), seed=3, device=CPU)
        runs.append((metrics, model.state_dict()))
    (first, first_state), (second, second_state) = runs
    assert first == second
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)


def test_a_large_proximal_term_keeps_weights_closer_to_the_start(
    base_model: StagedModel, images: TensorDataset
) -> None:
    stages = ["conv_head", "head"]
    cfg = _config(lr=0.01, local_epochs=4)
    start = _snapshot(base_model)
    keys = [key for key in travelling_keys(base_model, stages) if "running_" not in key]
    # Train on the frozen prefix's output (exact, see below) so that several epochs stay fast.
    boundary = first_trainable_index(base_model, stages)
    features = extract_features(base_model, images, stop=boundary, batch_size=8, device=CPU)

    distances = {}
    for mu in (0.0, 50.0):  # lr * mu = 0.5: strong pull, still a stable step
        model = copy.deepcopy(base_model)
        torch.manual_seed(0)
        train_one_round(model, features, stages=stages, cfg=cfg, start=boundary, proximal_mu=mu, seed=0, device=CPU)
        distances[mu] = _distance(model, start, keys)

    assert distances[0.0] > 0
    assert distances[50.0] < 0.5 * distances[0.0]


def test_training_on_cached_features_matches_training_on_images(
    base_model: StagedModel, images: TensorDataset
) -> None:
    stages = ["conv_head", "head"]
    cfg = _config()
    boundary = first_trainable_index(base_model, stages)
    assert boundary == base_model.stage_index("conv_head")

    on_images = copy.deepcopy(base_model)
    on_features = copy.deepcopy(base_model)
    features = extract_features(on_features, images, stop=boundary, batch_size=3, device=CPU)
    assert features.tensors[0].shape[0] == len(images)
    assert torch.equal(features.tensors[1], images.tensors[1])

    losses_images, losses_features = [], []
    for server_round in range(2):  # several rounds: the trajectory, not only one number
        torch.manual_seed(server_round)
        losses_images.append(
            train_one_round(on_images, images, stages=stages, cfg=cfg, seed=server_round, device=CPU).loss
        )
        torch.manual_seed(server_round)
        losses_features.append(
            train_one_round(
                on_features, features, stages=stages, cfg=cfg, start=boundary, seed=server_round, device=CPU
            ).loss
        )

    assert losses_features == pytest.approx(losses_images, rel=1e-5, abs=1e-6)
    assert len(set(losses_images)) == 2  # it did train: the loss moved between rounds
    state_images, state_features = on_images.state_dict(), on_features.state_dict()
    for key in state_images:
        torch.testing.assert_close(state_features[key], state_images[key], rtol=1e-4, atol=1e-6)
    # And evaluating either input gives the same numbers.
    from_images = evaluate(on_images, images, device=CPU)
    from_features = evaluate(on_features, features, start=boundary, device=CPU)
    assert from_features.loss == pytest.approx(from_images.loss, rel=1e-5)
    assert from_features.accuracy == from_images.accuracy


def test_extract_features_is_the_frozen_prefix_output(model: StagedModel, images: TensorDataset) -> None:
    boundary = model.stage_index("conv_head")
    features = extract_features(model, images, stop=boundary, batch_size=5, device=CPU)

    with torch.no_grad():
        expected = model.eval().forward_stages(images.tensors[0], 0, boundary)
    torch.testing.assert_close(features.tensors[0], expected, rtol=1e-5, atol=1e-6)
    assert features.tensors[1].dtype == torch.long


def test_extract_features_of_no_data_is_empty(model: StagedModel) -> None:
    empty = TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long))
    features = extract_features(model, empty, stop=3, batch_size=4, device=CPU)
    assert len(features) == 0


def test_evaluate_reports_accuracy_and_the_number_of_examples(model: StagedModel, images: TensorDataset) -> None:
    before = _snapshot(model)

    metrics = evaluate(model, images, batch_size=3, device=CPU)

    assert metrics.num_examples == len(images)  # a last partial batch still counts
    assert 0.0 <= metrics.accuracy <= 1.0
    assert math.isfinite(metrics.loss) and metrics.loss > 0
    with torch.no_grad():
        logits = model.eval()(images.tensors[0])
    expected_loss = torch.nn.functional.cross_entropy(logits, images.tensors[1]).item()
    expected_accuracy = (logits.argmax(1) == images.tensors[1]).float().mean().item()
    assert metrics.loss == pytest.approx(expected_loss, rel=1e-5)
    assert metrics.accuracy == pytest.approx(expected_accuracy)
    after = model.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before)  # evaluation changes nothing


def test_evaluate_of_no_data_reports_zero_examples(model: StagedModel) -> None:
    empty = TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long))
    metrics = evaluate(model, empty, device=CPU)
    assert metrics.num_examples == 0
    assert math.isnan(metrics.loss)


@pytest.mark.parametrize(
    ("name", "kind"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_make_optimizer_builds_the_configured_optimizer_with_discriminative_lrs(
    model: StagedModel, name: str, kind: type[torch.optim.Optimizer]
) -> None:
    stages = trainable_stages(model, 2)
    freeze_all_but(model, stages)
    cfg = _config(optimizer=name, lr=0.2, lr_decay_per_block=0.5, weight_decay=1e-4)

    optimizer = make_optimizer(model, stages, cfg)

    assert type(optimizer) is kind
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.2, 0.1, 0.05])
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


def test_make_optimizer_passes_sgd_momentum(model: StagedModel) -> None:
    freeze_all_but(model, ["head"])
    optimizer = make_optimizer(model, ["head"], _config(momentum=0.8))
    assert optimizer.param_groups[0]["momentum"] == 0.8


def test_training_without_examples_says_so(model: StagedModel) -> None:
    empty = TensorDataset(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no training examples on this client"):
        train_one_round(model, empty, stages=["head"], cfg=TrainConfig(), device=torch.device("cpu"))
