"""Data sources (offline digits, real photographs, torchvision sets, a node's image folder) and partitioners."""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
from torchvision.transforms.v2 import functional as F

from fedtune.registry import Registry

Split = Literal["train", "test"]
Transform = Callable[[Tensor], Any]
# What to do with an image file that cannot be decoded safely: stop, naming it, or leave it out.
BadImages = Literal["error", "skip"]

log = logging.getLogger("fedtune.data")

# PIL's own default bound (Image.MAX_IMAGE_PIXELS), kept here so that it holds whatever another
# library sets PIL's global to: 89.5 million pixels is about 9,460 x 9,460, and decoding it takes
# 268 MB as RGB. Every image is resized to a few hundred pixels a side anyway.
MAX_IMAGE_PIXELS = 89_478_485
# The only PIL decoders tried on a file (the ImageFolder extensions, plus GIF): a file of any other
# format, whatever its name, is not an image here.
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")


class BadImageError(ValueError):
    """An image that cannot be decoded safely; the message names the file (or item) and the problem."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"cannot use image {where}: {problem}")
        self.where = where
        self.problem = problem


class ImageStore(Protocol):
    """Where a dataset's pixels come from: image i as a uint8 tensor (C, H, W)."""

    def __len__(self) -> int: ...
    def __call__(self, index: int) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# The dataset type every source returns
# ---------------------------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[Any, int]]):
    """(image tensor, label) pairs; images are decoded lazily and passed through a transform.

    Without a transform an item is a uint8 tensor (C, H, W), C = 1 (grayscale) or 3 (RGB); set the
    backbone's preprocessing with `with_transform`. `identity` names the source, split and content
    version and is what `fingerprint` hashes, so it must change whenever the pixels could.
    """

    def __init__(
        self,
        images: ImageStore,
        *,
        targets: Sequence[int],
        classes: Sequence[str],
        identity: str,
        transform: Transform | None = None,
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self._images = images
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self.identity = identity
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image = self._images(index % len(self))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def with_transform(self, transform: Transform | None) -> ImageDataset:
        """The same items through another transform; shares the image store (no pixel copy)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

    def __repr__(self) -> str:
        return f"ImageDataset({self.identity!r}, {len(self)} images, {len(self.classes)} classes)"


# Image stores are small picklable classes (not closures) so datasets can cross process
# boundaries: DataLoader workers under spawn, and Ray actors in simulation.


class _ArrayImages:
    """Images held in memory as a uint8 array (N, H, W) or (N, C, H, W)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __call__(self, index: int) -> Tensor:
        image = torch.from_numpy(np.ascontiguousarray(self.array[index]))
        return image.unsqueeze(0) if image.ndim == 2 else image


class _FileImages:
    """Image files decoded on access, as RGB."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, index: int) -> Tensor:
        return F.pil_to_tensor(read_image(self.paths[index]))


class _TorchvisionImages:
    """Images of a torchvision dataset, its own transforms unset, as uint8 tensors."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, index: int) -> Tensor:
        try:
            image, _ = self.dataset[index]
            return _to_uint8_tensor(image)
        except Exception as error:  # noqa: BLE001 - whatever the dataset's own decoder raises on a bad file
            raise BadImageError(f"{index} of torchvision {type(self.dataset).__name__}", str(error)) from error


def _to_uint8_tensor(image: Any) -> Tensor:
    if isinstance(image, Tensor):
        return image if image.ndim == 3 else image.unsqueeze(0)
    # grayscale datasets (MNIST) stay one channel; the preprocessing makes three
    return F.pil_to_tensor(_eight_bit(image))


# ---------------------------------------------------------------------------------------------
# Decoding image files safely
# ---------------------------------------------------------------------------------------------


def _eight_bit(image: Image.Image) -> Image.Image:
    """The image as 8-bit 'L' (grey) or 'RGB'. 16-bit grey is scaled to 8 bits: convert() would
    clip every value above 255, and a 16-bit scan would come out all white."""
    if image.mode in ("L", "RGB"):
        return image
    # Pillow reads 16-bit grey PNGs as I;16 (older versions: I, which a PNG uses for nothing else).
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        pixels = np.asarray(image).astype(np.float32)
        return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8))  # 0..65535 -> 0..255
    if image.mode in ("I", "F"):
        raise ValueError(f"its pixels are 32-bit {'integers' if image.mode == 'I' else 'floats'}, which have no "
                         "standard 8-bit scale; convert it to 8 or 16 bits per channel")
    return image.convert("RGB")


def _open_image(path: str | Path) -> Image.Image:
    """The opened (not yet decoded) image; BadImageError unless it is a known format within MAX_IMAGE_PIXELS."""
    try:
        with warnings.catch_warnings():
            # PIL warns past its own bound (and refuses past twice that); ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise BadImageError(str(path), f"too large to decode safely ({error})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(str(path), f"not an image of a known format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as error:  # noqa: BLE001 - a hostile header can make a PIL plugin raise anything
        raise BadImageError(str(path), f"its header cannot be read ({type(error).__name__}: {error})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS or width < 1 or height < 1:
        image.close()
        raise BadImageError(str(path), f"{width}x{height} pixels; fedtune decodes images of 1 to "
                                       f"{MAX_IMAGE_PIXELS:,} pixels")
    return image


def read_image(path: str | Path) -> Image.Image:
    """An image file, fully decoded, as 8-bit RGB; BadImageError naming the file if that cannot be done safely."""
    with _open_image(path) as image:
        try:
            # convert() forces the full decode, so truncated files fail here, naming the file,
            # rather than deep inside a transform.
            return _eight_bit(image).convert("RGB")
        except Exception as error:  # noqa: BLE001 - corrupt data can make a decoder raise anything
            raise BadImageError(str(path), f"cannot be decoded ({type(error).__name__}: {error})") from None


@functools.lru_cache(maxsize=1 << 16)
def _image_problem(path: str, size: int, mtime_ns: int, *, decode: bool) -> str | None:
    """Why a file cannot be used (None if it can), remembered per file version: a simulation's
    server and clients, in one process, check the same files."""
    try:
        if decode:
            read_image(path)
        else:
            _open_image(path).close()
    except BadImageError as error:
        return error.problem
    return None


def check_image_files(
    paths: Sequence[str], labels: Sequence[int], *, bad_images: BadImages, decode: bool = False
) -> tuple[list[str], list[int]]:
    """The (paths, labels) whose images can be used: each file's header is read (format, size);
    with `decode` or bad_images="skip", each is decoded in full too (a truncated or corrupt file is
    found only so). A bad file raises BadImageError naming it, or with "skip" is left out with a warning."""
    kept_paths, kept_labels = [], []
    for path, label in zip(paths, labels, strict=True):
        stat = os.stat(path)
        problem = _image_problem(path, stat.st_size, stat.st_mtime_ns, decode=decode or bad_images == "skip")
        if problem is None:
            kept_paths.append(path)
            kept_labels.append(label)
        elif bad_images == "error":
            raise BadImageError(path, f"{problem} (set data.bad_images: skip to leave such files out)")
        else:
            log.warning("leaving out image %s: %s", path, problem)
    return kept_paths, kept_labels


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
    check = _ARGUMENT_CHECKS.get(name, functools.partial(_no_argument, name))
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
    if not isinstance(store, _FileImages):
        return dataset  # pixels in memory, or decoded by a torchvision dataset when used
    paths, targets = check_image_files(store.paths, dataset.targets, bad_images=bad_images, decode=decode)
    if len(paths) == len(store.paths):
        return dataset
    if not paths:
        raise ValueError(f"none of the {len(store.paths)} images of {dataset.identity} can be used")
    # Other files, other pixels: feature caches keyed by the identity must not mistake one for the other.
    left_out = hashlib.sha256("\n".join(sorted(set(store.paths) - set(paths))).encode()).hexdigest()[:16]
    return ImageDataset(_FileImages(paths), targets=targets, classes=dataset.classes,
                        identity=f"{dataset.identity}:without-{left_out}", transform=dataset.transform)


def _no_argument(name: str, argument: str | None) -> None:
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
    _no_argument("digits", argument)
    images, labels = _digits_arrays()[split]
    return ImageDataset(
        _ArrayImages(images),
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


def _image_folder_split(root: Path, split: Split) -> tuple[list[str], list[int], list[str]]:
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
    _no_argument("imagefolder", argument)
    if root is None:
        raise ValueError("the imagefolder source needs data.root: the folder holding the images")
    path = Path(root).expanduser().resolve()
    paths, labels, classes = _image_folder_split(path, split)
    return ImageDataset(
        _FileImages(paths),
        targets=labels,
        classes=classes,
        identity=f"imagefolder:{path}:{split}:{_listing_digest(paths)}",
    )


# ---------------------------------------------------------------------------------------------
# hymenoptera: real photographs (ants vs bees)
# ---------------------------------------------------------------------------------------------

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
HYMENOPTERA_FOLDER = "hymenoptera_data"
# sha256 over the sorted lines f"{relative posix path}\t{sha256 of the file}\n" of every file in the
# unpacked folder (398 files). The zip's own hash cannot be pinned without network access, and the
# unpacked tree is what is used anyway; see _tree_digest.
HYMENOPTERA_TREE_SHA256 = "de482aeb9aa7e451514763b89460f2f6de607558d0b3b6c7490a6ae5b243ce8d"
HYMENOPTERA_FILES = 398


def _tree_digest(folder: Path) -> tuple[str, int]:
    """(sha256 of the sorted per-file lines, number of files) of every file under folder."""
    lines = []
    for path in folder.rglob("*"):
        if path.is_file():
            file_hash = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    file_hash.update(block)
            lines.append(f"{path.relative_to(folder).as_posix()}\t{file_hash.hexdigest()}\n")
    lines.sort()
    return hashlib.sha256("".join(lines).encode()).hexdigest(), len(lines)


@functools.cache
def _verify_hymenoptera(folder: str) -> None:
    """Raise unless folder holds exactly the official files; a success is remembered per process
    (hashing 46 MB takes a few tenths of a second, and every client of a simulation loads it)."""
    digest, count = _tree_digest(Path(folder))
    if digest != HYMENOPTERA_TREE_SHA256:
        raise ValueError(
            f"the contents of {folder} differ from the official hymenoptera_data set "
            f"({count} files found, {HYMENOPTERA_FILES} expected; tree sha256 {digest[:16]}... instead of "
            f"{HYMENOPTERA_TREE_SHA256[:16]}...): a file was changed, added or removed. Point data.root at "
            f"an unmodified copy, or delete it and set data.download: true on a connected machine"
        )


def _find_hymenoptera(root: Path) -> Path | None:
    # root may be the data folder itself or the folder that contains it
    for candidate in (root, root / HYMENOPTERA_FOLDER):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    return None


def _safe_extract(archive: zipfile.ZipFile, target: Path) -> None:
    target = target.resolve()
    for member in archive.namelist():
        if not (target / member).resolve().is_relative_to(target):
            raise ValueError(f"refusing to extract {member!r}: it points outside {target}")
    archive.extractall(target)


def _download_hymenoptera(root: Path) -> Path:
    """Download, unpack and verify the official zip into root; return the data folder."""
    destination = root / HYMENOPTERA_FOLDER
    if destination.exists():
        raise FileExistsError(
            f"{destination} exists but is not a complete copy (no train/ and val/); remove it and retry"
        )
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "hymenoptera_data.zip"
    partial = root / "hymenoptera_data.zip.part"
    try:
        with urllib.request.urlopen(HYMENOPTERA_URL, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {HYMENOPTERA_URL}: {error}. Without network access, copy the "
            f"hymenoptera_data folder to this machine and set data.root to it"
        ) from error
    partial.replace(archive)
    # unpack beside the destination and move into place only once verified, so an interrupted or
    # tampered download never leaves a folder that a later run would mistake for the data
    staging = Path(tempfile.mkdtemp(prefix=".hymenoptera-", dir=root))
    try:
        with zipfile.ZipFile(archive) as zipped:
            _safe_extract(zipped, staging)
        unpacked = _find_hymenoptera(staging)
        if unpacked is None:
            raise ValueError(f"{HYMENOPTERA_URL} did not unpack to a folder with train/ and val/")
        _verify_hymenoptera(str(unpacked))
        unpacked.replace(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return destination


@register_source("hymenoptera", downloads=True)
def load_hymenoptera(
    split: Split, *, root: str | None, download: bool, seed: int, argument: str | None = None
) -> ImageDataset:
    """PyTorch's transfer-learning tutorial photos: ants vs bees, train/ and val/ ('test').

    Train 244 / test 153 images: the folder holds 398 files, but train/ants/imageNotFound.gif is a
    "we're sorry, this image could not be found" placeholder, and .gif is not an ImageFolder
    extension, so, as in the tutorial, it is not an example. The tree is verified in full.
    """
    _no_argument("hymenoptera", argument)
    options = (
        "set data.root to a local copy of hymenoptera_data (or the folder containing it), or set "
        f"data.download: true on a connected machine to fetch {HYMENOPTERA_URL} into data.root"
    )
    if root is None:
        if download:
            raise ValueError("data.download: true needs data.root, the folder to download hymenoptera_data into")
        raise FileNotFoundError(f"the hymenoptera source needs its data: {options}")
    base = Path(root).expanduser().resolve()
    folder = _find_hymenoptera(base)
    if folder is None:
        if not download:
            raise FileNotFoundError(f"no hymenoptera_data (train/ and val/) at {base}: {options}")
        folder = _download_hymenoptera(base)
    _verify_hymenoptera(str(folder))
    paths, labels, classes = _image_folder_split(folder, split)
    return ImageDataset(
        _FileImages(paths),
        targets=labels,
        classes=classes,
        # content is pinned by the checksum, so the identity does not depend on where it lives
        identity=f"hymenoptera:{HYMENOPTERA_TREE_SHA256[:16]}:{split}",
    )


# ---------------------------------------------------------------------------------------------
# torchvision datasets
# ---------------------------------------------------------------------------------------------

_TORCHVISION_EXAMPLES = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "SVHN", "STL10", "EMNIST")


def _torchvision_targets(dataset: Any) -> list[int]:
    for attribute in ("targets", "labels", "_labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return [int(v) for v in values]
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
        _TorchvisionImages(dataset),
        targets=targets,
        classes=[str(c) for c in classes],
        identity=f"torchvision:{argument}:{split}",
    )


# ---------------------------------------------------------------------------------------------
# Partitioners and the local validation split
# ---------------------------------------------------------------------------------------------

DIRICHLET_ATTEMPTS = 2_000


def partition(
    labels: Sequence[int],
    *,
    scheme: Literal["iid", "dirichlet", "shards"],
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_examples: int = 1,
) -> list[list[int]]:
    """Split indices 0..len(labels)-1 into num_partitions disjoint, covering, sorted lists.

    Deterministic for (labels, scheme, num_partitions, seed, params). Every partition ends with at
    least min_examples indices, or a ValueError says which settings cannot give that.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if num_partitions < 1 or num_partitions > n:
        raise ValueError(f"num_partitions must be between 1 and the number of examples ({n}), got {num_partitions}")
    if min_examples < 1:
        raise ValueError(f"min_examples must be at least 1, got {min_examples}")
    if num_partitions * min_examples > n:
        raise ValueError(
            f"{num_partitions} partitions of at least {min_examples} examples need "
            f"{num_partitions * min_examples} examples; there are {n}"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_partitions, rng, alpha=alpha, min_examples=min_examples)
    elif scheme == "shards":
        parts = _shards(y, num_partitions, rng, shards_per_partition=shards_per_partition)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: dirichlet, iid, shards")
    smallest = min(len(p) for p in parts)
    if smallest < min_examples:
        raise ValueError(
            f"{scheme} partitioning of {n} examples into {num_partitions} partitions gives one only "
            f"{smallest} examples, fewer than min_examples={min_examples}"
        )
    return [sorted(int(i) for i in p) for p in parts]


def _dirichlet(
    y: np.ndarray, num_partitions: int, rng: np.random.Generator, *, alpha: float, min_examples: int
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    class_sizes = np.array([len(members) for members in by_class])
    for _ in range(DIRICHLET_ATTEMPTS):
        # only the (class x partition) counts are drawn per attempt; examples are dealt out once a
        # draw passes, so even thousands of rejected draws cost milliseconds
        proportions = rng.dirichlet(np.full(num_partitions, alpha), size=len(by_class))
        bounds = (np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        bounds[:, -1] = class_sizes  # float rounding must not drop the last examples of a class
        counts = np.diff(bounds, axis=1, prepend=0)
        if counts.sum(axis=0).min() < min_examples:
            continue
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members, cuts in zip(by_class, bounds, strict=True):
            for k, chunk in enumerate(np.split(rng.permutation(members), cuts[:-1])):
                parts[k].append(chunk)
        return [np.concatenate(chunks) for chunks in parts]
    raise ValueError(
        f"dirichlet partitioning is infeasible: in {DIRICHLET_ATTEMPTS} draws with alpha={alpha}, no split of "
        f"{len(y)} examples gave all {num_partitions} partitions at least min_examples={min_examples}; "
        f"raise alpha, or lower num_partitions or min_examples"
    )


def _shards(
    y: np.ndarray, num_partitions: int, rng: np.random.Generator, *, shards_per_partition: int
) -> list[np.ndarray]:
    num_shards = num_partitions * shards_per_partition
    if shards_per_partition < 1:
        raise ValueError(f"shards_per_partition must be at least 1, got {shards_per_partition}")
    if num_shards > len(y):
        raise ValueError(
            f"{num_partitions} partitions x {shards_per_partition} shards = {num_shards} shards, "
            f"more than the {len(y)} examples"
        )
    # shuffle, then stable-sort by label: shards are label-pure runs, but which examples of a
    # label land in which shard still depends on the seed
    shuffled = rng.permutation(len(y))
    ordered = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(ordered, num_shards)
    owners = rng.permutation(num_shards).reshape(num_partitions, shards_per_partition)
    return [np.concatenate([shards[s] for s in row]) for row in owners]


def split_validation(
    indices: Sequence[int], labels: Sequence[int], *, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, validation) subsets of indices; `labels` are the whole dataset's, indexed by them.

    ceil(fraction * n) examples go to validation, but at least one stays for training. Stratified
    when every class present has at least two examples (and there is room for one of each class
    on both sides), plain random otherwise. Both lists are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    chosen = np.asarray(indices, dtype=np.int64)
    n = len(chosen)
    if n and (chosen.min() < 0 or chosen.max() >= len(labels)):
        raise ValueError(f"indices must lie in [0, {len(labels)}) (labels are the whole dataset's, indexed by them)")
    n_val = min(math.ceil(fraction * n), n - 1) if n else 0
    if n_val <= 0:
        return sorted(int(i) for i in chosen), []
    y = np.asarray(labels, dtype=np.int64)[chosen]
    rng = np.random.default_rng(seed)
    _, counts = np.unique(y, return_counts=True)
    if counts.min() >= 2 and len(counts) <= n_val <= n - len(counts):
        from sklearn.model_selection import train_test_split

        train, val = train_test_split(
            chosen, test_size=n_val, stratify=y, random_state=int(rng.integers(2**31 - 1))
        )
    else:
        order = rng.permutation(chosen)
        val, train = order[:n_val], order[n_val:]
    return sorted(int(i) for i in train), sorted(int(i) for i in val)


def fingerprint(dataset: ImageDataset, indices: Sequence[int]) -> str:
    """Stable short hash of (dataset identity, indices in order), to key feature caches.

    Covers the pixels only: a cache of model outputs must add the backbone, weights and
    preprocessing to its key.
    """
    h = hashlib.sha256(dataset.identity.encode())
    h.update(b"\0")
    h.update(np.asarray(indices, dtype="<i8").tobytes())
    return h.hexdigest()[:16]
