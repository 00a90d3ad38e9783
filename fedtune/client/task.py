"""A client's side of a round: restore the global model, load local data, reuse cached features."""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from fedtune import messages as keys
from fedtune.adapters import AdapterError, AdapterPlan
from fedtune.backbones import StagedModel, preprocessing_for
from fedtune.client.cache import CACHE_MAX_ENV, DEFAULT_CACHE_MAX_GB, FeatureCache, ModelCache, default_cache_root
from fedtune.client.resident import RESIDENT, Architecture, NotThisArchitecture, ResidentModels
from fedtune.config import MAX_DP_SCALE, DataConfig
from fedtune.data import (
    ResidentSplit,
    fingerprint,
    resident_partitioning,
    resident_split,
    split_validation,
    training_subset,
)
from fedtune.engine import extract_features
from fedtune.params import first_trainable_index, load_tensors, travelling_keys
from fedtune.protocol import (
    ClientSettings,
    RefusedMessage,
    VirtualClient,
    check_stages_of,
    check_trainable_tensors,
)

log = logging.getLogger("fedtune.client")

_MAX_PARTITION_ID = 1_000_000
# Under the cache root: the cache the virtual clients of simulations on this machine share.
SHARED_CACHE = "virtual-clients"
_MAX_CACHE_GB = 1e6
# Examples per batch of a frozen prefix's forward pass: a cached feature entry is exactly what this
# batching computes (fedtune/client/statistics.py computes the same entries).
FEATURE_BATCH = 64
# With max-epsilon set and no max-delta, the delta a node accepts: the usual choice below 1 / examples.
DEFAULT_MAX_DELTA = 1e-5


def in_simulation() -> bool:
    """Whether this ClientApp runs as a virtual node of Flower's simulation engine.

    The engine (flwr 1.41) runs every ClientApp call inside a Ray actor: ClientAppActor
    (flwr/simulation/ray_transport/ray_actor.py, line 71), handed each message by
    flwr/server/superlink/fleet/vce/backend/raybackend.py (process_message, line 174), in a
    simulation the user started (`fedtune simulate`, or `flwr run` on a simulation SuperLink)
    from the user's own config. A real SuperNode runs its ClientApp in a process of its own
    (flwr-clientapp, or fedtune's worker) that never joins a Ray cluster: what decides is this
    process, which no server message can change. The node config cannot tell the two apart: the
    engine sets exactly partition-id and num-partitions (flwr/server/superlink/fleet/vce/
    vce_api.py, lines 91-94), which a real SuperNode can be given too.
    """
    ray = sys.modules.get("ray")  # never imported by a real node's ClientApp process
    if ray is None or not ray.is_initialized():  # get_runtime_context() would start a Ray otherwise
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def _flag(node_config: dict[str, object], key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"node config {key}: must be true or false, got {str(value)[:40]!r}")


def _whole_number(node_config: dict[str, object], key: str, default: int, *, high: int) -> int:
    value = node_config.get(key, default)
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"node config {key}: must be a whole number, got {str(value)[:40]!r}") from None
    if not 0 <= number <= high:
        raise ValueError(f"node config {key}: must be between 0 and {high}, got {number}")
    return number


def _positive_number(node_config: dict[str, object], key: str, *, high: float) -> float | None:
    """A node-config number in (0, high), or None when the key is absent."""
    value = node_config.get(key)
    if value is None:
        return None
    try:
        number = float(str(value))
    except ValueError:
        raise ValueError(f"node config {key}: must be a number, got {str(value)[:40]!r}") from None
    if not (math.isfinite(number) and 0 < number < high):
        raise ValueError(f"node config {key}: must be above 0 and below {high:g}, got {number}")
    return number


def _cache_max_bytes(node_config: dict[str, object]) -> int:
    """This node's cache cap: node config cache-max-gb, else $FEDTUNE_CACHE_MAX_GB, else the default."""
    source, value = "node config cache-max-gb", node_config.get("cache-max-gb")
    if value is None:
        source, value = CACHE_MAX_ENV, os.environ.get(CACHE_MAX_ENV) or DEFAULT_CACHE_MAX_GB
    try:
        gigabytes = float(str(value))
    except ValueError:
        raise ValueError(f"{source}: must be a number of gigabytes, got {str(value)[:40]!r}") from None
    if not (math.isfinite(gigabytes) and 0 < gigabytes <= _MAX_CACHE_GB):
        raise ValueError(f"{source}: must be a number of gigabytes above 0 (at most {_MAX_CACHE_GB:g}), got {value}")
    return int(gigabytes * 1024**3)


@dataclass(frozen=True)
class NodeIdentity:
    """Node-local facts: they come from the node's own config (and process), never from the server."""

    partition_id: int
    num_partitions: int
    cache_root: Path
    data_root: Path | None = None  # this node's copy of the dataset, in place of the experiment's data.root
    own_data: bool = False  # data_root is this node's own dataset, used whole instead of one partition
    download: bool = False  # this node may download its dataset into data_root (node config download=true)
    cache_max_bytes: int = int(DEFAULT_CACHE_MAX_GB * 1024**3)
    # This node's own privacy floor (node config max-epsilon, max-delta): with it, the node trains
    # only under DP-SGD within that budget, whatever the server's settings say.
    max_epsilon: float | None = None
    max_delta: float = DEFAULT_MAX_DELTA
    # A virtual node of the user's own simulation: it may read the experiment's data settings.
    simulated: bool = False
    # Where this client's own state lives (its DP ledgers): cache_root, unless several virtual
    # clients share the cache (playing).
    state_root: Path | None = None

    @property
    def client_state_root(self) -> Path:
        return self.state_root or self.cache_root

    @classmethod
    def from_node_config(cls, node_config: dict[str, object], *, simulated: bool | None = None) -> NodeIdentity:
        """`simulated` defaults to what this process is (in_simulation())."""
        if "partition-id" not in node_config:
            raise ValueError("this node has no 'partition-id' in its node config; start it with one")
        partition_id = _whole_number(node_config, "partition-id", 0, high=_MAX_PARTITION_ID)
        num_partitions = _whole_number(node_config, "num-partitions", 0, high=_MAX_PARTITION_ID)
        if "cache-dir" in node_config:
            cache_root = Path(str(node_config["cache-dir"]))
        else:
            # Each virtual node of a simulation gets a cache of its own, as separate machines would.
            cache_root = default_cache_root() / f"node-{partition_id}"
        data_root = Path(str(node_config["data-root"])) if "data-root" in node_config else None
        own_data = _flag(node_config, "own-data")
        if own_data and data_root is None:
            raise ValueError("this node's config says own-data but gives no data-root (start it with --data PATH)")
        return cls(partition_id=partition_id, num_partitions=num_partitions, cache_root=cache_root,
                   data_root=data_root, own_data=own_data, download=_flag(node_config, "download"),
                   cache_max_bytes=_cache_max_bytes(node_config),
                   max_epsilon=_positive_number(node_config, "max-epsilon", high=MAX_DP_SCALE),
                   max_delta=_positive_number(node_config, "max-delta", high=1.0) or DEFAULT_MAX_DELTA,
                   simulated=in_simulation() if simulated is None else simulated)

    def playing(self, virtual: VirtualClient | None, settings_clients: int | None = None) -> NodeIdentity:
        """This node as the virtual client a simulation message names (itself when it names none).

        Only a virtual node of the user's own simulation plays other clients: a real node's data and
        identity are its own, and it refuses a message that names another. The clients a simulation
        node plays share one content-addressed cache on this machine (`virtual-clients` under the
        cache root: one backbone copy and the frozen features of every partition); each keeps its
        own state (its DP ledgers) under `clients/<partition>` there.
        """
        if virtual is None:
            return self
        if not self.simulated:
            raise RefusedMessage(keys.VIRTUAL_PARTITION, "names a virtual client, but this is a real node: its "
                                                         "data and its identity are its own")
        if settings_clients is not None and virtual.clients != settings_clients:
            raise RefusedMessage(keys.VIRTUAL_CLIENTS, f"says the federation has {virtual.clients} clients, the "
                                                       f"settings say {settings_clients}")
        shared = default_cache_root() / SHARED_CACHE
        return replace(self, partition_id=virtual.partition, num_partitions=virtual.clients, cache_root=shared,
                       state_root=shared / "clients" / str(virtual.partition))

    def model_cache(self) -> ModelCache:
        return ModelCache(self.cache_root, max_bytes=self.cache_max_bytes)

    def feature_cache(self) -> FeatureCache:
        return FeatureCache(self.cache_root, max_bytes=self.cache_max_bytes)

    def data_location(self, data: DataConfig) -> tuple[str | None, bool]:
        """Where this node's data is, and whether it may download it.

        A virtual node of a simulation follows the user's experiment file (data.root, data.download),
        unless its node config names a data-root. A real node reads only the folder its own config
        names and downloads only if its own config says so: the server's data.root and
        data.download never reach its file system.
        """
        if self.simulated:
            return (str(self.data_root) if self.data_root is not None else data.root), data.download
        if self.data_root is None and data.root is not None:
            raise ValueError("the experiment's data is read from a folder (data.root), but a real node reads only "
                             "the folder its own config names: start it with --data PATH (node config data-root)")
        if data.download and not self.download:
            log.info("data.download from the server is ignored: this node downloads only with download=true in "
                     "its own node config")
        return (str(self.data_root) if self.data_root is not None else None), self.download


@contextmanager
def restored_model(
    settings: ClientSettings,
    *,
    model_hash: str,
    trainable: dict[str, Tensor],
    stages: Iterable[str],
    cache: ModelCache,
    device: torch.device,
    resident: ResidentModels = RESIDENT,
) -> Iterator[StagedModel]:
    """The global model of this round, on `device`, for the block: the cached full model with this
    round's trainable tensors.

    The model is this process's resident instance (fedtune/client/resident.py): it stays in
    memory for the next message, which gets it back as the cached model again, whatever this one
    did. ModelNotCached if the cache lacks the model; RefusedMessage if the server's stages or
    tensors do not fit the model its settings describe.
    """
    stages = list(stages)
    architecture = Architecture(settings.model.backbone, settings.num_classes, settings.model.head_dropout,
                                settings.model.cut, AdapterPlan.of(settings.train))
    try:
        with resident.lease(cache, model_hash, architecture, stages=stages, device=device) as model:
            check_stages_of(stages, model.stages, backbone=settings.model.backbone)
            check_stages_of(settings.train.lr_multipliers, model.stages, backbone=settings.model.backbone,
                            field=f"{keys.CLIENT_CONFIG}: train.lr_multipliers")
            expected = travelling_keys(model, stages, statistics=not settings.freeze_statistics,
                                       personalization=settings.personalization)
            check_trainable_tensors(trainable, model.state_dict(keep_vars=True))  # reads dtypes only
            try:
                load_tensors(model, trainable, expected_keys=expected)
            except ValueError as error:
                raise RefusedMessage(keys.ARRAYS, str(error)) from None
            yield model
    except AdapterError as error:  # the settings' adapters do not fit this backbone: raised before the block runs
        raise RefusedMessage(keys.CLIENT_CONFIG, str(error)) from None
    except NotThisArchitecture:  # raised before the block runs; which tensors differ is too long for a reason
        raise RefusedMessage(keys.MODEL_HASH, f"names a cached model that is not a {settings.model.backbone} with "
                                              f"{settings.num_classes} classes") from None


@dataclass(frozen=True)
class LocalData:
    train: Dataset
    validation: Dataset
    train_identity: str
    validation_identity: str


def local_data(settings: ClientSettings, node: NodeIdentity) -> LocalData:
    """This node's training data (its partition, or its own dataset whole), with a local validation part held out.

    It trains on data.train_fraction of what is left (fedtune.data.training_subset): all of it by default.
    """
    data = settings.data
    root, download = node.data_location(data)
    # Read and partitioned once per run in this process, not per message: a simulation's actor
    # serves many virtual clients, and a node's worker every round.
    loaded = resident_split(data.source, "train", root=root, download=download, seed=settings.seed,
                            bad_images=data.bad_images, scope=settings.run_key)
    full = loaded.dataset
    if node.own_data:
        mine: Sequence[int] | np.ndarray = range(len(full))
    else:
        mine = _partition_of(settings, node, loaded)
    train_idx, val_idx = split_validation(
        mine, loaded.labels, fraction=data.val_fraction, seed=settings.seed + node.partition_id
    )
    # After the validation split, so data.train_fraction changes only what this client trains on.
    train_idx = training_subset(train_idx, loaded.labels, fraction=data.train_fraction,
                                seed=settings.seed + node.partition_id)
    pre = preprocessing_for(settings.model.backbone).at_size(data.image_size)
    augmented = full.with_transform(pre.transform(augment=data.augment))
    plain = full.with_transform(pre.transform(augment=False))
    return LocalData(
        train=Subset(augmented, train_idx),
        validation=Subset(plain, val_idx),
        train_identity=f"{fingerprint(full, train_idx)}|{pre}",
        validation_identity=f"{fingerprint(full, val_idx)}|{pre}",
    )


def _partition_of(settings: ClientSettings, node: NodeIdentity, loaded: ResidentSplit) -> np.ndarray:
    data = settings.data
    if node.num_partitions and node.num_partitions != settings.num_clients:
        raise ValueError(
            f"the federation has {node.num_partitions} nodes but the experiment expects "
            f"federation.num_clients = {settings.num_clients}"
        )
    if not 0 <= node.partition_id < settings.num_clients:
        raise ValueError(f"partition-id {node.partition_id} is outside 0..{settings.num_clients - 1}")
    parts = resident_partitioning(
        loaded,
        scheme=data.partition.scheme,
        num_partitions=settings.num_clients,
        seed=settings.seed,
        alpha=data.partition.alpha,
        shards_per_partition=data.partition.shards_per_client,
        min_examples=data.partition.min_examples,
    )
    return parts.indices(node.partition_id)


def model_inputs(
    model: StagedModel,
    dataset: Dataset,
    *,
    identity: str,
    stages: list[str],
    model_hash: str,
    augmented: bool,
    cache: FeatureCache,
    device: torch.device,
    in_use: Iterable[Path] = (),
) -> tuple[Dataset, int]:
    """What to feed the trainable stages, and from which stage index.

    The frozen prefix below the lowest trainable stage gives the same output every round, so
    (without augmentation) it runs once per node and its output is cached on disk. `in_use`: cache
    entries that writing the features must not evict (the round's model).
    """
    start = first_trainable_index(model, stages)
    if start == 0 or augmented:
        return dataset, 0
    key = feature_key(model_hash, start, identity)
    cached = cache.get(*key)
    if cached is None:
        cached = extract_features(model, dataset, stop=start, batch_size=FEATURE_BATCH, device=device)
        cache.put(cached, *key, in_use=in_use)
    return cached, start


def feature_key(model_hash: str, stop: int, identity: str) -> tuple[str, str, str]:
    """The feature cache's key of the output of the stages below `stop`, of the model `model_hash`, on
    the data `identity` names (its examples and preprocessing)."""
    return model_hash, str(stop), identity
