"""Parameter-efficient fine-tuning of the trainable blocks: LoRA adapters (through PEFT) or BitFit.

`train.adapter` (config.py) chooses. The blocks that carry adapters are those the run trains at its
widest (train.trainable_blocks, or its last unfreeze step). In a block that trains this round, only
the adapter's tensors train and travel (fedtune/params.py, `is_adapter_parameter`): its
pretrained weights, and its BatchNorm statistics, which stay in eval mode, remain the initial model's
to the bit on every node, so they never need to be sent. The head is new and trains whole.

LoRA (Hu et al. 2021): PEFT's `inject_adapter_in_model` wraps each target layer (a Linear, a 1x1
Conv2d, a MultiheadAttention) in a LoRA layer: the pretrained weight moves to
`<layer>.base_layer.weight` and the adapter is `<layer>.lora_A.default.weight` and
`<layer>.lora_B.default.weight`. B starts at zero, so a fresh adapter leaves the output unchanged; A
starts random, drawn by the server from its seed and sent with the model like the new head. The
server and every client build the same wrapped model (fedtune/client/resident.py, Architecture), so
the model's hash and cache cover the adapters too.

BitFit (Ben Zaken et al. 2022): the biases of the adapted blocks train, nothing else; in a
convolution-BatchNorm backbone those are BatchNorm's shifts.

The exported model (model.safetensors, `fedtune predict`) is merged: W + (alpha / rank) B A in the
layer's own name (`merged_state`), the plain backbone's layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from fedtune.backbones import HEAD, StagedModel
from fedtune.config import TrainConfig
from fedtune.params import trainable_stages


class AdapterError(ValueError):
    """The adapters a config asks for do not fit the model; the message names the setting."""


@dataclass(frozen=True)
class AdapterPlan:
    """Which adapter, in which blocks, of what size: what a model is built with (hashable, for the
    client's resident models)."""

    kind: Literal["lora", "bitfit"]
    blocks: int | Literal["all"]  # the run's widest trainable_blocks: these blocks carry adapters
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: auto (`lora_targets`)

    @classmethod
    def of(cls, train: TrainConfig) -> AdapterPlan | None:
        """The plan `train` describes; None without an adapter."""
        if train.adapter == "none":
            return None
        lora = train.lora
        targets = None if lora.target_modules == "auto" else tuple(lora.target_modules)
        return cls(kind=train.adapter, blocks=train.widest_blocks, rank=lora.rank, alpha=lora.alpha,
                   dropout=lora.dropout, targets=targets)


def _adapted_stages(model: StagedModel, blocks: int | Literal["all"]) -> list[str]:
    return [name for name in trainable_stages(model, blocks) if name != HEAD]


def _auto_target(name: str, module: nn.Module, parent_types: dict[str, type]) -> bool:
    """Linear layers, 1x1 convolutions of one group and attention layers (not a Linear inside one:
    PEFT adapts the attention's projections through the attention layer itself)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    inside_attention = any(issubclass(kind, nn.MultiheadAttention) for prefix, kind in parent_types.items()
                           if name.startswith(prefix + "."))
    if isinstance(module, nn.Linear):
        return not inside_attention
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size == (1, 1)


def lora_targets(stage: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    """The names, within `stage`, of the layers LoRA adapts: `targets` (a module of that name or ending in
    "." + it), or with None every linear layer, 1x1 convolution and attention layer. AdapterError for a
    named layer PEFT cannot adapt and merge (a grouped or depthwise convolution:
    peft/tuners/lora/layer.py:1684, "Merging is not supported for _ConvNd layers with groups > 1")."""
    modules = dict(stage.named_modules())
    if targets is None:
        attention = {name: type(module) for name, module in modules.items()
                     if isinstance(module, nn.MultiheadAttention)}
        return [name for name, module in modules.items() if name and _auto_target(name, module, attention)]
    chosen = [name for name in modules if name and any(name == t or name.endswith("." + t) for t in targets)]
    for name in chosen:
        module = modules[name]
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            raise AdapterError(f"train.lora.target_modules: {name} is a grouped (depthwise) convolution, which "
                             "PEFT cannot merge LoRA into; name linear layers or convolutions of one group")
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
            raise AdapterError(f"train.lora.target_modules: {name} is a {type(module).__name__}; LoRA adapts "
                             "Linear, Conv2d and MultiheadAttention layers")
    return chosen


def add_adapters(model: StagedModel, plan: AdapterPlan | None) -> StagedModel:
    """`model` with the adapters of `plan` in its adapted blocks (in place; returned for chaining).

    AdapterError naming the setting when the backbone has fewer blocks, LoRA finds no layer to adapt
    in any of those blocks, or a named target matches no layer there (or one it cannot adapt).
    """
    if plan is None:
        return model
    try:
        stages = _adapted_stages(model, plan.blocks)
    except ValueError as error:  # more blocks than the backbone has
        raise AdapterError(str(error)) from None
    if plan.kind == "lora":
        _add_lora(model, stages, plan)
    model.adapter = plan.kind
    model.adapted_stages = frozenset(stages)
    return model


def _add_lora(model: StagedModel, stages: list[str], plan: AdapterPlan) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # about 2 s of imports (transformers): LoRA runs only

    found = {name: lora_targets(model.stages[name], plan.targets) for name in stages}
    if not any(found.values()):
        what = f"layer named {', '.join(plan.targets)}" if plan.targets else "linear, 1x1 conv or attention layer"
        raise AdapterError(f"train.adapter: lora finds no {what} in the adapted blocks ({', '.join(stages)}); "
                         "train more blocks or name train.lora.target_modules")
    if plan.targets is not None:
        unmatched = [t for t in plan.targets
                     if not any(n == t or n.endswith("." + t) for names in found.values() for n in names)]
        if unmatched:
            raise AdapterError(f"train.lora.target_modules: no layer named {', '.join(unmatched)} in the adapted "
                             f"blocks ({', '.join(stages)})")
    for name, targets in found.items():
        if targets:  # a block without any (a LayerNorm alone) stays frozen whole
            config = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=plan.dropout,
                                target_modules=targets, bias="none")
            inject_adapter_in_model(config, model.stages[name])


def merged_state(model: StagedModel) -> dict[str, Tensor]:
    """The model's tensors with every LoRA adapter merged into the weight it adapts, keyed as the plain
    backbone's (what `fedtune predict` builds), on the CPU; the model itself is left as it is."""
    if model.adapter != "lora":
        return {key: value.detach().cpu() for key, value in model.state_dict().items()}
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model).cpu()
    # As PEFT's own merge_and_unload (peft/tuners/tuners_utils.py, BaseTuner._unload_and_optionally_merge),
    # on layers injected without a PeftModel around them: outermost LoRA layers first, each merged and
    # replaced by the layer it wraps (MultiheadAttention has its own method, for its inner out_proj).
    for stage in plain.stages.values():
        wrapped = [(name, module) for name, module in stage.named_modules() if isinstance(module, BaseTunerLayer)]
        outermost = [(name, module) for name, module in wrapped
                     if not any(name.startswith(other + ".") for other, _ in wrapped)]
        for name, layer in outermost:
            parent = stage.get_submodule(name.rpartition(".")[0]) if "." in name else stage
            if hasattr(layer, "unload_and_optionally_merge_module"):
                base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
            else:
                layer.merge(safe_merge=True)
                base = layer.get_base_layer()
            setattr(parent, name.rpartition(".")[2], base)
        if hasattr(stage, "peft_config"):  # inject_adapter_in_model's record of the adapter, gone with it
            del stage.peft_config
    return {key: value.detach().cpu() for key, value in plain.state_dict().items()}
