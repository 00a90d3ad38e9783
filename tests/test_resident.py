"""A client process keeps its model between messages: each message still starts from exactly its round's global model.

Through the real ClientApp in this process (as a Ray actor or a node's worker runs it): whatever
the previous message did to the resident model (trained other stages, ran Opacus, was refused
halfway), the next one gets the cached model plus its own round's tensors, with the flags, hooks
and attributes of a fresh build; a cached file damaged after the model became resident is still
found; and the process keeps no more models than its bound.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType
from server_messages import NUM_CLASSES, GlobalModel, Node, global_model, instruction, query, round_config, settings
from torch import nn
from torch.utils.data import TensorDataset

import fedtune.client.app as client_app
from fedtune import messages as keys
from fedtune import protocol
from fedtune.backbones import StagedModel
from fedtune.client.cache import FileSignature, ModelCache, ModelNotCached
from fedtune.client.resident import RESIDENT, Architecture, ResidentModels
from fedtune.client.task import NodeIdentity, restored_model
from fedtune.config import TrainConfig
from fedtune.engine import train_one_round
from fedtune.params import trainable_stages, trainable_state_dict
from fedtune.protocol import RefusedMessage

pytestmark = pytest.mark.usefixtures("server_identity")
CPU = torch.device("cpu")


@pytest.fixture
def holding(tmp_path: Path) -> Node:
    node = Node(cache=tmp_path / "node" / "cache")
    assert not node.send(query(with_backbone=True)).has_error()
    return node


def _round(*overrides: str, blocks: int = 1, shift: float = 0.0, mu: float = 0.0, server_round: int = 1,
           message_type: str = MessageType.TRAIN, settings_json: str | None = None) -> Message:
    """A round's message with `blocks` trainable blocks; `shift` moves its global tensors off the cached ones."""
    model = global_model()
    stages = trainable_stages(model.model, blocks)
    config = {**round_config(settings_json=settings_json or json.dumps(settings(*overrides)),
                             server_round=server_round), keys.TRAINABLE_STAGES: stages}
    if mu:
        config[keys.PROXIMAL_MU] = mu
    tensors = {key: value + shift if value.is_floating_point() else value
               for key, value in trainable_state_dict(model.model, stages).items()}
    return instruction(config, arrays=tensors, message_type=message_type)


@contextmanager
def _starting_model(node: Node, message: Message, resident: ResidentModels = RESIDENT) -> Iterator[StagedModel]:
    """The model `message` starts from on `node`, as the ClientApp restores it."""
    parsed = protocol.parse_round_instruction(message.content)
    cache = NodeIdentity.from_node_config(dict(node.context.node_config)).model_cache()
    with restored_model(parsed.settings, model_hash=parsed.model_hash, trainable=parsed.arrays.to_torch_state_dict(),
                        stages=parsed.stages, cache=cache, device=CPU, resident=resident) as model:
        yield model


def _hooks(module: nn.Module) -> int:
    return sum(len(value) for name, value in vars(module).items() if name.endswith("hooks") and isinstance(value, dict))


def _assert_as_built(model: StagedModel, reference: StagedModel) -> None:
    """Same tensors bit for bit, same modes, flags, attributes and (no) hooks as a fresh build."""
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    modules, built = list(model.named_modules()), list(reference.named_modules())
    assert [name for name, _ in modules] == [name for name, _ in built]
    for (name, module), (_, fresh) in zip(modules, built, strict=True):
        assert type(module) is type(fresh), name
        assert module.training == fresh.training, name
        assert vars(module).keys() == vars(fresh).keys(), (name, vars(module).keys() ^ vars(fresh).keys())
        assert _hooks(module) == _hooks(fresh) == 0, name
        assert getattr(module, "inplace", None) == getattr(fresh, "inplace", None), name
    for (name, parameter), (_, fresh_parameter) in zip(model.named_parameters(), reference.named_parameters(),
                                                         strict=True):
        assert parameter.requires_grad == fresh_parameter.requires_grad, name
        assert parameter.grad is None and not vars(parameter), (name, vars(parameter))
        assert parameter._backward_hooks is None, name


PREVIOUS = {
    # what the previous message was -> (the message, whether it is refused)
    "train the last two blocks (BatchNorm in train mode), statistics sent, FedProx": (
        lambda: _round(blocks=2, mu=0.1), False),
    "train with augmentation (no feature cache)": (lambda: _round("data.augment=true", blocks=1), False),
    "DP-SGD (Opacus) on head + last block": (lambda: _round("privacy.dp_sgd.enabled=true", blocks=1), False),
    "evaluate": (lambda: _round(blocks=1, shift=0.5, message_type=MessageType.EVALUATE), False),
    "refused tensors": (lambda: _nan_round(), True),
    "refused after the model was restored (DP-SGD sending statistics)": (lambda: _round(
        blocks=1, settings_json=json.dumps({**settings("privacy.dp_sgd.enabled=true"), "freeze_statistics": False})),
        True),
}


def _nan_round() -> Message:
    message = _round(blocks=1)
    record = message.content[keys.ARRAYS]
    tensors = record.to_torch_state_dict()
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = float("nan")
    return instruction(dict(message.content[keys.CONFIG]), arrays=tensors)


@pytest.mark.parametrize("previous", PREVIOUS)
def test_each_message_starts_from_the_exact_global_model_whatever_the_last_one_did(holding: Node,
                                                                                   previous: str) -> None:
    make, refused = PREVIOUS[previous]
    reply = holding.send(make())
    assert reply.has_error() == refused, reply.error.reason if reply.has_error() else "acted upon"

    following = _round(blocks=0, shift=0.25, server_round=2)  # head only, other global tensors
    fresh = ResidentModels()  # builds the reference: the cached model and the round's tensors, nothing else
    with _starting_model(holding, following, fresh) as reference, _starting_model(holding, following) as model:
        assert model is not reference
        _assert_as_built(model, reference)


def test_the_model_stays_resident_between_messages_and_a_refused_one_is_not_kept(holding: Node) -> None:
    context = holding.context
    _, first = client_app.run_training(_round(blocks=1), context)
    _, second = client_app.run_training(_round(blocks=0, server_round=2), context)
    _, private = client_app.run_training(_round("privacy.dp_sgd.enabled=true", blocks=1, server_round=3), context)
    assert second is first and private is first  # Opacus's leftovers are taken off, the instance kept
    assert holding.send(_nan_round()).has_error()
    _, after_refusal = client_app.run_training(_round(blocks=1, server_round=4), context)
    assert after_refusal is not first  # a refused message's instance is never used again


def test_a_refused_message_does_not_change_the_next_good_one(holding: Node) -> None:
    # With augmentation every stage runs for every batch (no feature cache): anything left in the
    # resident model by the refused messages would change the good message's reply.
    good = _round("data.augment=true", blocks=1, shift=0.01)
    first = holding.send(good)
    assert not first.has_error()
    for hostile in ("refused tensors", "refused after the model was restored (DP-SGD sending statistics)"):
        assert holding.send(PREVIOUS[hostile][0]()).has_error()
    again = holding.send(good)
    assert not again.has_error()
    assert dict(again.content[keys.METRICS]) == dict(first.content[keys.METRICS])
    expected, got = first.content[keys.ARRAYS].to_torch_state_dict(), again.content[keys.ARRAYS].to_torch_state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


# --- The cached file: hashed once per process, and still checked -------------------------------


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped byte", "flipped byte, times put back", "replaced by another model",
                                    "truncated", "deleted"])
def test_a_file_damaged_after_its_model_became_resident_is_found(holding: Node, tmp_path: Path, damage: str) -> None:
    assert not holding.send(_round(blocks=0)).has_error()  # the model is resident, its file verified
    [path] = holding.model_files()
    before = path.stat()
    if damage.startswith("flipped byte"):
        _flip_last_byte(path)
        if damage.endswith("times put back"):  # the change time still moves: no user can set it
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif damage == "replaced by another model":
        other = Node(cache=tmp_path / "other")
        assert not other.send(query(global_model(seed=1), with_backbone=True)).has_error()
        shutil.copy(other.model_files()[0], tmp_path / "swap")
        os.replace(tmp_path / "swap", path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()

    reply = holding.send(_round(blocks=0, server_round=2))

    assert reply.has_error() and reply.error.reason.startswith(f"{keys.MODEL_MISSING}: "), reply.error.reason
    assert not path.exists()  # removed, so the node answers the next query truthfully
    assert holding.send(query()).content[keys.METRICS][keys.HAS_MODEL] == 0
    assert holding.send(query(with_backbone=True)).content[keys.METRICS][keys.HAS_MODEL] == 1
    assert not holding.send(_round(blocks=0, server_round=3)).has_error()


class _CountingCache(ModelCache):
    """A model cache that counts the reads that hash a file."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0

    def load_signed(self, model_hash: str) -> tuple[dict[str, torch.Tensor], FileSignature]:
        self.reads += 1
        return super().load_signed(model_hash)


def _cached(model: GlobalModel, root: Path) -> _CountingCache:
    cache = _CountingCache(root)
    cache.store(model.model_hash, model.state)
    return cache


ARCHITECTURE = Architecture(backbone="mobilenet_v3_small", num_classes=NUM_CLASSES, head_dropout=0.0)


def _lease(resident: ResidentModels, cache: ModelCache, model: GlobalModel) -> None:
    with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=model.stages, device=CPU) as leased:
        assert all(torch.equal(leased.state_dict()[k], v) for k, v in model.state.items())


def test_a_file_is_hashed_once_per_process_until_it_changes(tmp_path: Path) -> None:
    resident, model = ResidentModels(), global_model()
    first, second = _cached(model, tmp_path / "a"), _cached(model, tmp_path / "b")  # two nodes' caches
    for _ in range(3):
        _lease(resident, first, model)
        _lease(resident, second, model)
    assert (first.reads, second.reads) == (1, 1)
    os.utime(first.path(model.model_hash), ns=(1, 1))  # the file changed (its content, as far as anyone knows)
    _lease(resident, first, model)
    _lease(resident, second, model)
    assert (first.reads, second.reads) == (2, 1)


def test_processes_sharing_a_cache_do_not_take_each_others_uses_for_changes(tmp_path: Path) -> None:
    model = global_model()
    cache = _cached(model, tmp_path)
    os.utime(cache.path(model.model_hash), ns=(1, 1))  # last used long ago: the next use records itself
    workers = [ResidentModels(), ResidentModels()]  # two Ray workers of a simulation, on one node's cache
    for _ in range(3):
        for worker in workers:
            _lease(worker, cache, model)
    assert cache.reads == 2  # once per worker: a use marks the file at most once a minute (USE_RESOLUTION_S)


def test_a_process_keeps_at_most_its_bound_of_models(tmp_path: Path) -> None:
    resident = ResidentModels(capacity=2)
    models = [global_model(seed) for seed in range(3)]
    caches = [_cached(model, tmp_path / f"c{seed}") for seed, model in enumerate(models)]
    for model, cache in zip(models, caches, strict=True):
        _lease(resident, cache, model)
    assert len(resident) == 2
    _lease(resident, caches[2], models[2])
    _lease(resident, caches[1], models[1])
    assert [cache.reads for cache in caches] == [1, 1, 1]  # the two most recent are kept
    _lease(resident, caches[0], models[0])  # the least recently used was dropped: read and hashed again
    assert [cache.reads for cache in caches] == [2, 1, 1] and len(resident) == 2


def test_a_cached_model_of_another_architecture_is_refused_and_not_kept(tmp_path: Path) -> None:
    resident = ResidentModels()
    node = Node(cache=tmp_path / "cache")
    assert not node.send(query(with_backbone=True)).has_error()
    message = _round(blocks=0, settings_json=json.dumps({**settings(), "num_classes": 7}))
    with pytest.raises(RefusedMessage, match="names a cached model that is not a mobilenet_v3_small with 7 classes"):
        with _starting_model(node, message, resident):
            pass
    assert len(resident) == 0


def test_writes_to_the_model_after_its_lease_are_undone_by_the_next_one(tmp_path: Path) -> None:
    resident, model = ResidentModels(), global_model()
    cache = _cached(model, tmp_path)
    with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=["head"], device=CPU) as leased:
        pass
    with torch.no_grad():  # a frozen stage written in place, BatchNorm statistics updated by a forward in train mode
        next(leased.stages["features_0"].parameters()).mul_(2.0)
        leased.train()(torch.randn(4, 3, 32, 32))
    with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=["head"], device=CPU) as again:
        assert again is leased
        assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state.items())


def test_a_model_leased_twice_at_once_is_two_instances(tmp_path: Path) -> None:
    resident, model = ResidentModels(), global_model()
    cache = _cached(model, tmp_path)
    with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=model.stages, device=CPU) as outer:
        with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=model.stages, device=CPU) as inner:
            assert inner is not outer
            with torch.no_grad():
                inner.stages["head"][-1].weight.add_(1.0)
        assert all(torch.equal(outer.state_dict()[k], v) for k, v in model.state.items())
    _lease(resident, cache, model)


def test_a_missing_model_is_not_cached(tmp_path: Path) -> None:
    with pytest.raises(ModelNotCached):
        _lease(ResidentModels(), ModelCache(tmp_path), global_model())


@pytest.mark.gpu
def test_the_model_stays_on_the_gpu_between_messages(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    resident, model = ResidentModels(), global_model()
    cache = _cached(model, tmp_path)
    stages = trainable_stages(model.model, 1)
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, NUM_CLASSES, (32,)))
    with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=stages, device=cuda) as first:
        assert next(first.parameters()).device.type == "cuda"
        train_one_round(first, data, stages=stages, cfg=TrainConfig(lr=0.1), device=cuda)  # as a train message does
    with resident.lease(cache, model.model_hash, ARCHITECTURE, stages=model.stages, device=cuda) as second:
        assert second is first and next(second.parameters()).device.type == "cuda"  # kept, and on the device
        assert all(torch.equal(second.state_dict()[k].cpu(), v) for k, v in model.state.items())
    assert cache.reads == 1
