"""The messages a server sends a node, well-formed or at their worst, and nodes that answer them in this process.

Tests import this module by name (pytest puts tests/ on sys.path). Building a Message needs the
server's identity: use the `server_identity` fixture of conftest.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import messages as keys
from fedtune.backbones import StagedModel, build_model
from fedtune.client.app import app
from fedtune.config import load_config
from fedtune.params import state_hash, trainable_stages, trainable_state_dict
from fedtune.protocol import ClientSettings

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "mobilenet_v3_small"  # the smallest registered backbone: 1.5 M parameters
NUM_CLASSES = 10
NUM_CLIENTS = 10


@dataclass(frozen=True)
class GlobalModel:
    """What the server holds: the initial model, its hash and the stages that train in round 1."""

    model: StagedModel
    state: dict[str, torch.Tensor]
    model_hash: str
    stages: list[str]


@cache
def global_model(seed: int = 0) -> GlobalModel:
    torch.manual_seed(seed)
    model = build_model(BACKBONE, num_classes=NUM_CLASSES, weights="none")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return GlobalModel(model, state, state_hash(state), trainable_stages(model, 0))


def settings(*overrides: str, run_key: str = "run-1") -> dict[str, Any]:
    """Client settings for digits at 32 px on the small backbone, as a JSON-ready dict to tamper with."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.backbone={BACKBONE}", "model.weights=none", "data.image_size=32", "train.unfreeze=[]",
        "train.trainable_blocks=0", f"federation.num_clients={NUM_CLIENTS}", "federation.rounds=3",
        "data.partition.scheme=iid", *overrides,
    ])
    return ClientSettings.of(cfg, num_classes=NUM_CLASSES, run_key=run_key).model_dump(mode="json")


def query(model: GlobalModel | None = None, *, model_hash: object = None, with_backbone: bool = False,
          backbone: dict[str, torch.Tensor] | None = None) -> Message:
    """The model query; with the backbone, the delivery."""
    model = model or global_model()
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.MODEL_HASH: model.model_hash if model_hash is None
                                                     else model_hash})})
    if with_backbone or backbone is not None:
        content[keys.BACKBONE] = ArrayRecord(backbone if backbone is not None else model.state)
    return Message(content, dst_node_id=1, message_type=MessageType.QUERY)


def round_config(model: GlobalModel | None = None, *, settings_json: str | None = None,
                 server_round: int = 1) -> dict[str, Any]:
    model = model or global_model()
    return {
        keys.CLIENT_CONFIG: settings_json if settings_json is not None else json.dumps(settings()),
        keys.MODEL_HASH: model.model_hash,
        keys.TRAINABLE_STAGES: list(model.stages),
        keys.SERVER_ROUND: server_round,
    }


def instruction(config: dict[str, Any], *, arrays: dict[str, torch.Tensor] | None = None,
                message_type: str = MessageType.TRAIN, model: GlobalModel | None = None,
                dst_node_id: int = 1) -> Message:
    """A train (or evaluate) message with this config and these tensors (the model's trainable ones by default)."""
    model = model or global_model()
    tensors = arrays if arrays is not None else trainable_state_dict(model.model, model.stages)
    content = RecordDict({keys.CONFIG: ConfigRecord(config), keys.ARRAYS: ArrayRecord(tensors)})
    return Message(content, dst_node_id=dst_node_id, message_type=message_type)


@dataclass
class Node:
    """A node as its SuperNode would run it: the real ClientApp, this node's config, its own cache."""

    cache: Path
    partition: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> Context:
        config = {"partition-id": self.partition, "num-partitions": NUM_CLIENTS, "cache-dir": str(self.cache),
                  **self.extra_config}
        return Context(run_id=7, node_id=1000 + self.partition, node_config=config, state=RecordDict(),
                       run_config={})

    def send(self, message: Message) -> Message:
        return app(message, self.context)

    def model_files(self) -> list[Path]:
        return sorted((self.cache / "models").glob("*.safetensors"))


class LoopbackGrid:
    """Hands each message to the node it is addressed to, in this process, and returns the replies.

    Stands in for the SuperLink between the server's ModelDelivery and real ClientApps; a node
    listed in `silent` does not answer (as past a timeout).
    """

    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes
        self.silent: set[int] = set()
        self.sent: list[tuple[int, str]] = []  # (node, message type) in order

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            if node not in self.silent:
                replies.append(self.nodes[node].send(message))
        return replies
