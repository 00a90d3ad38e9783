"""CUDA paths: device placement and mixed precision. Run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fedtune.backbones import build_model
from fedtune.config import TrainConfig
from fedtune.engine import evaluate, resolve_device, train_one_round
from fedtune.params import trainable_stages

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return resolve_device("auto")


@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_keeps_frozen_tensors(cuda: torch.device, amp: bool) -> None:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=10, weights="imagenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = trainable_stages(model, 1)
    data = TensorDataset(torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,)))
    metrics = train_one_round(model, data, stages=stages, cfg=TrainConfig(amp=amp, lr=0.01), device=cuda)
    assert next(model.parameters()).device.type == "cuda"
    assert metrics.num_examples == 32
    after = {k: v.cpu() for k, v in model.state_dict().items()}
    for key, value in before.items():
        trained = key.split(".")[1] in stages
        assert torch.equal(after[key], value) != trained or key.endswith("num_batches_tracked"), key
    assert 0.0 <= evaluate(model, data, device=cuda).accuracy <= 1.0
