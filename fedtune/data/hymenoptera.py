"""The ants/bees photographs (hymenoptera_data): found on disk or downloaded, and checked file by file."""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from fedtune.atomic import replace_atomically
from fedtune.data.images import FileImages, ImageDataset, Split
from fedtune.data.sources import image_folder_split, register_source, takes_no_argument

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

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(HYMENOPTERA_URL, timeout=60) as response, tmp.open("wb") as out:
            shutil.copyfileobj(response, out)

    try:
        replace_atomically(archive, fetch)  # an interrupted download leaves no archive to mistake for a whole one
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(
            f"could not download {HYMENOPTERA_URL}: {error}. Without network access, copy the "
            f"hymenoptera_data folder to this machine and set data.root to it"
        ) from error
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
    takes_no_argument("hymenoptera", argument)
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
    paths, labels, classes = image_folder_split(folder, split)
    return ImageDataset(
        FileImages(paths),
        targets=labels,
        classes=classes,
        # content is pinned by the checksum, so the identity does not depend on where it lives
        identity=f"hymenoptera:{HYMENOPTERA_TREE_SHA256[:16]}:{split}",
    )


