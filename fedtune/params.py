"""Which tensors train and travel: the only code deciding that, always keyed by name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from fedtune.backbones import HEAD, StagedModel
from fedtune.config import PersonalizationConfig

# BatchNorm's step counter is an int64 that weighted averaging would turn into a float, and it
# only matters for BatchNorm layers with momentum=None (none of the registered backbones).
_NOT_TRAVELLING_SUFFIX = "num_batches_tracked"
# PEFT names an adapter's tensors lora_A.<adapter>.weight and lora_B.<adapter>.weight (peft/tuners/lora/model.py,
# LoraModel.prefix = "lora_"): the only parameters of a LoRA-adapted block that train (fedtune/adapters.py).
_LORA_PARAMETER = ".lora_"
_BITFIT_PARAMETER = "bias"


def trainable_stages(model: StagedModel, blocks: int | Literal["all"]) -> list[str]:
    """The head plus the last `blocks` blocks below it (all of them for "all"), bottom to top."""
    names = model.block_names
    if blocks == "all":
        chosen = names
    else:
        if blocks < 0:
            raise ValueError(f"trainable_blocks must be 0 or more, got {blocks}")
        if blocks > len(names):
            raise ValueError(
                f"trainable_blocks={blocks} but the backbone has only {len(names)} blocks: {', '.join(names)}"
            )
        chosen = names[len(names) - blocks :] if blocks else []
    return [*chosen, HEAD]


def stage_of(key: str) -> str:
    """`stages.<stage>.<rest>` -> `<stage>`: the layer group a state-dict entry belongs to."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "stages":
        raise ValueError(f"{key!r} is not a key of a staged model")
    return parts[1]


def stage_state(model: StagedModel, stages: Iterable[str]) -> dict[str, Tensor]:
    """The state-dict entries of the given stages, in model order, keyed as in the whole model's.

    Only those stages are walked: the whole model's state dict of a large backbone has hundreds of
    entries, built again for every message and round.
    """
    wanted = set(stages)
    state: dict[str, Tensor] = {}
    for name, stage in model.stages.items():
        if name in wanted:
            state.update(stage.state_dict(prefix=f"stages.{name}."))
    return state


def adapted(model: StagedModel, stage: str) -> bool:
    """Whether only `stage`'s adapter trains (fedtune/adapters.py); the head always trains whole."""
    return stage != HEAD and stage in model.adapted_stages


def is_adapter_parameter(kind: str, name: str) -> bool:
    """Whether the parameter `name` (a parameter or state-dict key) of an adapted stage trains under `kind`."""
    if kind == "lora":
        return _LORA_PARAMETER in name
    if kind == "bitfit":
        return name.rpartition(".")[2] == _BITFIT_PARAMETER
    raise ValueError(f"no adapter named {kind!r}")


def trains(model: StagedModel, stage: str, name: str) -> bool:
    """Whether the parameter `name` of a trainable `stage` trains: all of them, or in an adapted stage its adapter's."""
    return not adapted(model, stage) or is_adapter_parameter(model.adapter, name)


def personal_keys(model: StagedModel, stages: Iterable[str], personalization: PersonalizationConfig | None
                  ) -> frozenset[str]:
    """The state-dict keys of `stages` that stay on each client under `personalization` (config.py's
    PersonalizationConfig): fedbn, every BatchNorm layer's running statistics (with fedbn_affine, its
    weight and bias too); local_head, the head's; local, all of them. Trained there, never sent.
    finetune keeps nothing: each evaluation fine-tunes the global model anew."""
    method = "none" if personalization is None else personalization.method
    wanted = [name for name in stages if name in model.stages]
    if method in ("none", "finetune"):
        return frozenset()
    if method in ("local", "local_head"):
        chosen = wanted if method == "local" else [name for name in wanted if name == HEAD]
        return frozenset(_trained_keys(model, chosen, statistics=True))
    parts = ("running_mean", "running_var", *(("weight", "bias") if personalization and personalization.fedbn_affine
                                              else ()))
    batch_norm = {
        f"stages.{name}.{path}.{part}" if path else f"stages.{name}.{part}"
        for name in wanted for path, module in model.stages[name].named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for part in parts if getattr(module, part, None) is not None
    }
    return frozenset(batch_norm.intersection(_trained_keys(model, wanted, statistics=True)))


def travelling_keys(model: StagedModel, stages: list[str], *, statistics: bool = True,
                    personalization: PersonalizationConfig | None = None) -> list[str]:
    """State-dict keys of the given stages, in model order: parameters, and BatchNorm statistics
    unless `statistics` is False (under differential privacy they stay frozen and never travel);
    never the keys `personalization` keeps on the clients (`personal_keys`)."""
    personal = personal_keys(model, stages, personalization)
    return [key for key in _trained_keys(model, stages, statistics=statistics) if key not in personal]


def _trained_keys(model: StagedModel, stages: Iterable[str], *, statistics: bool) -> list[str]:
    """State-dict keys of `stages` that training changes, in model order: parameters that train (`trains`),
    and the BatchNorm statistics of stages trained whole unless `statistics` is False (an adapted stage
    keeps its statistics frozen: `set_train_mode`)."""
    wanted = set(stages)
    keys: list[str] = []
    for name, stage in model.stages.items():
        if name not in wanted:
            continue
        buffers = {buffer for buffer, _ in stage.named_buffers()}
        for key in stage.state_dict():
            if key in buffers:
                if statistics and not adapted(model, name) and not key.endswith(_NOT_TRAVELLING_SUFFIX):
                    keys.append(f"stages.{name}.{key}")
            elif trains(model, name, key):
                keys.append(f"stages.{name}.{key}")
    return keys


def trainable_state_dict(model: StagedModel, stages: list[str], *, statistics: bool = True,
                         personalization: PersonalizationConfig | None = None) -> dict[str, Tensor]:
    """The travelling tensors of `stages` (`travelling_keys`), copied to the CPU."""
    state = stage_state(model, stages)
    return {key: state[key].detach().cpu()
            for key in travelling_keys(model, stages, statistics=statistics, personalization=personalization)}


def load_tensors(model: StagedModel, tensors: Mapping[str, Tensor], *, expected_keys: list[str]) -> None:
    """Copy named tensors into the model; the key set must match exactly, shapes must agree."""
    missing = sorted(set(expected_keys) - set(tensors))
    extra = sorted(set(tensors) - set(expected_keys))
    if missing or extra:
        raise ValueError(f"tensor keys do not match the trainable set: missing {missing[:3]}, unexpected {extra[:3]}")
    state = stage_state(model, {stage_of(key) for key in tensors})
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ValueError(f"tensor keys the model lacks: {unknown[:3]}")
    for key, value in tensors.items():
        if state[key].shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(state[key].shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)


def freeze_all_but(model: StagedModel, stages: list[str]) -> None:
    """requires_grad only for the given stages (in an adapted stage, only for its adapter: `trains`)."""
    wanted = set(stages)
    for name, stage in model.stages.items():
        for key, parameter in stage.named_parameters():
            parameter.requires_grad_(name in wanted and trains(model, name, key))


def set_train_mode(model: StagedModel, stages: list[str], *, freeze_statistics: bool = False) -> None:
    """Training mode for trainable stages only.

    requires_grad=False does not stop BatchNorm from updating its running statistics in train():
    frozen stages stay in eval() so they remain bit-identical to the server's copy. With
    `freeze_statistics`, BatchNorm layers of trainable stages stay in eval() too: they normalise
    with the pretrained statistics and train only their affine weight and bias. So do those of an
    adapted stage always: all of it but its adapter stays the initial model's (fedtune/adapters.py).
    """
    wanted = set(stages)
    for name, stage in model.stages.items():
        stage.train(name in wanted)
        if freeze_statistics or adapted(model, name):
            for module in stage.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def first_trainable_index(model: StagedModel, stages: list[str]) -> int:
    """Index of the lowest trainable stage: everything below it is a frozen prefix."""
    return min(model.stage_index(stage) for stage in stages)


def param_groups(
    model: StagedModel,
    stages: list[str],
    *,
    lr: float,
    decay_per_block: float,
    multipliers: Mapping[str, float] | None = None,
) -> list[dict[str, object]]:
    """Discriminative learning rates: the head at lr, the i-th block below it at lr * decay**i.

    `multipliers` names a stage's multiplier of lr directly and takes precedence over the decay.
    """
    multipliers = multipliers or {}
    ordered = [name for name in reversed(list(model.stages)) if name in set(stages)]
    groups = []
    depth = 0
    for name in ordered:
        parameters = [p for p in model.stages[name].parameters() if p.requires_grad]
        if not parameters:  # parameterless stages (pooling) are not blocks
            continue
        factor = multipliers.get(name, decay_per_block**depth)
        groups.append({"params": parameters, "lr": lr * factor, "stage": name})
        depth += 1
    return groups


def state_hash(tensors: Mapping[str, Tensor]) -> str:
    """Content hash of named tensors (names, dtypes, shapes and bytes): the model cache key."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def num_bytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
