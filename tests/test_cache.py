"""A node's disk cache: verified full models by content hash, frozen-prefix features that survive damage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from client.cache import CACHE_ENV, FeatureCache, ModelCache, default_cache_root
from fedtune.params import state_hash


def _model_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "stages.stem.0.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "stages.stem.1.running_var": torch.rand(4, generator=generator) + 0.5,
        "stages.head.1.weight": torch.randn(10, 4, generator=generator),
        "stages.head.1.bias": torch.randn(10, generator=generator),
    }


def _features() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(6, 8, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]))


def _leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and path.name.endswith(".tmp")]


def test_default_cache_root_follows_the_environment(isolated_cache: Path) -> None:
    assert default_cache_root() == isolated_cache


def test_default_cache_root_falls_back_to_the_home_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_root() == Path.home() / ".cache" / "fedtune"


# --- ModelCache -------------------------------------------------------------------------------


def test_model_cache_round_trip(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache)
    tensors = _model_tensors()
    model_hash = state_hash(tensors)
    assert not cache.has(model_hash)

    cache.store(model_hash, tensors)

    assert cache.has(model_hash)
    assert cache.path(model_hash).parent == isolated_cache / "models"
    loaded = cache.load(model_hash)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)


def test_model_cache_stores_non_contiguous_tensors_under_their_hash(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache)
    tensors = {"stages.head.1.weight": torch.arange(12.0).reshape(3, 4).t()}
    model_hash = state_hash(tensors)

    cache.store(model_hash, tensors)

    assert torch.equal(cache.load(model_hash)["stages.head.1.weight"], tensors["stages.head.1.weight"])


def test_model_cache_store_with_the_wrong_hash_raises_and_writes_nothing(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache)
    tensors = _model_tensors()
    announced = "0" * 64

    with pytest.raises(ValueError, match="not the announced 000000000000"):
        cache.store(announced, tensors)

    assert not cache.has(announced)
    assert not cache.has(state_hash(tensors))


def test_model_cache_load_of_a_corrupted_entry_raises_and_removes_it(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache)
    tensors = _model_tensors()
    model_hash = state_hash(tensors)
    cache.store(model_hash, tensors)
    # Flip the last byte: a tensor value changes, the file still parses.
    path = cache.path(model_hash)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))

    with pytest.raises(ValueError, match=rf"cached model {model_hash[:12]} is corrupt"):
        cache.load(model_hash)

    assert not cache.has(model_hash)
    assert not path.exists()
    cache.store(model_hash, tensors)  # the server resends it
    assert torch.equal(cache.load(model_hash)["stages.head.1.bias"], tensors["stages.head.1.bias"])


def test_model_cache_leaves_no_temporary_files(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache)
    tensors = _model_tensors()
    model_hash = state_hash(tensors)

    cache.store(model_hash, tensors)
    cache.store(model_hash, tensors)  # overwriting an entry is atomic too

    assert _leftovers(isolated_cache) == []
    assert sorted(path.name for path in (isolated_cache / "models").iterdir()) == [f"{model_hash}.safetensors"]


def test_model_cache_failed_write_leaves_no_temporary_file_and_no_entry(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache)
    shared = torch.zeros(3)
    # safetensors refuses tensors that share memory: the write fails after the temp file exists.
    tensors = {"a": shared, "b": shared}
    model_hash = state_hash(tensors)

    with pytest.raises(RuntimeError, match="share memory"):
        cache.store(model_hash, tensors)

    assert not cache.has(model_hash)
    assert list((isolated_cache / "models").iterdir()) == []


# --- FeatureCache -----------------------------------------------------------------------------


def test_feature_cache_round_trip(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    dataset = _features()
    identity = ("model-hash", "8", "train-identity")
    assert cache.get(*identity) is None

    cache.put(dataset, *identity)

    loaded = cache.get(*identity)
    assert isinstance(loaded, TensorDataset)
    assert torch.equal(loaded.tensors[0], dataset.tensors[0])
    assert torch.equal(loaded.tensors[1], dataset.tensors[1])
    assert loaded.tensors[1].dtype == torch.long
    assert _leftovers(isolated_cache) == []


def test_feature_cache_stores_labels_as_long(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    features, labels = _features().tensors
    cache.put(TensorDataset(features, labels.to(torch.int32)), "id")

    loaded = cache.get("id")
    assert loaded is not None
    assert loaded.tensors[1].dtype == torch.long
    assert torch.equal(loaded.tensors[1], labels)


def test_feature_cache_keys_entries_by_the_whole_identity(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    cache.put(_features(), "model-a", "8", "data")

    assert cache.get("model-a", "8", "data") is not None
    assert cache.get("model-b", "8", "data") is None
    assert cache.get("model-a", "9", "data") is None
    assert cache.path("model-a", "8", "data") != cache.path("model-a", "9", "data")


@pytest.mark.parametrize("garbage", [b"", b"not a safetensors file", b"\xff" * 64])
def test_feature_cache_get_of_a_garbage_file_returns_none_and_removes_it(
    isolated_cache: Path, garbage: bytes
) -> None:
    cache = FeatureCache(isolated_cache)
    path = cache.path("id")
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)

    assert cache.get("id") is None
    assert not path.exists()


def test_feature_cache_recomputes_after_a_torn_file(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    dataset = _features()
    cache.put(dataset, "id")
    path = cache.path("id")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    assert cache.get("id") is None
    cache.put(dataset, "id")

    loaded = cache.get("id")
    assert loaded is not None
    assert torch.equal(loaded.tensors[0], dataset.tensors[0])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_model_cache_unreadable_entry_is_removed_so_the_server_resends_it(isolated_cache: Path, damage: str) -> None:
    cache = ModelCache(isolated_cache)
    tensors = _model_tensors()
    model_hash = state_hash(tensors)
    cache.store(model_hash, tensors)
    path = cache.path(model_hash)
    path.write_bytes(path.read_bytes()[:20] if damage == "truncated" else b"garbage")
    with pytest.raises(ValueError, match="is corrupt; it was removed"):
        cache.load(model_hash)
    assert not cache.has(model_hash)


def test_feature_cache_foreign_safetensors_file_is_recomputed(isolated_cache: Path) -> None:
    from safetensors.torch import save_file

    cache = FeatureCache(isolated_cache)
    path = cache.path("model", "3", "data")
    path.parent.mkdir(parents=True)
    save_file({"something_else": torch.zeros(2)}, str(path))
    assert cache.get("model", "3", "data") is None
    assert not path.exists()
