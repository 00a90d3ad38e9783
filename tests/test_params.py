"""Which tensors train and travel: stage selection, keyed (de)serialization, LRs and content hashes."""

from __future__ import annotations

import copy

import pytest
import torch

from fedtune.backbones import StagedModel, build_model
from fedtune.params import (
    first_trainable_index,
    freeze_all_but,
    load_tensors,
    num_bytes,
    param_groups,
    set_train_mode,
    stage_of,
    state_hash,
    trainable_stages,
    trainable_state_dict,
    travelling_keys,
)

LITE0_BLOCKS = ["stem", *[f"blocks_{i}" for i in range(7)], "conv_head"]


@pytest.fixture(scope="module")
def lite0() -> StagedModel:
    """One random-init lite0 for the read-only tests; tests that mutate take a deepcopy."""
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", num_classes=10, weights="none")


def _state_copy(model: StagedModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# --- trainable_stages ------------------------------------------------------------------------


def test_trainable_stages_zero_blocks_is_the_head_only(lite0: StagedModel) -> None:
    assert trainable_stages(lite0, 0) == ["head"]


def test_trainable_stages_one_block_is_the_top_block_and_head(lite0: StagedModel) -> None:
    assert trainable_stages(lite0, 1) == ["conv_head", "head"]


def test_trainable_stages_all_is_every_block_bottom_to_top_then_head(lite0: StagedModel) -> None:
    assert trainable_stages(lite0, "all") == [*LITE0_BLOCKS, "head"]
    # As many blocks as exist is the same as "all".
    assert trainable_stages(lite0, len(LITE0_BLOCKS)) == trainable_stages(lite0, "all")


def test_trainable_stages_never_include_parameterless_stages(lite0: StagedModel) -> None:
    assert "pool" not in trainable_stages(lite0, "all")


def test_trainable_stages_out_of_range_names_the_blocks(lite0: StagedModel) -> None:
    with pytest.raises(ValueError, match="only 9 blocks") as excinfo:
        trainable_stages(lite0, 10)
    message = str(excinfo.value)
    assert "trainable_blocks=10" in message
    assert all(block in message for block in LITE0_BLOCKS)


# --- stage_of / travelling keys ---------------------------------------------------------------


def test_stage_of_reads_the_stage_from_a_state_dict_key() -> None:
    assert stage_of("stages.blocks_3.0.conv_pw.weight") == "blocks_3"
    assert stage_of("stages.head.1.bias") == "head"


@pytest.mark.parametrize("key", ["head.weight", "stages.head", "layers.head.1.weight"])
def test_stage_of_rejects_keys_outside_a_staged_model(key: str) -> None:
    with pytest.raises(ValueError, match="not a key of a staged model"):
        stage_of(key)


def test_travelling_keys_cover_the_stages_and_their_batchnorm_statistics(lite0: StagedModel) -> None:
    stages = ["conv_head", "head"]
    keys = travelling_keys(lite0, stages)

    assert {stage_of(key) for key in keys} == set(stages)
    assert "stages.conv_head.1.running_mean" in keys
    assert "stages.conv_head.1.running_var" in keys
    assert "stages.conv_head.0.weight" in keys
    assert {"stages.head.1.weight", "stages.head.1.bias"} <= set(keys)
    # Frozen stages never travel.
    assert not any(key.startswith("stages.blocks_6.") for key in keys)


def test_travelling_keys_leave_out_num_batches_tracked(lite0: StagedModel) -> None:
    keys = travelling_keys(lite0, trainable_stages(lite0, "all"))
    assert "stages.conv_head.1.num_batches_tracked" in lite0.state_dict()
    assert not any(key.endswith("num_batches_tracked") for key in keys)
    # Everything else of the model travels when all stages train.
    expected = [key for key in lite0.state_dict() if not key.endswith("num_batches_tracked")]
    assert keys == expected


def test_trainable_state_dict_holds_detached_cpu_copies_in_model_order(lite0: StagedModel) -> None:
    stages = ["conv_head", "head"]
    tensors = trainable_state_dict(lite0, stages)

    assert list(tensors) == travelling_keys(lite0, stages)
    state = lite0.state_dict()
    for key, value in tensors.items():
        assert value.device.type == "cpu"
        assert not value.requires_grad
        assert torch.equal(value, state[key])


# --- load_tensors -----------------------------------------------------------------------------


def _head_tensors(model: StagedModel, *, fill: float) -> dict[str, torch.Tensor]:
    return {key: torch.full_like(value, fill) for key, value in trainable_state_dict(model, ["head"]).items()}


def test_load_tensors_copies_named_tensors_into_the_model(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    expected_keys = travelling_keys(model, ["head"])
    tensors = _head_tensors(model, fill=0.25)

    load_tensors(model, tensors, expected_keys=expected_keys)

    state = model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key], value)


def test_load_tensors_rejects_a_missing_key_and_leaves_the_model_unchanged(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    before = _state_copy(model)
    tensors = _head_tensors(model, fill=0.25)
    del tensors["stages.head.1.bias"]

    with pytest.raises(ValueError, match=r"missing \['stages.head.1.bias'\]"):
        load_tensors(model, tensors, expected_keys=travelling_keys(model, ["head"]))

    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_load_tensors_rejects_an_extra_key_and_leaves_the_model_unchanged(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    before = _state_copy(model)
    tensors = _head_tensors(model, fill=0.25)
    tensors["stages.conv_head.0.weight"] = model.state_dict()["stages.conv_head.0.weight"] + 1

    with pytest.raises(ValueError, match=r"unexpected \['stages.conv_head.0.weight'\]"):
        load_tensors(model, tensors, expected_keys=travelling_keys(model, ["head"]))

    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_load_tensors_rejects_a_wrong_shape_and_leaves_the_model_unchanged(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    before = _state_copy(model)
    tensors = _head_tensors(model, fill=0.25)  # the weight is valid and would be copied first
    tensors["stages.head.1.bias"] = torch.zeros(11)

    with pytest.raises(ValueError, match=r"stages.head.1.bias: shape \(11,\) does not match the model's \(10,\)"):
        load_tensors(model, tensors, expected_keys=travelling_keys(model, ["head"]))

    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


# --- freezing and modes -----------------------------------------------------------------------


def test_freeze_all_but_and_set_train_mode_touch_only_the_given_stages(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    stages = ["conv_head", "head"]

    freeze_all_but(model, stages)
    set_train_mode(model, stages)

    for name, stage in model.stages.items():
        assert stage.training == (name in stages), name
        assert all(p.requires_grad == (name in stages) for p in stage.parameters()), name


def test_first_trainable_index_is_the_lowest_trainable_stage(lite0: StagedModel) -> None:
    assert first_trainable_index(lite0, ["head"]) == len(lite0.stages) - 1
    assert first_trainable_index(lite0, ["conv_head", "head"]) == lite0.stage_index("conv_head")
    assert first_trainable_index(lite0, ["head", "blocks_6", "conv_head"]) == lite0.stage_index("blocks_6")
    assert first_trainable_index(lite0, trainable_stages(lite0, "all")) == 0


# --- param_groups -----------------------------------------------------------------------------


def test_param_groups_decay_the_lr_block_by_block_below_the_head(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    stages = trainable_stages(model, 2)  # blocks_6, conv_head, head
    freeze_all_but(model, stages)

    groups = param_groups(model, stages, lr=0.1, decay_per_block=0.5)

    assert [group["stage"] for group in groups] == ["head", "conv_head", "blocks_6"]
    assert [group["lr"] for group in groups] == pytest.approx([0.1, 0.05, 0.025])
    for group in groups:
        expected = list(model.stages[group["stage"]].parameters())
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]


def test_param_groups_skip_parameterless_stages_without_spending_a_decay_step(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    # "pool" sits between conv_head and head but holds no parameters.
    groups = param_groups(model, ["conv_head", "pool", "head"], lr=1.0, decay_per_block=0.5)
    assert [(group["stage"], group["lr"]) for group in groups] == [("head", 1.0), ("conv_head", 0.5)]


def test_param_groups_can_feed_a_torch_optimizer(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    stages = trainable_stages(model, 1)
    freeze_all_but(model, stages)
    optimizer = torch.optim.SGD(param_groups(model, stages, lr=0.1, decay_per_block=0.5), lr=0.1)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1, 0.05])


# --- state_hash / num_bytes -------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "stages.head.1.weight": torch.randn(3, 4, generator=generator),
        "stages.head.1.bias": torch.randn(3, generator=generator),
        "stages.conv_head.1.running_var": torch.rand(5, generator=generator),
    }


def test_state_hash_is_stable_across_calls_and_copies() -> None:
    tensors = _tensors()
    digest = state_hash(tensors)
    assert digest == state_hash(tensors)
    assert digest == state_hash({key: value.clone() for key, value in tensors.items()})
    assert len(digest) == 64


def test_state_hash_does_not_depend_on_key_order() -> None:
    tensors = _tensors()
    reordered = dict(reversed(list(tensors.items())))
    assert list(reordered) != list(tensors)
    assert state_hash(reordered) == state_hash(tensors)


def test_state_hash_changes_when_a_single_value_changes() -> None:
    tensors = _tensors()
    changed = {key: value.clone() for key, value in tensors.items()}
    changed["stages.head.1.bias"][1] += 1e-6
    assert state_hash(changed) != state_hash(tensors)


def test_state_hash_sees_names_dtypes_and_shapes() -> None:
    tensors = {"a": torch.zeros(4)}
    assert state_hash({"b": torch.zeros(4)}) != state_hash(tensors)
    assert state_hash({"a": torch.zeros(4, dtype=torch.float64)}) != state_hash(tensors)
    assert state_hash({"a": torch.zeros(2, 2)}) != state_hash(tensors)


def test_state_hash_of_a_non_contiguous_tensor_equals_its_contiguous_copy() -> None:
    transposed = torch.arange(6.0).reshape(2, 3).t()
    assert not transposed.is_contiguous()
    assert state_hash({"a": transposed}) == state_hash({"a": transposed.contiguous()})


def test_num_bytes_counts_every_element() -> None:
    tensors = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64), "c": torch.zeros(2, dtype=torch.int64)}
    assert num_bytes(tensors) == 12 * 4 + 5 * 8 + 2 * 8


def test_negative_trainable_blocks_is_an_error(lite0: StagedModel) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        trainable_stages(lite0, -1)


def test_param_groups_named_multipliers_override_the_decay(lite0: StagedModel) -> None:
    model = copy.deepcopy(lite0)
    stages = trainable_stages(model, 2)
    freeze_all_but(model, stages)
    groups = param_groups(model, stages, lr=0.1, decay_per_block=0.5, multipliers={"blocks_6": 0.01})
    assert [(g["stage"], g["lr"]) for g in groups] == [
        ("head", pytest.approx(0.1)), ("conv_head", pytest.approx(0.05)), ("blocks_6", pytest.approx(0.001)),
    ]
