"""Data sources by name (offline digits, a node's image folder, torchvision sets): the registry and `load_split`."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from fedtune.data.images import (
    ArrayImages,
    BadImages,
    FileImages,
    ImageDataset,
    Split,
    TorchvisionImages,
    check_image_files,
)
from fedtune.registry import Registry

# ---------------------------------------------------------------------------------------------
# Source registry
# ---------------------------------------------------------------------------------------------

SourceLoader = Callable[..., ImageDataset]
SOURCES: Registry[SourceLoader] = Registry("data source")


# Sources that can fetch their data when data.download is true.
DOWNLOADING_SOURCES: set[str] = set()
# Checks of what follows the colon in "<source>:<argument>", for the sources that take one.
_ARGUMENT_CHECKS: dict[str, Callable[[str | None], object]] = {}
MAX_SOURCE_CHARS = 100


def register_source(
    name: str, *, downloads: bool = False, argument: Callable[[str | None], object] | None = None
) -> Callable[[SourceLoader], SourceLoader]:
    """File a loader under `name`; `argument` raises ValueError for an argument the source does not take."""

    def decorate(loader: SourceLoader) -> SourceLoader:
        SOURCES.add(name, loader)
        if downloads:
            DOWNLOADING_SOURCES.add(name)
        if argument is not None:
            _ARGUMENT_CHECKS[name] = argument
        return loader

    return decorate


def check_source(source: str) -> None:
    """Raise ValueError unless `source` names a registered source, with an argument it takes."""
    if len(source) > MAX_SOURCE_CHARS:
        raise ValueError(f"a data source of {len(source)} characters; known: {', '.join(sorted(SOURCES))}")
    name, _, argument = source.partition(":")
    if name not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known: {', '.join(sorted(SOURCES))}")
    check = _ARGUMENT_CHECKS.get(name, functools.partial(takes_no_argument, name))
    check(argument or None)


def load_split(
    source: str,
    split: Split,
    *,
    root: str | None,
    download: bool,
    seed: int,
    bad_images: BadImages = "error",
    decode_now: bool = False,
) -> ImageDataset:
    """One split of a source, without transform (items are uint8 CHW tensors).

    `source` is a registered name, optionally with an argument after a colon
    ("torchvision:CIFAR10"). `seed` is passed to the source; the built-in sources have fixed
    splits and do not use it (the server's held-out set must not change between runs).
    Image files are checked as check_image_files says; `decode_now` decodes each in full now
    rather than when first used, so that a corrupt one is found before anything starts.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    check_source(source)
    name, _, argument = source.partition(":")
    dataset = SOURCES[name](split, root=root, download=download, seed=seed, argument=argument or None)
    return _usable_images(dataset, bad_images=bad_images, decode=decode_now)


def _usable_images(dataset: ImageDataset, *, bad_images: BadImages, decode: bool) -> ImageDataset:
    """The dataset without the image files that cannot be used (or BadImageError, with "error")."""
    store = dataset._images
    if not isinstance(store, FileImages):
        return dataset  # pixels in memory, or decoded by a torchvision dataset when used
    paths, targets = check_image_files(store.paths, dataset.targets, bad_images=bad_images, decode=decode)
    if len(paths) == len(store.paths):
        return dataset
    if not paths:
        raise ValueError(f"none of the {len(store.paths)} images of {dataset.identity} can be used")
    # Other files, other pixels: feature caches keyed by the identity must not mistake one for the other.
    left_out = hashlib.sha256("\n".join(sorted(set(store.paths) - set(paths))).encode()).hexdigest()[:16]
    return ImageDataset(FileImages(paths), targets=targets, classes=dataset.classes,
                        identity=f"{dataset.identity}:without-{left_out}", transform=dataset.transform)


def takes_no_argument(name: str, argument: str | None) -> None:
    if argument is not None:
        raise ValueError(f"data source {name!r} takes no ':' argument (got {name}:{argument})")


# ---------------------------------------------------------------------------------------------
# digits: the offline default
# ---------------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed on purpose: the run seed must not move examples between train and test


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 intensities -> the 0..255 range every uint8 image pipeline expects
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    # canonical (original) order inside each split; shuffling is the loader's job
    train, test = np.sort(train), np.sort(test)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


@register_source("digits")
def load_digits_split(
    split: Split, *, root: str | None, download: bool, seed: int, argument: str | None = None
) -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits (ships with scikit-learn: no download, no root).

    Train 1,437 / test 360 images (1x8x8 uint8), 10 classes. The 80/20 stratified split uses a
    fixed random_state (0) and ignores `seed`, so every run evaluates on the same held-out images.
    """
    takes_no_argument("digits", argument)
    images, labels = _digits_arrays()[split]
    return ImageDataset(
        ArrayImages(images),
        targets=labels.tolist(),
        classes=[str(d) for d in range(10)],
        identity=f"digits:{split}:test{DIGITS_TEST_FRACTION}:rs{DIGITS_SPLIT_SEED}",
    )


# ---------------------------------------------------------------------------------------------
# imagefolder: a node's own data
# ---------------------------------------------------------------------------------------------


def _is_image_file(path: str) -> bool:
    # hidden files are skipped: macOS writes "._name.jpg" AppleDouble files that are not images
    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not os.path.basename(path).startswith(".")


def _class_folders(directory: Path) -> list[str]:
    # like torchvision's find_classes, but hidden folders (.ipynb_checkpoints, .git) are not classes
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _folder_split_dirs(root: Path) -> dict[str, Path] | None:
    """train/test(or val) folders when root is laid out by split, None when root is one split."""
    subfolders = {name.lower(): root / name for name in _class_folders(root)}
    if not {"train", "test", "val"} & subfolders.keys():
        return None
    dirs = {}
    if "train" in subfolders:
        dirs["train"] = subfolders["train"]
    # "test" wins over "val" when both exist: val is usually a tuning set, test the held-out one
    held_out = subfolders.get("test", subfolders.get("val"))
    if held_out is not None:
        dirs["test"] = held_out
    return dirs


def _scan_image_folder(directory: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classes) of an ImageFolder-layout folder, with errors a user can act on.

    `classes` fixes the label numbering (the test split must number classes as train does).
    """
    found = _class_folders(directory)
    if not found:
        raise FileNotFoundError(
            f"no class folders in {directory}: expected ImageFolder layout, one subfolder per class "
            f"(e.g. {directory}/cat/1.jpg, {directory}/dog/2.jpg)"
        )
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{directory} has class folders {unknown} that the train split lacks "
                f"(train classes: {classes}); labels would not match"
            )
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(str(directory), class_to_idx, is_valid_file=_is_image_file, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [name for name in found if counts[class_to_idx[name]] == 0]
    if empty:
        raise FileNotFoundError(
            f"class folder(s) {', '.join(str(directory / name) for name in empty)} hold no images "
            f"(looked for {', '.join(IMG_EXTENSIONS)})"
        )
    return [path for path, _ in samples], [label for _, label in samples], classes


def _listing_digest(paths: Sequence[str]) -> str:
    # names, sizes and modification times: cheap to read, and any edit changes one of them
    h = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        h.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def image_folder_split(root: Path, split: Split) -> tuple[list[str], list[int], list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (set data.root to a folder in ImageFolder layout)")
    dirs = _folder_split_dirs(root)
    if dirs is None:
        if split == "test":
            raise FileNotFoundError(
                f"{root} has no test/ or val/ subfolder, so it has no 'test' split; it is used whole "
                f"as the 'train' split (lay it out as {root}/train/<class>/ and {root}/test/<class>/ "
                f"to give it one)"
            )
        return _scan_image_folder(root)
    if "train" not in dirs:
        raise FileNotFoundError(f"{root} has a test/ or val/ folder but no train/ folder")
    if split == "train":
        return _scan_image_folder(dirs["train"])
    if "test" not in dirs:
        raise FileNotFoundError(f"{root} has train/ but no test/ or val/ folder for the 'test' split")
    # classes come from train so that label i means the same class in both splits
    return _scan_image_folder(dirs["test"], classes=_class_folders(dirs["train"]))


@register_source("imagefolder")
def load_image_folder(
    split: Split, *, root: str | None, download: bool, seed: int, argument: str | None = None
) -> ImageDataset:
    """Any ImageFolder-layout folder: `root/<class>/*.jpg`, or split as `root/train/<class>/...`
    plus `root/test/` (or `root/val/`). A folder without split subfolders is the 'train' split
    only, which is all a node's private data needs."""
    takes_no_argument("imagefolder", argument)
    if root is None:
        raise ValueError("the imagefolder source needs data.root: the folder holding the images")
    path = Path(root).expanduser().resolve()
    paths, labels, classes = image_folder_split(path, split)
    return ImageDataset(
        FileImages(paths),
        targets=labels,
        classes=classes,
        identity=f"imagefolder:{path}:{split}:{_listing_digest(paths)}",
    )


# ---------------------------------------------------------------------------------------------
# torchvision datasets
# ---------------------------------------------------------------------------------------------

_TORCHVISION_EXAMPLES = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "SVHN", "STL10", "EMNIST")


def _torchvision_targets(dataset: Any) -> list[int]:
    for attribute in ("targets", "labels", "_labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            # A tensor or array as a list first: iterating a tensor makes a tensor of each label,
            # which held 480 MiB at once for 800,000 labels (MNIST's targets are a tensor).
            return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    # no label attribute: read every item once (decodes every image, but only at load time)
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _torchvision_class(argument: str | None) -> type:
    """The class of torchvision.datasets that `torchvision:<argument>` names; ValueError if it names none."""
    import torchvision.datasets
    from torchvision.datasets import VisionDataset

    examples = ", ".join(_TORCHVISION_EXAMPLES)
    if argument is None:
        raise ValueError(f"name the dataset class: torchvision:<DatasetClass>, e.g. {examples}")
    # A class name, checked before it is looked up: nothing else of the module may be reached.
    cls = getattr(torchvision.datasets, argument, None) if re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,63}", argument) else None
    if not (inspect.isclass(cls) and issubclass(cls, VisionDataset) and cls is not VisionDataset):
        raise ValueError(f"unknown torchvision dataset {argument[:64]!r}; known ones include {examples} "
                         "(class names of torchvision.datasets, case-sensitive)")
    parameters = inspect.signature(cls).parameters
    if "train" not in parameters and "split" not in parameters:
        raise ValueError(f"torchvision dataset {argument} takes neither train= nor split=; use the imagefolder source")
    return cls


@register_source("torchvision", downloads=True, argument=_torchvision_class)
def load_torchvision(
    split: Split, *, root: str | None, download: bool, seed: int, argument: str | None = None
) -> ImageDataset:
    """`torchvision:<DatasetClass>`, e.g. torchvision:CIFAR10, built with train=(split == 'train')
    (or split='train'/'test' for classes such as SVHN that take a split name)."""
    cls = _torchvision_class(argument)
    split_argument: dict[str, Any] = (
        {"train": split == "train"} if "train" in inspect.signature(cls).parameters else {"split": split}
    )
    if root is None:
        raise ValueError(f"torchvision:{argument} needs data.root: the folder holding (or to download) the dataset")
    path = Path(root).expanduser().resolve()
    try:
        dataset = cls(str(path), download=download, **split_argument)
    except RuntimeError as error:
        if download:
            raise
        raise FileNotFoundError(
            f"torchvision dataset {argument} ({split}) not found or incomplete under {path}: set data.root to "
            f"a folder holding it, or set data.download: true on a connected machine (torchvision: {error})"
        ) from error
    targets = _torchvision_targets(dataset)
    classes = getattr(dataset, "classes", None) or [str(i) for i in range(max(targets, default=-1) + 1)]
    return ImageDataset(
        TorchvisionImages(dataset),
        targets=targets,
        classes=[str(c) for c in classes],
        identity=_torchvision_identity(f"torchvision:{argument}:{split}", path, dataset, targets),
    )


def _torchvision_identity(name: str, path: Path, dataset: Any, targets: list[int]) -> str:
    """What the set's frozen features are cached under: its name, folder, labels and, where the
    class keeps its images in one array (MNIST's, CIFAR's), their bytes. Two folders holding the
    same class's files, or a folder whose files changed, must not share cached features."""
    digest = hashlib.sha256(f"{name}\0{path}\0".encode())
    digest.update(np.asarray(targets, dtype="<i8").tobytes())
    data = getattr(dataset, "data", None)
    if isinstance(data, torch.Tensor):
        digest.update(data.contiguous().numpy().tobytes())
    elif isinstance(data, np.ndarray):
        digest.update(np.ascontiguousarray(data).tobytes())
    return f"{name}:{digest.hexdigest()[:16]}"


