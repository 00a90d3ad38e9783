"""Models kept alive in a client's process between messages: verified once, put back to the cached model in place.

Rebuilding the model for every train and evaluate message (build the architecture, read the
cached file, hash it, load it) was most of a warm simulated round (issue 11). A process that
handles many messages, a Ray actor of the simulation engine serving many virtual nodes and rounds
or a real node's long-lived worker (fedtune/worker.py), keeps up to `CAPACITY` models instead,
the least recently used dropped first. Each holds:

- the cached file's tensors as verified (hashed) once, on the CPU, never handed out (`pristine`);
  a node's file is read and hashed again only when its `FileSignature` changed since the read
  that verified it, so a damaged or replaced file is still found, removed and reported missing.
  What a message uses is always the verified copy in memory;
- one built instance, which stays on the device the last message used (a GPU, say).

A lease hands out the instance holding exactly the cached model, as a fresh build holding it
would be. When a lease ends, whatever the block attached to the instance is taken off: attributes
added to a module or a parameter (Opacus leaves `activations` on modules and `summed_grad` on
parameters after `to_standard_module()`), changed scalar settings (an `inplace` flag), gradients.
When the next lease starts, an instance that is not structurally the one built (a module
replaced, added or removed, a hook left on a module or a parameter) is dropped and a new one
built from `pristine`, as is the instance of a lease that ended in an exception (a refused
message, a failed training): what it holds is not trusted. Otherwise every tensor that may differ
from `pristine` is copied back:
- every tensor of the stages the previous lease named (they received tensors and trained);
- every tensor whose version counter moved (optimizer steps, `copy_`, any in-place write that
  autograd sees), wherever it is;
- every buffer: BatchNorm updates its running statistics without moving a version counter, and
  buffers are small (EfficientNet-Lite0: 42 thousand numbers beside 3.4 million parameters);
and the flags a fresh build starts with are set again (train mode, requires_grad). The one write
this cannot see is one through `Tensor.data` to a stage the previous lease did not name; no
fedtune code writes to a frozen stage at all.

Memory: each kept model costs twice its size (pristine in RAM, the instance in RAM or on the GPU):
2 x 2 x 13.7 MB = 55 MB per process for EfficientNet-Lite0, 2 x 2 x 100 MB for ResNet-50.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fedtune.adapters import AdapterPlan, add_adapters
from fedtune.backbones import StagedModel, build_model
from fedtune.client.cache import FileSignature, ModelCache
from fedtune.params import stage_of

# Models a process keeps: a run uses one; two let a worker serve two runs, or a run and the one
# after it, without reading and hashing the file for each message.
CAPACITY = 2
# Files a kept model remembers as verified: one per node cache whose messages this process handled.
_MAX_VERIFIED_FILES = 4096
_SCALAR = (bool, int, float, str, type(None))


class NotThisArchitecture(ValueError):
    """The cached model's tensors do not fit the architecture the message describes."""


@dataclass(frozen=True)
class Architecture:
    """What `build_model` builds without weights: an instance is reused only for the same one."""

    backbone: str
    num_classes: int
    head_dropout: float
    cut: str | None = None
    adapter: AdapterPlan | None = None  # train.adapter: the server's model carries the same adapters

    def build(self) -> StagedModel:
        # Built locally without weights: they come from the cache, never from a hub.
        model = build_model(self.backbone, num_classes=self.num_classes, weights="none",
                            head_dropout=self.head_dropout, cut=self.cut)
        return add_adapters(model, self.adapter)


def _hook_registries(module: nn.Module) -> tuple[tuple[str, int], ...]:
    # Every hook registry of a module is a dict attribute named *hooks (forward, backward,
    # state-dict and load hooks, and their pre- and post- forms): each with its size.
    return tuple((name, len(value)) for name, value in vars(module).items()
                 if name.endswith("hooks") and isinstance(value, dict))


def _same_objects(current: Mapping[str, object], built: tuple[tuple[str, object], ...]) -> bool:
    return len(current) == len(built) and all(current.get(name, _GONE) is value for name, value in built)


_GONE = object()


@dataclass(frozen=True)
class _ModuleAsBuilt:
    name: str
    module: nn.Module
    attributes: frozenset[str]
    scalars: tuple[tuple[str, object], ...]  # settings such as inplace, p, eps, momentum
    hooks: tuple[tuple[str, int], ...]
    parameters: tuple[tuple[str, object], ...]  # the module's own, by identity (None where a bias is absent)
    buffers: tuple[tuple[str, object], ...]
    training: bool

    @classmethod
    def of(cls, name: str, module: nn.Module) -> _ModuleAsBuilt:
        attributes = vars(module)
        return cls(name, module, frozenset(attributes),
                   tuple((key, value) for key, value in attributes.items()
                         if isinstance(value, _SCALAR) and key != "training"),
                   _hook_registries(module), tuple(module._parameters.items()), tuple(module._buffers.items()),
                   module.training)

    def matches(self, name: str, module: nn.Module) -> bool:
        if module is not self.module or name != self.name:
            return False
        attributes = vars(module)
        return (attributes.keys() == self.attributes
                and all(attributes[key] == value for key, value in self.scalars)
                and all(len(attributes[key]) == size for key, size in self.hooks)
                and _same_objects(module._parameters, self.parameters)
                and _same_objects(module._buffers, self.buffers))


@dataclass(frozen=True)
class _Built:
    """An instance as built: its structure (modules, tensors, hooks, attributes), its settings, and the
    flags a fresh build starts with."""

    modules: tuple[_ModuleAsBuilt, ...]
    parameters: tuple[nn.Parameter, ...]  # none carries attributes or hooks of its own when built
    requires_grad: tuple[bool, ...]

    @classmethod
    def of(cls, model: nn.Module) -> _Built:
        parameters = tuple(model.parameters())
        if any(vars(parameter) for parameter in parameters):
            raise ValueError("a freshly built model has parameters with attributes of their own")
        return cls(tuple(_ModuleAsBuilt.of(name, module) for name, module in model.named_modules()), parameters,
                   tuple(parameter.requires_grad for parameter in parameters))

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` is still this structure, with these settings and no hook added."""
        modules = list(model.named_modules())
        return (len(modules) == len(self.modules)
                and all(built.matches(*current) for current, built in zip(modules, self.modules, strict=True))
                and not any(vars(parameter) or parameter._backward_hooks or parameter._post_accumulate_grad_hooks
                            for parameter in self.parameters))

    def tidy(self) -> None:
        """Take off what a lease attached: attributes added to modules and parameters, changed settings, gradients."""
        for built in self.modules:
            for name in vars(built.module).keys() - built.attributes:
                delattr(built.module, name)
            for name, value in built.scalars:
                if getattr(built.module, name, _GONE) != value:
                    setattr(built.module, name, value)
        for parameter in self.parameters:
            for name in list(vars(parameter)):
                delattr(parameter, name)
            parameter.grad = None

    def restore_flags(self) -> None:
        for built in self.modules:
            built.module.training = built.training
        for parameter, requires_grad in zip(self.parameters, self.requires_grad, strict=True):
            parameter.requires_grad_(requires_grad)


@dataclass
class _Instance:
    """A built model, and what tells whether it still holds its cached model."""

    model: StagedModel
    built: _Built
    tensors: dict[str, Tensor]  # the state dict's tensors (keep_vars)
    versions: dict[str, int]  # each tensor's version counter when it last equalled pristine
    stage_of: dict[str, str]  # each state-dict key's stage
    buffers: frozenset[str]  # state-dict keys of buffers
    stages: set[str] = field(default_factory=set)  # stages the last lease named

    @classmethod
    def build(cls, architecture: Architecture, pristine: dict[str, Tensor]) -> _Instance:
        model = architecture.build()
        tensors = model.state_dict(keep_vars=True)
        mismatched = sorted(set(tensors) ^ set(pristine)) or [
            key for key, tensor in tensors.items() if tensor.shape != pristine[key].shape]
        if mismatched:
            raise NotThisArchitecture(f"{len(mismatched)} tensors differ in name or shape, first {mismatched[0]!r}")
        with torch.no_grad():
            for key, tensor in tensors.items():
                tensor.copy_(pristine[key])
        return cls._of(model)

    @classmethod
    def _of(cls, model: StagedModel) -> _Instance:
        tensors = model.state_dict(keep_vars=True)
        buffers = frozenset(name for name, _ in model.named_buffers()) & tensors.keys()  # persistent ones
        return cls(model, _Built.of(model), tensors, {key: tensor._version for key, tensor in tensors.items()},
                   {key: stage_of(key) for key in tensors}, buffers)

    def intact(self) -> bool:
        """Whether the structure is the one built (otherwise the instance is rebuilt)."""
        return self.built.matches(self.model)

    def reset(self, pristine: dict[str, Tensor]) -> None:
        """Back to the cached model, as a fresh build holding it would be."""
        stale = self.buffers.union(
            key for key, tensor in self.tensors.items()
            if tensor._version != self.versions[key] or self.stage_of[key] in self.stages)
        with torch.no_grad():
            for key in stale:
                self.tensors[key].copy_(pristine[key])
        for key in stale:
            self.versions[key] = self.tensors[key]._version
        self.stages = set()
        self.built.restore_flags()

    def on(self, device: torch.device) -> _Instance:
        """The instance on `device`. Moving gives buffers new tensors: the record is taken again."""
        current = next(self.model.parameters()).device
        if current.type == device.type and (device.index is None or current.index == device.index):
            return self
        return _Instance._of(self.model.to(device))


@dataclass
class _Kept:
    """One model a process keeps: its verified tensors, the files they were verified from, an idle instance."""

    pristine: dict[str, Tensor]
    verified: OrderedDict[Path, FileSignature] = field(default_factory=OrderedDict)
    idle: _Instance | None = None

    def note_verified(self, path: Path, signature: FileSignature) -> None:
        self.verified[path] = signature
        self.verified.move_to_end(path)
        while len(self.verified) > _MAX_VERIFIED_FILES:
            self.verified.popitem(last=False)


class ResidentModels:
    """The models this process keeps between messages (see the module's docstring); thread-safe."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be 1 or more, got {capacity}")
        self.capacity = capacity
        self._kept: OrderedDict[tuple[str, Architecture], _Kept] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    @contextmanager
    def lease(self, cache: ModelCache, model_hash: str, architecture: Architecture, *, stages: Iterable[str],
              device: torch.device) -> Iterator[StagedModel]:
        """The model `model_hash` of `cache`, exactly as cached, on `device`, for the block's duration.

        `stages` are those the block may change (it loads the round's tensors into them and trains
        them). ModelNotCached if the cache lacks the model or it is damaged; NotThisArchitecture if
        its tensors are not `architecture`'s.
        """
        key = (model_hash, architecture)
        with self._lock:
            kept = self._verified(cache, model_hash, architecture)
            instance, kept.idle = kept.idle, None  # a concurrent lease of the same model builds its own
            if instance is not None and instance.intact():
                instance.reset(kept.pristine)
            else:
                try:
                    instance = _Instance.build(architecture, kept.pristine)
                except NotThisArchitecture:
                    del self._kept[key]  # no message can use these tensors with this architecture
                    raise
        instance = instance.on(device)
        instance.stages = set(stages)
        yield instance.model
        # Reached only if the block ended without an exception; otherwise the instance is dropped.
        instance.built.tidy()
        with self._lock:
            if self._kept.get(key) is kept and kept.idle is None:
                kept.idle = instance

    def _verified(self, cache: ModelCache, model_hash: str, architecture: Architecture) -> _Kept:
        """The kept model, its file in `cache` verified by this process since the file last changed."""
        key = (model_hash, architecture)
        path = cache.path(model_hash)
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            known = kept.verified.pop(path, None)
            renewed = cache.reuse(model_hash, known) if known is not None else None
            if renewed is not None:
                kept.note_verified(path, renewed)
                return kept
        tensors, signature = cache.load_signed(model_hash)  # reads and hashes; ModelNotCached if damaged
        if kept is None:
            if len(self._kept) >= self.capacity:
                self._kept.popitem(last=False)
            kept = self._kept[key] = _Kept(pristine=tensors)
        kept.note_verified(path, signature)
        return kept


# This process's models: one set per Ray actor, per node worker, per test process.
RESIDENT = ResidentModels()
