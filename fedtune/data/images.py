"""Images as fedtune reads them: decoded safely (bounded pixels, known formats); the dataset every source returns."""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

log = logging.getLogger("fedtune.data")


Split = Literal["train", "test"]
Transform = Callable[[Tensor], Any]
# What to do with an image file that cannot be decoded safely: stop, naming it, or leave it out.
BadImages = Literal["error", "skip"]


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


class ArrayImages:
    """Images held in memory as a uint8 array (N, H, W) or (N, C, H, W)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __call__(self, index: int) -> Tensor:
        image = torch.from_numpy(np.ascontiguousarray(self.array[index]))
        return image.unsqueeze(0) if image.ndim == 2 else image


class FileImages:
    """Image files decoded on access, as RGB."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, index: int) -> Tensor:
        return F.pil_to_tensor(read_image(self.paths[index]))


class TorchvisionImages:
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


