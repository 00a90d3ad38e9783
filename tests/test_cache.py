"""A node's disk cache: verified models by hash, checksummed features, one size cap with LRU eviction."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from fedtune.client.cache import CACHE_ENV, CacheFull, FeatureCache, ModelCache, ModelNotCached, default_cache_root
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

    with pytest.raises(ModelNotCached, match=rf"{model_hash[:12]} was damaged in this node's cache"):
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
    with pytest.raises(ModelNotCached, match="unreadable.*was removed"):
        cache.load(model_hash)
    assert not cache.has(model_hash)


def test_feature_cache_foreign_safetensors_file_is_recomputed(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    path = cache.path("model", "3", "data")
    path.parent.mkdir(parents=True)
    save_file({"something_else": torch.zeros(2)}, str(path))
    assert cache.get("model", "3", "data") is None
    assert not path.exists()


# --- Names: only the exact form of a content hash becomes a file name ---------------------------


@pytest.mark.parametrize("name", ["../../victim", "/etc/victim", "A" * 64, "0" * 63, "0" * 65, "0" * 63 + "/", ""])
def test_model_cache_refuses_any_name_but_a_hash(isolated_cache: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a model hash"):
        ModelCache(isolated_cache).path(name)


def test_model_cache_reports_a_missing_model_as_not_cached(isolated_cache: Path) -> None:
    with pytest.raises(ModelNotCached, match="is not in this node's cache"):
        ModelCache(isolated_cache).load("0" * 64)


# --- The size cap: least recently used entries go first ------------------------------------------


def _sized(seed: int, megabytes: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"stages.head.1.weight": torch.randn(int(megabytes * 1e6 / 4), generator=generator)}


def _used_at(path: Path, seconds_ago: float) -> None:
    moment = time.time() - seconds_ago
    os.utime(path, (moment, moment))


def test_storing_past_the_cap_evicts_the_least_recently_used_models(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache, max_bytes=int(3.5e6))
    models = [_sized(seed, 1.0) for seed in range(3)]
    hashes = [state_hash(m) for m in models]
    for age, (model_hash, tensors) in zip((300, 200, 100), zip(hashes, models, strict=True), strict=True):
        cache.store(model_hash, tensors)
        _used_at(cache.path(model_hash), age)
    cache.load(hashes[0])  # the oldest is used again: the second is now the least recently used

    newest = _sized(3, 1.0)
    cache.store(state_hash(newest), newest)

    assert [cache.has(h) for h in hashes] == [True, False, True]
    assert cache.has(state_hash(newest))
    assert sum(p.stat().st_size for p in (isolated_cache / "models").iterdir()) <= 3.5e6


def test_a_model_larger_than_the_cap_is_refused_and_nothing_is_evicted(isolated_cache: Path) -> None:
    cache = ModelCache(isolated_cache, max_bytes=int(2e6))
    small = _sized(0, 1.0)
    cache.store(state_hash(small), small)
    big = _sized(1, 3.0)

    with pytest.raises(CacheFull, match="larger than this node's cache cap"):
        cache.store(state_hash(big), big)

    assert cache.has(state_hash(small)) and not cache.has(state_hash(big))
    assert _leftovers(isolated_cache) == []


def test_features_never_evict_the_model_in_use(isolated_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = ModelCache(isolated_cache, max_bytes=int(2.5e6))
    features = FeatureCache(isolated_cache, max_bytes=int(2.5e6))
    in_use = _sized(0, 1.0)
    models.store(state_hash(in_use), in_use)
    _used_at(models.path(state_hash(in_use)), 1000)  # the oldest entry, yet in use
    generator = torch.Generator().manual_seed(1)
    big = TensorDataset(torch.randn(2000, 200, generator=generator), torch.zeros(2000, dtype=torch.long))  # 1.6 MB

    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        features.put(big, "id", in_use=[models.path(state_hash(in_use))])

    assert models.has(state_hash(in_use))
    assert features.get("id") is None  # no room beside the model in use: not cached, and said so
    assert any("features not cached" in r.getMessage() and "cache cap" in r.getMessage() for r in caplog.records)


def test_one_cap_covers_models_and_features(isolated_cache: Path) -> None:
    models = ModelCache(isolated_cache, max_bytes=int(2.5e6))
    features = FeatureCache(isolated_cache, max_bytes=int(2.5e6))
    old = _sized(0, 1.0)
    models.store(state_hash(old), old)
    _used_at(models.path(state_hash(old)), 1000)
    generator = torch.Generator().manual_seed(1)
    big = TensorDataset(torch.randn(2000, 200, generator=generator), torch.zeros(2000, dtype=torch.long))

    features.put(big, "id")  # the model is not in use this time: least recently used, it goes

    assert not models.has(state_hash(old))
    assert features.get("id") is not None


# --- Feature checksums: a damaged entry is detected, named, removed and never used ---------------


def _entry(cache: FeatureCache, *identity: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(cache.path(*identity), framework="pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}, dict(reader.metadata())


def _data_offset(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("where", ["features", "labels"])
def test_a_flipped_byte_in_a_feature_entry_is_detected(
    isolated_cache: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    cache = FeatureCache(isolated_cache)
    cache.put(_features(), "model", "3", "data")
    path = cache.path("model", "3", "data")
    raw = bytearray(path.read_bytes())
    # safetensors lays out the int64 labels before the float32 features (alignment, then name)
    tensors, _ = _entry(cache, "model", "3", "data")
    labels_bytes = tensors["labels"].numel() * 8
    offset = _data_offset(path) + (1 if where == "labels" else labels_bytes + 5)
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))

    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        assert cache.get("model", "3", "data") is None

    assert not path.exists()
    assert any(str(path) in r.getMessage() and "do not match its checksum" in r.getMessage() for r in caplog.records)


def test_replaced_labels_are_detected_even_with_the_metadata_kept(
    isolated_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache(isolated_cache)
    cache.put(_features(), "model", "3", "data")
    path = cache.path("model", "3", "data")
    tensors, metadata = _entry(cache, "model", "3", "data")
    save_file({"features": tensors["features"], "labels": torch.zeros_like(tensors["labels"])}, str(path),
              metadata=metadata)

    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        assert cache.get("model", "3", "data") is None

    assert any(str(path) in r.getMessage() for r in caplog.records)
    cache.put(_features(), "model", "3", "data")  # recomputed
    assert torch.equal(cache.get("model", "3", "data").tensors[1], _features().tensors[1])


def test_an_entry_copied_from_another_identity_is_detected(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    cache.put(_features(), "model-a", "3", "data")
    target = cache.path("model-b", "3", "data")
    target.write_bytes(cache.path("model-a", "3", "data").read_bytes())

    assert cache.get("model-b", "3", "data") is None
    assert not target.exists()
    assert cache.get("model-a", "3", "data") is not None


def test_an_entry_without_checksum_is_recomputed(isolated_cache: Path) -> None:
    cache = FeatureCache(isolated_cache)
    path = cache.path("model", "3", "data")
    path.parent.mkdir(parents=True)
    features, labels = _features().tensors
    save_file({"features": features, "labels": labels}, str(path))  # as the cache wrote them before checksums

    assert cache.get("model", "3", "data") is None
    assert not path.exists()


def test_writes_trust_the_count_of_bytes_until_a_rescan_finds_what_others_wrote(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A simulation's shared cache holds two entries per client: a write must not scan them all.
    import fedtune.client.cache as cache_module

    entry = TensorDataset(torch.zeros(64, 256), torch.zeros(64, dtype=torch.long))  # about 66 kB a file
    cache = FeatureCache(isolated_cache, max_bytes=400_000)
    scans = 0
    scan = Path.glob

    def counted(self: Path, pattern: str):  # noqa: ANN202
        nonlocal scans
        scans += 1
        return scan(self, pattern)

    monkeypatch.setattr(Path, "glob", counted)
    for client in range(4):
        cache.put(entry, f"client {client}")
    assert scans == 1  # the first write scanned the cache's folder; the next three trusted the count

    # Another process of this machine fills the cache behind this one's back.
    for name in ("other-a", "other-b", "other-c"):
        (cache.root / f"{name}.safetensors").write_bytes(cache.path("client 0").read_bytes())
    os.utime(cache.path("client 0"), (1, 1))  # the least recently used entry
    monkeypatch.setattr(cache_module, "RESCAN_S", 0.0)
    cache.put(entry, "client 4")
    assert scans == 2 and not cache.path("client 0").exists()  # a rescan saw them, and made room
    total = sum(path.stat().st_size for path in cache.root.iterdir())
    assert total <= 400_000
