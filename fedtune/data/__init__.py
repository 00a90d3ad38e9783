"""Data: images read safely (`images`), sources by name (`sources`, `hymenoptera`), partitioners (`partitions`).

`load_split(source, split, ...)` is what a server or a client asks for; `partition` and
`split_validation` decide which examples each client holds.
"""

from fedtune.data import hymenoptera  # noqa: F401 - registers the hymenoptera source
from fedtune.data.images import (
    MAX_IMAGE_PIXELS,
    BadImageError,
    BadImages,
    ImageDataset,
    Split,
    check_image_files,
    read_image,
)
from fedtune.data.partitions import fingerprint, partition, split_validation
from fedtune.data.sources import DOWNLOADING_SOURCES, SOURCES, check_source, load_split

__all__ = [
    "DOWNLOADING_SOURCES", "MAX_IMAGE_PIXELS", "SOURCES", "BadImageError", "BadImages", "ImageDataset", "Split",
    "check_image_files", "check_source", "fingerprint", "load_split", "partition", "read_image", "split_validation",
]
