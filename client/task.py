"""A client's side of a round: rebuild the global model, load local data, reuse cached features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset, Subset

from client.cache import FeatureCache, ModelCache, default_cache_root
from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.config import ClientSettings
from fedtune.data import fingerprint, load_split, partition, split_validation
from fedtune.engine import extract_features
from fedtune.params import first_trainable_index, load_tensors, travelling_keys


@dataclass(frozen=True)
class NodeIdentity:
    """Node-local facts: they come from the node's own config, never from the server."""

    partition_id: int
    num_partitions: int
    cache_root: Path
    data_root: Path | None = None  # this node's copy of the dataset, in place of the experiment's data.root
    own_data: bool = False  # data_root is this node's own dataset, used whole instead of one partition

    @classmethod
    def from_node_config(cls, node_config: dict[str, object]) -> NodeIdentity:
        if "partition-id" not in node_config:
            raise ValueError("this node has no 'partition-id' in its node config; start it with one")
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config.get("num-partitions", 0))
        if "cache-dir" in node_config:
            cache_root = Path(str(node_config["cache-dir"]))
        else:
            # Each virtual node of a simulation gets a cache of its own, as separate machines would.
            cache_root = default_cache_root() / f"node-{partition_id}"
        data_root = Path(str(node_config["data-root"])) if "data-root" in node_config else None
        own_data = str(node_config.get("own-data", "false")).lower() == "true"
        if own_data and data_root is None:
            raise ValueError("this node's config says own-data but gives no data-root (start it with --data PATH)")
        return cls(partition_id=partition_id, num_partitions=num_partitions, cache_root=cache_root,
                   data_root=data_root, own_data=own_data)


def restore_model(
    settings: ClientSettings,
    *,
    model_hash: str,
    trainable: dict[str, Tensor],
    stages: list[str],
    cache: ModelCache,
) -> StagedModel:
    """The global model of this round: the cached full model with this round's trainable tensors."""
    if not cache.has(model_hash):
        raise RuntimeError(f"model {model_hash[:12]} is not cached on this node; the server sends it before training")
    # The architecture is built locally without weights: they come from the cache, not a hub.
    model = build_model(
        settings.model.backbone,
        num_classes=settings.num_classes,
        weights="none",
        head_dropout=settings.model.head_dropout,
    )
    model.load_state_dict(cache.load(model_hash))
    expected = travelling_keys(model, stages, statistics=not settings.freeze_statistics)
    load_tensors(model, trainable, expected_keys=expected)
    return model


@dataclass(frozen=True)
class LocalData:
    train: Dataset
    validation: Dataset
    train_identity: str
    validation_identity: str


def local_data(settings: ClientSettings, node: NodeIdentity) -> LocalData:
    """This node's training data (its partition, or its own dataset whole), with a local validation part held out."""
    data = settings.data
    root = str(node.data_root) if node.data_root is not None else data.root
    full = load_split(data.source, "train", root=root, download=data.download, seed=settings.seed,
                      bad_images=data.bad_images)
    if node.own_data:
        mine = list(range(len(full.targets)))
    else:
        mine = _partition_of(settings, node, full.targets)
    train_idx, val_idx = split_validation(
        mine, full.targets, fraction=data.val_fraction, seed=settings.seed + node.partition_id
    )
    pre = preprocessing_for(settings.model.backbone).at_size(data.image_size)
    augmented = full.with_transform(pre.transform(augment=data.augment))
    plain = full.with_transform(pre.transform(augment=False))
    return LocalData(
        train=Subset(augmented, train_idx),
        validation=Subset(plain, val_idx),
        train_identity=f"{fingerprint(full, train_idx)}|{pre}",
        validation_identity=f"{fingerprint(full, val_idx)}|{pre}",
    )


def _partition_of(settings: ClientSettings, node: NodeIdentity, targets: list[int]) -> list[int]:
    data = settings.data
    if node.num_partitions and node.num_partitions != settings.num_clients:
        raise ValueError(
            f"the federation has {node.num_partitions} nodes but the experiment expects "
            f"federation.num_clients = {settings.num_clients}"
        )
    if not 0 <= node.partition_id < settings.num_clients:
        raise ValueError(f"partition-id {node.partition_id} is outside 0..{settings.num_clients - 1}")
    parts = partition(
        targets,
        scheme=data.partition.scheme,
        num_partitions=settings.num_clients,
        seed=settings.seed,
        alpha=data.partition.alpha,
        shards_per_partition=data.partition.shards_per_client,
        min_examples=data.partition.min_examples,
    )
    return parts[node.partition_id]


def model_inputs(
    model: StagedModel,
    dataset: Dataset,
    *,
    identity: str,
    stages: list[str],
    model_hash: str,
    augmented: bool,
    cache: FeatureCache,
    device: object,
) -> tuple[Dataset, int]:
    """What to feed the trainable stages, and from which stage index.

    The frozen prefix below the lowest trainable stage gives the same output every round, so
    (without augmentation) it runs once per node and its output is cached on disk.
    """
    start = first_trainable_index(model, stages)
    if start == 0 or augmented:
        return dataset, 0
    key = (model_hash, str(start), identity)
    cached = cache.get(*key)
    if cached is None:
        cached = extract_features(model, dataset, stop=start, batch_size=64, device=device)
        cache.put(cached, *key)
    return cached, start
