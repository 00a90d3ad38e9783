"""Data sources and partitioners: offline, seeded, CPU only."""

from __future__ import annotations

import io
import logging
import math
import shutil
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import write_bomb_png, write_gray16_png, write_image_folder, write_truncated_png
from PIL import Image

from fedtune.data import (
    SOURCES,
    BadImageError,
    ImageDataset,
    check_source,
    fingerprint,
    hymenoptera,
    load_split,
    partition,
    read_image,
    split_validation,
)
from fedtune.preprocessing import Preprocessing

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared/data/hymenoptera_data"
needs_hymenoptera = pytest.mark.skipif(
    not HYMENOPTERA.is_dir(), reason=f"local copy of hymenoptera_data not found at {HYMENOPTERA}"
)
SMALL = Preprocessing(crop_size=32, resize_size=36, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def digits(split: str, seed: int = 0) -> ImageDataset:
    return load_split("digits", split, root=None, download=False, seed=seed)  # type: ignore[arg-type]


def entropy(labels: list[int]) -> float:
    counts = np.bincount(labels) / len(labels)
    counts = counts[counts > 0]
    return float(-(counts * np.log(counts)).sum())


# --- registry ---------------------------------------------------------------------------------


def test_sources_registry_names_and_unknown_source() -> None:
    assert set(SOURCES) == {"digits", "hymenoptera", "imagefolder", "torchvision"}
    with pytest.raises(ValueError, match="unknown data source 'mnist'.*digits"):
        load_split("mnist", "train", root=None, download=False, seed=0)
    with pytest.raises(ValueError, match="split must be"):
        load_split("digits", "val", root=None, download=False, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes no ':' argument"):
        load_split("digits:extra", "train", root=None, download=False, seed=0)


# --- digits -----------------------------------------------------------------------------------


def test_digits_shapes_labels_and_split_sizes() -> None:
    train, test = digits("train"), digits("test")

    assert (len(train), len(test)) == (1437, 360)
    assert train.classes == test.classes == [str(d) for d in range(10)]
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8
    assert isinstance(label, int) and label == train.targets[0]
    pixels = torch.stack([train[i][0] for i in range(len(train))])
    assert pixels.min() == 0 and pixels.max() == 255  # 0..16 scaled to the full uint8 range
    # stratified: every class keeps about 20% of its examples in test
    for c in range(10):
        in_test, total = test.targets.count(c), train.targets.count(c) + test.targets.count(c)
        assert abs(in_test - 0.2 * total) <= 1


def test_digits_split_does_not_depend_on_run_seed() -> None:
    a, b = digits("test", seed=0), digits("test", seed=12345)

    assert a.targets == b.targets
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert fingerprint(a, range(len(a))) == fingerprint(b, range(len(b)))


def test_with_transform_applies_preprocessing_without_touching_the_original() -> None:
    train = digits("train")

    ready = train.with_transform(SMALL.transform())
    image, label = ready[3]

    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == train.targets[3]
    assert train[3][0].dtype == torch.uint8  # the source dataset keeps its identity transform
    assert ready.targets is train.targets  # items shared, not copied
    with pytest.raises(IndexError):
        train[len(train)]


# --- hymenoptera ------------------------------------------------------------------------------


@needs_hymenoptera
@pytest.mark.parametrize("root", [HYMENOPTERA, HYMENOPTERA.parent], ids=["data-folder", "parent-folder"])
def test_hymenoptera_from_local_copy(root: Path) -> None:
    train = load_split("hymenoptera", "train", root=str(root), download=False, seed=0)
    test = load_split("hymenoptera", "test", root=str(root), download=False, seed=0)

    # 398 files, but train/ants/imageNotFound.gif is a placeholder and not an ImageFolder image
    assert (len(train), len(test)) == (244, 153)
    assert train.classes == test.classes == ["ants", "bees"]
    assert Counter(train.targets) == {0: 123, 1: 121}
    assert Counter(test.targets) == {0: 70, 1: 83}
    image, _ = test[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) > 100
    assert train.with_transform(SMALL.transform(augment=True))[0][0].shape == (3, 32, 32)


@needs_hymenoptera
def test_hymenoptera_checksum_matches_local_copy() -> None:
    digest, count = hymenoptera._tree_digest(HYMENOPTERA)

    assert (digest, count) == (hymenoptera.HYMENOPTERA_TREE_SHA256, hymenoptera.HYMENOPTERA_FILES)


@needs_hymenoptera
@pytest.mark.parametrize("change", ["altered", "removed", "added"])
def test_hymenoptera_modified_copy_fails_verification(tmp_path: Path, change: str) -> None:
    copy = tmp_path / "hymenoptera_data"
    shutil.copytree(HYMENOPTERA, copy)
    victim = next(iter(sorted((copy / "val" / "bees").iterdir())))
    if change == "altered":
        raw = bytearray(victim.read_bytes())
        raw[-10] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif change == "removed":
        victim.unlink()
    else:
        (copy / "train" / "ants" / "extra.jpg").write_bytes(victim.read_bytes())

    with pytest.raises(ValueError, match="differ from the official hymenoptera_data set"):
        load_split("hymenoptera", "train", root=str(copy), download=False, seed=0)


def test_hymenoptera_missing_without_download_explains_both_options(tmp_path: Path) -> None:
    for root in (str(tmp_path / "nowhere"), None):
        with pytest.raises(FileNotFoundError, match=r"data\.root.*data\.download: true"):
            load_split("hymenoptera", "train", root=root, download=False, seed=0)


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


def _zip_of(folder: Path, tamper: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                content = path.read_bytes()
                if tamper and path.name == "imageNotFound.gif":
                    content += b"x"
                archive.writestr(f"hymenoptera_data/{path.relative_to(folder).as_posix()}", content)
    return buffer.getvalue()


@needs_hymenoptera
def test_hymenoptera_download_unpacks_verifies_and_removes_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested = _serve(monkeypatch, _zip_of(HYMENOPTERA))

    test = load_split("hymenoptera", "test", root=str(tmp_path / "cache"), download=True, seed=0)

    assert requested == [hymenoptera.HYMENOPTERA_URL]
    assert len(test) == 153
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["hymenoptera_data"]  # zip and staging gone
    # a second load finds the unpacked copy and does not download again
    load_split("hymenoptera", "train", root=str(tmp_path / "cache"), download=True, seed=0)
    assert len(requested) == 1


@needs_hymenoptera
def test_hymenoptera_tampered_download_is_rejected_and_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, _zip_of(HYMENOPTERA, tamper=True))

    with pytest.raises(ValueError, match="differ from the official"):
        load_split("hymenoptera", "train", root=str(tmp_path), download=True, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_hymenoptera_download_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)

    with pytest.raises(ConnectionError, match="could not download.*set data.root"):
        load_split("hymenoptera", "train", root=str(tmp_path), download=True, seed=0)
    assert list(tmp_path.iterdir()) == []


# --- imagefolder ------------------------------------------------------------------------------


def _image(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size + 4), (value, 255 - value, 7)).save(path)


def _folder(root: Path, layout: dict[str, int]) -> None:
    for class_name, count in layout.items():
        for i in range(count):
            _image(root / class_name / f"{i}.png", 20 * i)


def test_imagefolder_flat_folder_is_train_only(tmp_path: Path) -> None:
    _folder(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / "cat" / "._0.png").write_bytes(b"AppleDouble")  # macOS metadata, not an image
    (tmp_path / ".ipynb_checkpoints").mkdir()

    train = load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0)

    assert train.classes == ["cat", "dog"] and train.targets == [0, 0, 0, 1, 1]
    image, label = train[4]
    assert image.shape == (3, 16, 12) and image.dtype == torch.uint8 and label == 1
    with pytest.raises(FileNotFoundError, match="no test/ or val/ subfolder"):
        load_split("imagefolder", "test", root=str(tmp_path), download=False, seed=0)


def test_imagefolder_split_layout_numbers_test_classes_like_train(tmp_path: Path) -> None:
    _folder(tmp_path / "train", {"a": 1, "b": 2, "c": 1})
    _folder(tmp_path / "val", {"c": 2})  # test holds only the last class

    test = load_split("imagefolder", "test", root=str(tmp_path), download=False, seed=0)

    assert test.classes == ["a", "b", "c"] and test.targets == [2, 2]


def test_imagefolder_identity_changes_with_contents(tmp_path: Path) -> None:
    _folder(tmp_path, {"x": 2, "y": 2})
    before = load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0)
    _image(tmp_path / "y" / "1.png", 99, size=20)

    after = load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0)

    assert fingerprint(before, [0, 1, 2, 3]) != fingerprint(after, [0, 1, 2, 3])


def test_imagefolder_errors_are_clear(tmp_path: Path) -> None:
    def load(root: Path, split: str = "train") -> ImageDataset:
        return load_split("imagefolder", split, root=str(root), download=False, seed=0)  # type: ignore[arg-type]

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing")

    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "loose.png", 1)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        load(tmp_path / "flat")

    _folder(tmp_path / "sparse", {"full": 2})
    (tmp_path / "sparse" / "empty").mkdir()
    (tmp_path / "sparse" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"sparse/empty hold no images"):
        load(tmp_path / "sparse")

    _folder(tmp_path / "mismatch" / "train", {"a": 1})
    _folder(tmp_path / "mismatch" / "test", {"a": 1, "zebra": 1})
    with pytest.raises(ValueError, match="zebra"):
        load(tmp_path / "mismatch", "test")

    with pytest.raises(ValueError, match="needs data.root"):
        load_split("imagefolder", "train", root=None, download=False, seed=0)


def test_imagefolder_undecodable_header_names_the_file(tmp_path: Path) -> None:
    _folder(tmp_path, {"ok": 2})
    broken = tmp_path / "bad" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG body")

    with pytest.raises(BadImageError, match=r"cannot use image .*bad/broken\.jpg: its header cannot be read.*"
                                            r"data\.bad_images: skip"):
        load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0)


def test_bad_images_stop_the_load_or_are_skipped_with_a_warning_naming_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    write_image_folder(tmp_path / "test", {"cat": 2, "dog": 2})
    clean = load_split("imagefolder", "test", root=str(tmp_path), download=False, seed=0)
    bomb = write_bomb_png(tmp_path / "test" / "cat" / "huge.png")
    truncated = write_truncated_png(tmp_path / "test" / "dog" / "cut.png")
    text = tmp_path / "test" / "dog" / "notes.png"
    text.write_text("a text file with an image's name")

    with pytest.raises(BadImageError, match=rf"{bomb}: too large to decode safely"):
        load_split("imagefolder", "test", root=str(tmp_path), download=False, seed=0)

    with caplog.at_level(logging.WARNING, logger="fedtune.data"):
        test = load_split("imagefolder", "test", root=str(tmp_path), download=False, seed=0, bad_images="skip")
    assert test.targets == clean.targets == [0, 0, 1, 1]
    assert [image.shape for image, _ in test] == [(3, 16, 12)] * 4
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"leaving out image {bomb}: too large" in warnings
    assert f"leaving out image {truncated}: cannot be decoded" in warnings
    assert f"leaving out image {text}: not an image" in warnings
    # Without the left-out files the pixels are those of another dataset: caches must not mix them up.
    assert test.identity != clean.identity and fingerprint(test, [0, 1]) != fingerprint(clean, [0, 1])


def test_a_truncated_image_is_found_when_decoded_and_named(tmp_path: Path) -> None:
    """Its header is intact, so the cheap check at load passes it; decoding it names it, and the
    check that decodes everything up front (decode_now, as `fedtune check` does) finds it at once."""
    write_image_folder(tmp_path, {"a": 2})
    truncated = write_truncated_png(tmp_path / "a" / "z-cut.png")
    dataset = load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0)

    assert dataset[0][0].shape == (3, 16, 12)  # the good images still load
    with pytest.raises(BadImageError, match=rf"{truncated}: cannot be decoded"):
        dataset[2]
    with pytest.raises(BadImageError, match=rf"{truncated}: cannot be decoded"):
        load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0, decode_now=True)


def test_fedtunes_own_pixel_bound_holds_below_pils_refusal(tmp_path: Path) -> None:
    # 100 million pixels: PIL only warns (it refuses past twice its bound); fedtune refuses.
    big = tmp_path / "big.png"
    Image.new("1", (10_000, 10_000)).save(big)
    with pytest.raises(BadImageError, match=r"10000x10000 pixels; fedtune decodes images of 1 to 89,478,485"):
        read_image(big)


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white(tmp_path: Path) -> None:
    ramp = write_gray16_png(tmp_path / "scans" / "ramp.png")
    expected = np.rint(ramp / 257.0).astype(np.uint8)

    rgb = np.asarray(read_image(tmp_path / "scans" / "ramp.png"))
    image, _ = load_split("imagefolder", "train", root=str(tmp_path), download=False, seed=0)[0]

    assert rgb.shape == (8, 32, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert expected[0, 0] == 0 and expected[0, -1] == 255 and 120 <= expected[0, 15] <= 135
    assert np.array_equal(image[0].numpy(), expected)


def test_32_bit_float_pixels_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "depth.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(path)
    with pytest.raises(BadImageError, match=r"depth\.tif: cannot be decoded.*32-bit floats"):
        read_image(path)


# --- torchvision ------------------------------------------------------------------------------


def test_torchvision_unknown_class_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown torchvision dataset 'CIFAR11'.*CIFAR10.*MNIST"):
        load_split("torchvision:CIFAR11", "train", root="/tmp", download=False, seed=0)
    with pytest.raises(ValueError, match="torchvision:<DatasetClass>"):
        load_split("torchvision", "train", root="/tmp", download=False, seed=0)
    # Only a class name is looked up in torchvision.datasets, and the message stays short.
    for argument in ("__builtins__", "VisionDataset", "ImageFolder", "x" * 90):
        with pytest.raises(ValueError, match=r"unknown torchvision dataset|takes neither|characters") as error:
            check_source(f"torchvision:{argument}")
        assert len(str(error.value)) < 300
    check_source("torchvision:CIFAR10")


def test_torchvision_missing_data_without_download_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 \(test\) not found.*data\.download: true"):
        load_split("torchvision:CIFAR10", "test", root=str(tmp_path), download=False, seed=0)
    assert list(tmp_path.iterdir()) == []  # nothing was fetched


# --- partitioners -----------------------------------------------------------------------------

LABELS = digits("train").targets
SCHEMES = ["iid", "dirichlet", "shards"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_covers_every_index_exactly_once(scheme: str) -> None:
    parts = partition(LABELS, scheme=scheme, num_partitions=7, seed=3)  # type: ignore[arg-type]

    assert len(parts) == 7 and all(parts)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(LABELS)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_deterministic_by_seed(scheme: str) -> None:
    first = partition(LABELS, scheme=scheme, num_partitions=5, seed=11)  # type: ignore[arg-type]

    assert partition(LABELS, scheme=scheme, num_partitions=5, seed=11) == first  # type: ignore[arg-type]
    assert partition(LABELS, scheme=scheme, num_partitions=5, seed=12) != first  # type: ignore[arg-type]


def test_iid_sizes_differ_by_at_most_one_and_mix_labels() -> None:
    parts = partition(LABELS, scheme="iid", num_partitions=10, seed=0)

    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert min(entropy([LABELS[i] for i in p]) for p in parts) > 0.9 * math.log(10)


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_not() -> None:
    def mean_entropy(alpha: float) -> float:
        parts = partition(LABELS, scheme="dirichlet", num_partitions=10, seed=0, alpha=alpha)
        return float(np.mean([entropy([LABELS[i] for i in p]) for p in parts]))

    # log(10) = 2.30 is a perfectly balanced partition
    assert mean_entropy(0.1) < 1.4
    assert mean_entropy(100.0) > 2.2


def test_dirichlet_respects_min_examples() -> None:
    for seed in range(5):
        parts = partition(LABELS, scheme="dirichlet", num_partitions=40, seed=seed, alpha=0.1, min_examples=5)
        assert min(len(p) for p in parts) >= 5


def test_dirichlet_infeasible_settings_raise_with_the_settings() -> None:
    with pytest.raises(ValueError, match=r"alpha=0\.01.*10 partitions.*min_examples=2"):
        partition(list(range(20)), scheme="dirichlet", num_partitions=10, seed=0, alpha=0.01, min_examples=2)
    with pytest.raises(ValueError, match="need 30 examples; there are 20"):
        partition([0] * 20, scheme="dirichlet", num_partitions=10, seed=0, min_examples=3)


def test_shards_give_at_most_shards_per_partition_labels() -> None:
    labels = [c for c in range(10) for _ in range(100)]  # shard size 50 divides every class

    parts = partition(labels, scheme="shards", num_partitions=10, seed=0, shards_per_partition=2)

    assert all(len({labels[i] for i in p}) <= 2 for p in parts)
    # which shards a partition gets is drawn, not neighbouring labels handed out in order
    reseeded = partition(labels, scheme="shards", num_partitions=10, seed=1, shards_per_partition=2)
    assert {frozenset(labels[i] for i in p) for p in parts} != {frozenset(labels[i] for i in p) for p in reseeded}
    assert [len(p) for p in parts] == [100] * 10
    # on the uneven digits classes a shard can straddle two labels, but partitions stay narrow
    digits_parts = partition(LABELS, scheme="shards", num_partitions=10, seed=0, shards_per_partition=2)
    assert max(len({LABELS[i] for i in p}) for p in digits_parts) <= 4


def test_partition_argument_errors_name_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"between 1 and the number of examples \(3\), got 4"):
        partition([0, 1, 0], scheme="iid", num_partitions=4, seed=0)
    with pytest.raises(ValueError, match="got 0"):
        partition([0, 1, 0], scheme="iid", num_partitions=0, seed=0)
    with pytest.raises(ValueError, match=r"3 partitions x 2 shards = 6 shards, more than the 5 examples"):
        partition([0, 1, 2, 3, 4], scheme="shards", num_partitions=3, seed=0)
    with pytest.raises(ValueError, match="unknown partition scheme 'pathological'"):
        partition([0, 1], scheme="pathological", num_partitions=1, seed=0)  # type: ignore[arg-type]


# --- local validation split -------------------------------------------------------------------


def test_split_validation_is_stratified_disjoint_and_seeded() -> None:
    indices = partition(LABELS, scheme="iid", num_partitions=4, seed=0)[1]

    train, val = split_validation(indices, LABELS, fraction=0.2, seed=5)

    assert sorted(train + val) == sorted(indices) and not set(train) & set(val)
    assert len(val) == math.ceil(0.2 * len(indices))
    per_class = Counter(LABELS[i] for i in indices)
    val_class = Counter(LABELS[i] for i in val)
    assert all(abs(val_class[c] - 0.2 * per_class[c]) <= 1 for c in per_class)
    assert split_validation(indices, LABELS, fraction=0.2, seed=5) == (train, val)
    assert split_validation(indices, LABELS, fraction=0.2, seed=6) != (train, val)


def test_split_validation_edge_cases() -> None:
    labels = [0, 0, 1, 2, 2, 2]
    assert split_validation([5, 1, 3], labels, fraction=0.0, seed=0) == ([1, 3, 5], [])
    # one example: it stays for training
    assert split_validation([4], labels, fraction=0.5, seed=0) == ([4], [])
    # class 1 has a single example: falls back to a plain random split of the right size
    train, val = split_validation(range(6), labels, fraction=0.5, seed=0)
    assert len(val) == 3 and len(train) == 3 and sorted(train + val) == list(range(6))
    # a large fraction still leaves one training example
    train, val = split_validation([0, 1], labels, fraction=0.99, seed=0)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="indices must lie in"):
        split_validation([0, 9], labels, fraction=0.2, seed=0)


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_depends_on_identity_and_indices_only() -> None:
    train, test = digits("train"), digits("test")

    key = fingerprint(train, [0, 5, 9])

    assert len(key) == 16 and int(key, 16) >= 0
    assert fingerprint(digits("train", seed=99), [0, 5, 9]) == key
    assert fingerprint(train.with_transform(SMALL.transform()), [0, 5, 9]) == key
    assert fingerprint(train, [0, 5, 10]) != key
    assert fingerprint(train, [5, 0, 9]) != key  # cached features are stored in index order
    assert fingerprint(test, [0, 5, 9]) != key


def test_two_folders_of_one_torchvision_class_never_share_cached_features(tmp_path: Path) -> None:
    from mnist_format import write_digits_as_mnist

    def mnist(folder: Path) -> ImageDataset:
        return load_split("torchvision:MNIST", "train", root=str(folder), download=False, seed=0)

    first = mnist(write_digits_as_mnist(tmp_path / "a", train=50, test=5))
    again = mnist(tmp_path / "a")
    other = mnist(write_digits_as_mnist(tmp_path / "b", train=50, test=5, seed=1))
    assert first.identity == again.identity
    assert first.identity != other.identity and first.identity.startswith("torchvision:MNIST:train:")
    # Files changed in place are another data set too.
    write_digits_as_mnist(tmp_path / "a", train=50, test=5, seed=2)
    changed = mnist(tmp_path / "a")
    assert changed.identity not in (first.identity, other.identity)
