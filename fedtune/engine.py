"""Training and evaluation loops in plain PyTorch, shared by clients and the server (no Flower here)."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedtune.backbones import StagedModel
from fedtune.config import TrainConfig
from fedtune.params import freeze_all_but, param_groups, set_train_mode


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    num_examples: int


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible on this node")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _autocast(device: torch.device, enabled: bool):  # noqa: ANN202 - a context manager
    # Mixed precision only pays off (and is only well tested) on CUDA.
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def extract_features(
    model: StagedModel, data: Dataset, *, stop: int, batch_size: int, device: torch.device
) -> TensorDataset:
    """Run the frozen prefix stages[:stop] once: later epochs and rounds start from its output."""
    model.eval()
    features, labels = [], []
    for images, targets in DataLoader(data, batch_size=batch_size, shuffle=False):
        features.append(model.forward_stages(images.to(device), 0, stop).cpu())
        labels.append(torch.as_tensor(targets))
    if not features:
        return TensorDataset(torch.empty(0), torch.empty(0, dtype=torch.long))
    return TensorDataset(torch.cat(features), torch.cat(labels))


def size_of(data: Dataset) -> int:
    """The number of examples of a map-style data set (every one fedtune uses has a length).

    torch's `Dataset` type does not declare `__len__` (iterable data sets have none)."""
    return len(cast(Sized, data))


def _batches(data: Dataset, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    # In training, a last batch of one example would break BatchNorm in trainable stages; shuffling
    # changes which examples fall out from epoch to epoch.
    drop_last = shuffle and size_of(data) > batch_size
    yield from DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


def make_optimizer(model: StagedModel, stages: list[str], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(
        model, stages, lr=cfg.lr, decay_per_block=cfg.lr_decay_per_block, multipliers=cfg.lr_multipliers
    )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_one_round(
    model: StagedModel,
    data: Dataset,
    *,
    stages: list[str],
    cfg: TrainConfig,
    start: int = 0,
    proximal_mu: float = 0.0,
    freeze_statistics: bool = False,
    seed: int = 0,
    device: torch.device,
) -> Metrics:
    """Local epochs over `data`, which feeds stage `start` (images when 0, cached features above).

    Only `stages` train; frozen stages stay in eval() so their BatchNorm statistics never drift.
    With proximal_mu > 0 the FedProx term mu/2 * ||w - w_global||^2 keeps clients near the
    global model. With freeze_statistics, BatchNorm keeps its running statistics (see set_train_mode).
    """
    if size_of(data) == 0:
        raise ValueError("no training examples on this client")
    model.to(device)
    freeze_all_but(model, stages)
    set_train_mode(model, stages, freeze_statistics=freeze_statistics)
    optimizer = make_optimizer(model, stages, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in trainable] if proximal_mu > 0 else []
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()

    total_loss, correct, seen = 0.0, 0, 0
    for epoch in range(cfg.local_epochs):
        for inputs, targets in _batches(data, cfg.batch_size, shuffle=True, seed=seed + epoch):
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, cfg.amp):
                logits = model.forward_stages(inputs, start)
                loss = loss_fn(logits, targets)
            objective = loss
            if anchors:
                drift = sum((p - a).pow(2).sum() for p, a in zip(trainable, anchors, strict=True))
                objective = loss + 0.5 * proximal_mu * drift
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
    model.eval()
    return Metrics(loss=total_loss / seen, accuracy=correct / seen, num_examples=size_of(data))


@torch.no_grad()
def evaluate(
    model: StagedModel, data: Dataset, *, start: int = 0, batch_size: int = 128, device: torch.device
) -> Metrics:
    """Mean cross-entropy and accuracy of `data` fed into stage `start`."""
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, targets in _batches(data, batch_size, shuffle=False, seed=0):
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model.forward_stages(inputs, start).float()
        total_loss += loss_fn(logits, targets).item()
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
    if not seen:
        return Metrics(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    return Metrics(loss=total_loss / seen, accuracy=correct / seen, num_examples=seen)
