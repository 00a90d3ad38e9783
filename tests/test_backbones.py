"""Backbone registry: staged models equal the native ones, weights load from every source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models import WeightsEnum

from fedtune.backbones import (
    BACKBONES,
    StagedModel,
    build_model,
    preprocessing_for,
)
from fedtune.config import ConfigError, load_config
from fedtune.server.preflight import PreflightError, preflight

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/hymenoptera_data"
IMAGENET_ANT, IMAGENET_BEE = 310, 309

EXPECTED_BLOCKS = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v3_small": [f"features_{i}" for i in range(13)] + ["pre_logits"],
    "mobilenet_v3_large": [f"features_{i}" for i in range(17)] + ["pre_logits"],
    "efficientnet_b0": [f"features_{i}" for i in range(9)],
    "convnext_tiny": [f"features_{i}" for i in range(8)] + ["pre_logits"],
    "vit_b_16": ["embed", *[f"encoder_{i}" for i in range(12)], "encoder_norm"],
    "efficientnet_lite0": ["stem", *[f"blocks_{i}" for i in range(7)], "conv_head"],
    "efficientnet_lite1": ["stem", *[f"blocks_{i}" for i in range(7)], "conv_head"],
    "efficientnet_lite2": ["stem", *[f"blocks_{i}" for i in range(7)], "conv_head"],
}
# vit_b_16's position embeddings fix its input at 224 px; the others take any size >= 32.
INPUT_SIZE = {"vit_b_16": 224}


def test_every_backbone_has_expected_blocks() -> None:
    assert set(BACKBONES) == set(EXPECTED_BLOCKS)


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_staged_model_matches_native(name: str) -> None:
    spec = BACKBONES[name]
    torch.manual_seed(0)
    native = spec.build().eval()
    # The same seed gives build_model the same random backbone; only the new head differs.
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000, weights="none").eval()
    model.stages["head"][1].load_state_dict(native.get_submodule(spec.classifier).state_dict())
    size = INPUT_SIZE.get(name, 48)
    x = torch.randn(1 if name == "vit_b_16" else 2, 3, size, size)

    with torch.no_grad():
        expected, actual = native(x), model(x)

    assert model.block_names == EXPECTED_BLOCKS[name]
    assert list(model.stages)[-1] == "head"
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
def test_new_head_has_requested_classes_and_dropout(name: str) -> None:
    model = build_model(name, num_classes=3, weights="none", head_dropout=0.25).eval()

    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))

    dropout, linear = model.stages["head"]
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.25
    assert isinstance(linear, nn.Linear) and linear.out_features == 3
    assert logits.shape == (2, 3)
    assert all(key.startswith("stages.") for key in model.state_dict())


def test_forward_stages_composes_to_forward() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2, weights="none").eval()
    split = model.stage_index("layer3")
    x = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        features = model.forward_stages(x, stop=split)
        logits = model.forward_stages(features, start=split)

    assert torch.equal(logits, model(x))
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        model.stage_index("nope")


@pytest.mark.parametrize(("name", "cut", "features"), [
    ("efficientnet_lite0", "blocks_5", 192), ("resnet18", "layer3", 256), ("mobilenet_v3_small", "pre_logits", 1024),
])
def test_cut_model_ends_after_the_block_and_reuses_its_weights(name: str, cut: str, features: int) -> None:
    torch.manual_seed(0)
    whole = build_model(name, num_classes=3, weights="none").eval()
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, weights="none", cut=cut).eval()
    x = torch.randn(2, 3, 48, 48)

    stop = whole.stage_index(cut) + 1
    assert list(model.stages)[:stop] == list(whole.stages)[:stop]
    assert model.block_names[-1] == cut
    assert model.stages["head"][1].in_features == features
    with torch.no_grad():
        below = whole.forward_stages(x, stop=stop)
        pooled = below.mean(dim=(2, 3)) if below.dim() == 4 else below
        assert torch.allclose(model.forward_stages(x, stop=-1), pooled, atol=1e-6)
        assert model(x).shape == (2, 3)


def test_a_cut_that_is_not_a_block_is_refused_naming_the_blocks() -> None:
    with pytest.raises(ValueError, match=r"model.cut: 'pool' is not a block .*blocks: stem, blocks_0"):
        build_model("efficientnet_lite0", num_classes=2, weights="none", cut="pool")
    with pytest.raises(ValueError, match=r"model.cut: the output of 'encoder_3' has shape \(1, 197, 768\)"):
        build_model("vit_b_16", num_classes=2, weights="none", cut="encoder_3")


def test_a_bad_cut_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/quickstart.yaml", ["model.cut=conv_hed", f"output.dir={tmp_path}"])
    with pytest.raises(PreflightError, match=r"^model\.cut: 'conv_hed' is not a block of this backbone"):
        preflight(cfg, simulation=True)
    with pytest.raises(ConfigError, match=r"model\.cut"):
        load_config(repo / "configs/quickstart.yaml", ["model.cut=../x"])


def test_staged_model_requires_head_last() -> None:
    with pytest.raises(ValueError, match="must be named 'head'"):
        StagedModel([("head", nn.Identity()), ("pool", nn.Identity())])


def test_pool_has_no_parameters_and_is_not_a_block() -> None:
    model = build_model("efficientnet_b0", num_classes=2, weights="none")

    assert not list(model.stages["pool"].parameters())
    assert "pool" not in model.block_names


def imagenet_model(name: str) -> nn.Module:
    """The native model with its published weights and 1000-class head, in eval mode."""
    spec = BACKBONES[name]
    native = spec.build()
    spec.load_pretrained(native)
    return native.eval()


def test_lite0_imagenet_weights_reach_build_model() -> None:
    native = imagenet_model("efficientnet_lite0")
    model = build_model("efficientnet_lite0", num_classes=2)

    assert torch.equal(model.stages["stem"][0].weight, native.conv_stem.weight)
    assert torch.equal(model.stages["conv_head"][1].running_var, native.bn2.running_var)


def test_torchvision_imagenet_path_loads_the_weights_state_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand in for the download: the weights enum hands back a known state dict.
    torch.manual_seed(1)
    published = BACKBONES["resnet18"].build().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, progress=True: published)

    model = build_model("resnet18", num_classes=2)

    assert torch.equal(model.stages["layer4"][1].conv2.weight, published["layer4.1.conv2.weight"])


def _photos(label: str, count: int = 10) -> list[Path]:
    return sorted((DATA / "val" / label).glob("*.jpg"))[:count]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"ants/bees photos not found at {DATA}")
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_offline_weights_recognise_ants_and_bees(name: str) -> None:
    # Real ImageNet weights, not a random or foreign file: the 1000-class head knows these insects.
    model = imagenet_model(name)
    transform = preprocessing_for(name).transform()
    rates = {}
    for label, imagenet_class in (("ants", IMAGENET_ANT), ("bees", IMAGENET_BEE)):
        paths = _photos(label)
        batch = torch.stack([transform(Image.open(path)) for path in paths])
        with torch.no_grad():
            top5 = model(batch).topk(5, dim=1).indices
        rates[label] = (top5 == imagenet_class).any(dim=1).float().mean().item()

    print(f"{name} top-5 hit rate on {len(paths)} photos each: {rates}")
    assert rates["ants"] >= 0.6 and rates["bees"] >= 0.6


def test_weights_from_safetensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    native = BACKBONES["mobilenet_v3_small"].build()
    path = tmp_path / "weights.safetensors"
    save_file(native.state_dict(), str(path))

    model = build_model("mobilenet_v3_small", num_classes=2, weights=str(path))

    assert torch.equal(model.stages["features_0"][0].weight, native.features[0][0].weight)
    assert torch.equal(model.stages["pre_logits"][0].bias, native.classifier[0].bias)


def test_weights_from_torch_file_without_classifier(tmp_path: Path) -> None:
    torch.manual_seed(3)
    state = BACKBONES["resnet18"].build().state_dict()
    headless = {key: value for key, value in state.items() if not key.startswith("fc.")}
    path = tmp_path / "weights.pt"
    torch.save(headless, path)

    model = build_model("resnet18", num_classes=2, weights=str(path))

    assert torch.equal(model.stages["stem"][0].weight, state["conv1.weight"])


def test_weights_file_with_wrong_shape_names_the_key(tmp_path: Path) -> None:
    state = BACKBONES["resnet18"].build().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))

    with pytest.raises(ValueError, match=r"bad\.safetensors.*shape mismatch: layer1\.0\.conv1\.weight"):
        build_model("resnet18", num_classes=2, weights=str(path))


def test_weights_file_with_missing_key_names_the_key(tmp_path: Path) -> None:
    state = BACKBONES["resnet18"].build().state_dict()
    del state["layer2.0.bn1.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)

    with pytest.raises(ValueError, match=r"missing: layer2\.0\.bn1\.bias"):
        build_model("resnet18", num_classes=2, weights=str(path))


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"

    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        build_model("resnet18", num_classes=2, weights=str(path))


def test_unknown_backbone_lists_known_ones() -> None:
    known = r"unknown backbone 'resnet9'; known: .*efficientnet_lite0.*resnet18"
    with pytest.raises(ValueError, match=known):
        build_model("resnet9", num_classes=2)
    with pytest.raises(ValueError, match="unknown backbone"):
        preprocessing_for("resnet9")


def test_truncated_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(BACKBONES["mobilenet_v3_small"].build().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:100_000])

    with pytest.raises(ValueError, match=r"weights file .*cut\.safetensors is not a readable safetensors file"):
        build_model("mobilenet_v3_small", num_classes=2, weights=str(path))

    not_torch = tmp_path / "junk.pt"
    not_torch.write_bytes(b"neither a zip nor a pickle")
    with pytest.raises(ValueError, match=r"junk\.pt is not a readable torch state dict"):
        build_model("mobilenet_v3_small", num_classes=2, weights=str(not_torch))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path: Path, bad: float) -> None:
    state = BACKBONES["resnet18"].build().state_dict()
    state["layer3.1.conv2.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "poisoned.safetensors"
    save_file(state, str(path))

    expected = r"poisoned\.safetensors: tensor layer3\.1\.conv2\.weight holds NaN or infinite"
    with pytest.raises(ValueError, match=expected):
        build_model("resnet18", num_classes=2, weights=str(path))


def test_a_weights_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(ValueError, match=r"list\.pt: expected a state dict .* got list"):
        build_model("resnet18", num_classes=2, weights=str(path))
