"""A client's answer to `fedtune select`: each candidate's frozen features of its training split, reduced to sums.

The features never leave the node: only FeatureStatistics (fedtune/transferability.py) of them do,
in the form fedtune/statistics_protocol.py gives them. Candidates that share a model (a backbone and
the same backbone cut earlier) are computed in one forward pass. The features a candidate's head
reads (the output of the stage below its head) go into the node's feature cache under the key
head-only fine-tuning uses (fedtune/client/task.py, model_inputs), so the candidate chosen starts
its first round with its training features already computed. Under SecAgg+ the same features are
scaled into a public range and masked instead (`secure_statistics`, called from
fedtune/client/secure_aggregation.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from flwr.app import Context, Message
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fedtune import messages as keys
from fedtune.backbones import HEAD, StagedModel
from fedtune.client.cache import FeatureCache
from fedtune.client.resident import ResidentModels
from fedtune.client.task import FEATURE_BATCH, NodeIdentity, feature_key, local_data, restored_model
from fedtune.data import ImageDataset
from fedtune.engine import resolve_device
from fedtune.protocol import RefusedMessage, excerpt
from fedtune.statistics_protocol import (
    StatisticsQuery,
    StatisticsRequest,
    parse_statistics_query,
    secure_vectors,
    statistics_record,
    statistics_reply,
)

# Models kept between statistics queries, apart from those training keeps (fedtune/client/resident.py):
# a simulation's worker answers for many clients in turn, each query naming every candidate's model.
# Four covers the default candidates (Lite0, Lite1, Lite2, a random Lite0; the cut one shares Lite0's).
STATISTICS_MODELS = ResidentModels(capacity=4)


def answer_statistics_query(msg: Message, context: Context) -> Message:
    """The statistics of every candidate the query names, on this node's training split.

    Raises RefusedMessage for a query not of its exact form (a stage the model lacks, or whose
    output is not a feature vector or map), ModelNotCached if a candidate's model is not here.
    """
    _refuse_under_own_budget(context)
    query = parse_statistics_query(msg.content)
    if query.secure is not None:
        raise RefusedMessage(keys.STATISTICS_NORMS, "secure aggregation's bounds in a plain query: the statistics "
                                                    "would go to the server unmasked")
    records, seconds, examples = [], [], 0
    for request, (features, labels, shared) in zip(query.requests, _features(query, context), strict=True):
        started = time.perf_counter()
        records.append(statistics_record(features.numpy(), labels.numpy(), num_classes=request.settings.num_classes))
        seconds.append(shared + time.perf_counter() - started)
        examples = len(labels)
    return Message(statistics_reply(records, num_examples=examples, seconds=seconds), reply_to=msg)


def _refuse_under_own_budget(context: Context) -> None:
    """A node with its own privacy budget (node config max-epsilon) releases its data only through
    DP-SGD's noise; the statistics are exact moments of its features (and, summed by SecAgg+, still
    exact for the federation), so it answers no statistics query."""
    node = NodeIdentity.from_node_config(dict(context.node_config))
    if node.max_epsilon is not None:
        raise RefusedMessage(keys.STATISTICS_SETTINGS, f"this node's data leaves it only under DP-SGD (its max-epsilon "
                                                       f"is {node.max_epsilon:g}); feature statistics carry no noise")


def secure_statistics(query: StatisticsQuery, context: Context) -> dict[str, np.ndarray]:
    """Under SecAgg+: every candidate's statistics scaled into [-1, 1] by the query's public bounds,
    keyed `<candidate index>.<part>` (fedtune/statistics_protocol.py, secure_vectors)."""
    _refuse_under_own_budget(context)
    if query.secure is None:
        raise RefusedMessage(keys.STATISTICS_NORMS, "missing: under secure aggregation the sums need public bounds")
    vectors: dict[str, np.ndarray] = {}
    for index, (request, (features, labels, _)) in enumerate(zip(query.requests, _features(query, context),
                                                                  strict=True)):
        parts = secure_vectors(features.numpy(), labels.numpy(), num_classes=request.settings.num_classes,
                               norm=query.secure.norms[index], max_examples=query.secure.max_examples,
                               levels=query.secure.levels)
        vectors |= {f"{index}.{name}": value for name, value in parts.items()}
    return vectors


def _features(query: StatisticsQuery, context: Context) -> list[tuple[Tensor, Tensor, float]]:
    """Per request: (features N x D, labels, the seconds of its share of the forward pass)."""
    requests = query.requests
    node = NodeIdentity.from_node_config(dict(context.node_config)).playing(query.virtual,
                                                                            requests[0].settings.num_clients)
    found: dict[int, tuple[Tensor, Tensor, float]] = {}
    decoded = _DecodedOnce()
    for model_hash, indices in _by_model(requests).items():
        started = time.perf_counter()
        settings = requests[indices[0]].settings
        models = node.model_cache()
        device = resolve_device(settings.train.device)
        with restored_model(settings, model_hash=model_hash, trainable={}, stages=[], cache=models, device=device,
                            resident=STATISTICS_MODELS) as model:
            stops = [_stop_after(model, requests[index].stage, backbone=settings.model.backbone) for index in indices]
            data = local_data(settings, node)
            outputs = _stage_outputs(model, decoded.images(data.train), stops, device=device,
                                     cache=node.feature_cache(),
                                     key=lambda stop: feature_key(model_hash, stop, data.train_identity),
                                     in_use=[models.path(model_hash)])
        shared = (time.perf_counter() - started) / len(indices)  # one pass, split evenly between its candidates
        for index, stop in zip(indices, stops, strict=True):
            found[index] = (*outputs[stop], shared)
    return [found[index] for index in range(len(requests))]


# Decoded training images a statistics query keeps in memory for its candidates (each with its own
# preprocessing); a client with more streams them from its store for each candidate instead.
DECODED_BUDGET_BYTES = 512 * 1024**2


class _DecodedOnce:
    """A client's training images decoded once per query, then handed to each candidate's preprocessing:
    a JPEG decode costs as much as a small backbone's forward pass. The pixels, and so the features
    (and their cache entries), are those of the client's own data set."""

    def __init__(self, budget: int = DECODED_BUDGET_BYTES) -> None:
        self.budget = budget
        self._key: tuple[str, tuple[int, ...]] | None = None
        self._items: list[tuple[Tensor, int]] | None = None

    def images(self, train: Dataset) -> Dataset:
        if not (isinstance(train, Subset) and isinstance(train.dataset, ImageDataset)):
            return train
        key = (train.dataset.identity, tuple(int(i) for i in train.indices))
        if key != self._key:
            self._key, self._items = key, self._decode(train.dataset.with_transform(None), key[1])
        if self._items is None:  # past the budget: streamed
            return train
        return _Transformed(self._items, train.dataset.transform)

    def _decode(self, plain: ImageDataset, indices: tuple[int, ...]) -> list[tuple[Tensor, int]] | None:
        items, size = [], 0
        for index in indices:
            image, label = plain[index]
            size += image.numel() * image.element_size()
            if size > self.budget:
                return None
            items.append((image, label))
        return items


class _Transformed(Dataset):
    """Decoded (image, label) pairs through a transform."""

    def __init__(self, items: list[tuple[Tensor, int]], transform: Callable[[Tensor], Tensor] | None) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.items[index]
        return (self.transform(image) if self.transform is not None else image), label


def _by_model(requests: Iterable[StatisticsRequest]) -> dict[str, list[int]]:
    """The requests' indices grouped by model, in the order each model first appears. The requests
    of one model must describe it alike (architecture, data): the model is restored once for all."""
    groups: dict[str, list[int]] = {}
    described: dict[str, tuple[object, object]] = {}
    for index, request in enumerate(requests):
        description = (request.settings.model, request.settings.data)
        if described.setdefault(request.model_hash, description) != description:
            raise RefusedMessage(keys.STATISTICS_MODELS, f"names the model {request.model_hash[:12]} twice, with "
                                                         "different model or data settings")
        groups.setdefault(request.model_hash, []).append(index)
    return groups


def _stop_after(model: StagedModel, stage: str, *, backbone: str) -> int:
    """The number of stages up to and including `stage`: its output is the feature. Never the head."""
    names = list(model.stages)
    if stage not in names or stage == HEAD:
        raise RefusedMessage(keys.STATISTICS_STAGES, f"{excerpt(stage)} is not a stage below the head of {backbone} "
                                                     f"(its stages: {', '.join(names)})")
    return names.index(stage) + 1


def _stage_outputs(
    model: StagedModel,
    dataset: Dataset,
    stops: list[int],
    *,
    device: torch.device,
    cache: FeatureCache,
    key: Callable[[int], tuple[str, str, str]],
    in_use: list[Path],
) -> dict[int, tuple[Tensor, Tensor]]:
    """(features N x D, labels) of the stages below each stop, feature maps average-pooled, in one pass.

    The head's input (stop = the head's index) is read from the feature cache, or computed and cached.
    """
    head = model.stage_index(HEAD)
    outputs: dict[int, tuple[Tensor, Tensor]] = {}
    if head in stops:
        cached = cache.get(*key(head))
        if cached is not None:
            outputs[head] = (cached.tensors[0], cached.tensors[1])
    missing = sorted(set(stops) - set(outputs))
    if missing:
        outputs |= _forward(model, dataset, missing, device=device)
        if head in missing:
            cache.put(TensorDataset(*outputs[head]), *key(head), in_use=in_use)
    return outputs


@torch.no_grad()
def _forward(model: StagedModel, dataset: Dataset, stops: list[int], *, device: torch.device
             ) -> dict[int, tuple[Tensor, Tensor]]:
    """One pass of the data through the stages below the highest stop, keeping each stop's output.

    Batched as fedtune/engine.py's extract_features, so a cached entry is the same either way.
    """
    model.eval()
    stages = list(model.stages.items())[: max(stops)]
    features: dict[int, list[Tensor]] = {stop: [] for stop in stops}
    labels = []
    for images, targets in DataLoader(dataset, batch_size=FEATURE_BATCH, shuffle=False):
        x = images.to(device)
        for index, (name, stage) in enumerate(stages, start=1):
            x = stage(x)
            if index in features:
                features[index].append(_as_vectors(x, name).cpu())
        labels.append(torch.as_tensor(targets))
    if not labels:
        raise ValueError("this node has no training examples to compute statistics on")
    label_tensor = torch.cat(labels)
    return {stop: (torch.cat(parts), label_tensor) for stop, parts in features.items()}


def _as_vectors(output: Tensor, stage: str) -> Tensor:
    """A stage's output as one vector per example: features as they are, a feature map average-pooled
    (as a cut backbone's `pool` stage does: fedtune/backbones.py, cut_model)."""
    if output.dim() == 2:
        return output
    if output.dim() == 4:
        return F.adaptive_avg_pool2d(output, 1).flatten(1)
    raise RefusedMessage(keys.STATISTICS_STAGES, f"the output of {excerpt(stage)} has shape {tuple(output.shape)}: "
                                                 "neither features (N, D) nor a feature map (N, C, H, W)")
